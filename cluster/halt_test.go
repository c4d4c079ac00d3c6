package cluster

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	nodev1 "github.com/gitraft/gitraft/proto/gitraft/node/v1"
)

func nodeClient(t *testing.T, n *Node) nodev1.NodeServiceClient {
	t.Helper()
	conn, err := grpc.NewClient(n.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return nodev1.NewNodeServiceClient(conn)
}

// A holder of a node certificate sends entries no node could apply, to a
// follower's and to the leader's NodeService.Propose (what followers
// forward to): every one is refused with InvalidArgument before it reaches
// the log, and no node panics or changes.
func Test_MultiNode_MalformedProposalsRefused(t *testing.T) {
	c := mustNewCluster(t, 3)
	propose(t, c.any(), create("r"))
	leader, follower := c.waitLeader(), c.follower()
	c.waitConverged()

	future := &fsmv1.Entry{}
	if err := proto.Unmarshal(futureEntryBytes(t, "mallory"), future); err != nil {
		t.Fatal(err)
	}
	poison := map[string]*fsmv1.Entry{
		"no command":          {},
		"unknown command":     future,
		"unknown format":      {Format: 9, Command: &fsmv1.Entry_CreateRepo{CreateRepo: &fsmv1.CreateRepo{Name: "x"}}},
		"unknown field":       {Command: &fsmv1.Entry_CreateRepo{CreateRepo: withUnknownField(&fsmv1.CreateRepo{Name: "x"}, 7)}},
		"empty database":      {Command: &fsmv1.Entry_Database{Database: &dbv1.Command{}}},
		"create without name": create(""),
	}
	before := stateOf(t, leader)
	lastIndex := leader.raft.LastIndex()
	for _, n := range []*Node{follower, leader} {
		client := nodeClient(t, n)
		for name, e := range poison {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := client.Propose(ctx, &nodev1.ProposeRequest{Entry: e})
			cancel()
			if status.Code(err) != codes.InvalidArgument {
				t.Errorf("%s NodeService.Propose %s: %v, want InvalidArgument", n.ID(), name, err)
			} else {
				t.Logf("%s refused %s: %s", n.ID(), name, status.Convert(err).Message())
			}
			// The local path (what the admin services use) refuses too.
			ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
			_, err = n.Propose(ctx, e)
			cancel()
			if !errors.Is(err, ErrInvalidEntry) || status.Code(toStatus(err)) != codes.InvalidArgument {
				t.Errorf("%s Propose %s: %v, want ErrInvalidEntry", n.ID(), name, err)
			}
		}
	}
	if got := leader.raft.LastIndex(); got != lastIndex {
		t.Errorf("the leader's log grew from %d to %d", lastIndex, got)
	}
	if string(stateOf(t, leader)) != string(before) {
		t.Error("the state changed")
	}
	// Everyone is alive, and well-formed writes go on.
	r := propose(t, follower, create("after"))
	for _, n := range c.nodes {
		if h := n.fsm.Halted(); h != nil {
			t.Errorf("%s halted: %s", n.ID(), h.Message())
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		idx, err := n.ReadBarrier(ctx)
		cancel()
		if err != nil || idx < r.GetIndex() {
			t.Fatalf("%s read barrier = %d, %v", n.ID(), idx, err)
		}
	}
	c.waitConverged()
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// A rolling upgrade gone wrong: a newer leader writes a command that one
// older follower does not know. The follower halts (no panic, no crash
// loop), says "upgrade this node" in readiness, status and metrics, serves
// no reads, takes no snapshot and keeps its log; the others go on. Restarted
// as the newer binary, it replays the log and catches up.
func Test_MultiNode_UnknownEntryHaltsOldNodeUntilUpgraded(t *testing.T) {
	c := mustNewCluster(t, 3, func(cfg *Config) { cfg.newerCommands = knowFutureCommand; cfg.Version = "1.1" })
	propose(t, c.any(), create("before"))

	// One follower runs the older binary.
	old := c.follower()
	id := old.ID()
	c.stop(id)
	cfg := c.cfgs[id]
	cfg.newerCommands, cfg.Version = nil, "1.0"
	c.cfgs[id] = cfg
	old = c.restart(id)
	waitFor(t, "the older node ready", 15*time.Second, func() bool { ok, _ := old.Ready(); return ok })
	if err := old.raft.Snapshot().Error(); err != nil {
		t.Fatalf("snapshot before the halt: %v", err)
	}

	// The newer leader writes command 99, bypassing validation as a newer
	// binary would (it knows the command), then more.
	leader := c.waitLeader()
	f := leader.raft.Apply(futureEntryBytes(t, "bob"), 5*time.Second)
	if err := f.Error(); err != nil {
		t.Fatal(err)
	}
	haltAt := f.Index()
	if r, ok := f.Response().(*fsmv1.Result); !ok || r.GetRefusal() != nil {
		t.Fatalf("the newer leader did not apply command 99: %v", f.Response())
	}
	after := propose(t, leader, create("after"))

	waitFor(t, "the older node to halt", 10*time.Second, func() bool { return old.fsm.Halted() != nil })
	h := old.fsm.Halted()
	if h.Index != haltAt || !strings.Contains(h.Message(), "upgrade this node") || !strings.Contains(h.Message(), "command 99") || !strings.Contains(h.Message(), "version 1.0") {
		t.Fatalf("halt %+v: %s", h, h.Message())
	}
	waitFor(t, "the older node to receive the later entry", 10*time.Second, func() bool { return old.raft.LastIndex() >= after.GetIndex() })
	if old.AppliedIndex() >= haltAt {
		t.Errorf("applied index %d, past the halt at %d", old.AppliedIndex(), haltAt)
	}
	if repoExists(old.fsm, "after") || userExists(old.fsm, "bob") {
		t.Error("the halted node applied entries from the halt on")
	}

	// Readiness, metrics, status.
	code, body := httpGet(t, "http://"+old.HTTPAddr()+"/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "upgrade this node") {
		t.Errorf("/readyz = %d %s", code, body)
	}
	_, metrics := httpGet(t, "http://"+old.HTTPAddr()+"/metrics")
	if !strings.Contains(metrics, "\ngitraft_fsm_halted 1\n") {
		t.Error("gitraft_fsm_halted is not 1")
	}
	_, metrics = httpGet(t, "http://"+leader.HTTPAddr()+"/metrics")
	if !strings.Contains(metrics, "\ngitraft_fsm_halted 0\n") {
		t.Error("gitraft_fsm_halted is not 0 on the leader")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := (&clusterService{n: leader}).GetStatus(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range st.GetMembers() {
		switch {
		case m.GetId() == id && (!strings.Contains(m.GetHalted(), "upgrade this node") || m.GetHaltedIndex() != haltAt || m.GetVersion() != "1.0"):
			t.Errorf("status of the halted node: %v", m)
		case m.GetId() != id && m.GetHalted() != "":
			t.Errorf("status of %s: %v", m.GetId(), m)
		}
	}
	if own := old.localStatus(); own.GetHaltedIndex() != haltAt {
		t.Errorf("own status %v", own)
	}

	// No reads, no snapshot (the log stays), no crash.
	if _, err := old.ReadBarrier(ctx); !errors.Is(err, ErrHalted) {
		t.Errorf("read barrier on the halted node: %v", err)
	}
	if err := old.raft.Snapshot().Error(); err == nil {
		t.Error("the halted node took a snapshot")
	}
	// Made leader, the halted node hands leadership to a healthy voter, so
	// the rest of the cluster goes on taking writes.
	if err := leader.raft.LeadershipTransferToServer(raft.ServerID(id), raft.ServerAddress(old.RaftAddr())).Error(); err != nil {
		t.Fatalf("transfer to the halted node: %v", err)
	}
	waitFor(t, "the halted node to lead", 10*time.Second, func() bool {
		_, lid := leader.raft.LeaderWithID()
		return string(lid) == id
	})
	waitFor(t, "a healthy leader again", 15*time.Second, func() bool {
		l := c.waitLeader()
		return l.ID() != id
	})
	propose(t, old, create("later"))

	// Upgrade: the same node, data dir and log, with the newer binary.
	c.stop(id)
	cfg = c.cfgs[id]
	cfg.newerCommands, cfg.Version = knowFutureCommand, "1.1"
	c.cfgs[id] = cfg
	upgraded := c.restart(id)
	waitFor(t, "the upgraded node ready", 15*time.Second, func() bool { ok, _ := upgraded.Ready(); return ok })
	c.waitConverged()
	if upgraded.fsm.Halted() != nil {
		t.Fatalf("still halted: %s", upgraded.fsm.Halted().Message())
	}
	for _, r := range []string{"before", "after", "later"} {
		if !repoExists(upgraded.fsm, r) {
			t.Errorf("the upgraded node is missing repo %s", r)
		}
	}
	if !userExists(upgraded.fsm, "bob") {
		t.Error("the upgraded node did not apply command 99")
	}
	if code, body := httpGet(t, "http://"+upgraded.HTTPAddr()+"/readyz"); code != http.StatusOK {
		t.Errorf("/readyz after the upgrade = %d %s", code, body)
	}
	if err := upgraded.raft.Snapshot().Error(); err != nil {
		t.Errorf("snapshot after the upgrade: %v", err)
	}
}
