package replica

// Git sessions between nodes over ReplicaService.GitSession: a peer
// fetching objects to catch up (upload-pack, no user), and a client's
// session proxied to a node that can serve it.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/gitraft/gitraft/cluster/pki"
	"github.com/gitraft/gitraft/gitproto"
	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
)

// SessionHandler serves a client session proxied from another node (the
// SSH front end provides it). It returns git's exit code.
type SessionHandler func(ctx context.Context, service, repo, user string, publicKey []byte, gitProtocol string, stdin io.Reader, stdout, stderr io.Writer) int

// SetSessionHandler installs the handler for proxied client sessions.
func (r *Replicas) SetSessionHandler(h SessionHandler) { r.sessions.Store(&h) }

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }

// GitSession serves a git session that arrived at another node.
func (s *Service) GitSession(stream replicav1.ReplicaService_GitSessionServer) error {
	r := s.r
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	st := first.GetStart()
	if st == nil {
		return status.Error(codes.InvalidArgument, "GitSession must start with a start message")
	}
	stdinR, stdinW := io.Pipe()
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				stdinW.CloseWithError(err)
				return
			}
			switch x := m.Msg.(type) {
			case *replicav1.GitSessionRequest_Stdin:
				if _, err := stdinW.Write(x.Stdin); err != nil {
					return
				}
			case *replicav1.GitSessionRequest_StdinEof:
				stdinW.Close()
			}
		}
	}()
	var sendMu sync.Mutex
	send := func(m *replicav1.GitSessionResponse) error {
		sendMu.Lock()
		defer sendMu.Unlock()
		return stream.Send(m)
	}
	stdout := writerFunc(func(b []byte) (int, error) {
		return len(b), send(&replicav1.GitSessionResponse{Msg: &replicav1.GitSessionResponse_Stdout{Stdout: append([]byte(nil), b...)}})
	})
	stderr := writerFunc(func(b []byte) (int, error) {
		return len(b), send(&replicav1.GitSessionResponse{Msg: &replicav1.GitSessionResponse_Stderr{Stderr: append([]byte(nil), b...)}})
	})
	ctx := stream.Context()
	var code int
	if st.GetUser() == "" {
		// Node-to-node catch-up: serve objects from this node's copy.
		if st.GetService() != "upload-pack" {
			return status.Error(codes.PermissionDenied, "nodes may only fetch from each other")
		}
		path, err := r.st.Path(st.GetRepo())
		if err != nil {
			return status.Error(codes.InvalidArgument, err.Error())
		}
		code = r.uploadPack(ctx, path, st.GetGitProtocol(), stdinR, stdout, stderr)
	} else {
		h := r.sessions.Load()
		if h == nil {
			return status.Error(codes.FailedPrecondition, "this node has no SSH front end to serve proxied sessions")
		}
		code = (*h)(ctx, st.GetService(), st.GetRepo(), st.GetUser(), st.GetPublicKey(), st.GetGitProtocol(), stdinR, stdout, stderr)
	}
	stdinR.Close()
	return send(&replicav1.GitSessionResponse{Msg: &replicav1.GitSessionResponse_ExitCode{ExitCode: int32(code)}})
}

// uploadPack serves a peer any object of the copy by id (the node's git
// runner, storage's environment policy).
func (r *Replicas) uploadPack(ctx context.Context, path, gitProtocol string, stdin io.Reader, stdout, stderr io.Writer) int {
	var env []string
	if gitProtocol != "" {
		env = append(env, "GIT_PROTOCOL="+gitProtocol)
	}
	git := r.st.Git()
	c := git.Command(ctx, "", env, "upload-pack", "--strict", path)
	c.Stdin, c.Stdout, c.Stderr = stdin, stdout, stderr
	c.WaitDelay = 5 * time.Second
	if err := git.Run(c); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) && ee.ExitCode() > 0 {
			return ee.ExitCode()
		}
		fmt.Fprintf(stderr, "gitraft: git upload-pack: %v\n", err)
		return 1
	}
	return 0
}

// Proxy runs a client's session on the peer at addr and returns git's exit
// code there.
func (r *Replicas) Proxy(ctx context.Context, addr string, svc gitproto.Service, repo, user string, publicKey []byte, gitProtocol string, stdin io.Reader, stdout, stderr io.Writer) (int, error) {
	c, err := r.node.Conn(addr)
	if err != nil {
		return 0, err
	}
	return gitSession(ctx, c, &replicav1.GitSessionStart{Service: string(svc), Repo: repo, User: user, PublicKey: publicKey, GitProtocol: gitProtocol, Via: r.node.ID()}, stdin, stdout, stderr)
}

func gitSession(ctx context.Context, c grpc.ClientConnInterface, start *replicav1.GitSessionStart, stdin io.Reader, stdout, stderr io.Writer) (int, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := replicav1.NewReplicaServiceClient(c).GitSession(ctx)
	if err != nil {
		return 0, err
	}
	if err := stream.Send(&replicav1.GitSessionRequest{Msg: &replicav1.GitSessionRequest_Start{Start: start}}); err != nil {
		return 0, err
	}
	go func() {
		buf := make([]byte, 64<<10)
		for {
			k, err := stdin.Read(buf)
			if k > 0 {
				if stream.Send(&replicav1.GitSessionRequest{Msg: &replicav1.GitSessionRequest_Stdin{Stdin: append([]byte(nil), buf[:k]...)}}) != nil {
					return
				}
			}
			if err != nil {
				stream.Send(&replicav1.GitSessionRequest{Msg: &replicav1.GitSessionRequest_StdinEof{StdinEof: true}})
				return
			}
		}
	}()
	for {
		m, err := stream.Recv()
		if err != nil {
			return 0, err
		}
		switch x := m.Msg.(type) {
		case *replicav1.GitSessionResponse_Stdout:
			if _, err := stdout.Write(x.Stdout); err != nil {
				return 0, err
			}
		case *replicav1.GitSessionResponse_Stderr:
			stderr.Write(x.Stderr)
		case *replicav1.GitSessionResponse_ExitCode:
			return int(x.ExitCode), nil
		}
	}
}

// RunNodeGit is `gitraft node-git ADDR SERVICE REPO`: git's ext:: transport
// runs it to fetch from a peer, with the node's credentials (insecure, or
// the TLS files). It returns the exit code.
func RunNodeGit(ctx context.Context, addr, service, repo string, tlsFiles pki.Files, insecureMode bool, stdin io.Reader, stdout, stderr io.Writer) int {
	var creds credentials.TransportCredentials
	if insecureMode {
		creds = insecure.NewCredentials()
	} else {
		b, err := tlsFiles.Load()
		if err != nil {
			fmt.Fprintln(stderr, "gitraft node-git:", err)
			return 1
		}
		creds = credentials.NewTLS(b.ClientConfig(""))
	}
	c, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		fmt.Fprintln(stderr, "gitraft node-git:", err)
		return 1
	}
	defer c.Close()
	code, err := gitSession(ctx, c, &replicav1.GitSessionStart{Service: strings.TrimPrefix(service, "git-"), Repo: repo}, stdin, stdout, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "gitraft node-git:", err)
		return 1
	}
	return code
}
