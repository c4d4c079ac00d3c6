package cluster

import (
	"context"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
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
	t, ok := n.gitTarget(name)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "repository %q not found", name)
	}
	var plan []*repov1.RepairChange
	if req.GetAuto() {
		if plan, err = n.git.RepairPlan(ctx, name, t.Refs); err != nil {
			return nil, err
		}
	} else {
		for _, u := range req.GetUpdates() {
			ref, nv := u.GetRef(), normOID(u.GetNewOid())
			cur, exists := t.Refs[ref]
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
	if req.GetDryRun() {
		return resp, nil
	}
	if len(plan) == 0 {
		// Every ref is held by a majority: bring the copies that are not
		// (damaged, behind) to the committed version.
		resp.Version = t.Version
		resp.Copies = n.healAfterRepair(ctx, name, t.Version)
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
	now, _ := n.gitTarget(name)
	u := &fsmv1.UpdateRefs{Repo: name, FencingToken: held.Token(), Atomic: true, RepairActor: actor, RepairReason: req.GetReason()}
	for _, c := range plan {
		if now.Refs[c.GetRef()] != c.GetOldOid() {
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
	// The refs are fixed; now every copy: each catches up to the repair's
	// version, and a scrub heals what is still damaged or says why not.
	held.Release(ctx)
	resp.Copies = n.healAfterRepair(ctx, name, resp.Version)
	return resp, nil
}
