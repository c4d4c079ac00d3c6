package cluster

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/raft"

	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	nodev1 "github.com/gitraft/gitraft/proto/gitraft/node/v1"
)

// Write locks whose holder is gone are freed as soon as the cluster knows,
// not when their lease runs out:
//
//   - a node that starts again commits a new incarnation in its member
//     record (registerSelf), and that entry frees what the node held under
//     any other incarnation (State: SetMember);
//   - the leader watches its heartbeats to the other nodes; when one has
//     not answered for raft.holder_timeout, it proposes FreeNodeLocks for
//     the locks that node holds.
//
// Either way the fencing token keeps it safe: the lock's next holder gets a
// bigger token, and whatever the old holder sends afterwards is refused.

// newIncarnation names this process's life: its start time and a random
// part, so that two starts never share one.
func newIncarnation() string {
	return strconv.FormatInt(time.Now().UnixNano(), 36) + "-" + newRequestID()[:8]
}

// locksKnowNodes reports whether every member runs a gitraft that knows
// the lock entries that name nodes (State.LocksKnowNodes).
func (n *Node) locksKnowNodes() bool {
	var ok bool
	n.fsm.Read(func(s *State) { ok = s.LocksKnowNodes() })
	return ok
}

// silentPeers records, while this node leads, the peers whose heartbeats
// fail and since when the leader has not heard from them.
type silentPeers struct {
	mu    sync.Mutex
	since map[string]time.Time
}

func newSilentPeers() *silentPeers { return &silentPeers{since: map[string]time.Time{}} }

func (s *silentPeers) failed(id string, lastContact time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.since[id]; ok {
		return
	}
	if lastContact.IsZero() {
		lastContact = time.Now()
	}
	s.since[id] = lastContact
}

func (s *silentPeers) resumed(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.since, id)
}

func (s *silentPeers) reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.since)
}

// silentFor lists the peers not heard from for at least d, by id, with how
// long.
func (s *silentPeers) silentFor(d time.Duration, now time.Time) map[string]time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out map[string]time.Duration
	for id, t := range s.since {
		if gone := now.Sub(t); gone >= d {
			if out == nil {
				out = map[string]time.Duration{}
			}
			out[id] = gone
		}
	}
	return out
}

// watchHeartbeats feeds silentPeers from Raft's heartbeat observations
// (sent by the leader's replication to each follower).
func (n *Node) watchHeartbeats() {
	ch := make(chan raft.Observation, 64)
	obs := raft.NewObserver(ch, false, func(o *raft.Observation) bool {
		switch o.Data.(type) {
		case raft.FailedHeartbeatObservation, raft.ResumedHeartbeatObservation:
			return true
		}
		return false
	})
	n.raft.RegisterObserver(obs)
	n.goRun(func() {
		defer n.raft.DeregisterObserver(obs)
		for {
			select {
			case <-n.stop:
				return
			case o := <-ch:
				switch d := o.Data.(type) {
				case raft.FailedHeartbeatObservation:
					n.silent.failed(string(d.PeerID), d.LastContact)
				case raft.ResumedHeartbeatObservation:
					n.silent.resumed(string(d.PeerID))
				}
			}
		}
	})
}

// freeSilentHolders, on the leader, frees the write locks of every node it
// has not heard from for HolderTimeout.
func (n *Node) freeSilentHolders(ctx context.Context) {
	if n.fsm.Halted() != nil || !n.locksKnowNodes() {
		return
	}
	silent := n.silent.silentFor(n.cfg.Raft.HolderTimeout, time.Now())
	for _, id := range slices.Sorted(maps.Keys(silent)) {
		if id == n.cfg.NodeID {
			continue
		}
		var upTo uint64
		n.fsm.Read(func(s *State) {
			for _, l := range s.NodeLocks(id) {
				upTo = max(upTo, l.Token)
			}
		})
		if upTo == 0 {
			continue
		}
		// An observation may be lost (Raft drops them when the channel is
		// full): make sure the node does not answer before freeing.
		if n.answers(ctx, id) {
			n.silent.resumed(id)
			continue
		}
		reason := fmt.Sprintf("no answer to the leader's heartbeats for %s (raft.holder_timeout %s)", silent[id].Round(time.Millisecond), n.cfg.Raft.HolderTimeout)
		r, err := n.Propose(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_FreeNodeLocks{FreeNodeLocks: &fsmv1.FreeNodeLocks{Node: id, UpToToken: upTo, Reason: reason}}})
		if err != nil {
			n.log.Warn("freeing a silent node's write locks failed", "holder_node", id, "err", err)
			continue
		}
		n.log.Info("freed the write locks of a silent node", "holder_node", id, "count", len(r.GetFreed()), "index", r.GetIndex(), "why", reason)
	}
}

// answers reports whether member id answers a status request within a
// heartbeat timeout.
func (n *Node) answers(ctx context.Context, id string) bool {
	var addr string
	n.fsm.Read(func(s *State) {
		if m, ok := s.Member(id); ok {
			addr = m.GetGrpcAddr()
		}
	})
	if addr == "" {
		return false
	}
	c, err := n.peers.node(addr)
	if err != nil {
		return false
	}
	cctx, cancel := context.WithTimeout(ctx, n.cfg.Raft.HeartbeatTimeout)
	defer cancel()
	_, err = c.GetLocalStatus(cctx, &nodev1.GetLocalStatusRequest{})
	return err == nil
}

// lockWaits wakes this node's writers waiting for a write lock when an
// applied entry may have freed it (lockd.Watcher), so that the first in the
// queue asks again at once instead of at its next retry.
type lockWaits struct {
	mu sync.Mutex
	ch map[string]chan struct{}
}

func newLockWaits() *lockWaits { return &lockWaits{ch: map[string]chan struct{}{}} }

// changed returns a channel closed at repo's next wake.
func (w *lockWaits) changed(repo string) <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	c, ok := w.ch[repo]
	if !ok {
		c = make(chan struct{})
		w.ch[repo] = c
	}
	return c
}

func (w *lockWaits) wake(repo string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if c, ok := w.ch[repo]; ok {
		close(c)
		delete(w.ch, repo)
	}
}

// applied wakes the waiters of every repository whose lock the entry may
// have freed.
func (w *lockWaits) applied(e *fsmv1.Entry, r *fsmv1.Result) {
	if u := e.GetUpdateRefs(); u.GetReleaseLock() {
		// The ref change released its lock, whether its refs applied or
		// not (a stale token frees nothing; waking costs a retry).
		w.wake(u.GetRepo())
	}
	if r.GetRefusal() != nil {
		return
	}
	switch c := e.Command.(type) {
	case *fsmv1.Entry_ReleaseLock:
		w.wake(c.ReleaseLock.GetRepo())
	case *fsmv1.Entry_ForceReleaseLock:
		w.wake(c.ForceReleaseLock.GetRepo())
	case *fsmv1.Entry_DeleteRepo:
		w.wake(c.DeleteRepo.GetName())
	case *fsmv1.Entry_LeaveLockQueue:
		w.wake(c.LeaveLockQueue.GetRepo()) // the next waiter may be first now
	}
	for _, l := range r.GetExpired() {
		w.wake(l.GetRepo())
	}
	for _, l := range r.GetFreed() {
		w.wake(l.GetRepo())
	}
}
