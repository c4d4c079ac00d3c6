package cluster

import (
	"context"
	"fmt"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/gitraft/gitraft/lockd"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	lockv1 "github.com/gitraft/gitraft/proto/gitraft/lock/v1"
)

// lockOn returns the lock on repo as n's state has it.
func lockOn(n *Node, repo string) (lockd.WriteLock, bool) {
	var l lockd.WriteLock
	var ok bool
	n.fsm.Read(func(s *State) { l, ok = s.locks.Get(repo) })
	return l, ok
}

// waitLocksKnowNodes waits until every member recorded its incarnation:
// before, nodes propose no lock fields that name them.
func (c *testCluster) waitLocksKnowNodes() {
	c.t.Helper()
	waitFor(c.t, "every member's incarnation", 15*time.Second, func() bool {
		for _, n := range c.nodes {
			if !n.locksKnowNodes() {
				return false
			}
		}
		return true
	})
}

func freedCount(n *Node, reason string) float64 {
	m := &dto.Metric{}
	if err := n.metrics.locksFreed.WithLabelValues(reason).Write(m); err != nil {
		panic(err)
	}
	return m.GetCounter().GetValue()
}

// A node restarts while it holds a write lock: the entry that records its
// new incarnation frees the lock, long before its lease would run out (the
// leader's silent-holder check is off here, so only the restart can free
// it), and the old token is refused.
func Test_MultiNode_RestartFreesHolderLocks(t *testing.T) {
	c := mustNewCluster(t, 3, func(cfg *Config) { cfg.Raft.HolderTimeout = time.Hour })
	leader := c.waitLeader()
	c.waitLocksKnowNodes()
	propose(t, leader, create("acme/site"))
	holder := c.follower()
	id := holder.ID()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l, err := holder.Locker().AcquireLock(ctx, "acme/site", id+"/push-1", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if l.Node != id || l.Incarnation != holder.incarnation {
		t.Fatalf("lock %+v does not name its node and incarnation", l)
	}
	c.stop(id)
	if _, held := lockOn(leader, "acme/site"); !held {
		t.Fatal("the lock went with a graceful stop; the test needs it held")
	}
	back := c.restart(id)
	waitFor(t, "the restarted holder's lock to be freed", 15*time.Second, func() bool {
		_, held := lockOn(leader, "acme/site")
		return !held
	})
	if got := freedCount(leader, "restarted"); got != 1 {
		t.Errorf("gitraft_lock_freed_total{reason=restarted} = %v on the leader, want 1", got)
	}
	// The new process takes the lock; the old token is refused.
	l2, err := back.Locker().AcquireLock(ctx, "acme/site", id+"/push-2", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	r, err := back.Propose(ctx, update("acme/site", l.Token, true, "refs/heads/main", "", oidA))
	if err != nil || r.GetRefusal().GetReason() != fsmv1.Reason_REASON_STALE_TOKEN {
		t.Fatalf("the old process's change: %v, %v; want a stale token", r, err)
	}
	// Its own member record again carries no change: nothing more is freed.
	time.Sleep(200 * time.Millisecond)
	if cur, held := lockOn(leader, "acme/site"); !held || cur.Token != l2.Token {
		t.Fatalf("the new process's lock is gone: %+v", cur)
	}
}

// A node that holds a lock goes silent (stopped, not restarted): the
// leader frees its locks once its heartbeats have failed for
// holder_timeout, well before the hour-long lease. While the node answers,
// its lock stays.
func Test_MultiNode_SilentHolderLocksFreed(t *testing.T) {
	c := mustNewCluster(t, 3, func(cfg *Config) { cfg.Raft.HolderTimeout = 600 * time.Millisecond })
	leader := c.waitLeader()
	c.waitLocksKnowNodes()
	propose(t, leader, create("acme/site"))
	holder := c.follower()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l, err := holder.Locker().AcquireLock(ctx, "acme/site", holder.ID()+"/push-1", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * 600 * time.Millisecond)
	if _, held := lockOn(leader, "acme/site"); !held {
		t.Fatal("the lock of a node that answers was freed")
	}
	c.stop(holder.ID())
	waitFor(t, "the silent holder's lock to be freed", 15*time.Second, func() bool {
		_, held := lockOn(leader, "acme/site")
		return !held
	})
	if got := freedCount(leader, "unreachable"); got != 1 {
		t.Errorf("gitraft_lock_freed_total{reason=unreachable} = %v on the leader, want 1", got)
	}
	other := c.follower()
	l2, err := other.Locker().AcquireLock(ctx, "acme/site", other.ID()+"/push-2", time.Hour)
	if err != nil || l2.Token <= l.Token {
		t.Fatalf("next acquire: %+v, %v; want a bigger token than %d", l2, err, l.Token)
	}
}

// Writers waiting for a lock through different nodes get it in the order
// they asked, each as soon as the one before releases it.
func Test_MultiNode_LockWaitersInOrder(t *testing.T) {
	c := mustNewCluster(t, 3)
	leader := c.waitLeader()
	c.waitLocksKnowNodes()
	propose(t, leader, create("acme/site"))
	var nodes []*Node
	for _, n := range c.nodes {
		nodes = append(nodes, n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	first, err := nodes[0].locks.Acquire(ctx, "acme/site", nodes[0].ID()+"/a", nil)
	if err != nil {
		t.Fatal(err)
	}
	type grant struct {
		who string
		h   *lockd.Held
		err error
	}
	grants := make(chan grant, 3)
	queueLen := func() int {
		var n int
		leader.fsm.Read(func(s *State) {
			for _, q := range s.LockQueues() {
				n += len(q.Waiters)
			}
		})
		return n
	}
	// b, c, d ask in this order, from the three nodes; each is queued
	// before the next asks.
	for i, who := range []string{"b", "c", "d"} {
		n := nodes[(i+1)%3]
		holder := n.ID() + "/" + who
		go func() {
			h, err := n.locks.Acquire(ctx, "acme/site", holder, nil)
			grants <- grant{holder, h, err}
		}()
		waitFor(t, holder+" to be queued", 10*time.Second, func() bool { return queueLen() == i+1 })
	}
	// The admin API (gitraft lock ls) shows the holder and the queue, in
	// order, from any node.
	resp, err := (&lockService{n: nodes[2]}).ListLocks(ctx, &lockv1.ListLocksRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var listed []string
	for _, q := range resp.GetQueues() {
		for _, w := range q.GetWaiters() {
			listed = append(listed, q.GetRepo()+":"+w.GetHolder())
		}
	}
	wantListed := fmt.Sprint([]string{"acme/site:" + nodes[1].ID() + "/b", "acme/site:" + nodes[2].ID() + "/c", "acme/site:" + nodes[0].ID() + "/d"})
	if len(resp.GetLocks()) != 1 || resp.GetLocks()[0].GetHolder() != nodes[0].ID()+"/a" || fmt.Sprint(listed) != wantListed {
		t.Fatalf("ListLocks: %v, queue %v; want %s/a holding, queue %s", resp.GetLocks(), listed, nodes[0].ID(), wantListed)
	}
	prev := first
	var order []string
	for range 3 {
		if err := prev.Release(ctx); err != nil {
			t.Fatal(err)
		}
		g := <-grants
		if g.err != nil {
			t.Fatal(g.err)
		}
		order = append(order, g.who[len(g.who)-1:])
		prev = g.h
	}
	prev.Release(ctx)
	if got := fmt.Sprint(order); got != "[b c d]" {
		t.Fatalf("granted in the order %s, want [b c d]", got)
	}
}

// While a member has recorded no incarnation (it runs an older gitraft, or
// has not registered yet), nodes propose lock entries as before: no node,
// no incarnation, no wait lease, and no FreeNodeLocks; an older node would
// ignore the fields or halt on the entry.
func Test_State_LocksKnowNodes(t *testing.T) {
	s := NewState()
	if s.LocksKnowNodes() {
		t.Fatal("an empty state says every member knows incarnations")
	}
	set := func(id, inc string) {
		s.Apply(s.Index()+1, &fsmv1.Entry{Command: &fsmv1.Entry_SetMember{SetMember: &fsmv1.SetMember{Member: &fsmv1.Member{Id: id, Incarnation: inc}}}})
	}
	set("n1", "a")
	set("n2", "")
	if s.LocksKnowNodes() {
		t.Fatal("n2 has no incarnation, yet the state says every member knows them")
	}
	set("n2", "b")
	if !s.LocksKnowNodes() {
		t.Fatal("every member has an incarnation")
	}
}

// A ref change that releases its lock (UpdateRefs.release_lock) wakes the
// node's writers waiting for that lock, refused or not: without the wake
// they waited for their next retry, and 16 pushers to one repository got
// 2.4 pushes/s instead of 22.
func Test_LockWaits_WokenByReleaseWithRefs(t *testing.T) {
	w := newLockWaits()
	for _, refused := range []bool{false, true} {
		ch := w.changed("r")
		other := w.changed("other")
		r := &fsmv1.Result{}
		if refused {
			r.Refusal = &fsmv1.Refusal{Message: "stale"}
		}
		w.applied(&fsmv1.Entry{Command: &fsmv1.Entry_UpdateRefs{UpdateRefs: &fsmv1.UpdateRefs{Repo: "r", ReleaseLock: true}}}, r)
		select {
		case <-ch:
		default:
			t.Fatalf("refused=%v: the waiters of r were not woken", refused)
		}
		select {
		case <-other:
			t.Fatalf("refused=%v: the waiters of another repository were woken", refused)
		default:
		}
	}
	ch := w.changed("r")
	w.applied(&fsmv1.Entry{Command: &fsmv1.Entry_UpdateRefs{UpdateRefs: &fsmv1.UpdateRefs{Repo: "r"}}}, &fsmv1.Result{})
	select {
	case <-ch:
		t.Fatal("a ref change that keeps its lock woke the waiters")
	default:
	}
}
