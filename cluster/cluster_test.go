package cluster

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

// testCluster is a whole cluster in this process, insecure on loopback.
type testCluster struct {
	t     *testing.T
	tune  func(*Config)
	dir   string
	nodes map[string]*Node
	cfgs  map[string]Config
}

func testLogger(t *testing.T) *slog.Logger {
	if os.Getenv("GITRAFT_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func mustNewCluster(t *testing.T, size int, tune ...func(*Config)) *testCluster {
	t.Helper()
	c := &testCluster{t: t, dir: t.TempDir(), nodes: map[string]*Node{}, cfgs: map[string]Config{}}
	if len(tune) > 0 {
		c.tune = tune[0]
	}
	t.Cleanup(func() {
		for _, n := range c.nodes {
			n.Close()
		}
	})
	for i := 1; i <= size; i++ {
		c.add(fmt.Sprintf("n%d", i), i == 1)
		if i == 1 {
			c.waitLeader()
		}
	}
	c.waitMembers(size)
	c.waitVoters(size)
	return c
}

func (c *testCluster) add(id string, bootstrap bool) *Node {
	c.t.Helper()
	cfg := Config{
		NodeID: id, DataDir: filepath.Join(c.dir, id),
		// Port 0: the kernel picks free ports as the node listens, so a
		// port cannot be taken by another test between choosing and
		// listening. start records the ports for restarts.
		RaftAddr: "127.0.0.1:0", GRPCAddr: "127.0.0.1:0", HTTPAddr: "127.0.0.1:0",
		Insecure: true, Bootstrap: bootstrap,
		Raft:               RaftTuning{HeartbeatTimeout: 300 * time.Millisecond, ElectionTimeout: 300 * time.Millisecond, LeaderLeaseTimeout: 150 * time.Millisecond},
		LockExpiryInterval: 50 * time.Millisecond,
		PromoteInterval:    50 * time.Millisecond,
	}
	if c.tune != nil {
		c.tune(&cfg)
	}
	if !bootstrap {
		for _, n := range c.nodes {
			cfg.Join = append(cfg.Join, n.GRPCAddr())
		}
	}
	return c.start(cfg)
}

func (c *testCluster) start(cfg Config) *Node {
	c.t.Helper()
	n, err := New(cfg, testLogger(c.t).With("node", cfg.NodeID))
	if err != nil {
		c.t.Fatalf("start %s: %v", cfg.NodeID, err)
	}
	c.nodes[cfg.NodeID] = n
	// A restart must come back on the same addresses (peers know them).
	cfg.RaftAddr, cfg.RaftAdvertise = n.RaftAddr(), ""
	cfg.GRPCAddr, cfg.GRPCAdvertise = n.GRPCAddr(), ""
	cfg.HTTPAddr = n.HTTPAddr()
	c.cfgs[cfg.NodeID] = cfg
	return n
}

func (c *testCluster) stop(id string) {
	c.t.Helper()
	if err := c.nodes[id].Close(); err != nil {
		c.t.Logf("close %s: %v", id, err)
	}
	delete(c.nodes, id)
}

func (c *testCluster) restart(id string) *Node {
	c.t.Helper()
	cfg := c.cfgs[id]
	cfg.Join = nil
	return c.start(cfg)
}

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (c *testCluster) waitLeader() *Node {
	c.t.Helper()
	var leader *Node
	waitFor(c.t, "a leader", 15*time.Second, func() bool {
		for _, n := range c.nodes {
			if n.IsLeader() && n.leaderReady.Load() {
				leader = n
				return true
			}
		}
		return false
	})
	return leader
}

func (c *testCluster) waitMembers(size int) {
	c.t.Helper()
	// Registered means with the feature level each reports (a joining node
	// is recorded first with the addresses it asked to join with).
	waitFor(c.t, fmt.Sprintf("%d registered members", size), 15*time.Second, func() bool {
		for _, n := range c.nodes {
			ok := true
			n.fsm.Read(func(s *State) {
				ok = len(s.Members()) == size
				for _, m := range c.nodes {
					rec, _ := s.Member(m.ID())
					ok = ok && rec.GetFeatureLevel() == m.ownFeatureLevel()
				}
			})
			if !ok {
				return false
			}
		}
		return true
	})
}

// suffrages is the Raft configuration as the leader sees it: ID to suffrage.
func (c *testCluster) suffrages() map[string]raft.ServerSuffrage {
	c.t.Helper()
	f := c.waitLeader().raft.GetConfiguration()
	if err := f.Error(); err != nil {
		c.t.Fatal(err)
	}
	out := map[string]raft.ServerSuffrage{}
	for _, s := range f.Configuration().Servers {
		out[string(s.ID)] = s.Suffrage
	}
	return out
}

// waitVoters waits until the configuration has size voters: members join as
// non-voters, and the leader promotes them.
func (c *testCluster) waitVoters(size int) {
	c.t.Helper()
	waitFor(c.t, fmt.Sprintf("%d voters", size), 15*time.Second, func() bool {
		voters := 0
		for _, s := range c.suffrages() {
			if s == raft.Voter {
				voters++
			}
		}
		return voters == size
	})
}

func (c *testCluster) any() *Node {
	for _, n := range c.nodes {
		return n
	}
	return nil
}

func (c *testCluster) follower() *Node {
	for _, n := range c.nodes {
		if !n.IsLeader() {
			return n
		}
	}
	c.t.Fatal("no follower")
	return nil
}

func propose(t *testing.T, n *Node, e *fsmv1.Entry) *fsmv1.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := n.Propose(ctx, e)
	if err != nil {
		t.Fatalf("propose on %s: %v", n.ID(), err)
	}
	if r.GetRefusal() != nil {
		t.Fatalf("refused: %v", r.GetRefusal())
	}
	return r
}

// stateOf serialises a node's state for comparison.
func stateOf(t *testing.T, n *Node) []byte {
	var b []byte
	n.fsm.Read(func(s *State) { b = snapshotBytesAt(t, s) })
	return b
}

func snapshotBytesAt(t *testing.T, s *State) []byte {
	v := s.capture()
	v.index = 0 // nodes compare content, not how far their logs reach
	var out []byte
	v.items(func(it *fsmv1.SnapshotItem) bool {
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(it)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, b...)
		return true
	})
	return out
}

func (c *testCluster) waitConverged() {
	c.t.Helper()
	waitFor(c.t, "every node to hold the same state", 15*time.Second, func() bool {
		var ref []byte
		for _, n := range c.nodes {
			s := stateOf(c.t, n)
			if ref == nil {
				ref = s
			} else if string(ref) != string(s) {
				return false
			}
		}
		return true
	})
}

func Test_MultiNode_WritesThroughFollower(t *testing.T) {
	c := mustNewCluster(t, 3)
	f := c.follower()
	r := propose(t, f, create("via-follower"))
	if r.GetRepo().GetVersion() != 1 {
		t.Fatalf("result %v", r)
	}
	// A read barrier on another follower sees the write at once.
	for _, n := range c.nodes {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		idx, err := n.ReadBarrier(ctx)
		cancel()
		if err != nil || idx < r.GetIndex() {
			t.Fatalf("%s read barrier = %d, %v; want >= %d", n.ID(), idx, err, r.GetIndex())
		}
		var ok bool
		n.fsm.Read(func(s *State) { _, ok = s.Repo("via-follower") })
		if !ok {
			t.Fatalf("%s does not see the repo after a read barrier", n.ID())
		}
	}
	c.waitConverged()
}

func Test_MultiNode_LeaderKilled(t *testing.T) {
	c := mustNewCluster(t, 3)
	leader := c.waitLeader()
	var committed []string
	for i := range 20 {
		name := fmt.Sprintf("r%d", i)
		propose(t, c.follower(), create(name))
		committed = append(committed, name)
	}
	c.stop(leader.ID())
	newLeader := c.waitLeader()
	if newLeader.ID() == leader.ID() {
		t.Fatal("old leader still leads")
	}
	propose(t, c.any(), create("after-failover"))
	for _, n := range c.nodes {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if _, err := n.ReadBarrier(ctx); err != nil {
			t.Fatal(err)
		}
		cancel()
		n.fsm.Read(func(s *State) {
			for _, name := range append(committed, "after-failover") {
				if _, ok := s.Repo(name); !ok {
					t.Errorf("%s lost committed repo %s", n.ID(), name)
				}
			}
		})
	}
	// The old leader comes back as a follower with everything.
	c.restart(leader.ID())
	c.waitConverged()
}

func Test_MultiNode_FollowerRestartCatchesUp(t *testing.T) {
	c := mustNewCluster(t, 3)
	f := c.follower()
	id := f.ID()
	c.stop(id)
	for i := range 10 {
		propose(t, c.any(), create(fmt.Sprintf("while-down-%d", i)))
	}
	n := c.restart(id)
	waitFor(t, "restarted follower ready", 15*time.Second, func() bool { ok, _ := n.Ready(); return ok })
	c.waitConverged()
}

func Test_MultiNode_NewMemberGetsSnapshot(t *testing.T) {
	// Keep few log entries behind a snapshot, so a new member cannot replay
	// the log from the start and must install the snapshot.
	c := mustNewCluster(t, 3, func(cfg *Config) { cfg.Raft.TrailingLogs = 2 })
	for i := range 30 {
		propose(t, c.any(), create(fmt.Sprintf("s%d", i)))
	}
	for _, n := range c.nodes {
		if err := n.raft.Snapshot().Error(); err != nil {
			t.Fatal(err)
		}
	}
	leader := c.waitLeader()
	if first, _ := leader.store.FirstIndex(); first <= 1 {
		t.Fatalf("leader log not compacted (first index %d)", first)
	}
	n4 := c.add("n4", false)
	c.waitMembers(4)
	c.waitConverged()
	var restored bool
	n4.fsm.Read(func(s *State) { _, restored = s.Repo("s0") })
	if !restored {
		t.Fatal("n4 is missing repos written before it joined")
	}
	if st, _ := n4.raft.Stats()["last_snapshot_index"]; st == "0" {
		t.Fatalf("n4 did not install a snapshot (stats %v)", n4.raft.Stats())
	}
}

func Test_MultiNode_LockExpiryDrivenByLeader(t *testing.T) {
	c := mustNewCluster(t, 3)
	n := c.follower()
	propose(t, n, create("r"))
	tok := propose(t, n, acquire("r", "n/x", 200*time.Millisecond)).GetLock().GetFencingToken()
	ctx0, cancel0 := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel0()
	if _, err := n.ReadBarrier(ctx0); err != nil { // n is a follower: see the grant first
		t.Fatal(err)
	}
	var held bool
	n.fsm.Read(func(s *State) { held = len(s.Locks()) == 1 })
	if !held {
		t.Fatal("lock not visible after a read barrier")
	}
	waitFor(t, "the lease to be expired by the leader", 10*time.Second, func() bool {
		n.fsm.Read(func(s *State) { held = len(s.Locks()) > 0 })
		return !held
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, err := n.Propose(ctx, update("r", tok, false, "refs/heads/main", "", oidA))
	if err != nil {
		t.Fatal(err)
	}
	if r.GetRefusal().GetReason() != fsmv1.Reason_REASON_LOCK_NOT_HELD {
		t.Fatalf("write under an expired lock: %v", r)
	}
}

func Test_MultiNode_NoQuorum(t *testing.T) {
	c := mustNewCluster(t, 3)
	survivor := c.follower()
	for id := range c.nodes {
		if id != survivor.ID() {
			c.stop(id)
		}
	}
	before := stateOf(t, survivor)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	_, err := survivor.Propose(ctx, create("lost"))
	if err == nil {
		t.Fatal("write succeeded without a quorum")
	}
	t.Logf("no-quorum write failed after %s: %v", time.Since(start).Round(time.Millisecond), err)
	if st := toStatus(err); st.Error() == "" {
		t.Fatal("empty error")
	}
	if string(before) != string(stateOf(t, survivor)) {
		t.Fatal("state changed without a quorum")
	}
}

func Test_Node_RefusesForeignDataDir(t *testing.T) {
	c := mustNewCluster(t, 1)
	cfg := c.cfgs["n1"]
	c.stop("n1")
	cfg.NodeID = "other"
	cfg.Bootstrap = false
	if _, err := New(cfg, testLogger(t)); err == nil || !errorsIs(err, ErrDataDir) {
		t.Fatalf("started on another node's data dir: %v", err)
	}
	// A damaged raft.db.
	cfg = c.cfgs["n1"]
	if err := os.WriteFile(filepath.Join(cfg.DataDir, raftDirName, raftDBName), []byte("not a bolt file"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := New(cfg, testLogger(t))
	if err == nil || !errorsIs(err, ErrDataDir) {
		t.Fatalf("started on a damaged raft.db: %v", err)
	}
	t.Log(err)
}

func Test_Node_InsecureOnlyOnLoopback(t *testing.T) {
	_, err := New(Config{NodeID: "n1", DataDir: t.TempDir(), RaftAddr: "0.0.0.0:0", GRPCAddr: "127.0.0.1:0", Insecure: true}, testLogger(t))
	if err == nil || !errorsIs(err, ErrConfig) {
		t.Fatalf("insecure on 0.0.0.0 accepted: %v", err)
	}
}

var _ = raft.Leader

// Reads must not wait for entries that never reach the state machine:
// membership changes and a new leader's first entries.
func Test_MultiNode_ReadAfterMembershipAndLeaderChange(t *testing.T) {
	c := mustNewCluster(t, 3)
	propose(t, c.any(), create("r"))
	barrierAll := func(what string) {
		t.Helper()
		for _, n := range c.nodes {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err := n.ReadBarrier(ctx)
			cancel()
			if err != nil {
				t.Fatalf("read on %s after %s: %v", n.ID(), what, err)
			}
		}
	}
	c.add("n4", false)
	c.waitMembers(4)
	barrierAll("adding n4")

	leader := c.waitLeader()
	if err := leader.raft.RemoveServer("n4", 0, 5*time.Second).Error(); err != nil {
		t.Fatal(err)
	}
	c.stop("n4")
	barrierAll("removing n4")

	if err := leader.raft.LeadershipTransfer().Error(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a new leader", 10*time.Second, func() bool {
		l := c.waitLeader()
		return l.ID() != leader.ID()
	})
	barrierAll("a leadership transfer")
}
