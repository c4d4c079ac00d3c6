package e2e

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gitraft/gitraft/cluster/pki"
	clusterv1 "github.com/gitraft/gitraft/proto/gitraft/cluster/v1"
	lockv1 "github.com/gitraft/gitraft/proto/gitraft/lock/v1"
	nodev1 "github.com/gitraft/gitraft/proto/gitraft/node/v1"
	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
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

// protoOf runs the CLI with --json and decodes the answer into the API's own
// message, as a script using the generated types would.
func (c *cluster) protoOf(n *node, m proto.Message, args ...string) {
	c.t.Helper()
	out := c.must(n, append(args, "--json")...)
	if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal([]byte(out), m); err != nil {
		c.t.Fatalf("decode %s: %v\n%s", strings.Join(args, " "), err, out)
	}
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
		"//abs":   "absolute path",
		"/abs/":   "empty path segment",
		"a\x01b":  "control character",
		"-opt":    "starts with",
		"a b":     "contains ' '",
		"x/../..": `".." path segment`,
	} {
		stderr := c.fails(n, "repo", "create", "--", arg)
		if !strings.Contains(stderr, msg) || !strings.Contains(stderr, "invalid repository name") {
			t.Errorf("repo create %q: stderr %q, want it to name the rule (%q)", arg, stderr, msg)
		}
	}
	if s := c.fails(n, "repo", "create", "team/repoa"); !strings.Contains(s, "already exists") {
		t.Errorf("duplicate create: %q", s)
	}
	// One leading "/" is how a name appears in an SSH URL's path: "/team/repoa"
	// is the repository "team/repoa", never a path on the node.
	if s := c.fails(n, "repo", "create", "/team/repoa.git"); !strings.Contains(s, "already exists") {
		t.Errorf("duplicate create in URL form: %q", s)
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
	var show repov1.GetRepoResponse
	c.protoOf(c.nodes[0], &show, "repo", "show", "team/repoa")
	if show.GetRepo().GetVersion() != 1 || len(show.GetRepo().GetRefs()) != 0 {
		t.Fatalf("refused updates changed the repo: %v", show.GetRepo())
	}
	if _, err := locks.ReleaseLock(ctx, &lockv1.ReleaseLockRequest{Repo: "team/repoa", FencingToken: tok}); err != nil {
		t.Fatal(err)
	}
}

// repoState is what every node must agree on for one repository: the
// replicated state, without the per-node replica view.
func repoState(r *repov1.Repo) *repov1.Repo {
	return &repov1.Repo{Name: r.GetName(), Version: r.GetVersion(), Refs: r.GetRefs(), Head: r.GetHead(), RefCount: r.GetRefCount()}
}

func Test_E2E_LeaderKilledAndRejoins(t *testing.T) {
	c := startCluster(t, 3)
	u := c.addGitUser("ann")
	for _, name := range []string{"a", "b", "c", "d"} {
		c.must(c.other(), "repo", "create", name)
		c.must(c.other(), "repo", "grant", name, "ann", "write")
	}
	wt := u.workTree(url(c.nodes[0], "a"))
	u.commit(wt, "f", "one\n")
	u.mustGit(wt, "push", "-q", "origin", "main")

	old := c.leader()
	old.kill()
	newLeader := c.leader() // only a running node counts
	survivor := c.other(old)
	t.Logf("killed leader %s; new leader %s; writing through %s", old.id, newLeader.id, survivor.id)
	for _, name := range []string{"e", "f"} {
		c.must(survivor, "repo", "create", name)
	}
	// Refs and objects the restarted node has never seen.
	second := u.commit(wt, "f", "two\n")
	u.mustGit(wt, "push", "-q", url(survivor, "a"), "main")
	u.mustGit(wt, "push", "-q", url(survivor, "d"), "main")

	old.start()
	old.waitReady(60 * time.Second)
	var want repov1.ListReposResponse
	c.protoOf(survivor, &want, "repo", "ls")
	if len(want.GetRepos()) != 6 {
		t.Fatalf("%d repos, want 6: %v", len(want.GetRepos()), want.GetRepos())
	}
	for _, n := range c.nodes {
		var got repov1.ListReposResponse
		c.protoOf(n, &got, "repo", "ls")
		if len(got.GetRepos()) != len(want.GetRepos()) {
			t.Fatalf("repo ls on %s: %d repos, want %d", n.id, len(got.GetRepos()), len(want.GetRepos()))
		}
		for i, r := range want.GetRepos() {
			if g := got.GetRepos()[i]; g.GetName() != r.GetName() || g.GetVersion() != r.GetVersion() {
				t.Errorf("repo ls on %s: %s@%d, want %s@%d", n.id, g.GetName(), g.GetVersion(), r.GetName(), r.GetVersion())
			}
		}
		for _, r := range want.GetRepos() {
			var mine, theirs repov1.GetRepoResponse
			c.protoOf(n, &mine, "repo", "show", r.GetName())
			c.protoOf(survivor, &theirs, "repo", "show", r.GetName())
			if !proto.Equal(repoState(mine.GetRepo()), repoState(theirs.GetRepo())) {
				t.Errorf("repo show %s on %s = %v\nwant (from %s) %v", r.GetName(), n.id, repoState(mine.GetRepo()), survivor.id, repoState(theirs.GetRepo()))
			}
		}
	}
	var a repov1.GetRepoResponse
	c.protoOf(old, &a, "repo", "show", "a")
	if refs := a.GetRepo().GetRefs(); len(refs) != 1 || refs[0].GetOid() != second {
		t.Fatalf("repo a on %s: refs %v, want main at %s", old.id, refs, second)
	}
	// Its disk catches up too, by itself: every node's refs match the state,
	// and a clone through it has the commit pushed while it was down.
	for _, name := range []string{"a", "d"} {
		waitFor(t, "repo verify "+name+" to pass on every node", 60*time.Second, func() bool {
			return c.run(old, "repo", "verify", name).code == 0
		})
	}
	clone := u.cloneAndCheck(old, "d")
	if got := strings.TrimSpace(u.mustGit(clone, "rev-parse", "HEAD")); got != second {
		t.Fatalf("clone of d through %s: HEAD %s, want %s", old.id, got, second)
	}
	waitFor(t, "cluster status to show 3 reachable voters", 30*time.Second, func() bool {
		var st clusterv1.GetStatusResponse
		c.protoOf(old, &st, "cluster", "status")
		ok := len(st.GetMembers()) == 3 && st.GetLeaderId() != ""
		for _, m := range st.GetMembers() {
			ok = ok && m.GetReachable() && m.GetSuffrage() == clusterv1.Suffrage_SUFFRAGE_VOTER
		}
		return ok
	})
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
	// Nor the push pipeline's (packs, copies, node-to-node git).
	_, err = replicav1.NewReplicaServiceClient(conn).GetLocalRefs(ctx, &replicav1.GetLocalRefsRequest{Repo: "x"})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("admin calling ReplicaService: %v, want PermissionDenied", err)
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
	// It keeps asking to join, and keeps being refused.
	var log string
	waitFor(t, "n9's join to be refused twice", 30*time.Second, func() bool {
		b, _ := os.ReadFile(intruder.dir + ".log")
		log = string(b)
		return strings.Count(log, "join failed") >= 2
	})
	select {
	case <-intruder.exited:
		t.Fatalf("n9 exited instead of retrying its join:\n%s", log)
	default:
	}
	if l := strings.ToLower(log); !strings.Contains(l, "certificate") && !strings.Contains(l, "tls") {
		t.Errorf("n9's failed joins do not say the certificate was refused:\n%s", log)
	}
	var st clusterv1.GetStatusResponse
	c.protoOf(c.nodes[0], &st, "cluster", "status")
	for _, m := range st.GetMembers() {
		if m.GetId() == "n9" || m.GetRaftAddr() == intruder.raftAddr {
			t.Fatalf("a node from another CA joined: %v", m)
		}
	}
	if len(st.GetMembers()) != 3 {
		t.Fatalf("%d members, want 3", len(st.GetMembers()))
	}
	// The refusal above is n9's own (it does not trust n1). The cluster must
	// refuse n9 too, even when n9 trusts the cluster's CA: on the gRPC port
	// and on the Raft port of every node.
	pair, err := tls.LoadX509KeyPair(filepath.Join(other, "n9.crt"), filepath.Join(other, "n9.key"))
	if err != nil {
		t.Fatal(err)
	}
	foreign := &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{pair}, InsecureSkipVerify: true}
	for _, n := range c.nodes {
		conn, err := grpc.NewClient(n.grpcAddr, grpc.WithTransportCredentials(credentials.NewTLS(foreign)))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err = nodev1.NewNodeServiceClient(conn).ReadIndex(ctx, &nodev1.ReadIndexRequest{})
		cancel()
		conn.Close()
		// The connection is dropped in the handshake (how the client words
		// it varies: bad certificate, broken pipe, reset).
		if status.Code(err) != codes.Unavailable {
			t.Errorf("%s gRPC with a foreign node certificate: %v, want the connection refused (Unavailable)", n.id, err)
		}
		raw, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", n.raftAddr, foreign)
		if err != nil {
			continue // refused during the handshake
		}
		// With TLS 1.3 the server checks the client's certificate after the
		// client's side of the handshake is done: the refusal arrives as an
		// alert on the first read. A timeout would mean it was accepted.
		raw.SetDeadline(time.Now().Add(5 * time.Second))
		raw.Write([]byte{0})
		_, err = raw.Read(make([]byte, 1))
		raw.Close()
		var ne net.Error
		if err == nil || (errors.As(err, &ne) && ne.Timeout()) {
			t.Errorf("%s Raft port kept a connection with a foreign node certificate open (read: %v)", n.id, err)
		} else if !strings.Contains(err.Error(), "certificate") {
			t.Errorf("%s Raft port: %v, want a certificate refusal", n.id, err)
		}
	}
}

func Test_E2E_NoQuorum(t *testing.T) {
	c := startCluster(t, 3)
	c.must(c.nodes[0], "repo", "create", "before")
	// The survivor is a follower, and the leader dies last, so the survivor
	// never leads: the create below is refused for certain, never left in a
	// log where a later leader could still commit it.
	lead := c.leader()
	survivor := c.other(lead)
	c.other(lead, survivor).kill()
	lead.kill()
	// It must fail, not hang: runCmd kills it after 30s (exit code -1).
	start := time.Now()
	r := runCmd(t, c.dir, c.adminEnv(survivor), 30*time.Second, bin, "repo", "create", "lost")
	if r.code == 0 || r.code == -1 {
		t.Fatalf("repo create without a quorum: want a refusal within 30s, got %s", r)
	}
	stderr := r.stderr
	t.Logf("create without quorum failed after %s: %s", time.Since(start).Round(time.Millisecond), strings.TrimSpace(stderr))
	if !strings.Contains(stderr, "leader") && !strings.Contains(stderr, "majority") {
		t.Errorf("the error does not name the lost quorum: %q", stderr)
	}
	waitFor(t, "the survivor's /readyz to turn 503", 30*time.Second, func() bool {
		code, _ := survivor.readyz()
		return code == 503
	})
	for _, n := range c.nodes {
		if !n.running() {
			n.start()
		}
	}
	for _, n := range c.nodes {
		n.waitReady(60 * time.Second)
	}
	c.must(survivor, "repo", "create", "after")
	for _, n := range c.nodes {
		names := strings.Join(c.repoNames(n), " ")
		if strings.Contains(names, "lost") || !strings.Contains(names, "after") || !strings.Contains(names, "before") {
			t.Fatalf("repos on %s after recovery: %q", n.id, names)
		}
	}
	if s := c.fails(c.nodes[0], "repo", "show", "lost"); !strings.Contains(s, "not found") {
		t.Errorf("repo show lost: %q", s)
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
		"--git-host-key-files", c.hostKey(),
		"--raft-heartbeat-timeout", "500ms", "--raft-election-timeout", "500ms", "--raft-leader-lease-timeout", "250ms"}
	c.nodes = append(c.nodes, n4)
	n4.start()
	c.must(c.nodes[1], "cluster", "join", "--id", "n4", "--raft-addr", n4.raftAddr, "--grpc-addr", n4.grpcAddr)
	n4.waitReady(60 * time.Second)
	// Joined by hand, it is promoted like a node that joined by itself.
	c.waitVoters(4)
	if got, want := strings.Join(c.repoNames(n4), " "), strings.Join(c.repoNames(c.nodes[0]), " "); got != want {
		t.Fatalf("n4 lists %q, want %q", got, want)
	}
	if s := c.fails(c.nodes[0], "cluster", "join", "--id", "n4", "--raft-addr", freePort(t), "--grpc-addr", freePort(t)); !strings.Contains(s, "already a member") {
		t.Fatalf("duplicate ID join: %q", s)
	}
	c.must(c.nodes[0], "cluster", "transfer-leader", "n2")
	for _, n := range c.nodes {
		waitFor(t, n.id+" to see n2 lead", 30*time.Second, func() bool {
			var st clusterv1.GetStatusResponse
			c.protoOf(n, &st, "cluster", "status")
			return st.GetLeaderId() == "n2"
		})
	}
	c.must(c.nodes[3], "repo", "create", "after-transfer")
	c.must(c.nodes[0], "cluster", "remove", "n4")
	n4.kill()
	var st clusterv1.GetStatusResponse
	c.protoOf(c.nodes[0], &st, "cluster", "status")
	var ids []string
	for _, m := range st.GetMembers() {
		ids = append(ids, m.GetId())
	}
	sort.Strings(ids)
	if strings.Join(ids, " ") != "n1 n2 n3" {
		t.Fatalf("members after removing n4: %v, want n1 n2 n3", ids)
	}
	c.must(c.nodes[2], "repo", "create", "after-remove")
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
	tok := strconv.FormatUint(l.GetLock().GetFencingToken(), 10)
	if len(ls.Locks) != 1 || ls.Locks[0].Holder != "e2e/stuck" || ls.Locks[0].FencingToken != tok {
		t.Fatalf("lock ls = %+v, want the lock granted: %v", ls, l.GetLock())
	}
	// Releasing with a token that is not the lock's is refused.
	wrong := strconv.FormatUint(l.GetLock().GetFencingToken()+1, 10)
	c.fails(c.nodes[2], "lock", "release", "locked", "--token", wrong)
	c.jsonOf(c.nodes[1], &ls, "lock", "ls")
	if len(ls.Locks) != 1 || ls.Locks[0].FencingToken != tok {
		t.Fatalf("a release with the wrong token changed the locks: %+v", ls)
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
	short, err := locks.AcquireLock(ctx, &lockv1.AcquireLockRequest{Repo: "locked", Holder: "e2e/short", Lease: durationpb.New(time.Second)})
	if err != nil {
		t.Fatal(err)
	}
	if short.GetLock().GetFencingToken() <= l.GetLock().GetFencingToken() {
		t.Errorf("fencing token went from %d to %d; it must only grow", l.GetLock().GetFencingToken(), short.GetLock().GetFencingToken())
	}
	waitFor(t, "the lease to expire", 20*time.Second, func() bool {
		c.jsonOf(c.nodes[0], &ls, "lock", "ls")
		return len(ls.Locks) == 0
	})
	// The lock is free again: a new writer gets it at once.
	if _, err := locks.AcquireLock(ctx, &lockv1.AcquireLockRequest{Repo: "locked", Holder: "e2e/next", Lease: durationpb.New(time.Minute)}); err != nil {
		t.Fatalf("acquire after the lease ran out: %v", err)
	}
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
