package replica

// Housekeeping: each node keeps its own copies healthy. A scheduler reads
// every copy's health each interval and housekeeps, one repository at a
// time, those past a threshold; `gitraft repo housekeep` runs the same step
// now (Service.Housekeep). The work itself is storage's (Housekeep,
// RemoveLeftovers); what is decided here is when, whether a copy may be
// pruned (only at the committed version), and that no push is under way
// while leftovers go (the copy's guard, taken for a moment only: the
// repack runs beside pushes).

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
	"github.com/gitraft/gitraft/storage"
)

// HousekeepConfig configures a node's housekeeping.
type HousekeepConfig struct {
	// Off stops the scheduler (`gitraft repo housekeep` still works).
	Off bool
	// Interval is how often every copy's health is read (default 10m).
	Interval time.Duration
	// PackThreshold and LooseThreshold: a copy with at least this many
	// packs, or loose objects, is repacked (defaults 16 and 1024).
	PackThreshold, LooseThreshold int
	// PruneGrace is how long an object no ref reaches, and a leftover of
	// a failed push, is kept after it was last written (default 1h).
	PruneGrace time.Duration
	// PruneInterval is how often a copy is pruned, a full repack (default
	// 24h).
	PruneInterval time.Duration
}

func (c *HousekeepConfig) setDefaults() {
	if c.Interval <= 0 {
		c.Interval = 10 * time.Minute
	}
	if c.PackThreshold <= 0 {
		c.PackThreshold = 16
	}
	if c.LooseThreshold <= 0 {
		c.LooseThreshold = 1024
	}
	if c.PruneGrace <= 0 {
		c.PruneGrace = time.Hour
	}
	if c.PruneInterval <= 0 {
		c.PruneInterval = 24 * time.Hour
	}
}

// housekeeping is a node's housekeeping state.
type housekeeping struct {
	// slot lets one repository at a time be housekept on the node.
	slot *guard
	// lastPass is when the scheduler last went through every copy without
	// a failure (unix seconds; the scheduler's start before that).
	lastPass       atomic.Int64
	runs, failures atomic.Uint64

	mu     sync.Mutex
	health map[string]objectCounts
}

type objectCounts struct{ packs, loose int }

// HousekeepStats are a node's housekeeping figures for its metrics.
type HousekeepStats struct {
	// LastPass is when the scheduler last went through every copy
	// without a failure (when it started, before its first pass).
	LastPass time.Time
	// Runs and Failures count housekeeping runs of single copies.
	Runs, Failures uint64
	// Packs and loose objects over the copies, as last read.
	PacksSum, PacksMax, LooseSum, LooseMax int
}

// HousekeepStats returns the node's housekeeping figures.
func (r *Replicas) HousekeepStats() HousekeepStats {
	h := &r.hk
	st := HousekeepStats{Runs: h.runs.Load(), Failures: h.failures.Load()}
	if t := h.lastPass.Load(); t != 0 {
		st.LastPass = time.Unix(t, 0)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, c := range h.health {
		st.PacksSum += c.packs
		st.LooseSum += c.loose
		st.PacksMax = max(st.PacksMax, c.packs)
		st.LooseMax = max(st.LooseMax, c.loose)
	}
	return st
}

func (r *Replicas) noteHealth(name string, h storage.Health) {
	r.hk.mu.Lock()
	defer r.hk.mu.Unlock()
	if r.hk.health == nil {
		r.hk.health = map[string]objectCounts{}
	}
	r.hk.health[name] = objectCounts{h.Packs, h.LooseObjects}
}

// housekeepLoop runs the scheduler until Close.
func (r *Replicas) housekeepLoop() {
	cfg := r.cfg.Housekeeping
	r.hk.lastPass.Store(time.Now().Unix())
	ctx, cancel := r.untilStop(context.Background())
	defer cancel()
	// The first pass soon after the start, then every interval.
	t := time.NewTimer(min(cfg.Interval, time.Minute))
	defer t.Stop()
	for {
		select {
		case <-r.stop:
			return
		case <-t.C:
		}
		if r.node.Ready() {
			r.housekeepPass(ctx)
		}
		t.Reset(cfg.Interval)
	}
}

// housekeepPass reads every copy's health and housekeeps those due.
func (r *Replicas) housekeepPass(ctx context.Context) {
	cfg := r.cfg.Housekeeping
	targets := r.node.Repos()
	failed := false
	seen := map[string]bool{}
	for _, name := range slices.Sorted(maps.Keys(targets)) {
		if ctx.Err() != nil {
			return
		}
		h, err := r.st.Health(name)
		if errors.Is(err, storage.ErrNotFound) {
			continue // not here yet; the reconciler makes it
		}
		if err != nil {
			r.log.Warn("reading a copy's health failed", "repo", name, "err", err)
			failed = true
			continue
		}
		seen[name] = true
		r.noteHealth(name, h)
		if h.Since.IsZero() && h.LastRun.IsZero() {
			// First seen: its first prune is due a prune interval from now.
			now := time.Now()
			if err := r.st.NoteHousekeepSince(name, now); err != nil {
				r.log.Warn("recording when housekeeping first saw a copy failed", "repo", name, "err", err)
			}
			h.Since = now
		}
		if !housekeepDue(h, cfg, time.Now()) {
			continue
		}
		if _, err := r.housekeep(ctx, name, false); err != nil {
			if ctx.Err() != nil {
				return
			}
			failed = true
		}
	}
	r.hk.mu.Lock()
	for name := range r.hk.health {
		if !seen[name] {
			delete(r.hk.health, name)
		}
	}
	r.hk.mu.Unlock()
	if !failed {
		r.hk.lastPass.Store(time.Now().Unix())
	}
}

// housekeepDue reports whether a copy needs housekeeping: too many packs
// or loose objects, or a prune due (a prune interval since the last one,
// or since housekeeping first saw the copy) while there is something a
// prune could remove (more than one pack, loose objects, leftovers).
func housekeepDue(h storage.Health, cfg HousekeepConfig, now time.Time) bool {
	switch {
	case h.Packs >= cfg.PackThreshold || h.LooseObjects >= cfg.LooseThreshold:
		return true
	case h.Packs > 1 || h.LooseObjects > 0 || h.Leftovers > 0:
		last := h.LastPrune
		if last.IsZero() {
			last = h.Since
		}
		return now.Sub(last) >= cfg.PruneInterval
	}
	return false
}

// HousekeepReport is what one housekeeping run of a copy did.
type HousekeepReport struct {
	storage.HousekeepResult
	// PruneSkipped says why a prune that was due did not run.
	PruneSkipped     string
	LeftoversRemoved int
	Took             time.Duration
}

// Housekeep runs housekeeping of one copy now, pruning it if it is at the
// committed version (`gitraft repo housekeep`). It waits while another
// copy is housekept on this node.
func (r *Replicas) Housekeep(ctx context.Context, name string) (HousekeepReport, error) {
	ctx, cancel := r.untilStop(ctx)
	defer cancel()
	return r.housekeep(ctx, name, true)
}

// housekeep runs one copy's housekeeping: leftovers out (under the copy's
// guard, if no push holds it), then the repack, a pruning one when force
// or the prune interval says so and the copy is at the committed version.
func (r *Replicas) housekeep(ctx context.Context, name string, force bool) (HousekeepReport, error) {
	cfg := r.cfg.Housekeeping
	if err := r.hk.slot.Lock(ctx); err != nil {
		return HousekeepReport{}, err
	}
	defer r.hk.slot.Unlock()
	start := time.Now()
	rep, err := r.housekeepLocked(ctx, name, force)
	rep.Took = time.Since(start)
	r.hk.runs.Add(1)
	if err != nil {
		if ctx.Err() == nil {
			r.hk.failures.Add(1)
			r.log.Warn("housekeeping failed", "repo", name, "err", err)
		}
		return rep, err
	}
	r.noteHealth(name, rep.After)
	r.log.Info("housekept", "repo", name, "packs", rep.Before.Packs, "packs_after", rep.After.Packs,
		"loose", rep.Before.LooseObjects, "loose_after", rep.After.LooseObjects, "pruned", rep.Pruned,
		"prune_skipped", rep.PruneSkipped, "leftovers_removed", rep.LeftoversRemoved, "took", rep.Took.Round(time.Millisecond), "grace", cfg.PruneGrace)
	return rep, nil
}

func (r *Replicas) housekeepLocked(ctx context.Context, name string, force bool) (HousekeepReport, error) {
	cfg := r.cfg.Housekeeping
	var rep HousekeepReport
	h, err := r.st.Health(name)
	if err != nil {
		return rep, err
	}
	last := h.LastPrune
	if last.IsZero() {
		last = h.Since
	}
	prune := force || time.Since(last) >= cfg.PruneInterval
	if prune {
		// Only a copy at the committed version may lose what its refs do
		// not reach: a copy behind holds the packs of committed pushes
		// its refs do not name yet.
		if why := r.currentForPrune(ctx, name); why != "" {
			prune, rep.PruneSkipped = false, why
		}
	}
	c := r.copyOf(name)
	if c.guard.TryLock() {
		// No push of this node is under way in the copy: what failed
		// pushes left, and nothing changed for the grace period, goes.
		n, err := r.st.RemoveLeftovers(name, cfg.PruneGrace)
		c.guard.Unlock()
		rep.LeftoversRemoved = n
		if err != nil {
			return rep, err
		}
	}
	res, err := r.st.Housekeep(ctx, name, storage.HousekeepOptions{Prune: prune, Grace: cfg.PruneGrace})
	rep.HousekeepResult = res
	return rep, err
}

// currentForPrune says why a copy may not be pruned now ("" when it may):
// this node must confirm with the leader that it has applied the latest
// state, and its copy be at the version that state names.
func (r *Replicas) currentForPrune(ctx context.Context, name string) string {
	bctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := r.node.ReadBarrier(bctx); err != nil {
		return fmt.Sprintf("cannot confirm the committed version: %v", err)
	}
	t, ok := r.node.Repo(name)
	if !ok {
		return "the repository is not in the replicated state"
	}
	c := r.copyOf(name)
	if !c.currentAt(t) {
		return fmt.Sprintf("the copy is at version %d, behind the committed %d", c.pos().version, t.Version)
	}
	return ""
}

// Housekeep runs housekeeping of this node's copy of a repository now.
func (s *Service) Housekeep(ctx context.Context, req *replicav1.HousekeepRequest) (*replicav1.HousekeepResponse, error) {
	r := s.r
	if _, ok := r.node.Repo(req.GetRepo()); !ok {
		return nil, status.Errorf(codes.NotFound, "repository %q not found", req.GetRepo())
	}
	rep, err := r.Housekeep(ctx, req.GetRepo())
	if errors.Is(err, storage.ErrNotFound) {
		return nil, status.Errorf(codes.FailedPrecondition, "%s has no copy of %q yet", r.node.ID(), req.GetRepo())
	}
	if err != nil {
		return nil, status.Errorf(codes.Internal, "housekeeping %q on %s: %v", req.GetRepo(), r.node.ID(), err)
	}
	return &replicav1.HousekeepResponse{
		NodeId: r.node.ID(), Repo: req.GetRepo(),
		Before: healthProto(rep.Before), After: healthProto(rep.After),
		Pruned: rep.Pruned, PruneSkipped: rep.PruneSkipped,
		LeftoversRemoved: int32(rep.LeftoversRemoved), Seconds: rep.Took.Seconds(),
	}, nil
}

func healthProto(h storage.Health) *replicav1.ObjectHealth {
	unix := func(t time.Time) int64 {
		if t.IsZero() {
			return 0
		}
		return t.Unix()
	}
	return &replicav1.ObjectHealth{
		Packs: int32(h.Packs), CruftPacks: int32(h.CruftPacks), KeptPacks: int32(h.KeptPacks), PackBytes: h.PackBytes,
		LooseObjects: int64(h.LooseObjects), LooseBytes: h.LooseBytes, Leftovers: int32(h.Leftovers),
		CommitGraph: h.CommitGraph, MultiPackIndex: h.MultiPackIndex, Bitmap: h.Bitmap,
		LastRunUnix: unix(h.LastRun), LastPruneUnix: unix(h.LastPrune),
	}
}
