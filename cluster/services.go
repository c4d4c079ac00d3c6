package cluster

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gitraft/gitraft/lockd"
	clusterv1 "github.com/gitraft/gitraft/proto/gitraft/cluster/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	lockv1 "github.com/gitraft/gitraft/proto/gitraft/lock/v1"
	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
	"github.com/gitraft/gitraft/storage"
)

// commit proposes an entry and turns a refusal into a *RefusalError.
func (n *Node) commit(ctx context.Context, e *fsmv1.Entry) (*fsmv1.Result, error) {
	r, err := n.Propose(ctx, e)
	if err != nil {
		return nil, err
	}
	return r, refusal(r)
}

// ----- ClusterService -----

type clusterService struct {
	clusterv1.UnimplementedClusterServiceServer
	n *Node
}

func (s *clusterService) GetStatus(ctx context.Context, _ *clusterv1.GetStatusRequest) (*clusterv1.GetStatusResponse, error) {
	n := s.n
	local := n.localStatus()
	resp := &clusterv1.GetStatusResponse{
		NodeId: n.cfg.NodeID, State: local.State, Term: local.Term,
		CommitIndex: local.CommitIndex, AppliedIndex: local.AppliedIndex, LastLogIndex: n.raft.LastIndex(),
		Halted: local.Halted, HaltedIndex: local.HaltedIndex,
	}
	if local.LastContactUnixNano != 0 {
		resp.LastLeaderContact = timestamppb.New(time.Unix(0, local.LastContactUnixNano))
	}
	laddr, lid := n.raft.LeaderWithID()
	resp.LeaderId, resp.LeaderAddr = string(lid), string(laddr)
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, err
	}
	servers := f.Configuration().Servers
	members := make([]*clusterv1.Member, len(servers))
	var wg sync.WaitGroup
	for i, srv := range servers {
		m := &clusterv1.Member{Id: string(srv.ID), RaftAddr: string(srv.Address), Suffrage: suffrage(srv.Suffrage), Leader: srv.ID == lid}
		n.fsm.Read(func(st *State) {
			if meta, ok := st.Member(m.Id); ok {
				m.GrpcAddr, m.HttpAddr, m.SshAddr = meta.GetGrpcAddr(), meta.GetHttpAddr(), meta.GetSshAddr()
				for _, k := range meta.GetSshHostKeys() {
					m.SshHostKeys = append(m.SshHostKeys, fingerprintOf(k))
				}
			}
		})
		members[i] = m
		wg.Add(1)
		go func() {
			defer wg.Done()
			n.fillMemberStatus(ctx, m)
			if m.Reachable {
				n.memberFill(ctx, m, srv.Suffrage == raft.Nonvoter)
			}
		}()
	}
	wg.Wait()
	resp.Members = members
	n.fsm.Read(func(st *State) {
		var known []*fsmv1.Member
		for _, srv := range servers {
			if meta, ok := st.Member(string(srv.ID)); ok {
				known = append(known, meta)
			}
		}
		resp.SshHostKeyMismatch = hostKeyMismatch(known, st.stateHostPublicKey())
	})
	return resp, nil
}

// fillMemberStatus asks a member for its own view of Raft.
func (n *Node) fillMemberStatus(ctx context.Context, m *clusterv1.Member) {
	var ls interface {
		GetState() string
		GetAppliedIndex() uint64
		GetLastContactUnixNano() int64
		GetHalted() string
		GetHaltedIndex() uint64
		GetVersion() string
	}
	if m.Id == n.cfg.NodeID {
		ls = n.localStatus()
	} else {
		if m.GrpcAddr == "" {
			m.Error = "address unknown (not registered yet)"
			return
		}
		c, err := n.peers.node(m.GrpcAddr)
		if err != nil {
			m.Error = err.Error()
			return
		}
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		r, err := c.GetLocalStatus(cctx, nil)
		if err != nil {
			m.Error = status.Convert(err).Message()
			return
		}
		ls = r
	}
	m.Reachable = true
	m.State = ls.GetState()
	m.AppliedIndex = ls.GetAppliedIndex()
	m.Halted, m.HaltedIndex, m.Version = ls.GetHalted(), ls.GetHaltedIndex(), ls.GetVersion()
	if lc := ls.GetLastContactUnixNano(); lc != 0 {
		m.LastContact = timestamppb.New(time.Unix(0, lc))
	}
}

func suffrage(s raft.ServerSuffrage) clusterv1.Suffrage {
	switch s {
	case raft.Voter:
		return clusterv1.Suffrage_SUFFRAGE_VOTER
	case raft.Nonvoter:
		return clusterv1.Suffrage_SUFFRAGE_NONVOTER
	case raft.Staging:
		return clusterv1.Suffrage_SUFFRAGE_STAGING
	}
	return clusterv1.Suffrage_SUFFRAGE_UNSPECIFIED
}

func (s *clusterService) AddMember(ctx context.Context, req *clusterv1.AddMemberRequest) (*clusterv1.AddMemberResponse, error) {
	var resp *clusterv1.AddMemberResponse
	if fwd, err := s.n.forward(ctx, func(c grpc.ClientConnInterface) (err error) {
		resp, err = clusterv1.NewClusterServiceClient(c).AddMember(ctx, req)
		return err
	}); fwd {
		return resp, err
	}
	n := s.n
	if !validID(req.GetId()) || len(req.GetId()) > 63 {
		return nil, status.Errorf(codes.InvalidArgument, "member id %q: use 1-63 letters, digits, '.', '_' or '-'", req.GetId())
	}
	if req.GetRaftAddr() == "" || req.GetGrpcAddr() == "" {
		return nil, status.Error(codes.InvalidArgument, "a member needs --raft-addr and --grpc-addr")
	}
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, err
	}
	for _, srv := range f.Configuration().Servers {
		switch {
		case string(srv.ID) == req.GetId() && req.GetNoRaftState() && srv.Suffrage == raft.Voter:
			// A voter back with an empty data dir lost the log it
			// acknowledged: counted as a voter it could elect a leader that
			// lacks committed entries, and count toward a push's majority
			// with packs it no longer holds. It must come back as a new,
			// empty member.
			return nil, status.Errorf(codes.FailedPrecondition, "node %q is a voter of this cluster, but it comes back without Raft state (an empty or lost data dir): it lost the log it acknowledged and must not vote as if it had it. Remove it first (gitraft cluster remove %s); it then joins again by itself as a non-voter, refills every repository from its peers, and becomes a voter once it holds everything", req.GetId(), req.GetId())
		case string(srv.ID) == req.GetId() && string(srv.Address) == req.GetRaftAddr():
			// Already a member (a restarted joiner asking again): make sure
			// its addresses are recorded, and succeed.
			r, err := n.commit(ctx, setMemberEntry(req))
			if err != nil {
				return nil, err
			}
			return &clusterv1.AddMemberResponse{Index: r.GetIndex()}, nil
		case string(srv.ID) == req.GetId():
			return nil, status.Errorf(codes.AlreadyExists, "node ID %q is already a member at raft address %s; remove it first (gitraft cluster remove %s) or use another ID", req.GetId(), srv.Address, req.GetId())
		case string(srv.Address) == req.GetRaftAddr():
			return nil, status.Errorf(codes.AlreadyExists, "raft address %s is already used by member %q", req.GetRaftAddr(), srv.ID)
		}
	}
	// A new member holds nothing yet: it joins without a vote, so that it
	// neither counts toward the quorum nor leads, and the leader promotes
	// it once it holds every repository (promoteNonvoters).
	af := n.raft.AddNonvoter(raft.ServerID(req.GetId()), raft.ServerAddress(req.GetRaftAddr()), f.Index(), applyTimeout)
	if err := af.Error(); err != nil {
		return nil, fmt.Errorf("add member %s: %w", req.GetId(), err)
	}
	n.log.Info("added member as a non-voter; it becomes a voter once it holds every repository", "member", req.GetId(), "raft_addr", req.GetRaftAddr(), "index", af.Index())
	r, err := n.commit(ctx, setMemberEntry(req))
	if err != nil {
		return nil, err
	}
	return &clusterv1.AddMemberResponse{Index: r.GetIndex()}, nil
}

func setMemberEntry(req *clusterv1.AddMemberRequest) *fsmv1.Entry {
	return &fsmv1.Entry{Command: &fsmv1.Entry_SetMember{SetMember: &fsmv1.SetMember{Member: &fsmv1.Member{
		Id: req.GetId(), RaftAddr: req.GetRaftAddr(), GrpcAddr: req.GetGrpcAddr(), HttpAddr: req.GetHttpAddr(), SshAddr: req.GetSshAddr(),
	}}}}
}

func (s *clusterService) RemoveMember(ctx context.Context, req *clusterv1.RemoveMemberRequest) (*clusterv1.RemoveMemberResponse, error) {
	var resp *clusterv1.RemoveMemberResponse
	if fwd, err := s.n.forward(ctx, func(c grpc.ClientConnInterface) (err error) {
		resp, err = clusterv1.NewClusterServiceClient(c).RemoveMember(ctx, req)
		return err
	}); fwd {
		return resp, err
	}
	n := s.n
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, err
	}
	found := false
	for _, srv := range f.Configuration().Servers {
		found = found || string(srv.ID) == req.GetId()
	}
	if !found {
		return nil, status.Errorf(codes.NotFound, "no member with ID %q (see gitraft cluster status)", req.GetId())
	}
	// Record the removal first, while this node surely leads (removing
	// itself ends its leadership).
	var meta bool
	n.fsm.Read(func(st *State) { _, meta = st.Member(req.GetId()) })
	if meta {
		if _, err := n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_RemoveMember{RemoveMember: &fsmv1.RemoveMember{Id: req.GetId()}}}); err != nil {
			return nil, err
		}
	}
	rf := n.raft.RemoveServer(raft.ServerID(req.GetId()), 0, applyTimeout)
	if err := rf.Error(); err != nil {
		return nil, fmt.Errorf("remove %s: %w", req.GetId(), err)
	}
	n.log.Info("removed member", "member", req.GetId(), "index", rf.Index())
	return &clusterv1.RemoveMemberResponse{Index: rf.Index()}, nil
}

func (s *clusterService) TransferLeadership(ctx context.Context, req *clusterv1.TransferLeadershipRequest) (*clusterv1.TransferLeadershipResponse, error) {
	var resp *clusterv1.TransferLeadershipResponse
	if fwd, err := s.n.forward(ctx, func(c grpc.ClientConnInterface) (err error) {
		resp, err = clusterv1.NewClusterServiceClient(c).TransferLeadership(ctx, req)
		return err
	}); fwd {
		return resp, err
	}
	n := s.n
	var f raft.Future
	if id := req.GetId(); id != "" {
		if id == n.cfg.NodeID {
			return &clusterv1.TransferLeadershipResponse{LeaderId: id}, nil
		}
		cf := n.raft.GetConfiguration()
		if err := cf.Error(); err != nil {
			return nil, err
		}
		var addr raft.ServerAddress
		for _, srv := range cf.Configuration().Servers {
			if string(srv.ID) == id && srv.Suffrage == raft.Voter {
				addr = srv.Address
			}
		}
		if addr == "" {
			return nil, status.Errorf(codes.NotFound, "no voter with ID %q (see gitraft cluster status)", id)
		}
		f = n.raft.LeadershipTransferToServer(raft.ServerID(id), addr)
	} else {
		f = n.raft.LeadershipTransfer()
	}
	if err := f.Error(); err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "leadership transfer failed: %v", err)
	}
	wctx, cancel := context.WithTimeout(ctx, n.cfg.LeaderWait)
	defer cancel()
	for {
		if _, lid := n.raft.LeaderWithID(); lid != "" && string(lid) != n.cfg.NodeID {
			return &clusterv1.TransferLeadershipResponse{LeaderId: string(lid)}, nil
		}
		select {
		case <-wctx.Done():
			return nil, fmt.Errorf("%w: no new leader within %s", ErrNoLeader, n.cfg.LeaderWait)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// ----- RepoService -----

type repoService struct {
	repov1.UnimplementedRepoServiceServer
	n *Node
}

func repoToAPI(r *fsmv1.Repo, refCount int) *repov1.Repo {
	out := &repov1.Repo{
		Name: r.GetName(), Version: r.GetVersion(), UpdatedIndex: r.GetUpdatedIndex(),
		CreatedAt: timestamppb.New(time.Unix(0, r.GetCreatedUnixNano())),
		UpdatedAt: timestamppb.New(time.Unix(0, r.GetUpdatedUnixNano())),
		RefCount:  int32(refCount),
		Head:      r.GetHead(),
	}
	for _, ref := range r.GetRefs() {
		out.Refs = append(out.Refs, &repov1.Ref{Name: ref.GetName(), Oid: ref.GetOid()})
	}
	for _, rp := range r.GetRepairs() {
		a := &repov1.Repair{Index: rp.GetIndex(), At: timestamppb.New(time.Unix(0, rp.GetUnixNano())), Actor: rp.GetActor(), Reason: rp.GetReason(), Version: rp.GetVersion()}
		for _, c := range rp.GetChanges() {
			a.Changes = append(a.Changes, &repov1.RepairChange{Ref: c.GetRef(), OldOid: c.GetOldOid(), NewOid: c.GetNewOid()})
		}
		out.Repairs = append(out.Repairs, a)
	}
	return out
}

func (s *repoService) CreateRepo(ctx context.Context, req *repov1.CreateRepoRequest) (*repov1.CreateRepoResponse, error) {
	name, err := storage.CanonicalName(req.GetName())
	if err != nil {
		return nil, err
	}
	r, err := s.n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_CreateRepo{CreateRepo: &fsmv1.CreateRepo{Name: name}}})
	if err != nil {
		return nil, err
	}
	return &repov1.CreateRepoResponse{Repo: repoToAPI(r.GetRepo(), 0), Index: r.GetIndex()}, nil
}

func (s *repoService) DeleteRepo(ctx context.Context, req *repov1.DeleteRepoRequest) (*repov1.DeleteRepoResponse, error) {
	name, err := storage.CanonicalName(req.GetName())
	if err != nil {
		return nil, err
	}
	r, err := s.n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_DeleteRepo{DeleteRepo: &fsmv1.DeleteRepo{Name: name}}})
	if err != nil {
		return nil, err
	}
	return &repov1.DeleteRepoResponse{Index: r.GetIndex()}, nil
}

func (s *repoService) ListRepos(ctx context.Context, _ *repov1.ListReposRequest) (*repov1.ListReposResponse, error) {
	if _, err := s.n.ReadBarrier(ctx); err != nil {
		return nil, err
	}
	resp := &repov1.ListReposResponse{}
	s.n.fsm.Read(func(st *State) {
		repos, counts := st.Repos()
		for i, r := range repos {
			resp.Repos = append(resp.Repos, repoToAPI(r, counts[i]))
		}
		resp.Index = st.Index()
	})
	return resp, nil
}

func (s *repoService) GetRepo(ctx context.Context, req *repov1.GetRepoRequest) (*repov1.GetRepoResponse, error) {
	name, err := storage.CanonicalName(req.GetName())
	if err != nil {
		return nil, err
	}
	if _, err := s.n.ReadBarrier(ctx); err != nil {
		return nil, err
	}
	var resp *repov1.GetRepoResponse
	s.n.fsm.Read(func(st *State) {
		if r, ok := st.Repo(name); ok {
			resp = &repov1.GetRepoResponse{Repo: repoToAPI(r, len(r.GetRefs())), Index: st.Index()}
		}
	})
	if resp == nil {
		return nil, status.Errorf(codes.NotFound, "repository %q not found", name)
	}
	if s.n.git != nil {
		reps := s.n.git.MemberReplicas(ctx, name)
		var ids []string
		s.n.fsm.Read(func(st *State) {
			for _, m := range st.Members() {
				ids = append(ids, m.GetId())
			}
		})
		for _, id := range ids {
			r := &repov1.Replica{NodeId: id, State: repov1.ReplicaState_REPLICA_STATE_UNREACHABLE}
			if rep, ok := reps[id]; ok && rep.GetState() != replicav1.ReplicaState_REPLICA_STATE_UNSPECIFIED {
				// The enums share their numbering; a member judges against
				// its own applied index, so judge the version here too.
				r.Version, r.State = rep.GetVersion(), repov1.ReplicaState(rep.GetState())
				if rep.GetVersion() >= resp.Repo.GetVersion() && rep.GetState() != replicav1.ReplicaState_REPLICA_STATE_DAMAGED {
					r.State = repov1.ReplicaState_REPLICA_STATE_CURRENT
				}
			}
			resp.Repo.Replicas = append(resp.Repo.Replicas, r)
		}
	}
	return resp, nil
}

func (s *repoService) VerifyRepo(ctx context.Context, req *repov1.VerifyRepoRequest) (*repov1.VerifyRepoResponse, error) {
	n := s.n
	name, err := storage.CanonicalName(req.GetName())
	if err != nil {
		return nil, err
	}
	if _, err := n.ReadBarrier(ctx); err != nil {
		return nil, err
	}
	var want *fsmv1.Repo
	var members []*fsmv1.Member
	resp := &repov1.VerifyRepoResponse{Name: name}
	n.fsm.Read(func(st *State) {
		want, _ = st.Repo(name)
		members = st.Members()
		resp.Index = st.Index()
	})
	if want == nil {
		return nil, status.Errorf(codes.NotFound, "repository %q not found", name)
	}
	resp.Version = want.GetVersion()
	wantRefs := map[string]string{}
	for _, r := range want.GetRefs() {
		wantRefs[r.GetName()] = r.GetOid()
	}
	out := make([]*repov1.NodeVerification, len(members))
	var wg sync.WaitGroup
	for i, m := range members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v := &repov1.NodeVerification{NodeId: m.GetId()}
			out[i] = v
			conn, err := n.peers.conn(m.GetGrpcAddr())
			if err != nil {
				v.Error, v.State = err.Error(), repov1.ReplicaState_REPLICA_STATE_UNREACHABLE
				return
			}
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			local, err := replicav1.NewReplicaServiceClient(conn).GetLocalRefs(cctx, &replicav1.GetLocalRefsRequest{Repo: name})
			if err != nil {
				v.Error, v.State = status.Convert(err).Message(), repov1.ReplicaState_REPLICA_STATE_UNREACHABLE
				if status.Code(err) == codes.NotFound {
					v.State = repov1.ReplicaState_REPLICA_STATE_BEHIND
				}
				return
			}
			v.Version = local.GetVersion()
			v.Differences = diffRefs(local.GetRefs(), wantRefs)
			if local.GetHead() != want.GetHead() {
				v.Differences = append(v.Differences, fmt.Sprintf("HEAD: disk %s, state %s", local.GetHead(), want.GetHead()))
			}
			switch {
			case local.GetRepoId() != want.GetId():
				v.State = repov1.ReplicaState_REPLICA_STATE_BEHIND
				v.Error = "holds an older incarnation of the repository"
			case local.GetVersion() < want.GetVersion():
				v.State = repov1.ReplicaState_REPLICA_STATE_BEHIND
			default:
				v.State = repov1.ReplicaState_REPLICA_STATE_CURRENT
				v.Ok = len(v.Differences) == 0
			}
		}()
	}
	wg.Wait()
	resp.Nodes = out
	return resp, nil
}

// diffRefs lists how disk refs differ from the state's, sorted.
func diffRefs(disk, state map[string]string) []string {
	var out []string
	for ref, oid := range state {
		if disk[ref] != oid {
			out = append(out, fmt.Sprintf("%s: disk %s, state %s", ref, orDash(disk[ref]), oid))
		}
	}
	for ref, oid := range disk {
		if _, ok := state[ref]; !ok {
			out = append(out, fmt.Sprintf("%s: disk %s, not in state", ref, oid))
		}
	}
	sort.Strings(out)
	return out
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func (s *repoService) UpdateRefs(ctx context.Context, req *repov1.UpdateRefsRequest) (*repov1.UpdateRefsResponse, error) {
	name, err := storage.CanonicalName(req.GetRepo())
	if err != nil {
		return nil, err
	}
	u := &fsmv1.UpdateRefs{Repo: name, FencingToken: req.GetFencingToken(), Atomic: req.GetAtomic()}
	var oids []string
	for _, x := range req.GetUpdates() {
		u.Updates = append(u.Updates, &fsmv1.RefUpdate{Ref: x.GetRef(), OldOid: x.GetOldOid(), NewOid: x.GetNewOid()})
		if x.GetNewOid() != "" && strings.Trim(x.GetNewOid(), "0") != "" {
			oids = append(oids, x.GetNewOid())
		}
	}
	if err := s.n.objectsOnQuorum(ctx, name, oids); err != nil {
		return nil, err
	}
	r, err := s.n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_UpdateRefs{UpdateRefs: u}})
	if err != nil {
		return nil, err
	}
	resp := &repov1.UpdateRefsResponse{Version: r.GetRepo().GetVersion(), Index: r.GetIndex()}
	for _, rr := range r.GetRefResults() {
		resp.Results = append(resp.Results, &repov1.RefResult{Ref: rr.GetRef(), Status: repov1.RefStatus(rr.GetStatus()), CurrentOid: rr.GetCurrentOid()})
	}
	return resp, nil
}

// ----- LockService -----

type lockService struct {
	lockv1.UnimplementedLockServiceServer
	n *Node
}

func lockToAPI(l *fsmv1.WriteLock) *lockv1.WriteLock {
	if l == nil {
		return nil
	}
	return &lockv1.WriteLock{
		Repo: l.GetRepo(), Holder: l.GetHolder(), FencingToken: l.GetFencingToken(),
		AcquiredAt: timestamppb.New(time.Unix(0, l.GetAcquiredUnixNano())),
		ExpiresAt:  timestamppb.New(time.Unix(0, l.GetExpiresUnixNano())),
	}
}

func (n *Node) lease(d *durationpb.Duration) (time.Duration, error) {
	if d == nil {
		return n.cfg.DefaultLease, nil
	}
	l := d.AsDuration()
	if l <= 0 || l > 24*time.Hour {
		return 0, status.Errorf(codes.InvalidArgument, "lease %s: must be positive and at most 24h", l)
	}
	return l, nil
}

func (s *lockService) ListLocks(ctx context.Context, _ *lockv1.ListLocksRequest) (*lockv1.ListLocksResponse, error) {
	if _, err := s.n.ReadBarrier(ctx); err != nil {
		return nil, err
	}
	resp := &lockv1.ListLocksResponse{}
	s.n.fsm.Read(func(st *State) {
		for _, l := range st.Locks() {
			resp.Locks = append(resp.Locks, lockToAPI(lockToProto(l)))
		}
		for _, q := range st.LockQueues() {
			aq := &lockv1.LockQueue{Repo: q.Repo}
			for _, w := range q.Waiters {
				aq.Waiters = append(aq.Waiters, &lockv1.LockWaiter{Holder: w.Holder, Node: w.Node,
					Since: timestamppb.New(w.Since), ExpiresAt: timestamppb.New(w.ExpiresAt)})
			}
			resp.Queues = append(resp.Queues, aq)
		}
		resp.Index = st.Index()
	})
	return resp, nil
}

func (s *lockService) AcquireLock(ctx context.Context, req *lockv1.AcquireLockRequest) (*lockv1.AcquireLockResponse, error) {
	lease, err := s.n.lease(req.GetLease())
	if err != nil {
		return nil, err
	}
	name, err := storage.CanonicalName(req.GetRepo())
	if err != nil {
		return nil, err
	}
	r, err := s.n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_AcquireLock{AcquireLock: &fsmv1.AcquireLock{Repo: name, Holder: req.GetHolder(), LeaseNanos: int64(lease)}}})
	if err != nil {
		return nil, err
	}
	return &lockv1.AcquireLockResponse{Lock: lockToAPI(r.GetLock()), Index: r.GetIndex()}, nil
}

func (s *lockService) RenewLock(ctx context.Context, req *lockv1.RenewLockRequest) (*lockv1.RenewLockResponse, error) {
	lease, err := s.n.lease(req.GetLease())
	if err != nil {
		return nil, err
	}
	r, err := s.n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_RenewLock{RenewLock: &fsmv1.RenewLock{Repo: req.GetRepo(), FencingToken: req.GetFencingToken(), LeaseNanos: int64(lease)}}})
	if err != nil {
		return nil, err
	}
	return &lockv1.RenewLockResponse{Lock: lockToAPI(r.GetLock()), Index: r.GetIndex()}, nil
}

func (s *lockService) ReleaseLock(ctx context.Context, req *lockv1.ReleaseLockRequest) (*lockv1.ReleaseLockResponse, error) {
	r, err := s.n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_ReleaseLock{ReleaseLock: &fsmv1.ReleaseLock{Repo: req.GetRepo(), FencingToken: req.GetFencingToken()}}})
	if err != nil {
		return nil, err
	}
	return &lockv1.ReleaseLockResponse{Index: r.GetIndex()}, nil
}

func (s *lockService) ForceReleaseLock(ctx context.Context, req *lockv1.ForceReleaseLockRequest) (*lockv1.ForceReleaseLockResponse, error) {
	r, err := s.n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_ForceReleaseLock{ForceReleaseLock: &fsmv1.ForceReleaseLock{Repo: req.GetRepo()}}})
	if err != nil {
		return nil, err
	}
	s.n.log.Warn("write lock force-released", "repo", req.GetRepo(), "holder", r.GetLock().GetHolder(), "token", r.GetLock().GetFencingToken())
	return &lockv1.ForceReleaseLockResponse{Released: lockToAPI(r.GetLock()), Index: r.GetIndex()}, nil
}

// ----- the Locker a writer uses (lockd.Locker) -----

// Locker returns the lockd.Locker backed by this node's Raft proposals.
func (n *Node) Locker() lockd.Locker { return nodeLocker{n} }

type nodeLocker struct{ n *Node }

// lockWaitLease is how long a writer waiting for a write lock keeps its
// place in the queue without asking again. The lock client asks at least
// every lockd.DefaultRetryMax (1s) while it waits, so only a waiter that is
// gone loses its place.
const lockWaitLease = 5 * time.Second

func (l nodeLocker) AcquireLock(ctx context.Context, repo, holder string, lease time.Duration) (lockd.WriteLock, error) {
	a := &fsmv1.AcquireLock{Repo: repo, Holder: holder, LeaseNanos: int64(lease)}
	if l.n.locksKnowNodes() {
		a.Node, a.Incarnation, a.WaitLeaseNanos = l.n.cfg.NodeID, l.n.incarnation, int64(lockWaitLease)
	}
	r, err := l.n.Propose(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_AcquireLock{AcquireLock: a}})
	return lockResult(r, noLeaderAs(err))
}

// LockChanged implements lockd.Watcher.
func (l nodeLocker) LockChanged(repo string) <-chan struct{} { return l.n.lockWaits.changed(repo) }

// LeaveQueue implements lockd.Leaver.
func (l nodeLocker) LeaveQueue(ctx context.Context, repo, holder string) error {
	if !l.n.locksKnowNodes() {
		return nil // no queue: acquires carry no wait lease
	}
	r, err := l.n.Propose(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_LeaveLockQueue{LeaveLockQueue: &fsmv1.LeaveLockQueue{Repo: repo, Holder: holder}}})
	if err != nil {
		return err
	}
	if r.GetRefusal() != nil {
		return refusal(r)
	}
	return nil
}

var (
	_ lockd.Watcher = nodeLocker{}
	_ lockd.Leaver  = nodeLocker{}
)

func (l nodeLocker) RenewLock(ctx context.Context, repo string, token uint64, lease time.Duration) (lockd.WriteLock, error) {
	r, err := l.n.Propose(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_RenewLock{RenewLock: &fsmv1.RenewLock{Repo: repo, FencingToken: token, LeaseNanos: int64(lease)}}})
	return lockResult(r, err)
}

func (l nodeLocker) ReleaseLock(ctx context.Context, repo string, token uint64) error {
	r, err := l.n.Propose(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_ReleaseLock{ReleaseLock: &fsmv1.ReleaseLock{Repo: repo, FencingToken: token}}})
	_, err = lockResult(r, err)
	return err
}

// lockResult maps a lock entry's result back to lockd's errors.
func lockResult(r *fsmv1.Result, err error) (lockd.WriteLock, error) {
	if err != nil {
		return lockd.WriteLock{}, err
	}
	if rf := r.GetRefusal(); rf != nil {
		var sentinel error
		switch rf.GetReason() {
		case fsmv1.Reason_REASON_LOCK_HELD:
			return lockd.WriteLock{}, &lockd.HeldError{Lock: lockFromProto(r.GetLock()), Queued: true}
		case fsmv1.Reason_REASON_STALE_TOKEN:
			sentinel = lockd.ErrStaleToken
		case fsmv1.Reason_REASON_LOCK_NOT_HELD:
			sentinel = lockd.ErrNotHeld
		case fsmv1.Reason_REASON_LEASE_EXPIRED:
			sentinel = lockd.ErrLeaseExpired
		default:
			return lockd.WriteLock{}, refusal(r)
		}
		return lockd.WriteLock{}, fmt.Errorf("%s: %w", rf.GetMessage(), sentinel)
	}
	return lockFromProto(r.GetLock()), nil
}
