package cluster

import (
	"context"
	"errors"
	"math/rand/v2"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	clusterv1 "github.com/gitraft/gitraft/proto/gitraft/cluster/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	nodev1 "github.com/gitraft/gitraft/proto/gitraft/node/v1"
)

// watchLeadership runs the leader-only loops while this node leads.
func (n *Node) watchLeadership() {
	var cancel context.CancelFunc
	stopLeading := func() {
		if cancel != nil {
			cancel()
			cancel = nil
		}
		n.leaderReady.Store(false)
	}
	defer stopLeading()
	for {
		select {
		case <-n.stop:
			return
		case leading := <-n.leaderCh:
			stopLeading()
			n.metrics.leaderChanges.Inc()
			if leading {
				ctx, c := context.WithCancel(context.Background())
				cancel = c
				n.log.Info("became leader", "term", n.raft.CurrentTerm())
				n.goRun(func() { n.lead(ctx) })
			} else {
				n.log.Info("lost leadership", "term", n.raft.CurrentTerm())
			}
		}
	}
}

// lead is the leader's loop: a barrier first, so the state reflects every
// entry of earlier terms, then lock expiry; beside it the database and mail
// loops and the promotion of non-voters.
func (n *Node) lead(ctx context.Context) {
	n.goRun(func() { n.handOffWhileHalted(ctx) })
	n.silent.reset() // what a past term's heartbeats said is stale
	if err := n.raft.Barrier(applyTimeout).Error(); err != nil {
		n.log.Warn("leader barrier failed", "err", err)
		return
	}
	// Commit a command of this term, so that the commit index read barriers
	// hand out is one the state machine sees (see LeaderNoop).
	if _, err := n.applyLocal(&fsmv1.Entry{Command: &fsmv1.Entry_LeaderNoop{LeaderNoop: &fsmv1.LeaderNoop{Term: n.raft.CurrentTerm()}}}); err != nil {
		n.log.Warn("leader no-op failed", "err", err)
		return
	}
	n.leaderReady.Store(true)
	n.goRun(func() { n.leadDatabase(ctx) })
	n.goRun(func() { n.leadMail(ctx) })
	n.goRun(func() { n.promoteNonvoters(ctx) })
	t := time.NewTicker(n.cfg.LockExpiryInterval)
	defer t.Stop()
	holders := time.NewTicker(max(n.cfg.Raft.HolderTimeout/8, 10*time.Millisecond))
	defer holders.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-n.stop:
			return
		case <-t.C:
			n.expireLocks(ctx)
		case <-holders.C:
			n.freeSilentHolders(ctx)
		}
	}
}

// handOffWhileHalted runs while this node leads: a leader whose state
// machine halted takes no writes (applyLocal), so it hands leadership to a
// voter that is not halted, if one answers. When every voter is halted (they
// all run the binary that does not know the entry) it keeps leading: moving
// would only churn elections.
func (n *Node) handOffWhileHalted(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	told := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-n.stop:
			return
		case <-t.C:
		}
		h := n.fsm.Halted()
		if h == nil {
			continue
		}
		target, addr := n.healthyVoter(ctx)
		if target == "" {
			if !told {
				n.log.Error("leading while halted, and no other voter is healthy: the cluster takes no writes until nodes are upgraded", "index", h.Index)
				told = true
			}
			continue
		}
		n.log.Warn("leading while halted: handing leadership over", "to", target, "index", h.Index)
		if err := n.raft.LeadershipTransferToServer(raft.ServerID(target), raft.ServerAddress(addr)).Error(); err != nil {
			n.log.Warn("leadership hand-over failed; will retry", "to", target, "err", err)
		}
	}
}

// healthyVoter returns another voter that answers and is not halted.
func (n *Node) healthyVoter(ctx context.Context) (id, raftAddr string) {
	f := n.raft.GetConfiguration()
	if f.Error() != nil {
		return "", ""
	}
	for _, srv := range f.Configuration().Servers {
		if srv.Suffrage != raft.Voter || srv.ID == raft.ServerID(n.cfg.NodeID) {
			continue
		}
		var grpcAddr string
		n.fsm.Read(func(s *State) {
			if m, ok := s.Member(string(srv.ID)); ok {
				grpcAddr = m.GetGrpcAddr()
			}
		})
		if grpcAddr == "" {
			continue
		}
		c, err := n.peers.node(grpcAddr)
		if err != nil {
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		st, err := c.GetLocalStatus(cctx, &nodev1.GetLocalStatusRequest{})
		cancel()
		if err == nil && st.GetHalted() == "" {
			return string(srv.ID), string(srv.Address)
		}
	}
	return "", ""
}

// expireLocks proposes an expiry entry when some lease has run out by the
// leader's clock. Apply removes what the entry's time says has expired.
func (n *Node) expireLocks(ctx context.Context) {
	if n.fsm.Halted() != nil {
		return // a halted leader takes no writes; handOffWhileHalted acts
	}
	var expired int
	now := time.Now()
	n.fsm.Read(func(s *State) { expired = len(s.ExpiredLocks(now)) })
	if expired == 0 {
		return
	}
	r, err := n.Propose(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_ExpireLocks{ExpireLocks: &fsmv1.ExpireLocks{}}})
	if err != nil {
		n.log.Warn("expiring write locks failed", "err", err)
		return
	}
	for _, l := range r.GetExpired() {
		n.log.Info("write lock expired", "repo", l.GetRepo(), "holder", l.GetHolder(), "token", l.GetFencingToken(), "index", r.GetIndex())
	}
	n.metrics.locksExpired.Add(float64(len(r.GetExpired())))
}

// self is this node's member record.
func (n *Node) self() *fsmv1.Member {
	return &fsmv1.Member{
		Id:       n.cfg.NodeID,
		RaftAddr: n.cfg.RaftAdvertise,
		GrpcAddr: n.cfg.GRPCAdvertise,
		HttpAddr: n.HTTPAddr(),
		SshAddr:  n.cfg.SSHAdvertise,
		// The public parts only: private host keys stay in their files.
		SshHostKeys:  n.cfg.SSHHostKeys,
		FeatureLevel: n.ownFeatureLevel(),
		Incarnation:  n.incarnation,
	}
}

// registerSelf makes sure the replicated member table has this node's
// current addresses, feature level and incarnation, once it is part of the
// Raft configuration. The incarnation is a level 2 field: while some member
// runs an older gitraft the node registers without it (its restarts then
// free no locks; they expire). An older leader refuses the feature level
// too (a field it does not know): then the node registers what that leader
// knows, so peers can reach it, and keeps asking, less often, until an
// upgraded leader takes the whole record. Recording a new incarnation
// frees the locks this node's earlier process held.
func (n *Node) registerSelf() {
	for {
		next, done := n.registerOnce()
		if done {
			return
		}
		select {
		case <-n.stop:
			return
		case <-time.After(next):
		}
	}
}

// registerOnce is one round of registerSelf: done once the state holds this
// node's record as it should be, otherwise when to look again.
func (n *Node) registerOnce() (next time.Duration, done bool) {
	next = 200*time.Millisecond + rand.N(200*time.Millisecond)
	if !n.inConfiguration() {
		return next, false
	}
	var cur *fsmv1.Member
	n.fsm.Read(func(s *State) { cur, _ = s.Member(n.cfg.NodeID) })
	want := n.self()
	if proto.Equal(cur, want) {
		return 0, true
	}
	if level, _ := n.FeatureLevel(); level < 2 {
		if !n.ready.Load() {
			// Not caught up yet (a restart replays the log): the level
			// read from this state may be stale. Registering without the
			// incarnation would, until the next registration, keep every
			// node from tagging its locks with its node, and a lock taken
			// meanwhile could then only expire.
			return next, false
		}
		want.Incarnation = "" // the lowest member's gitraft would ignore it
	}
	if proto.Equal(cur, want) {
		return time.Second + rand.N(time.Second), false // until every member reports level 2
	}
	err := n.register(want)
	switch {
	case err == nil:
		n.log.Info("registered member addresses", "grpc_addr", n.cfg.GRPCAdvertise, "raft_addr", n.cfg.RaftAdvertise,
			"feature_level", want.GetFeatureLevel(), "incarnation", want.GetIncarnation())
	case tooOld(err):
		older := proto.CloneOf(want)
		older.FeatureLevel, older.Incarnation = 0, ""
		if !proto.Equal(cur, older) {
			if err := n.register(older); err != nil {
				n.log.Debug("registering member addresses", "err", err)
			} else {
				n.log.Info("registered member addresses without the feature level, which the leader's older gitraft does not know; will ask again", "grpc_addr", n.cfg.GRPCAdvertise)
			}
		}
		next = 5*time.Second + rand.N(time.Second)
	default:
		n.log.Debug("registering member addresses", "err", err)
	}
	return next, false
}

func (n *Node) register(m *fsmv1.Member) error {
	ctx, cancel := context.WithTimeout(context.Background(), n.cfg.LeaderWait)
	defer cancel()
	_, err := n.Propose(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_SetMember{SetMember: &fsmv1.SetMember{Member: m}}})
	return err
}

// tooOld reports whether a proposal was refused because the leader does
// not know one of its fields.
func tooOld(err error) bool {
	return err != nil && (errors.Is(err, ErrInvalidEntry) || status.Code(err) == codes.InvalidArgument)
}

func (n *Node) inConfiguration() bool {
	f := n.raft.GetConfiguration()
	if f.Error() != nil {
		return false
	}
	for _, s := range f.Configuration().Servers {
		if s.ID == raft.ServerID(n.cfg.NodeID) {
			return true
		}
	}
	return false
}

// joinLoop asks the configured members to add this node until one does.
func (n *Node) joinLoop() {
	backoff := 200 * time.Millisecond
	admitted := func() {
		n.joinErr.Store(nil)
		if n.layer != nil {
			n.layer.held.Store(false)
		}
	}
	for {
		if n.inConfiguration() {
			admitted()
			return
		}
		for _, addr := range n.cfg.Join {
			err := n.askToJoin(addr)
			if err == nil {
				admitted()
				n.log.Info("joined the cluster", "via", addr)
				return
			}
			msg := status.Convert(err).Message()
			n.joinErr.Store(&msg)
			if status.Code(err) == codes.FailedPrecondition {
				n.log.Error("the cluster refuses to let this node join; it takes no part in Raft until it may", "via", addr, "err", msg)
			} else {
				n.log.Warn("join failed; will retry", "via", addr, "err", err)
			}
		}
		select {
		case <-n.stop:
			return
		case <-time.After(backoff + rand.N(backoff)):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

func (n *Node) askToJoin(addr string) error {
	c, err := n.peers.conn(addr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	me := n.self()
	_, err = clusterv1.NewClusterServiceClient(c).AddMember(ctx, &clusterv1.AddMemberRequest{
		Id: me.Id, RaftAddr: me.RaftAddr, GrpcAddr: me.GrpcAddr, HttpAddr: me.HttpAddr, SshAddr: me.SshAddr,
		NoRaftState: true, // joinLoop runs only for a node without Raft state
	})
	return err
}

// watchReady marks the node ready once it has applied what the leader had
// committed when the node started: a leader is known and this node caught up.
func (n *Node) watchReady() {
	for {
		ctx, cancel := context.WithTimeout(context.Background(), n.cfg.LeaderWait)
		_, err := n.ReadBarrier(ctx)
		cancel()
		if err == nil {
			n.ready.Store(true)
			n.log.Info("ready: caught up with the leader", "index", n.fsm.Index())
			return
		}
		if errors.Is(err, context.Canceled) {
			return
		}
		select {
		case <-n.stop:
			return
		case <-time.After(250 * time.Millisecond):
		}
	}
}
