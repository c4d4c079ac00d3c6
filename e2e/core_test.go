package e2e

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gitraft/gitraft/cluster/pki"
	lockv1 "github.com/gitraft/gitraft/proto/gitraft/lock/v1"
	nodev1 "github.com/gitraft/gitraft/proto/gitraft/node/v1"
	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
)

// grpcConn dials a node with a certificate from the cluster CA.
func (c *cluster) grpcConn(n *node, certName string) *grpc.ClientConn {
	c.t.Helper()
	b, err := pki.Files{CA: filepath.Join(c.ca, "ca.crt"), Cert: filepath.Join(c.ca, certName+".crt"), Key: filepath.Join(c.ca, certName+".key")}.Load()
	if err != nil {
		c.t.Fatal(err)
	}
	conn, err := grpc.NewClient(n.grpcAddr, grpc.WithTransportCredentials(credentials.NewTLS(b.ClientConfig(""))))
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { conn.Close() })
	return conn
}

type repoListJSON struct {
	Repos []struct {
		Name    string `json:"name"`
		Version string `json:"version"`
	} `json:"repos"`
}

func (c *cluster) repoNames(n *node) []string {
	var l repoListJSON
	c.jsonOf(n, &l, "repo", "ls")
	var out []string
	for _, r := range l.Repos {
		out = append(out, r.Name+"@"+r.Version)
	}
	return out
}

func Test_E2E_ClusterLifecycle(t *testing.T) {
	c := startCluster(t, 3)
	var st statusJSON
	c.jsonOf(c.nodes[1], &st, "cluster", "status")
	leaders := 0
	for _, m := range st.Members {
		if m.Suffrage != "SUFFRAGE_VOTER" || !m.Reachable {
			t.Errorf("member %+v is not a reachable voter", m)
		}
		if m.Leader {
			leaders++
		}
	}
	if len(st.Members) != 3 || leaders != 1 {
		t.Fatalf("status: %d members, %d leaders; want 3 and 1", len(st.Members), leaders)
	}
	// Health and metrics on the HTTP port.
	for _, n := range c.nodes {
		for path, want := range map[string]string{"/healthz": `"ok":true`, "/readyz": `"ok":true`, "/metrics": "gitraft_raft_term"} {
			code, body := httpGet("http://" + n.httpAddr + path)
			if code != 200 || !strings.Contains(body, want) {
				t.Errorf("%s %s: %d %.200s", n.id, path, code, body)
			}
		}
	}
	// Writes through every node, reads on every node see them all at once.
	for i, n := range c.nodes {
		c.must(n, "repo", "create", "team/repo"+string(rune('a'+i)))
	}
	want := strings.Join(c.repoNames(c.nodes[0]), " ")
	for _, n := range c.nodes {
		if got := strings.Join(c.repoNames(n), " "); got != want || len(c.repoNames(n)) != 3 {
			t.Fatalf("repo ls on %s = %q, want %q (3 repos)", n.id, got, want)
		}
	}
	// Bad input: a clear message, non-zero exit, nothing changed.
	n := c.nodes[2]
	for arg, msg := range map[string]string{
		"../x":    `".." path segment`,
		"":        "empty",
		"/abs":    "", // canonicalised to "abs" would be valid; "/abs/" is not
		"a\x01b":  "control character",
		"-opt":    "starts with",
		"a b":     "contains ' '",
		"x/../..": `".." path segment`,
	} {
		if arg == "/abs" {
			arg, msg = "/abs/", "empty path segment"
		}
		stderr := c.fails(n, "repo", "create", "--", arg)
		if !strings.Contains(stderr, msg) || !strings.Contains(stderr, "invalid repository name") {
			t.Errorf("repo create %q: stderr %q, want it to name the rule (%q)", arg, stderr, msg)
		}
	}
	if s := c.fails(n, "repo", "create", "team/repoa"); !strings.Contains(s, "already exists") {
		t.Errorf("duplicate create: %q", s)
	}
	if s := c.fails(n, "repo", "show", "nope"); !strings.Contains(s, "not found") {
		t.Errorf("show unknown: %q", s)
	}
	if got := strings.Join(c.repoNames(n), " "); got != want {
		t.Fatalf("bad input changed the repos: %q, want %q", got, want)
	}

	// A ref compare-and-swap with a stale token or stale old value is refused
	// and changes nothing.
	conn := c.grpcConn(c.nodes[1], "admin")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	locks, repos := lockv1.NewLockServiceClient(conn), repov1.NewRepoServiceClient(conn)
	l, err := locks.AcquireLock(ctx, &lockv1.AcquireLockRequest{Repo: "team/repoa", Holder: "e2e", Lease: durationpb.New(time.Minute)})
	if err != nil {
		t.Fatal(err)
	}
	tok := l.GetLock().GetFencingToken()
	fake := strings.Repeat("ab", 20)
	// A ref may only point at objects a push stored on a majority.
	_, err = repos.UpdateRefs(ctx, &repov1.UpdateRefsRequest{Repo: "team/repoa", FencingToken: tok, Updates: []*repov1.RefUpdate{{Ref: "refs/heads/main", NewOid: fake}}})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(status.Convert(err).Message(), "majority") {
		t.Fatalf("a ref to objects no node holds: %v", err)
	}
	del := []*repov1.RefUpdate{{Ref: "refs/heads/gone", OldOid: fake}}
	_, err = repos.UpdateRefs(ctx, &repov1.UpdateRefsRequest{Repo: "team/repoa", FencingToken: tok - 1, Updates: del})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(status.Convert(err).Message(), "stale fencing token") {
		t.Fatalf("stale token: %v", err)
	}
	_, err = repos.UpdateRefs(ctx, &repov1.UpdateRefsRequest{Repo: "team/repoa", FencingToken: tok, Updates: del})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(status.Convert(err).Message(), "stale old value") {
		t.Fatalf("stale old value: %v", err)
	}
	var show struct {
		Repo struct {
			Version string `json:"version"`
			Refs    []struct{ Name, Oid string }
		} `json:"repo"`
	}
	c.jsonOf(c.nodes[0], &show, "repo", "show", "team/repoa")
	if show.Repo.Version != "1" || len(show.Repo.Refs) != 0 {
		t.Fatalf("refused updates changed the repo: %+v", show.Repo)
	}
	if _, err := locks.ReleaseLock(ctx, &lockv1.ReleaseLockRequest{Repo: "team/repoa", FencingToken: tok}); err != nil {
		t.Fatal(err)
	}
}

func Test_E2E_LeaderKilledAndRejoins(t *testing.T) {
	c := startCluster(t, 3)
	for _, name := range []string{"a", "b", "c"} {
		c.must(c.other(), "repo", "create", name)
	}
	old := c.leader()
	old.kill()
	survivor := c.other(old)
	newLeader := c.leader()
	if newLeader == old {
		t.Fatal("the killed node still leads")
	}
	for _, name := range []string{"d", "e"} {
		c.must(survivor, "repo", "create", name)
	}
	old.start()
	old.waitReady(60 * time.Second)
	want := strings.Join(c.repoNames(survivor), " ")
	if got := strings.Join(c.repoNames(old), " "); got != want {
		t.Fatalf("rejoined %s lists %q, want %q", old.id, got, want)
	}
	if len(strings.Fields(want)) != 5 {
		t.Fatalf("repos %q, want 5", want)
	}
	var st statusJSON
	c.jsonOf(old, &st, "cluster", "status")
	for _, m := range st.Members {
		if !m.Reachable {
			t.Errorf("member %s unreachable after rejoin", m.ID)
		}
	}
}

func Test_E2E_ForeignCAClientRefused(t *testing.T) {
	c := startCluster(t, 3)
	other := filepath.Join(t.TempDir(), "other-ca")
	c.must(nil, "ca", "init", "--dir", other, "--name", "other")
	c.must(nil, "ca", "issue", "admin", "mallory", "--dir", other)
	for _, caFile := range []string{filepath.Join(c.ca, "ca.crt"), filepath.Join(other, "ca.crt")} {
		r := runCmd(t, c.dir, []string{
			"GITRAFT_ADDR=" + c.nodes[0].grpcAddr, "GITRAFT_CACERT=" + caFile,
			"GITRAFT_CLIENT_CERT=" + filepath.Join(other, "mallory.crt"), "GITRAFT_CLIENT_KEY=" + filepath.Join(other, "mallory.key"),
		}, 30*time.Second, bin, "repo", "ls")
		if r.code == 0 {
			t.Fatalf("a client with a foreign certificate was served: %s", r)
		}
		if !strings.Contains(strings.ToLower(r.stderr), "tls") && !strings.Contains(strings.ToLower(r.stderr), "certificate") {
			t.Errorf("refusal does not say why: %q", r.stderr)
		}
	}
	// An admin certificate may not use the node-to-node API.
	conn := c.grpcConn(c.nodes[0], "admin")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := nodev1.NewNodeServiceClient(conn).ReadIndex(ctx, &nodev1.ReadIndexRequest{})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("admin calling NodeService: %v, want PermissionDenied", err)
	}
	// A node with a certificate from another CA cannot join.
	c.must(nil, "ca", "issue", "node", "n9", "--dir", other)
	intruder := &node{t: t, id: "n9", dir: filepath.Join(c.dir, "n9"),
		raftAddr: freePort(t), grpcAddr: freePort(t), httpAddr: freePort(t), sshAdr: freePort(t)}
	intruder.args = []string{"serve", "--node-id", "n9", "--data-dir", intruder.dir,
		"--raft-addr", intruder.raftAddr, "--grpc-addr", intruder.grpcAddr, "--http-addr", intruder.httpAddr, "--ssh-addr", intruder.sshAdr,
		"--tls-ca-file", filepath.Join(other, "ca.crt"), "--tls-cert-file", filepath.Join(other, "n9.crt"), "--tls-key-file", filepath.Join(other, "n9.key"),
		"--join", c.nodes[0].grpcAddr}
	intruder.start()
	defer intruder.kill()
	time.Sleep(3 * time.Second) // give it time to try, and fail, to join
	var st statusJSON
	c.jsonOf(c.nodes[0], &st, "cluster", "status")
	if len(st.Members) != 3 {
		t.Fatalf("a node from another CA joined: %d members", len(st.Members))
	}
}

func Test_E2E_NoQuorum(t *testing.T) {
	c := startCluster(t, 3)
	c.must(c.nodes[0], "repo", "create", "before")
	survivor := c.nodes[2]
	c.nodes[0].kill()
	c.nodes[1].kill()
	start := time.Now()
	stderr := c.fails(survivor, "repo", "create", "lost")
	t.Logf("create without quorum failed after %s: %s", time.Since(start).Round(time.Millisecond), strings.TrimSpace(stderr))
	if !strings.Contains(stderr, "leader") && !strings.Contains(stderr, "majority") {
		t.Errorf("the error does not name the lost quorum: %q", stderr)
	}
	waitFor(t, "the survivor's /readyz to turn 503", 30*time.Second, func() bool {
		code, _ := survivor.readyz()
		return code == 503
	})
	c.nodes[0].start()
	c.nodes[1].start()
	for _, n := range c.nodes {
		n.waitReady(60 * time.Second)
	}
	c.must(survivor, "repo", "create", "after")
	names := strings.Join(c.repoNames(c.nodes[0]), " ")
	if strings.Contains(names, "lost") || !strings.Contains(names, "after") || !strings.Contains(names, "before") {
		t.Fatalf("repos after recovery: %q", names)
	}
}

func Test_E2E_JoinRemoveTransfer(t *testing.T) {
	c := startCluster(t, 3)
	c.must(c.nodes[0], "repo", "create", "x")
	// n4 starts with no --join and is added by an operator.
	n4 := &node{t: t, id: "n4", dir: filepath.Join(c.dir, "n4"),
		raftAddr: freePort(t), grpcAddr: freePort(t), httpAddr: freePort(t), sshAdr: freePort(t)}
	c.must(nil, "ca", "issue", "node", "n4", "--dir", c.ca)
	n4.args = []string{"serve", "--node-id", "n4", "--data-dir", n4.dir,
		"--raft-addr", n4.raftAddr, "--grpc-addr", n4.grpcAddr, "--http-addr", n4.httpAddr, "--ssh-addr", n4.sshAdr,
		"--tls-ca-file", filepath.Join(c.ca, "ca.crt"), "--tls-cert-file", filepath.Join(c.ca, "n4.crt"), "--tls-key-file", filepath.Join(c.ca, "n4.key"),
		"--raft-heartbeat-timeout", "500ms", "--raft-election-timeout", "500ms", "--raft-leader-lease-timeout", "250ms"}
	c.nodes = append(c.nodes, n4)
	n4.start()
	c.must(c.nodes[1], "cluster", "join", "--id", "n4", "--raft-addr", n4.raftAddr, "--grpc-addr", n4.grpcAddr)
	n4.waitReady(60 * time.Second)
	if got, want := strings.Join(c.repoNames(n4), " "), strings.Join(c.repoNames(c.nodes[0]), " "); got != want {
		t.Fatalf("n4 lists %q, want %q", got, want)
	}
	if s := c.fails(c.nodes[0], "cluster", "join", "--id", "n4", "--raft-addr", freePort(t), "--grpc-addr", freePort(t)); !strings.Contains(s, "already a member") {
		t.Fatalf("duplicate ID join: %q", s)
	}
	c.must(c.nodes[0], "cluster", "transfer-leader", "n2")
	if l := c.leader(); l.id != "n2" {
		t.Fatalf("leader after transfer = %s, want n2", l.id)
	}
	c.must(c.nodes[0], "cluster", "remove", "n4")
	n4.kill()
	var st statusJSON
	c.jsonOf(c.nodes[0], &st, "cluster", "status")
	if len(st.Members) != 3 {
		t.Fatalf("%d members after removing n4", len(st.Members))
	}
}

func Test_E2E_LockCLI(t *testing.T) {
	c := startCluster(t, 3)
	c.must(c.nodes[0], "repo", "create", "locked")
	conn := c.grpcConn(c.nodes[1], "admin")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	locks := lockv1.NewLockServiceClient(conn)
	l, err := locks.AcquireLock(ctx, &lockv1.AcquireLockRequest{Repo: "locked", Holder: "e2e/stuck", Lease: durationpb.New(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	var ls struct {
		Locks []struct {
			Repo         string `json:"repo"`
			Holder       string `json:"holder"`
			FencingToken string `json:"fencing_token"`
		} `json:"locks"`
	}
	c.jsonOf(c.nodes[2], &ls, "lock", "ls")
	if len(ls.Locks) != 1 || ls.Locks[0].Holder != "e2e/stuck" || ls.Locks[0].FencingToken == "" {
		t.Fatalf("lock ls = %+v (granted %v)", ls, l.GetLock())
	}
	out := c.must(c.nodes[2], "lock", "release", "locked")
	if !strings.Contains(out, "e2e/stuck") {
		t.Errorf("force release does not say who held it: %q", out)
	}
	c.jsonOf(c.nodes[0], &ls, "lock", "ls")
	if len(ls.Locks) != 0 {
		t.Fatalf("lock survived a force release: %+v", ls)
	}
	// A short lease runs out by itself.
	if _, err := locks.AcquireLock(ctx, &lockv1.AcquireLockRequest{Repo: "locked", Holder: "e2e/short", Lease: durationpb.New(time.Second)}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the lease to expire", 20*time.Second, func() bool {
		c.jsonOf(c.nodes[0], &ls, "lock", "ls")
		return len(ls.Locks) == 0
	})
}

func Test_E2E_DevCommand(t *testing.T) {
	dir := t.TempDir()
	cmd := execCommand(bin, "dev", "--dir", dir)
	log, _ := os.Create(filepath.Join(dir, "dev.out"))
	defer log.Close()
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	defer cmd.Process.Kill()
	var info struct {
		Env   []string `json:"env"`
		Nodes []struct {
			ID string `json:"id"`
		} `json:"nodes"`
		Git struct {
			SSHCommand string   `json:"ssh_command"`
			CloneURLs  []string `json:"clone_urls"`
		} `json:"git"`
	}
	waitFor(t, "cluster.json", 60*time.Second, func() bool {
		b, err := os.ReadFile(filepath.Join(dir, "cluster.json"))
		return err == nil && json.Unmarshal(b, &info) == nil && len(info.Env) > 0
	})
	if len(info.Nodes) != 3 || len(info.Git.CloneURLs) != 3 {
		t.Fatalf("cluster.json: %+v", info)
	}
	r := runCmd(t, dir, info.Env, 30*time.Second, bin, "cluster", "status")
	if r.code != 0 || !strings.Contains(r.stdout, "Leader") {
		t.Fatalf("status against dev: %s", r)
	}
	if r := runCmd(t, dir, info.Env, 30*time.Second, bin, "repo", "create", "from-test"); r.code != 0 {
		t.Fatalf("repo create against dev: %s", r)
	}
	// The printed clone line works as printed.
	r = runCmd(t, dir, []string{"GIT_SSH_COMMAND=" + info.Git.SSHCommand}, 60*time.Second, "git", "clone", info.Git.CloneURLs[1], filepath.Join(dir, "wc"))
	if r.code != 0 {
		t.Fatalf("git clone as printed: %s", r)
	}
	cmd.Process.Signal(syscall.SIGINT)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("gitraft dev exited with %v after Ctrl-C", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("gitraft dev did not stop within 30s of SIGINT")
	}
}
