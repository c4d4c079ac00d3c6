package gitproto

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"
)

// fakePush is a PushTx that records what the hook handed it.
type fakePush struct {
	path   string
	refuse string // Commit's error, if not ""

	mu         sync.Mutex
	quarantine string
	packs      int
	updates    []RefUpdate
	finished   []bool
}

func (p *fakePush) Path() string    { return p.path }
func (p *fakePush) Version() uint64 { return 7 }

func (p *fakePush) Commit(ctx context.Context, quarantine string, updates []RefUpdate, atomic bool, progress func(string)) ([]RefUpdate, error) {
	packs, _ := filepath.Glob(filepath.Join(quarantine, "pack", "*.pack"))
	p.mu.Lock()
	p.quarantine, p.packs, p.updates = quarantine, len(packs), updates
	p.mu.Unlock()
	progress("replicated to 3/3 nodes")
	if p.refuse != "" {
		return nil, errors.New(p.refuse)
	}
	return updates, nil
}

func (p *fakePush) Finish(ok bool) {
	p.mu.Lock()
	p.finished = append(p.finished, ok)
	p.mu.Unlock()
}

// finishCalls waits up to 10 s for n calls of Finish and returns their oks.
func (p *fakePush) finishCalls(n int) []bool {
	deadline := time.Now().Add(10 * time.Second)
	for {
		p.mu.Lock()
		got := append([]bool(nil), p.finished...)
		p.mu.Unlock()
		if len(got) >= n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// runHookScript runs hookScript with the real sh, as git would: stdin and
// environment given, fd 3 and 4 the pipes to the node, answered by
// serveHook on p.
func runHookScript(t *testing.T, p *pushSession, stdin string, env ...string) (code int, stderr string) {
	t.Helper()
	dir := t.TempDir()
	hook := filepath.Join(dir, "pre-receive")
	if err := writeHook(hook); err != nil {
		t.Fatal(err)
	}
	pipes, err := newHookPipes()
	if err != nil {
		t.Fatal(err)
	}
	defer pipes.close()
	c := exec.Command(hook)
	c.Env = append([]string{"PATH=" + os.Getenv("PATH")}, env...)
	c.Stdin = strings.NewReader(stdin)
	var errb bytes.Buffer
	c.Stderr = &errb
	c.ExtraFiles = pipes.childFiles()
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	pipes.closeChildEnds()
	done := make(chan struct{})
	go func() {
		defer close(done)
		p.serveHook(context.Background(), pipes.reqR, &hookReplies{w: pipes.verdictW})
	}()
	err = c.Wait()
	<-done
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), errb.String()
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0, errb.String()
}

const (
	oidA = "1111111111111111111111111111111111111111"
	oidB = "2222222222222222222222222222222222222222"
	zero = "0000000000000000000000000000000000000000"
)

// The hook hands the node exactly what git fed it, the quarantine and the
// push options, and relays the node's progress and verdict.
func Test_Hook_HandsThePushToTheNode(t *testing.T) {
	tx := &fakePush{}
	p := &pushSession{tx: tx}
	stdin := fmt.Sprintf("%s %s refs/heads/main\n%s %s refs/tags/v1\n", oidA, oidB, zero, oidA)
	code, stderr := runHookScript(t, p, stdin, EnvPushID+"=x", "GIT_QUARANTINE_PATH=/q/tmp_objdir-incoming-1",
		"GIT_PUSH_OPTION_COUNT=2", "GIT_PUSH_OPTION_0=ci.skip", "GIT_PUSH_OPTION_1=with space $HOME `x`")
	if code != 0 {
		t.Fatalf("hook exit %d: %s", code, stderr)
	}
	want := []RefUpdate{{Ref: "refs/heads/main", Old: oidA, New: oidB}, {Ref: "refs/tags/v1", New: oidA}}
	if fmt.Sprint(tx.updates) != fmt.Sprint(want) || tx.quarantine != "/q/tmp_objdir-incoming-1" {
		t.Fatalf("the node got %v in %q, want %v", tx.updates, tx.quarantine, want)
	}
	if !p.committed || fmt.Sprint(p.pushOptions) != fmt.Sprint([]string{"ci.skip", "with space $HOME `x`"}) {
		t.Fatalf("committed %v, push options %q", p.committed, p.pushOptions)
	}
	if !strings.Contains(stderr, "gitraft: replicated to 3/3 nodes\n") {
		t.Fatalf("progress not relayed: %q", stderr)
	}
}

// Every ref update reaches the node, in order, whether the hook reads
// them all itself (up to 16) or passes the rest on with cat.
func Test_Hook_HandsOverEveryRefUpdate(t *testing.T) {
	for _, n := range []int{1, 15, 16, 17, 40} {
		tx := &fakePush{}
		p := &pushSession{tx: tx}
		var in strings.Builder
		var want []RefUpdate
		for i := range n {
			ref := fmt.Sprintf("refs/heads/b%02d", i)
			fmt.Fprintf(&in, "%s %s %s\n", zero, oidA, ref)
			want = append(want, RefUpdate{Ref: ref, New: oidA})
		}
		code, stderr := runHookScript(t, p, in.String(), EnvPushID+"=x")
		if code != 0 {
			t.Fatalf("%d refs: hook exit %d: %s", n, code, stderr)
		}
		if fmt.Sprint(tx.updates) != fmt.Sprint(want) {
			t.Fatalf("%d refs: the node got %v, want %v", n, tx.updates, want)
		}
	}
}

// A refusal reaches the pusher line by line, and the hook refuses.
func Test_Hook_RelaysARefusal(t *testing.T) {
	tx := &fakePush{refuse: "lost the write lock\nnothing was changed"}
	p := &pushSession{tx: tx}
	code, stderr := runHookScript(t, p, fmt.Sprintf("%s %s refs/heads/main\n", oidA, oidB), EnvPushID+"=x")
	if code != 1 || p.committed {
		t.Fatalf("hook exit %d, committed %v: %s", code, p.committed, stderr)
	}
	if !strings.Contains(stderr, "gitraft: lost the write lock\ngitraft: nothing was changed\n") {
		t.Fatalf("refusal not relayed: %q", stderr)
	}
}

// Too many refs are refused before the node is asked, after the hook
// has said them all (it must not block on a full pipe).
func Test_Hook_TooManyRefs(t *testing.T) {
	tx := &fakePush{}
	p := &pushSession{tx: tx, maxRefs: 1000}
	var in strings.Builder
	for i := range 3000 {
		fmt.Fprintf(&in, "%s %s refs/heads/b%05d\n", zero, oidA, i)
	}
	code, stderr := runHookScript(t, p, in.String(), EnvPushID+"=x")
	if code != 1 || tx.updates != nil || !strings.Contains(stderr, "this push updates 3000 refs; a push may update at most 1000") {
		t.Fatalf("hook exit %d, node got %d updates: %s", code, len(tx.updates), stderr)
	}
}

// Outside a push, and when the node is gone, the hook refuses and says why.
func Test_Hook_OutsideAPushOrWithoutTheNode(t *testing.T) {
	hook := filepath.Join(t.TempDir(), "pre-receive")
	if err := writeHook(hook); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(hook).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "only runs inside a gitraft push") {
		t.Fatalf("outside a push: %v %q", err, out)
	}
	// The node's ends are closed: the request cannot be said, or no answer
	// comes.
	pipes, err := newHookPipes()
	if err != nil {
		t.Fatal(err)
	}
	c := exec.Command(hook)
	c.Env = []string{EnvPushID + "=x"}
	c.Stdin = strings.NewReader(fmt.Sprintf("%s %s refs/heads/main\n", oidA, oidB))
	c.ExtraFiles = pipes.childFiles()
	pipes.reqR.Close()
	pipes.verdictW.Close()
	out, err = c.CombinedOutput()
	pipes.closeChildEnds()
	if err == nil || !strings.Contains(string(out), "gitraft: cannot reach the node") {
		t.Fatalf("without the node: %v %q", err, out)
	}
}

// pushBackend lets alice push to one repository, through fakePush.
type pushBackend struct {
	fakeBackend
	tx *fakePush
}

func (b *pushBackend) Access(context.Context, string, string) (Access, error) {
	return AccessWrite, nil
}

func (b *pushBackend) BeginPush(context.Context, string, string, string, func(string)) (PushTx, error) {
	return b.tx, nil
}

// pushRig is a repository with one commit in a work tree, served over
// SSH to alice by a Server whose backend the test gives (backend gets the
// host key, alice's key and the bare repository's path).
type pushRig struct {
	dir, repo, work, head string
	git                   func(wd string, args ...string) (string, error)
	// push runs git push in the work tree with args.
	push func(args ...string) (string, error)
	// refOf is a ref's value in the bare repository ("" when absent).
	refOf func(ref string) string
}

func newPushRig(t *testing.T, backend func(host gossh.Signer, alice gossh.PublicKey, repo string) Backend, configure ...func(*Server)) *pushRig {
	t.Helper()
	for _, tool := range []string{"git", "ssh"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is not installed", tool)
		}
	}
	dir := t.TempDir()
	rig := &pushRig{dir: dir, repo: filepath.Join(dir, "r.git"), work: filepath.Join(dir, "work")}
	rig.git = func(wd string, args ...string) (string, error) {
		c := exec.Command("git", args...)
		c.Dir = wd
		c.Env = append(os.Environ(), "GIT_CONFIG_NOSYSTEM=1", "HOME="+dir, "GIT_AUTHOR_NAME=a", "GIT_AUTHOR_EMAIL=a@x",
			"GIT_COMMITTER_NAME=a", "GIT_COMMITTER_EMAIL=a@x")
		out, err := c.CombinedOutput()
		return string(out), err
	}
	git := rig.git
	for _, args := range [][]string{{"init", "-q", "--bare", rig.repo}, {"-C", rig.repo, "config", "receive.unpackLimit", "1"}, {"init", "-q", "-b", "main", rig.work}} {
		if out, err := git(dir, args...); err != nil {
			t.Fatalf("git %v: %v %s", args, err, out)
		}
	}
	os.WriteFile(filepath.Join(rig.work, "f"), []byte("x\n"), 0o644)
	if out, err := git(rig.work, "add", "f"); err != nil {
		t.Fatal(err, out)
	}
	if out, err := git(rig.work, "commit", "-q", "-m", "one"); err != nil {
		t.Fatal(err, out)
	}
	head, _ := git(rig.work, "rev-parse", "HEAD")
	rig.head = strings.TrimSpace(head)

	_, alicePriv, _ := ed25519.GenerateKey(rand.Reader)
	aliceKey, _ := gossh.NewSignerFromKey(alicePriv)
	block, err := gossh.MarshalPrivateKey(alicePriv, "")
	if err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(dir, "alice")
	os.WriteFile(keyFile, pem.EncodeToMemory(block), 0o600)
	host := newSigner(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	knownHosts := filepath.Join(dir, "known_hosts")
	os.WriteFile(knownHosts, []byte(fmt.Sprintf("[127.0.0.1]:%d %s", port, gossh.MarshalAuthorizedKey(host.PublicKey()))), 0o600)
	srv, err := New(Config{NodeID: "t1", Listener: ln, StateDir: filepath.Join(dir, "state")}, backend(host, aliceKey.PublicKey(), rig.repo), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range configure {
		f(srv)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(context.Background()) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	sshCmd := fmt.Sprintf("ssh -i %s -o IdentitiesOnly=yes -o UserKnownHostsFile=%s -o StrictHostKeyChecking=yes -o BatchMode=yes -p %d", keyFile, knownHosts, port)
	rig.push = func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		c := exec.CommandContext(ctx, "git", append([]string{"push", "git@127.0.0.1:r"}, args...)...)
		c.Dir, c.Env = rig.work, append(os.Environ(), "GIT_SSH_COMMAND="+sshCmd, "GIT_CONFIG_NOSYSTEM=1", "HOME="+dir)
		out, err := c.CombinedOutput()
		return string(out), err
	}
	rig.refOf = func(ref string) string {
		out, _ := git(rig.repo, "rev-parse", "--verify", "-q", ref)
		return strings.TrimSpace(out)
	}
	return rig
}

// A real push over SSH: git receive-pack runs the installed hook, which
// reaches the push session through the fds git passed on to it, and the
// ref changes only when the node commits.
func Test_Push_RealGitRunsTheHook(t *testing.T) {
	var tx *fakePush
	rig := newPushRig(t, func(host gossh.Signer, alice gossh.PublicKey, repo string) Backend {
		tx = &fakePush{path: repo}
		return &pushBackend{fakeBackend: fakeBackend{host: host, alice: alice, repo: repo}, tx: tx}
	})
	head := rig.head
	push := func() (string, error) { return rig.push("main") }
	refOf := func() string { return rig.refOf("refs/heads/main") }

	// Refused by the node: git refuses the ref, and says why.
	tx.refuse = "the cluster lost its quorum; nothing was changed"
	out, err := push()
	if err == nil || !strings.Contains(out, "gitraft: the cluster lost its quorum; nothing was changed") || refOf() != "" {
		t.Fatalf("refused push: %v, ref %q:\n%s", err, refOf(), out)
	}
	if tx.packs != 1 || !strings.Contains(tx.quarantine, "incoming") {
		t.Fatalf("the node saw %d packs in quarantine %q", tx.packs, tx.quarantine)
	}
	// Accepted: git sets the ref the node committed.
	tx.refuse = ""
	out, err = push()
	if err != nil || refOf() != head {
		t.Fatalf("accepted push: %v, ref %q want %q:\n%s", err, refOf(), head, out)
	}
	if want := []RefUpdate{{Ref: "refs/heads/main", New: head}}; fmt.Sprint(tx.updates) != fmt.Sprint(want) {
		t.Fatalf("the node got %v, want %v", tx.updates, want)
	}
	if !strings.Contains(out, "gitraft: replicated to 3/3 nodes") {
		t.Fatalf("progress not relayed:\n%s", out)
	}
	// Finish runs once the client has its exit code.
	if got := tx.finishCalls(2); fmt.Sprint(got) != "[false true]" {
		t.Fatalf("Finish calls %v, want [false true]", got)
	}
}

// readAheadBackend offers its repository to read ahead; BeginPush first
// runs change (the copy changing while the lock is taken), and the push's
// transaction reports the copy unchanged or not as told.
type readAheadBackend struct {
	pushBackend
	mu        sync.Mutex
	change    func()
	unchanged bool
	offered   int
}

func (b *readAheadBackend) set(change func(), unchanged bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.change, b.unchanged = change, unchanged
}

func (b *readAheadBackend) timesOffered() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.offered
}

type readAheadTx struct {
	*fakePush
	unchanged bool
}

func (t readAheadTx) UnchangedSince(uint64) bool { return t.unchanged }

func (b *readAheadBackend) PushCopy(string) (string, uint64, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.offered++
	return b.repo, 7, true
}

func (b *readAheadBackend) BeginPush(context.Context, string, string, string, func(string)) (PushTx, error) {
	b.mu.Lock()
	change, unchanged := b.change, b.unchanged
	b.mu.Unlock()
	if change != nil {
		change()
	}
	return readAheadTx{b.tx, unchanged}, nil
}

// git starts on the copy before BeginPush returns; what it read reaches
// the client only if the copy did not change meanwhile. Otherwise a new
// git reads the copy as BeginPush left it.
func Test_Push_ReadAhead(t *testing.T) {
	var b *readAheadBackend
	started := make(chan *receivePack, 1)
	rig := newPushRig(t, func(host gossh.Signer, alice gossh.PublicKey, repo string) Backend {
		b = &readAheadBackend{pushBackend: pushBackend{fakeBackend: fakeBackend{host: host, alice: alice, repo: repo}, tx: &fakePush{path: repo}}}
		return b
	}, func(s *Server) {
		s.readAheadStarted = func(rp *receivePack) {
			select { // only the latest push's git matters
			case <-started:
			default:
			}
			started <- rp
		}
	})
	// advertised waits until the git started ahead has written its whole
	// ref advertisement (it ends with a flush packet), so a change made
	// after it is one that git did not see.
	advertised := func() {
		var rp *receivePack
		select {
		case rp = <-started:
		case <-time.After(30 * time.Second):
			t.Error("no git receive-pack was started ahead of BeginPush")
			return
		}
		deadline := time.Now().Add(30 * time.Second)
		for !bytes.HasSuffix(rp.out.heldSoFar(), []byte("0000")) {
			if time.Now().After(deadline) {
				t.Errorf("git wrote no whole advertisement: %q", rp.out.heldSoFar())
				return
			}
			time.Sleep(time.Millisecond)
		}
	}
	// Unchanged: the git that read ahead serves the push.
	b.set(nil, true)
	if out, err := rig.push("main"); err != nil || rig.refOf("refs/heads/main") != rig.head {
		t.Fatalf("push: %v, main %q:\n%s", err, rig.refOf("refs/heads/main"), out)
	}
	if n := b.timesOffered(); n != 1 {
		t.Fatalf("PushCopy asked %d times, want 1", n)
	}
	// While the lock is taken (after git read the refs), another push
	// creates refs/heads/other.
	change := func() {
		advertised()
		if out, err := rig.git(rig.repo, "update-ref", "refs/heads/other", rig.head); err != nil {
			t.Errorf("update-ref: %v %s", err, out)
		}
	}
	// A transaction that (wrongly) says unchanged shows what git read
	// ahead: the client does not see the new ref, so cannot delete it.
	// This is what UnchangedSince guards against.
	b.set(change, true)
	out, err := rig.push(":other")
	if err == nil || !strings.Contains(out, "remote ref does not exist") {
		t.Fatalf("the advertisement read ahead was not used: %v\n%s", err, out)
	}
	if out, err := rig.git(rig.repo, "update-ref", "-d", "refs/heads/other"); err != nil {
		t.Fatal(err, out)
	}
	// Changed: a fresh git advertises the ref, and the delete goes through.
	b.set(change, false)
	if out, err := rig.push(":other"); err != nil || rig.refOf("refs/heads/other") != "" {
		t.Fatalf("delete after the copy changed: %v, other %q:\n%s", err, rig.refOf("refs/heads/other"), out)
	}
	b.tx.mu.Lock()
	got := b.tx.updates
	b.tx.mu.Unlock()
	if want := []RefUpdate{{Ref: "refs/heads/other", Old: rig.head}}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("the node got %v, want %v", got, want)
	}
}
