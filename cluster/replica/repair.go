package replica

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
	"github.com/gitraft/gitraft/storage"
)

// RepairPlan finds the refs whose tips no voter holds whole (the objects
// are lost), and for each the newest value some node's copy has on disk
// that a majority does hold (or none: delete it). A tip that some voter
// but fewer than a majority hold is left alone: the other copies heal from
// that one.
func (r *Replicas) RepairPlan(ctx context.Context, repo string, refs map[string]string) ([]*repov1.RepairChange, error) {
	voters, err := r.node.Voters()
	if err != nil {
		return nil, err
	}
	need := len(voters)/2 + 1
	tips := slices.Compact(slices.Sorted(maps.Values(refs)))
	held, err := r.heldBy(ctx, repo, voters, tips)
	if err != nil {
		return nil, err
	}
	// What each node's copy has on disk for the refs: candidates.
	disk := map[string][]string{} // ref -> values seen on nodes' disks
	for _, m := range voters {
		refs, err := r.localRefs(ctx, m, repo)
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
		if held[tip] > 0 {
			// Some voter holds it whole: the copies that lack it heal
			// from that one (RepairRefs scrubs them after), which gives
			// the majority back without losing the push.
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
			ch, err := r.heldBy(ctx, repo, voters, cands)
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
func (r *Replicas) heldBy(ctx context.Context, repo string, voters []*fsmv1.Member, oids []string) (map[string]int, error) {
	out := map[string]int{}
	if len(oids) == 0 {
		return out, nil
	}
	answered := 0
	for _, m := range voters {
		var lacks []string
		var err error
		if m.GetId() == r.node.ID() {
			lacks, err = r.st.MissingWhole(ctx, repo, oids)
			if errors.Is(err, storage.ErrNotFound) {
				lacks, err = oids, nil
			}
		} else if c, cerr := r.client(m.GetGrpcAddr()); cerr == nil {
			cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			var resp *replicav1.MissingObjectsResponse
			resp, err = c.MissingObjects(cctx, &replicav1.MissingObjectsRequest{Repo: repo, Oids: oids, Full: true})
			cancel()
			lacks = resp.GetMissing()
		} else {
			err = cerr
		}
		if err != nil {
			r.log.Warn("repair: a voter did not answer; counting it as holding nothing", "repo", repo, "peer", m.GetId(), "err", err)
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
func (r *Replicas) localRefs(ctx context.Context, m *fsmv1.Member, repo string) (map[string]string, error) {
	if m.GetId() == r.node.ID() {
		return r.st.Refs(ctx, repo)
	}
	c, err := r.client(m.GetGrpcAddr())
	if err != nil {
		return nil, err
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := c.GetLocalRefs(cctx, &replicav1.GetLocalRefsRequest{Repo: repo})
	if err != nil {
		return nil, err
	}
	return resp.GetRefs(), nil
}

// Holding is what one member's copy holds of a set of objects.
type Holding struct {
	Member *fsmv1.Member
	// Lacks are the objects whose whole history the copy does not hold.
	Lacks []string
	// Err is set when the member did not answer (its part is unknown).
	Err error
}

// Holdings asks every member which of oids its copy of repo holds whole,
// walking whole histories (MissingObjects with full: a copy's refs may be
// what is damaged). A member without a copy lacks them all.
func (r *Replicas) Holdings(ctx context.Context, repo string, oids []string) []Holding {
	members := r.node.Members()
	out := make([]Holding, len(members))
	done := make(chan struct{}, len(members))
	for i, m := range members {
		go func() {
			defer func() { done <- struct{}{} }()
			h := Holding{Member: m}
			if len(oids) == 0 {
				out[i] = h
				return
			}
			if m.GetId() == r.node.ID() {
				h.Lacks, h.Err = r.st.MissingWhole(ctx, repo, oids)
				if errors.Is(h.Err, storage.ErrNotFound) {
					h.Lacks, h.Err = oids, nil
				}
			} else if c, err := r.client(m.GetGrpcAddr()); err != nil {
				h.Err = err
			} else {
				cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				resp, err := c.MissingObjects(cctx, &replicav1.MissingObjectsRequest{Repo: repo, Oids: oids, Full: true})
				cancel()
				if err != nil {
					h.Err = errors.New(status.Convert(err).Message())
				} else {
					h.Lacks = resp.GetMissing()
				}
			}
			out[i] = h
		}()
	}
	for range members {
		<-done
	}
	return out
}
