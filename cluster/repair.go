package cluster

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	nodev1 "github.com/gitraft/gitraft/proto/gitraft/node/v1"
	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
	"github.com/gitraft/gitraft/storage"
)

// RepairRefs forces refs of a damaged repository to new values under its
// write lock and records who did it and why (Praefect's accept-dataloss and
// Phabricator's thaw are the precedent). With auto, it first finds the refs
// whose tips fewer than a majority of voters hold whole, and resets each to
// the newest value a majority can serve, or deletes it.
func (s *repoService) RepairRefs(ctx context.Context, req *repov1.RepairRefsRequest) (*repov1.RepairRefsResponse, error) {
	n := s.n
	name, err := storage.CanonicalName(req.GetRepo())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if req.GetAuto() == (len(req.GetUpdates()) > 0) {
		return nil, status.Error(codes.InvalidArgument, "give either refs to set or delete, or --auto, not both")
	}
	if strings.TrimSpace(req.GetReason()) == "" && !req.GetDryRun() {
		return nil, status.Error(codes.InvalidArgument, "a repair needs a reason (--reason), for the record")
	}
	if n.git == nil {
		return nil, status.Error(codes.FailedPrecondition, ErrNoGit.Error())
	}
	if _, err := n.ReadBarrier(ctx); err != nil {
		return nil, err
	}
	t, ok := n.git.target(name)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "repository %q not found", name)
	}
	var plan []*repov1.RepairChange
	if req.GetAuto() {
		if plan, err = n.repairPlan(ctx, name, t.refs); err != nil {
			return nil, err
		}
	} else {
		for _, u := range req.GetUpdates() {
			ref, nv := u.GetRef(), normOID(u.GetNewOid())
			cur, exists := t.refs[ref]
			switch {
			case nv == "" && !exists:
				return nil, status.Errorf(codes.NotFound, "%s has no ref %s", name, ref)
			case nv != "":
				if err := ValidateGitRefName(ref); err != nil {
					return nil, status.Error(codes.InvalidArgument, err.Error())
				}
				if err := validateOID(nv); err != nil {
					return nil, status.Error(codes.InvalidArgument, err.Error())
				}
				if err := n.objectsOnQuorum(ctx, name, []string{nv}); err != nil {
					return nil, err
				}
			}
			plan = append(plan, &repov1.RepairChange{Ref: ref, OldOid: cur, NewOid: nv, Why: "set by the operator"})
		}
	}
	resp := &repov1.RepairRefsResponse{Repo: name, Changes: plan}
	if req.GetDryRun() || len(plan) == 0 {
		return resp, nil
	}
	actor := caller(ctx)
	held, err := n.locks.Acquire(ctx, name, "repair/"+actor, nil)
	if err != nil {
		return nil, fmt.Errorf("write lock of %s: %w", name, err)
	}
	defer func() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		held.Release(rctx)
		cancel()
	}()
	// Under the lock: the refs may have moved since the plan was made.
	if _, err := n.ReadBarrier(ctx); err != nil {
		return nil, err
	}
	now, _ := n.git.target(name)
	u := &fsmv1.UpdateRefs{Repo: name, FencingToken: held.Token(), Atomic: true, RepairActor: actor, RepairReason: req.GetReason()}
	for _, c := range plan {
		if now.refs[c.GetRef()] != c.GetOldOid() {
			return nil, status.Errorf(codes.Aborted, "%s changed while the repair was planned (a push?); run it again", c.GetRef())
		}
		u.Updates = append(u.Updates, &fsmv1.RefUpdate{Ref: c.GetRef(), OldOid: c.GetOldOid(), NewOid: c.GetNewOid()})
	}
	r, err := n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_UpdateRefs{UpdateRefs: u}})
	if err != nil {
		return nil, err
	}
	resp.Version, resp.Index = r.GetRepo().GetVersion(), r.GetIndex()
	n.log.Warn("repository repaired by an operator", "repo", name, "actor", actor, "reason", req.GetReason(), "refs", len(plan), "version", resp.Version)
	return resp, nil
}

// repairPlan finds the refs whose tips fewer than a majority of voters hold
// whole, and for each the newest value some node's copy has on disk that a
// majority does hold (or none: delete it).
func (n *Node) repairPlan(ctx context.Context, repo string, refs map[string]string) ([]*repov1.RepairChange, error) {
	voters, err := n.voters()
	if err != nil {
		return nil, err
	}
	need := len(voters)/2 + 1
	tips := slices.Sorted(maps.Values(refs))
	tips = slices.Compact(tips)
	held, err := n.heldBy(ctx, repo, voters, tips)
	if err != nil {
		return nil, err
	}
	// What each node's copy has on disk for the refs: candidates.
	disk := map[string][]string{} // ref -> values seen on nodes' disks
	for _, m := range voters {
		refs, err := n.localRefs(ctx, m, repo)
		if err != nil {
			continue
		}
		for ref, oid := range refs {
			if !slices.Contains(disk[ref], oid) {
				disk[ref] = append(disk[ref], oid)
			}
		}
	}
	var plan []*repov1.RepairChange
	for _, ref := range slices.Sorted(maps.Keys(refs)) {
		tip := refs[ref]
		if held[tip] >= need {
			continue
		}
		c := &repov1.RepairChange{Ref: ref, OldOid: tip}
		var cands []string
		for _, v := range disk[ref] {
			if v != tip {
				cands = append(cands, v)
			}
		}
		if len(cands) > 0 {
			ch, err := n.heldBy(ctx, repo, voters, cands)
			if err != nil {
				return nil, err
			}
			sort.SliceStable(cands, func(i, j int) bool { return ch[cands[i]] > ch[cands[j]] })
			if ch[cands[0]] >= need {
				c.NewOid = cands[0]
				c.Why = fmt.Sprintf("tip held whole by %d of %d voters; reset to %s, which %d hold", held[tip], len(voters), cands[0], ch[cands[0]])
			}
		}
		if c.NewOid == "" {
			c.Why = fmt.Sprintf("tip held whole by %d of %d voters, and no older value a majority holds: deleted (the objects are lost)", held[tip], len(voters))
		}
		plan = append(plan, c)
	}
	return plan, nil
}

// heldBy counts, for each oid, the voters whose copy holds it whole,
// walking whole histories: the copies' refs may be what is damaged.
func (n *Node) heldBy(ctx context.Context, repo string, voters []*fsmv1.Member, oids []string) (map[string]int, error) {
	out := map[string]int{}
	if len(oids) == 0 {
		return out, nil
	}
	answered := 0
	for _, m := range voters {
		var lacks []string
		var err error
		if m.GetId() == n.cfg.NodeID {
			lacks, err = n.git.st.MissingWhole(ctx, repo, oids)
			if errors.Is(err, storage.ErrNotFound) {
				lacks, err = oids, nil
			}
		} else if c, cerr := n.peers.node(m.GetGrpcAddr()); cerr == nil {
			cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			var resp *nodev1.MissingObjectsResponse
			resp, err = c.MissingObjects(cctx, &nodev1.MissingObjectsRequest{Repo: repo, Oids: oids, Full: true})
			cancel()
			lacks = resp.GetMissing()
		} else {
			err = cerr
		}
		if err != nil {
			n.log.Warn("repair: a voter did not answer; counting it as holding nothing", "repo", repo, "peer", m.GetId(), "err", err)
			continue
		}
		answered++
		for _, o := range oids {
			if !slices.Contains(lacks, o) {
				out[o]++
			}
		}
	}
	if answered == 0 {
		return nil, status.Error(codes.Unavailable, "no voter answered; cannot tell which objects are held")
	}
	return out, nil
}

// localRefs is what one member's copy of repo has on disk.
func (n *Node) localRefs(ctx context.Context, m *fsmv1.Member, repo string) (map[string]string, error) {
	if m.GetId() == n.cfg.NodeID {
		return n.git.st.Refs(ctx, repo)
	}
	c, err := n.peers.node(m.GetGrpcAddr())
	if err != nil {
		return nil, err
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := c.GetLocalRefs(cctx, &nodev1.GetLocalRefsRequest{Repo: repo})
	if err != nil {
		return nil, err
	}
	return resp.GetRefs(), nil
}
