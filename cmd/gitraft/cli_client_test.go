package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	clusterv1 "github.com/gitraft/gitraft/proto/gitraft/cluster/v1"
	lockv1 "github.com/gitraft/gitraft/proto/gitraft/lock/v1"
	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
)

// clearEnv unsets the variables the global flags read.
func clearEnv(t *testing.T) {
	for _, v := range []string{envAddr, envCACert, envClientCert, envClientKey, envInsecure} {
		t.Setenv(v, "")
	}
}

// testRoot builds a root command wired like main's: the global flags on the
// admin command groups.
func testRoot(t *testing.T, args ...string) (*cobra.Command, *globalOpts, *bytes.Buffer, *bytes.Buffer) {
	t.Helper()
	g := &globalOpts{}
	root := &cobra.Command{Use: "gitraft", SilenceErrors: true, SilenceUsage: true}
	for _, c := range []*cobra.Command{newClusterCmd(g), newRepoCmd(g), newLockCmd(g)} {
		g.register(c.PersistentFlags())
		root.AddCommand(c)
	}
	root.AddCommand(newCACmd())
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetIn(strings.NewReader(""))
	root.SetArgs(args)
	return root, g, &out, &errOut
}

func TestGlobalDefaults(t *testing.T) {
	clearEnv(t)
	g := &globalOpts{}
	cmd := &cobra.Command{Use: "x"}
	g.register(cmd.PersistentFlags())
	if err := cmd.ParseFlags(nil); err != nil {
		t.Fatal(err)
	}
	want := globalOpts{Addr: "127.0.0.1:7102", Timeout: 10 * time.Second}
	if *g != want {
		t.Errorf("defaults = %+v, want %+v", *g, want)
	}
}

func TestGlobalEnv(t *testing.T) {
	clearEnv(t)
	t.Setenv(envAddr, "10.0.0.1:9000")
	t.Setenv(envCACert, "/ca.crt")
	t.Setenv(envClientCert, "/admin.crt")
	t.Setenv(envClientKey, "/admin.key")
	t.Setenv(envInsecure, "1")
	g := &globalOpts{}
	fs := (&cobra.Command{}).PersistentFlags()
	g.register(fs)
	want := globalOpts{Addr: "10.0.0.1:9000", CACert: "/ca.crt", ClientCert: "/admin.crt", ClientKey: "/admin.key", Insecure: true, Timeout: 10 * time.Second}
	if *g != want {
		t.Errorf("from env = %+v, want %+v", *g, want)
	}
	// Flags win over the environment.
	if err := fs.Parse([]string{"--addr", "127.0.0.1:1", "--insecure=false", "--json", "--timeout", "3s"}); err != nil {
		t.Fatal(err)
	}
	if g.Addr != "127.0.0.1:1" || g.Insecure || !g.JSON || g.Timeout != 3*time.Second {
		t.Errorf("flags over env = %+v", *g)
	}

	for val, want := range map[string]bool{"true": true, "TRUE": true, "1": true, "0": false, "false": false, "yes": false, "": false} {
		t.Setenv(envInsecure, val)
		if got := envBool(envInsecure); got != want {
			t.Errorf("%s=%q: insecure = %v, want %v", envInsecure, val, got, want)
		}
	}
}

func TestIsLoopback(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:7102": true, "127.1.2.3:1": true, "localhost:7102": true, "LOCALHOST:1": true,
		"[::1]:7102": true, "::1": true, "127.0.0.1": true,
		"10.0.0.1:7102": false, "0.0.0.0:7102": false, "example.com:7102": false, "[::]:1": false, "": false,
	} {
		if got := isLoopback(addr); got != want {
			t.Errorf("isLoopback(%q) = %v, want %v", addr, got, want)
		}
	}
}

func TestInsecureRefusedOffLoopback(t *testing.T) {
	g := &globalOpts{Addr: "10.0.0.1:7102", Insecure: true, Timeout: time.Second}
	_, err := g.dial(context.Background())
	if err == nil || !strings.Contains(err.Error(), "loopback") || !strings.Contains(err.Error(), "10.0.0.1:7102") {
		t.Fatalf("dial with --insecure to 10.0.0.1 = %v, want a refusal naming loopback", err)
	}
	g.Addr = "127.0.0.1:7102"
	conn, err := g.dial(context.Background())
	if err != nil {
		t.Fatalf("dial with --insecure to loopback: %v", err)
	}
	conn.Close()
}

func TestMissingCredentials(t *testing.T) {
	g := &globalOpts{Addr: "10.0.0.1:7102", ClientKey: "/k"}
	_, err := g.dial(context.Background())
	if err == nil {
		t.Fatal("dial without certificates succeeded")
	}
	msg := err.Error()
	for _, want := range []string{"--ca-cert", "GITRAFT_CACERT", "--client-cert", "GITRAFT_CLIENT_CERT", "gitraft ca issue admin"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error lacks %q: %s", want, msg)
		}
	}
	if strings.Contains(msg, "--client-key") {
		t.Errorf("error names --client-key, which is set: %s", msg)
	}
}

func TestRPCError(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{status.Error(codes.InvalidArgument, `invalid repository name "../x": contains a ".." path segment`),
			`create repository "../x": invalid repository name "../x": contains a ".." path segment`},
		{status.Error(codes.Unavailable, "no leader"), `create repository "../x": no leader (is a majority of nodes up?)`},
		{status.Error(codes.Unavailable, "no leader after 5s; is a majority of nodes up?"), `create repository "../x": no leader after 5s; is a majority of nodes up?`},
		{&connError{"cannot reach gitraft at 127.0.0.1:1: connection refused"}, "cannot reach gitraft at 127.0.0.1:1: connection refused"},
		{errors.New("boom"), `create repository "../x": boom`},
	} {
		if got := rpcError(`create repository "../x"`, tc.err).Error(); got != tc.want {
			t.Errorf("rpcError(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
	if rpcError("x", nil) != nil {
		t.Error("rpcError(nil) != nil")
	}
}

func TestExplainConnError(t *testing.T) {
	g := &globalOpts{Addr: "10.0.0.1:7102", Timeout: 10 * time.Second}
	refused := status.Error(codes.Unavailable, `connection error: desc = "transport: Error while dialing: dial tcp 10.0.0.1:7102: connect: connection refused"`)
	if got := g.explainConnError(refused, connectivity.TransientFailure).Error(); got != "cannot reach gitraft at 10.0.0.1:7102: dial tcp 10.0.0.1:7102: connect: connection refused (is the node running, and is --addr its gRPC address?)" {
		t.Errorf("refused: %q", got)
	}
	// The same text while our connection is up came from the node (e.g. it
	// could not forward to the leader): left alone.
	if got := g.explainConnError(refused, connectivity.Ready); got != refused {
		t.Errorf("node's error rewritten: %v", got)
	}
	unknownCA := status.Error(codes.Unavailable, `connection error: desc = "transport: authentication handshake failed: tls: failed to verify certificate: x509: certificate signed by unknown authority"`)
	got := g.explainConnError(unknownCA, connectivity.TransientFailure).Error()
	if !strings.HasPrefix(got, "TLS handshake with 10.0.0.1:7102 failed: tls: failed to verify certificate: x509: certificate signed by unknown authority (is --ca-cert the cluster's CA") {
		t.Errorf("unknown authority: %q", got)
	}
	deadline := status.Error(codes.DeadlineExceeded, "context deadline exceeded")
	if got := g.explainConnError(deadline, connectivity.Connecting).Error(); !strings.Contains(got, "cannot reach gitraft at 10.0.0.1:7102") {
		t.Errorf("deadline while connecting: %q", got)
	}
	if got := g.explainConnError(deadline, connectivity.Ready); got != deadline {
		t.Errorf("deadline on a ready connection rewritten: %v", got)
	}
	noLeader := status.Error(codes.Unavailable, "no leader")
	if got := g.explainConnError(noLeader, connectivity.TransientFailure); got != noLeader {
		t.Errorf("node's Unavailable rewritten: %v", got)
	}
}

// ----- against an in-process server (insecure, loopback) -----

type fakeRepos struct {
	repov1.UnimplementedRepoServiceServer
	mu      sync.Mutex
	repos   map[string]*repov1.Repo
	deleted []string
}

func (f *fakeRepos) CreateRepo(_ context.Context, req *repov1.CreateRepoRequest) (*repov1.CreateRepoResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if strings.Contains(req.GetName(), "..") {
		return nil, status.Errorf(codes.InvalidArgument, "invalid repository name %q: contains a \"..\" path segment", req.GetName())
	}
	if _, ok := f.repos[req.GetName()]; ok {
		return nil, status.Errorf(codes.AlreadyExists, "repository %q already exists", req.GetName())
	}
	r := &repov1.Repo{Name: req.GetName(), Version: 1, CreatedAt: timestamppb.Now(), UpdatedAt: timestamppb.Now()}
	f.repos[r.Name] = r
	return &repov1.CreateRepoResponse{Repo: r, Index: 10}, nil
}

func (f *fakeRepos) ListRepos(context.Context, *repov1.ListReposRequest) (*repov1.ListReposResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	resp := &repov1.ListReposResponse{Index: 11}
	for _, r := range f.repos {
		resp.Repos = append(resp.Repos, r)
	}
	return resp, nil
}

func (f *fakeRepos) GetRepo(_ context.Context, req *repov1.GetRepoRequest) (*repov1.GetRepoResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	r, ok := f.repos[req.GetName()]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "repository %q not found", req.GetName())
	}
	return &repov1.GetRepoResponse{Repo: r, Index: 12}, nil
}

func (f *fakeRepos) DeleteRepo(_ context.Context, req *repov1.DeleteRepoRequest) (*repov1.DeleteRepoResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.repos, req.GetName())
	f.deleted = append(f.deleted, req.GetName())
	return &repov1.DeleteRepoResponse{Index: 13}, nil
}

type fakeLocks struct {
	lockv1.UnimplementedLockServiceServer
}

func (fakeLocks) ForceReleaseLock(_ context.Context, req *lockv1.ForceReleaseLockRequest) (*lockv1.ForceReleaseLockResponse, error) {
	return &lockv1.ForceReleaseLockResponse{Released: &lockv1.WriteLock{Repo: req.GetRepo(), Holder: "n2/push-3", FencingToken: 40}, Index: 41}, nil
}

func (fakeLocks) ReleaseLock(_ context.Context, req *lockv1.ReleaseLockRequest) (*lockv1.ReleaseLockResponse, error) {
	if req.GetFencingToken() != 40 {
		return nil, status.Errorf(codes.FailedPrecondition, "stale fencing token %d: the lock on %q is now held with token 40", req.GetFencingToken(), req.GetRepo())
	}
	return &lockv1.ReleaseLockResponse{Index: 42}, nil
}

type fakeCluster struct {
	clusterv1.UnimplementedClusterServiceServer
}

func (fakeCluster) AddMember(_ context.Context, req *clusterv1.AddMemberRequest) (*clusterv1.AddMemberResponse, error) {
	return &clusterv1.AddMemberResponse{Index: 57}, nil
}

func (fakeCluster) GetStatus(context.Context, *clusterv1.GetStatusRequest) (*clusterv1.GetStatusResponse, error) {
	return nil, status.Error(codes.Unavailable, "no leader")
}

// startFake serves the fake services on a loopback port and returns its
// address.
func startFake(t *testing.T) (string, *fakeRepos) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	repos := &fakeRepos{repos: map[string]*repov1.Repo{}}
	repov1.RegisterRepoServiceServer(s, repos)
	lockv1.RegisterLockServiceServer(s, fakeLocks{})
	clusterv1.RegisterClusterServiceServer(s, fakeCluster{})
	go s.Serve(ln)
	t.Cleanup(s.Stop)
	return ln.Addr().String(), repos
}

func run(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root, _, out, _ := testRoot(t, args...)
	err := root.Execute()
	return out.String(), err
}

func TestCommandsAgainstFakeServer(t *testing.T) {
	clearEnv(t)
	addr, repos := startFake(t)
	t.Setenv(envAddr, addr)
	t.Setenv(envInsecure, "true")

	out, err := run(t, "repo", "ls")
	if err != nil || out != "no repositories\n" {
		t.Fatalf("repo ls (empty) = %q, %v", out, err)
	}
	out, err = run(t, "repo", "create", "alpha")
	if err != nil || out != "created alpha at index 10\n" {
		t.Fatalf("repo create = %q, %v", out, err)
	}
	_, err = run(t, "repo", "create", "../x")
	if err == nil || err.Error() != `create repository "../x": invalid repository name "../x": contains a ".." path segment` {
		t.Fatalf("repo create ../x: %v", err)
	}
	out, err = run(t, "repo", "ls")
	if err != nil || !strings.HasPrefix(out, "NAME") || !strings.Contains(out, "alpha") {
		t.Fatalf("repo ls = %q, %v", out, err)
	}
	out, err = run(t, "repo", "ls", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var decoded struct {
		Repos []struct{ Name string } `json:"repos"`
		Index string                  `json:"index"`
	}
	if err := json.Unmarshal([]byte(out), &decoded); err != nil || len(decoded.Repos) != 1 || decoded.Repos[0].Name != "alpha" || decoded.Index != "11" {
		t.Fatalf("repo ls --json = %q (%v): %+v", out, err, decoded)
	}
	out, err = run(t, "repo", "show", "alpha")
	if err != nil || !strings.Contains(out, "name:") || !strings.Contains(out, "as of raft index 12") {
		t.Fatalf("repo show = %q, %v", out, err)
	}
	_, err = run(t, "repo", "show", "nope")
	if err == nil || err.Error() != `show repository "nope": repository "nope" not found` {
		t.Fatalf("repo show nope: %v", err)
	}

	// rm: refused without --yes and without confirmation; done with --yes.
	_, err = run(t, "repo", "rm", "alpha")
	if err == nil || !strings.Contains(err.Error(), "--yes") {
		t.Fatalf("repo rm without --yes: %v", err)
	}
	if len(repos.deleted) != 0 {
		t.Fatalf("deleted without confirmation: %v", repos.deleted)
	}
	out, err = run(t, "repo", "rm", "alpha", "--yes")
	if err != nil || out != "deleted alpha at index 13\n" {
		t.Fatalf("repo rm --yes = %q, %v", out, err)
	}

	out, err = run(t, "lock", "release", "alpha")
	if err != nil || out != "force-released the lock on alpha held by n2/push-3 (token 40) at index 41\n" {
		t.Fatalf("lock release = %q, %v", out, err)
	}
	out, err = run(t, "lock", "release", "alpha", "--token", "40")
	if err != nil || out != "released the lock on alpha (token 40) at index 42\n" {
		t.Fatalf("lock release --token = %q, %v", out, err)
	}
	_, err = run(t, "lock", "release", "alpha", "--token", "39")
	if err == nil || !strings.Contains(err.Error(), "stale fencing token 39") {
		t.Fatalf("lock release --token 39: %v", err)
	}

	out, err = run(t, "cluster", "join", "--id", "n4", "--raft-addr", "127.0.0.1:7201", "--grpc-addr", "127.0.0.1:7202")
	if err != nil || out != "added n4 (raft 127.0.0.1:7201) at index 57; it becomes a voter once it holds every repository (see gitraft cluster status)\n" {
		t.Fatalf("cluster join = %q, %v", out, err)
	}
	_, err = run(t, "cluster", "join", "--id", "n4")
	if err == nil || !strings.Contains(err.Error(), "raft-addr") {
		t.Fatalf("cluster join without addresses: %v", err)
	}
	_, err = run(t, "cluster", "status")
	if err == nil || err.Error() != "get cluster status: no leader (is a majority of nodes up?)" {
		t.Fatalf("cluster status: %v", err)
	}
	_, err = run(t, "lock", "ls")
	if err == nil || !strings.HasPrefix(err.Error(), "list locks: ") || !strings.Contains(err.Error(), "same gitraft version") {
		t.Fatalf("lock ls (unimplemented): %v", err)
	}
}

func TestUnreachable(t *testing.T) {
	clearEnv(t)
	// A port nothing listens on.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	start := time.Now()
	_, err = run(t, "repo", "ls", "--insecure", "--addr", addr, "--timeout", "5s")
	if err == nil || !strings.HasPrefix(err.Error(), "cannot reach gitraft at "+addr+": ") || !strings.Contains(err.Error(), "connection refused") {
		t.Fatalf("repo ls against a closed port: %v", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("took %s to fail; want fail-fast", d)
	}
}

func TestInsecureCommandRefused(t *testing.T) {
	clearEnv(t)
	_, err := run(t, "repo", "ls", "--insecure", "--addr", "192.0.2.1:7102")
	if err == nil || !strings.Contains(err.Error(), "loopback") {
		t.Fatalf("--insecure to a non-loopback address: %v", err)
	}
}
