package cluster

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	clusterv1 "github.com/gitraft/gitraft/proto/gitraft/cluster/v1"
	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
)

// fakeDisks stands in for the repositories on one node's disk (in-process
// nodes keep none): the node named filling holds the first `holds`
// repositories of its state, in name order; the others answer for
// themselves (holding nothing, they have nothing to fill).
type fakeDisks struct {
	filling string
	node    atomic.Pointer[Node]
	holds   atomic.Int64
}

func (d *fakeDisks) replicasOf(ctx context.Context, id string, ask func(context.Context) (*replicav1.GetReplicasResponse, error)) (*replicav1.GetReplicasResponse, error) {
	if id != d.filling {
		return ask(ctx)
	}
	n := d.node.Load()
	if n == nil {
		return nil, fmt.Errorf("%s is not started yet", id)
	}
	var names []string
	var index uint64
	n.fsm.Read(func(s *State) {
		names = slices.Sorted(maps.Keys(s.repos))
		index = s.Index()
	})
	resp := &replicav1.GetReplicasResponse{NodeId: id, Index: index}
	for i, name := range names {
		st := replicav1.ReplicaState_REPLICA_STATE_CURRENT
		if int64(i) >= d.holds.Load() {
			st = replicav1.ReplicaState_REPLICA_STATE_BEHIND
		}
		resp.Replicas = append(resp.Replicas, &replicav1.Replica{Repo: name, State: st})
	}
	return resp, nil
}

func (c *testCluster) status(t *testing.T) map[string]*clusterv1.Member {
	t.Helper()
	resp, err := (&clusterService{n: c.waitLeader()}).GetStatus(context.Background(), &clusterv1.GetStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*clusterv1.Member{}
	for _, m := range resp.GetMembers() {
		out[m.GetId()] = m
	}
	return out
}

// A joining node holds nothing: it must join as a non-voter, neither count
// toward the quorum nor lead, and become a voter only once it holds every
// repository at its committed version.
func Test_MultiNode_JoinsAsNonvoterUntilItHoldsEveryRepo(t *testing.T) {
	disks := &fakeDisks{filling: "n4"}
	c := mustNewCluster(t, 3, func(cfg *Config) { cfg.replicasOf = disks.replicasOf })
	for i := range 5 {
		propose(t, c.any(), create(fmt.Sprintf("r%d", i)))
	}
	n4 := c.add("n4", false)
	disks.node.Store(n4)
	c.waitMembers(4)
	stillNonvoter := func(what string) {
		t.Helper()
		// Many promotion rounds (50 ms each) pass.
		for range 10 {
			if s := c.suffrages()["n4"]; s != raft.Nonvoter {
				t.Fatalf("n4 is %v while it holds %d of 5 repos (%s), want a non-voter", s, disks.holds.Load(), what)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	stillNonvoter("right after joining")
	waitFor(t, "n4 to have applied the log", 10*time.Second, func() bool {
		return n4.AppliedIndex() >= c.waitLeader().AppliedIndex()
	})
	disks.holds.Store(4)
	stillNonvoter("one repo short")
	m := c.status(t)["n4"]
	if m.GetSuffrage() != clusterv1.Suffrage_SUFFRAGE_NONVOTER || m.GetFill().GetReposCurrent() != 4 || m.GetFill().GetReposTotal() != 5 || m.GetFill().GetWaitingFor() != "1 of 5 repos" {
		t.Fatalf("status of the filling n4: suffrage %v, fill %v", m.GetSuffrage(), m.GetFill())
	}
	for _, id := range []string{"n1", "n2", "n3"} {
		if f := c.status(t)[id].GetFill(); f != nil {
			t.Errorf("voter %s has a fill in status: %v", id, f)
		}
	}

	disks.holds.Store(5)
	c.waitVoters(4)
	if m := c.status(t)["n4"]; m.GetSuffrage() != clusterv1.Suffrage_SUFFRAGE_VOTER || m.GetFill() != nil {
		t.Fatalf("status of the promoted n4: suffrage %v, fill %v", m.GetSuffrage(), m.GetFill())
	}
	// Joining again (a restarted joiner) changes nothing: it stays a voter.
	cfg := c.cfgs["n4"]
	if _, err := (&clusterService{n: c.waitLeader()}).AddMember(context.Background(), &clusterv1.AddMemberRequest{
		Id: "n4", RaftAddr: cfg.RaftAddr, GrpcAddr: cfg.GRPCAddr,
	}); err != nil {
		t.Fatalf("joining again: %v", err)
	}
	if s := c.suffrages()["n4"]; s != raft.Voter {
		t.Fatalf("n4 is %v after joining again, want a voter", s)
	}
	propose(t, n4, create("after-promotion"))
}

func Test_Fill_WaitingFor(t *testing.T) {
	for _, tc := range []struct {
		f            fill
		commit, mark uint64
		want         string
	}{
		{fill{current: 0, total: 0, index: 0}, 50, 40, "the log (applied index 0 of 50)"},         // knows nothing yet
		{fill{current: 3, total: 3, index: 39}, 50, 40, "the log (applied index 39 of 50)"},       // not even its own addition
		{fill{current: 3, total: 3, index: 100}, 1000, 40, "the log (applied index 100 of 1000)"}, // far behind
		{fill{current: 2, total: 3, index: 50}, 50, 40, "1 of 3 repos"},                           // one repo short
		{fill{current: 2, total: 3, index: 5}, 50, 40, "1 of 3 repos; the log (applied index 5 of 50)"},
		{fill{current: 3, total: 3, index: 50}, 60, 40, ""}, // a little behind the commit index is fine
		{fill{current: 0, total: 0, index: 41}, 41, 40, ""}, // nothing to hold
	} {
		if got := tc.f.waitingFor(tc.commit, tc.mark); got != tc.want {
			t.Errorf("%+v commit %d mark %d: %q, want %q", tc.f, tc.commit, tc.mark, got, tc.want)
		}
	}
}
