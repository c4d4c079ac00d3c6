package replica

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/gitraft/gitraft/gitproto"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
	"github.com/gitraft/gitraft/storage"
)

// fakeState stands in for the replicated state and the lock table that
// Raft would keep: one per test cluster, shared by every fakeNode.
type fakeState struct {
	mu      sync.Mutex
	index   uint64
	repos   map[string]Target
	members []*fsmv1.Member
	lock    *fakeLock // the one write lock of the test repository
	// oldMembers: some member does not apply UpdateRefs.release_lock.
	oldMembers atomic.Bool
	// proposals counts UpdateRefs entries that reached the state.
	proposals atomic.Int32
	// beforePropose, if set, runs before an entry applies; an error
	// fails the proposal as a lost leader would.
	beforePropose func(ctx context.Context, e *fsmv1.Entry) error
	// afterApply, if set, runs after an entry applied; an error loses the
	// answer, as a leader that dies after the commit would.
	afterApply func(e *fsmv1.Entry) error
	// requests remembers results by request id, as the real state does.
	requests map[string]*fsmv1.Result
}

func (s *fakeState) repo(name string) (Target, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.repos[name]
	return t, ok
}

// setRef changes a ref behind the push's back, as another writer would.
func (s *fakeState) setRef(name, ref, oid string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.repos[name]
	refs := maps.Clone(t.Refs)
	if refs == nil {
		refs = map[string]string{}
	}
	refs[ref] = oid
	t.Refs, t.Version = refs, t.Version+1
	s.index++
	s.repos[name] = t
}

func (s *fakeState) apply(e *fsmv1.Entry) *fsmv1.Result {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.index++
	if r, ok := s.requests[e.GetRequestId()]; ok && e.GetRequestId() != "" {
		return r
	}
	r := s.applyLocked(e)
	if e.GetRequestId() != "" {
		if s.requests == nil {
			s.requests = map[string]*fsmv1.Result{}
		}
		s.requests[e.GetRequestId()] = r
	}
	return r
}

func (s *fakeState) applyLocked(e *fsmv1.Entry) *fsmv1.Result {
	u := e.GetUpdateRefs()
	refuse := func(r fsmv1.Reason, msg string) *fsmv1.Result {
		return &fsmv1.Result{Index: s.index, Refusal: &fsmv1.Refusal{Reason: r, Message: msg}}
	}
	if s.lock == nil || s.lock.token != u.GetFencingToken() || s.lock.isLost() {
		return refuse(fsmv1.Reason_REASON_STALE_TOKEN, "stale fencing token")
	}
	if u.GetReleaseLock() {
		// As the state machine does: the lock goes with the entry, refs
		// applied or refused.
		defer func(l *fakeLock) {
			l.releasedByEntry.Store(true)
			s.lock = nil
		}(s.lock)
	}
	t := s.repos[u.GetRepo()]
	refs := maps.Clone(t.Refs)
	if refs == nil {
		refs = map[string]string{}
	}
	for _, ru := range u.GetUpdates() {
		if refs[ru.GetRef()] != ru.GetOldOid() {
			return refuse(fsmv1.Reason_REASON_STALE_REF, "stale ref "+ru.GetRef())
		}
		if ru.GetNewOid() == "" {
			delete(refs, ru.GetRef())
		} else {
			refs[ru.GetRef()] = ru.GetNewOid()
		}
	}
	if t.Head == "" {
		t.Head = "refs/heads/main"
	}
	t.Refs, t.Version = refs, t.Version+1
	s.repos[u.GetRepo()] = t
	s.proposals.Add(1)
	return &fsmv1.Result{Index: s.index, Repo: &fsmv1.Repo{Name: t.Name, Id: t.ID, Version: t.Version}}
}

// fakeLock is the write lock as the holder sees it.
type fakeLock struct {
	s        *fakeState
	token    uint64
	lost     chan struct{}
	lostOnce sync.Once
	released atomic.Bool
	// releasedByEntry: an UpdateRefs with release_lock freed it.
	releasedByEntry atomic.Bool
	marked          atomic.Bool // MarkReleased was called
}

func (l *fakeLock) MarkReleased() { l.marked.Store(true) }

func (l *fakeLock) Token() uint64         { return l.token }
func (l *fakeLock) Lost() <-chan struct{} { return l.lost }
func (l *fakeLock) Err() error {
	if l.isLost() {
		return errors.New("lease ran out (test)")
	}
	return nil
}
func (l *fakeLock) isLost() bool {
	select {
	case <-l.lost:
		return true
	default:
		return false
	}
}

// lose takes the lock away, as an expired lease would.
func (l *fakeLock) lose() { l.lostOnce.Do(func() { close(l.lost) }) }

func (l *fakeLock) Release(context.Context) error {
	l.released.Store(true)
	l.s.mu.Lock()
	if l.s.lock == l {
		l.s.lock = nil
	}
	l.s.mu.Unlock()
	return nil
}

// fakeNode is one node's view of the fake state.
type fakeNode struct {
	s          *fakeState
	id         string
	barrierErr atomic.Pointer[error]
	connMu     sync.Mutex
	conns      map[string]*grpc.ClientConn
}

func (n *fakeNode) ID() string { return n.id }
func (n *fakeNode) Propose(ctx context.Context, e *fsmv1.Entry) (*fsmv1.Result, error) {
	if f := n.s.beforePropose; f != nil {
		if err := f(ctx, e); err != nil {
			return nil, err
		}
	}
	r := n.s.apply(e)
	if f := n.s.afterApply; f != nil {
		if err := f(e); err != nil {
			return nil, err
		}
	}
	return r, nil
}
func (n *fakeNode) ReadBarrier(ctx context.Context) (uint64, error) {
	if p := n.barrierErr.Load(); p != nil {
		return 0, *p
	}
	n.s.mu.Lock()
	defer n.s.mu.Unlock()
	return n.s.index, nil
}
func (n *fakeNode) ReleaseWithRefs() bool { return !n.s.oldMembers.Load() }
func (n *fakeNode) WaitApplied(ctx context.Context, index uint64) error {
	if p := n.barrierErr.Load(); p != nil {
		return *p
	}
	n.s.mu.Lock()
	defer n.s.mu.Unlock()
	if n.s.index < index {
		return fmt.Errorf("index %d is not applied (at %d)", index, n.s.index)
	}
	return nil
}
func (n *fakeNode) AppliedIndex() uint64 { n.s.mu.Lock(); defer n.s.mu.Unlock(); return n.s.index }
func (n *fakeNode) Ready() bool          { return true }
func (n *fakeNode) Repo(name string) (Target, bool) {
	return n.s.repo(name)
}
func (n *fakeNode) Repos() map[string]Target {
	n.s.mu.Lock()
	defer n.s.mu.Unlock()
	return maps.Clone(n.s.repos)
}
func (n *fakeNode) Members() []*fsmv1.Member {
	n.s.mu.Lock()
	defer n.s.mu.Unlock()
	return n.s.members
}
func (n *fakeNode) Voters() ([]*fsmv1.Member, error) { return n.Members(), nil }
func (n *fakeNode) Leader() (string, string)         { m := n.Members()[0]; return m.GetId(), m.GetGrpcAddr() }
func (n *fakeNode) KeyOwner(string) string           { return "alice" }
func (n *fakeNode) Access(repo, user string) (fsmv1.Access, bool) {
	_, ok := n.s.repo(repo)
	return fsmv1.Access_ACCESS_WRITE, ok
}
func (n *fakeNode) Lock(ctx context.Context, repo, holder string, onWait func(string)) (Lock, error) {
	if _, ok := n.s.repo(repo); !ok {
		return nil, ErrRepoNotFound
	}
	for {
		n.s.mu.Lock()
		if n.s.lock == nil || n.s.lock.isLost() {
			// As in the state machine: the token is the index that
			// granted the lock.
			n.s.index++
			l := &fakeLock{s: n.s, token: n.s.index, lost: make(chan struct{})}
			n.s.lock = l
			n.s.mu.Unlock()
			return l, nil
		}
		n.s.mu.Unlock()
		if onWait != nil {
			onWait("someone")
			onWait = nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}
func (n *fakeNode) Locked(string) bool {
	n.s.mu.Lock()
	defer n.s.mu.Unlock()
	return n.s.lock != nil && !n.s.lock.isLost()
}
func (n *fakeNode) Conn(addr string) (grpc.ClientConnInterface, error) {
	n.connMu.Lock()
	defer n.connMu.Unlock()
	if c, ok := n.conns[addr]; ok {
		return c, nil
	}
	c, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	n.conns[addr] = c
	return c, nil
}

// testNode is a node of a fake cluster: its git side, its store, and a
// gRPC server whose PutPack a test may delay or refuse.
type testNode struct {
	id    string
	node  *fakeNode
	r     *Replicas
	store *storage.Store
	addr  string
	// putPack, if set, runs when a pack arrives, before it is stored; an
	// error refuses it.
	putPack atomic.Pointer[func(ctx context.Context) error]
	// putPacks counts the PutPack calls this node has answered.
	putPacks atomic.Int32
}

type fakeCluster struct {
	t     *testing.T
	s     *fakeState
	nodes []*testNode
	repo  string
}

func testLogger() *slog.Logger {
	if os.Getenv("GITRAFT_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// newFakeCluster starts size nodes with one repository, "r", created at
// version 1 and present (empty) on every node's disk.
func newFakeCluster(t *testing.T, size int) *fakeCluster {
	t.Helper()
	c := &fakeCluster{t: t, s: &fakeState{repos: map[string]Target{}}, repo: "r"}
	c.s.repos["r"] = Target{Name: "r", ID: 7, Version: 1, Refs: map[string]string{}, Head: "refs/heads/main"}
	c.s.index = 7
	for i := 1; i <= size; i++ {
		id := fmt.Sprintf("n%d", i)
		st, err := storage.Open(storage.Config{Root: filepath.Join(t.TempDir(), "repos")}, testLogger())
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Init(context.Background(), "r", 7); err != nil {
			t.Fatal(err)
		}
		tn := &testNode{id: id, store: st}
		tn.node = &fakeNode{s: c.s, id: id, conns: map[string]*grpc.ClientConn{}}
		tn.r = New(Config{Store: st, SyncInterval: time.Hour, ReadCatchUp: 500 * time.Millisecond}, tn.node, testLogger().With("node", id))
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		tn.addr = ln.Addr().String()
		srv := grpc.NewServer(grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			if strings.HasSuffix(info.FullMethod, "/PutPack") {
				defer tn.putPacks.Add(1)
				if f := tn.putPack.Load(); f != nil {
					if err := (*f)(ss.Context()); err != nil {
						return err
					}
				}
			}
			return h(srv, ss)
		}))
		replicav1.RegisterReplicaServiceServer(srv, tn.r.Service())
		go srv.Serve(ln)
		t.Cleanup(func() {
			tn.r.Close()
			srv.Stop()
			for _, cc := range tn.node.conns {
				cc.Close()
			}
		})
		c.s.members = append(c.s.members, &fsmv1.Member{Id: id, GrpcAddr: tn.addr})
		c.nodes = append(c.nodes, tn)
	}
	return c
}

// onPutPack makes node i delay or refuse the packs it is sent.
func (c *fakeCluster) onPutPack(i int, f func(ctx context.Context) error) {
	c.nodes[i].putPack.Store(&f)
}

// pushData is what a client sends: a pack in a quarantine directory, and
// the ref change it carries.
type pushData struct {
	quarantine string
	update     gitproto.RefUpdate
	pack       string
}

func gitCmd(t *testing.T, dir string, args ...string) string {
	t.Helper()
	c := exec.Command("git", args...)
	c.Dir = dir
	c.Env = append(os.Environ(), "GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@example.org", "GIT_COMMITTER_NAME=t",
		"GIT_COMMITTER_EMAIL=t@example.org", "GIT_CONFIG_NOSYSTEM=1", "HOME="+dir)
	out, err := c.CombinedOutput()
	if err != nil {
		t.Fatalf("git %v: %v\n%s", args, err, out)
	}
	return strings.TrimSpace(string(out))
}

// newPush makes a first commit in a work repository and writes its objects
// as a pack into a fresh quarantine directory in node 0's copy, as
// receive-pack would.
func (c *fakeCluster) newPush(ref string) pushData {
	t := c.t
	t.Helper()
	work := t.TempDir()
	gitCmd(t, work, "init", "-q", "-b", "main")
	os.WriteFile(filepath.Join(work, "f"), []byte(work), 0o644)
	gitCmd(t, work, "add", "f")
	gitCmd(t, work, "commit", "-q", "-m", "c")
	head := gitCmd(t, work, "rev-parse", "HEAD")
	path, _ := c.nodes[0].store.Path(c.repo)
	q, err := os.MkdirTemp(filepath.Join(path, "objects"), "tmp_objdir-incoming-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(q, "pack"), 0o755); err != nil {
		t.Fatal(err)
	}
	pk := exec.Command("git", "pack-objects", "--revs", filepath.Join(q, "pack", "pack"))
	pk.Dir = work
	pk.Stdin = strings.NewReader(head + "\n")
	out, err := pk.Output()
	if err != nil {
		t.Fatalf("pack-objects: %v", err)
	}
	sum := strings.TrimSpace(string(out))
	return pushData{quarantine: q, update: gitproto.RefUpdate{Ref: ref, New: head}, pack: filepath.Join(q, "pack", "pack-"+sum)}
}

// migrate moves the quarantined pack into node i's copy, as git does once
// the hook accepts.
func (c *fakeCluster) migrate(i int, d pushData) {
	c.t.Helper()
	path, _ := c.nodes[i].store.Path(c.repo)
	for _, ext := range []string{".pack", ".idx"} {
		b, err := os.ReadFile(d.pack + ext)
		if err != nil {
			c.t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(path, "objects", "pack", filepath.Base(d.pack)+ext), b, 0o444); err != nil {
			c.t.Fatal(err)
		}
	}
}

// holds reports whether node i's copy holds oid whole.
func (c *fakeCluster) holds(i int, oid string) bool {
	c.t.Helper()
	missing, err := c.nodes[i].store.Missing(context.Background(), c.repo, []string{oid})
	if err != nil {
		c.t.Fatal(err)
	}
	return len(missing) == 0
}

func (c *fakeCluster) version() uint64 {
	t, _ := c.s.repo(c.repo)
	return t.Version
}

func noProgress(string) {}
