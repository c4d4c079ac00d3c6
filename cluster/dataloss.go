package cluster

// The operator's view of damage: scrubbing a repository's copies now
// (RepoService.ScrubRepo), the data-loss report (RepoService.DataLoss,
// Praefect's `dataloss` is the model), and bringing every copy to the
// committed version after a repair.

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/gitraft/gitraft/cluster/replica"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
	"github.com/gitraft/gitraft/storage"
)

// ScrubRepo asks one member, or every member, to scrub its copy of a
// repository now and heal it when it is damaged.
func (s *repoService) ScrubRepo(ctx context.Context, req *repov1.ScrubRepoRequest) (*repov1.ScrubRepoResponse, error) {
	n := s.n
	name, err := storage.CanonicalName(req.GetName())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if n.git == nil {
		return nil, status.Error(codes.FailedPrecondition, ErrNoGit.Error())
	}
	if _, err := n.ReadBarrier(ctx); err != nil {
		return nil, err
	}
	t, ok := n.gitTarget(name)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "repository %q not found", name)
	}
	var members []*fsmv1.Member
	n.fsm.Read(func(st *State) { members = st.Members() })
	if id := req.GetNodeId(); id != "" {
		members = slices.DeleteFunc(members, func(m *fsmv1.Member) bool { return m.GetId() != id })
		if len(members) == 0 {
			return nil, status.Errorf(codes.NotFound, "no member %q (see gitraft cluster status)", id)
		}
	}
	resp := &repov1.ScrubRepoResponse{Name: name, Version: t.Version}
	resp.Copies = n.scrubMembers(ctx, name, members)
	return resp, nil
}

// scrubMembers asks each member to scrub its copy of name, at once.
func (n *Node) scrubMembers(ctx context.Context, name string, members []*fsmv1.Member) []*repov1.CopyCheck {
	out := make([]*repov1.CopyCheck, len(members))
	var wg sync.WaitGroup
	for i, m := range members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i] = n.scrubMember(ctx, name, m)
		}()
	}
	wg.Wait()
	return out
}

func (n *Node) scrubMember(ctx context.Context, name string, m *fsmv1.Member) *repov1.CopyCheck {
	cc := &repov1.CopyCheck{NodeId: m.GetId(), State: repov1.ReplicaState_REPLICA_STATE_UNREACHABLE}
	var r *replicav1.ScrubResponse
	if m.GetId() == n.cfg.NodeID {
		r = n.git.Scrub(ctx, name)
	} else {
		conn, err := n.peers.conn(m.GetGrpcAddr())
		if err != nil {
			cc.Error = err.Error()
			return cc
		}
		cctx, cancel := context.WithTimeout(ctx, 15*time.Minute)
		defer cancel()
		r, err = replicav1.NewReplicaServiceClient(conn).Scrub(cctx, &replicav1.ScrubRequest{Repo: name})
		if err != nil {
			cc.Error = status.Convert(err).Message()
			return cc
		}
	}
	cc.Version, cc.State = r.GetVersion(), repov1.ReplicaState(r.GetState())
	cc.Findings, cc.Healed, cc.Error, cc.BytesChecked = r.GetFindings(), r.GetHealed(), r.GetError(), r.GetBytesChecked()
	return cc
}

// DataLoss lists the repositories whose committed version fewer than a
// majority of voters hold whole: every committed ref's object present with
// its whole history. A member that does not answer counts as not holding.
func (s *repoService) DataLoss(ctx context.Context, req *repov1.DataLossRequest) (*repov1.DataLossResponse, error) {
	n := s.n
	if n.git == nil {
		return nil, status.Error(codes.FailedPrecondition, ErrNoGit.Error())
	}
	idx, err := n.ReadBarrier(ctx)
	if err != nil {
		return nil, err
	}
	targets := replicaNode{n}.Repos()
	names := slices.Sorted(maps.Keys(targets))
	if req.GetName() != "" {
		name, err := storage.CanonicalName(req.GetName())
		if err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
		if _, ok := targets[name]; !ok {
			return nil, status.Errorf(codes.NotFound, "repository %q not found", name)
		}
		names = []string{name}
	}
	voters, err := n.voters()
	if err != nil {
		return nil, err
	}
	isVoter := map[string]bool{}
	for _, v := range voters {
		isVoter[v.GetId()] = true
	}
	resp := &repov1.DataLossResponse{Index: idx}
	for _, name := range names {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		rl := dataLossOf(targets[name].Refs, isVoter, n.git.Holdings(ctx, name, tipsOf(targets[name].Refs)))
		rl.Name, rl.Version = name, targets[name].Version
		resp.Checked++
		if req.GetAll() || rl.GetStatus() != repov1.DataLossStatus_DATA_LOSS_STATUS_HEALTHY {
			resp.Repos = append(resp.Repos, rl)
		}
	}
	return resp, nil
}

func tipsOf(refs map[string]string) []string {
	return slices.Compact(slices.Sorted(maps.Values(refs)))
}

// dataLossOf judges a repository from what each member holds of its
// committed refs' objects: healthy when a majority of voters hold them all,
// lost when some ref's objects no member holds, below majority otherwise
// (every ref's objects are on some member, if not on a majority).
func dataLossOf(refs map[string]string, isVoter map[string]bool, hs []replica.Holding) *repov1.RepoDataLoss {
	rl := &repov1.RepoDataLoss{Voters: int32(len(isVoter))}
	heldAnywhere := map[string]bool{}
	for _, h := range hs {
		nh := &repov1.NodeHolding{NodeId: h.Member.GetId(), Voter: isVoter[h.Member.GetId()]}
		if h.Err != nil {
			nh.Error = h.Err.Error()
		} else {
			lacks := map[string]bool{}
			for _, o := range h.Lacks {
				lacks[o] = true
			}
			for _, o := range refs {
				if !lacks[o] {
					heldAnywhere[o] = true
				}
			}
			for _, ref := range slices.Sorted(maps.Keys(refs)) {
				if lacks[refs[ref]] {
					nh.MissingRefs = append(nh.MissingRefs, ref)
				}
			}
			nh.Holds = len(nh.MissingRefs) == 0
			if len(nh.MissingRefs) > 5 {
				more := len(nh.MissingRefs) - 5
				nh.MissingRefs = append(nh.MissingRefs[:5], fmt.Sprintf("(%d more)", more))
			}
		}
		if nh.Holds && nh.Voter {
			rl.HeldBy++
		}
		rl.Nodes = append(rl.Nodes, nh)
	}
	sort.Slice(rl.Nodes, func(i, j int) bool { return rl.Nodes[i].GetNodeId() < rl.Nodes[j].GetNodeId() })
	for _, ref := range slices.Sorted(maps.Keys(refs)) {
		if !heldAnywhere[refs[ref]] {
			rl.LostRefs = append(rl.LostRefs, ref)
		}
	}
	switch {
	case len(refs) == 0 || int(rl.HeldBy) >= len(isVoter)/2+1:
		rl.Status = repov1.DataLossStatus_DATA_LOSS_STATUS_HEALTHY
	case len(rl.LostRefs) == 0:
		// Every ref's objects are somewhere, if not on a majority.
		rl.Status = repov1.DataLossStatus_DATA_LOSS_STATUS_BELOW_MAJORITY
	default:
		rl.Status = repov1.DataLossStatus_DATA_LOSS_STATUS_LOST
	}
	return rl
}

// healAfterRepair waits for every member's copy to reach version (the
// repair's), then scrubs it, so that a copy still damaged is healed and a
// copy that cannot be is named with the reason.
func (n *Node) healAfterRepair(ctx context.Context, name string, version uint64) []*repov1.CopyCheck {
	var members []*fsmv1.Member
	n.fsm.Read(func(st *State) { members = st.Members() })
	out := make([]*repov1.CopyCheck, len(members))
	var wg sync.WaitGroup
	for i, m := range members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			wctx, cancel := context.WithTimeout(ctx, time.Minute)
			lastErr := n.waitCopy(wctx, name, version, m)
			cancel()
			cc := n.scrubMember(ctx, name, m)
			if cc.GetVersion() < version && cc.GetError() == "" {
				cc.Error = fmt.Sprintf("still at version %d of %d", cc.GetVersion(), version)
				if lastErr != "" {
					cc.Error += ": " + lastErr
				}
			}
			out[i] = cc
		}()
	}
	wg.Wait()
	return out
}

// waitCopy polls a member until its copy of name is current at version (or
// ctx ends), and returns its last catch-up error.
func (n *Node) waitCopy(ctx context.Context, name string, version uint64, m *fsmv1.Member) string {
	var last string
	for {
		var rep *replicav1.Replica
		if m.GetId() == n.cfg.NodeID {
			if rs := n.git.Report(name).GetReplicas(); len(rs) == 1 {
				rep = rs[0]
			}
		} else if conn, err := n.peers.conn(m.GetGrpcAddr()); err == nil {
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			resp, err := replicav1.NewReplicaServiceClient(conn).GetReplicas(cctx, &replicav1.GetReplicasRequest{Repo: name})
			cancel()
			if err == nil && len(resp.GetReplicas()) == 1 {
				rep = resp.GetReplicas()[0]
			} else if err != nil {
				last = status.Convert(err).Message()
			}
		}
		if rep != nil {
			last = rep.GetError()
			if rep.GetVersion() >= version && rep.GetState() == replicav1.ReplicaState_REPLICA_STATE_CURRENT {
				return ""
			}
		}
		select {
		case <-ctx.Done():
			return last
		case <-time.After(250 * time.Millisecond):
		}
	}
}
