package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/timestamppb"

	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
)

// bigRepo is a GetRepoResponse like the one of a repository with n branches
// on three nodes.
func bigRepo(n int) *repov1.GetRepoResponse {
	r := &repov1.Repo{Name: "big", Version: 7, UpdatedIndex: 99, Head: "refs/heads/main",
		CreatedAt: timestamppb.Now(), UpdatedAt: timestamppb.Now(), RefCount: int32(n)}
	for i := range n {
		r.Refs = append(r.Refs, &repov1.Ref{Name: fmt.Sprintf("refs/heads/branch-%05d", i), Oid: fmt.Sprintf("%040x", i+1)})
	}
	for _, id := range []string{"n1", "n2", "n3"} {
		r.Replicas = append(r.Replicas, &repov1.Replica{NodeId: id, Version: 7, State: repov1.ReplicaState_REPLICA_STATE_CURRENT})
	}
	return &repov1.GetRepoResponse{Repo: r, Index: 123}
}

type bigRepoServer struct {
	repov1.UnimplementedRepoServiceServer
	resp *repov1.GetRepoResponse
}

func (s bigRepoServer) GetRepo(context.Context, *repov1.GetRepoRequest) (*repov1.GetRepoResponse, error) {
	return s.resp, nil
}

// devNull is where the benchmarks print: a real file, so that every write
// is a system call as it is to a terminal or a pipe.
func devNull(b *testing.B) *os.File {
	f, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { f.Close() })
	return f
}

// drainedPipe is a pipe whose other end a goroutine
// reads and discards, as when the CLI's output goes to a pager or a script.
func drainedPipe(b *testing.B) *os.File {
	r, w, err := os.Pipe()
	if err != nil {
		b.Fatal(err)
	}
	go io.Copy(io.Discard, r)
	b.Cleanup(func() { w.Close(); r.Close() })
	return w
}

// BenchmarkRepoShow10kRefs measures `gitraft repo show` of a repository with
// 10,000 refs: printing alone, and the whole command against a local gRPC
// server that answers at once (so what is left is the CLI's own time).
//
//	go test -run '^$' -bench RepoShow -benchmem ./cmd/gitraft/
func BenchmarkRepoShow10kRefs(b *testing.B) {
	resp := bigRepo(10000)
	b.Run("write", func(b *testing.B) {
		out := devNull(b)
		now := time.Now()
		for b.Loop() {
			if err := writeRepo(out, resp, now); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("write-pipe", func(b *testing.B) {
		out := drainedPipe(b)
		now := time.Now()
		for b.Loop() {
			if err := writeRepo(out, resp, now); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("json", func(b *testing.B) {
		out := devNull(b)
		for b.Loop() {
			if err := printProtoJSON(out, resp); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("command", func(b *testing.B) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		s := grpc.NewServer()
		repov1.RegisterRepoServiceServer(s, bigRepoServer{resp: resp})
		go s.Serve(ln)
		b.Cleanup(s.Stop)
		for _, v := range []string{envCACert, envClientCert, envClientKey} {
			b.Setenv(v, "")
		}
		b.Setenv(envAddr, ln.Addr().String())
		b.Setenv(envInsecure, "true")
		out := devNull(b)
		for b.Loop() {
			root := newRootCmd()
			root.SetOut(out)
			root.SetArgs([]string{"repo", "show", "big"})
			if err := root.Execute(); err != nil {
				b.Fatal(err)
			}
		}
	})
}
