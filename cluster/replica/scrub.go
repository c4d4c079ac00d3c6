package replica

// The scrub: a background walk over every copy on this node, as ZFS scrubs
// a pool. Each copy's packs and indexes are read whole and checked against
// their checksums (a bit flipped on disk), git's connectivity check runs
// from its refs (a lost pack), and its refs and HEAD are compared with the
// replicated state at the copy's version (an edit by hand). A copy found
// damaged is marked so (on disk too), serves no reads from then on, and is
// healed at once from a current peer by the catch-up (catchUpLocked).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/gitraft/gitraft/cluster/atomicfile"
	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
	"github.com/gitraft/gitraft/storage"
)

// scrubStateFile, in the store's root, remembers when the last scrub pass
// finished and how far the current one got, so that a restart resumes it.
const scrubStateFile = ".scrub.json"

type scrubState struct {
	// Completed is when the last whole pass finished (zero: never).
	Completed time.Time `json:"completed"`
	// Started is when the pass under way started (zero: none).
	Started time.Time `json:"started"`
	// After is the last repository the pass under way finished.
	After string `json:"after,omitempty"`
}

// scrubStats are the scrub's counters, read by the node's metrics.
type scrubStats struct {
	lastCompleted atomic.Int64 // unix seconds
	repos         atomic.Int64
	bytes         atomic.Int64
	damaged       atomic.Int64
	healed        atomic.Int64
	healFailed    atomic.Int64
}

// ScrubStats is what the scrub has done since the node started (and when
// the last whole pass finished, also from before).
type ScrubStats struct {
	LastCompleted time.Time
	Repos         int64 // copies scrubbed
	Bytes         int64 // bytes of packs and indexes checked
	Damaged       int64 // copies found damaged
	Healed        int64 // damaged copies healed
	HealFailed    int64 // heal attempts that failed (retried)
	DamagedNow    int   // copies damaged at this moment
}

// ScrubStats reports the scrub's counters.
func (r *Replicas) ScrubStats() ScrubStats {
	s := ScrubStats{Repos: r.scrub.repos.Load(), Bytes: r.scrub.bytes.Load(), Damaged: r.scrub.damaged.Load(),
		Healed: r.scrub.healed.Load(), HealFailed: r.scrub.healFailed.Load()}
	if t := r.scrub.lastCompleted.Load(); t != 0 {
		s.LastCompleted = time.Unix(t, 0)
	}
	r.mu.Lock()
	for _, c := range r.copies {
		if c.damage() != "" {
			s.DamagedNow++
		}
	}
	r.mu.Unlock()
	return s
}

func (r *Replicas) scrubStatePath() string { return filepath.Join(r.st.Root(), scrubStateFile) }

func (r *Replicas) loadScrubState() scrubState {
	var s scrubState
	b, err := os.ReadFile(r.scrubStatePath())
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			r.log.Warn("scrub: cannot read its state; starting afresh", "err", err)
		}
		return s
	}
	if err := json.Unmarshal(b, &s); err != nil {
		r.log.Warn("scrub: its state is damaged; starting afresh", "path", r.scrubStatePath(), "err", err)
		return scrubState{}
	}
	return s
}

func (r *Replicas) saveScrubState(s scrubState) {
	b, _ := json.Marshal(s)
	if err := atomicfile.Write(r.scrubStatePath(), append(b, '\n'), 0o600); err != nil {
		r.log.Warn("scrub: cannot record its progress", "err", err)
	}
}

// scrubLoop runs a pass every ScrubInterval after the last one finished,
// resuming a pass a restart interrupted. A node without a finished pass
// starts its first one ScrubInterval after it first started.
func (r *Replicas) scrubLoop() {
	st := r.loadScrubState()
	if !st.Completed.IsZero() {
		r.scrub.lastCompleted.Store(st.Completed.Unix())
	}
	if st.Completed.IsZero() && st.Started.IsZero() {
		// Count the first interval from now, and remember that.
		st.Completed = time.Now()
		r.saveScrubState(st)
	}
	for {
		if r.cfg.ScrubInterval < 0 {
			<-r.stop
			return
		}
		d := time.Until(st.Completed.Add(r.cfg.ScrubInterval))
		if !st.Started.IsZero() {
			d = 0 // resume the pass a restart interrupted
		}
		t := time.NewTimer(max(d, 0))
		select {
		case <-r.stop:
			t.Stop()
			return
		case <-t.C:
		}
		if !r.node.Ready() {
			select {
			case <-r.stop:
				return
			case <-time.After(time.Second):
			}
			continue
		}
		if st.Started.IsZero() {
			st.Started, st.After = time.Now(), ""
		}
		r.log.Info("scrub: pass started", "resuming_after", st.After)
		if !r.scrubPass(&st) {
			return // stopping; the state says where to resume
		}
		st = scrubState{Completed: time.Now()}
		r.saveScrubState(st)
		r.scrub.lastCompleted.Store(st.Completed.Unix())
		r.log.Info("scrub: pass completed", "repos", r.scrub.repos.Load(), "damaged_found", r.scrub.damaged.Load(), "healed", r.scrub.healed.Load())
	}
}

// scrubPass scrubs every copy after st.After, in name order, recording its
// progress; false when the node is stopping.
func (r *Replicas) scrubPass(st *scrubState) bool {
	ctx, cancel := r.untilStop(context.Background())
	defer cancel()
	limit := newRateLimit(r.cfg.ScrubRate)
	saved := time.Now()
	for _, name := range slices.Sorted(maps.Keys(r.node.Repos())) {
		if name <= st.After {
			continue
		}
		res := r.scrubCopy(ctx, name, limit.wait)
		if ctx.Err() != nil {
			r.saveScrubState(*st)
			return false
		}
		if res.Error != "" && len(res.Findings) == 0 {
			r.log.Warn("scrub: could not check a copy; next pass", "repo", name, "err", res.Error)
		}
		st.After = name
		if time.Since(saved) > 10*time.Second {
			r.saveScrubState(*st)
			saved = time.Now()
		}
	}
	return true
}

// rateLimit paces reads to a number of bytes per second.
type rateLimit struct {
	rate  int64
	start time.Time
	done  int64
}

func newRateLimit(rate int64) *rateLimit { return &rateLimit{rate: rate, start: time.Now()} }

func (l *rateLimit) wait(ctx context.Context, n int) error {
	if l.rate <= 0 {
		return nil
	}
	l.done += int64(n)
	due := l.start.Add(time.Duration(float64(l.done) / float64(l.rate) * float64(time.Second)))
	if d := time.Until(due); d > 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}

// Scrub checks this node's copy of a repository now, unpaced, and heals
// it when it is damaged (gitraft repo scrub).
func (r *Replicas) Scrub(ctx context.Context, repo string) *replicav1.ScrubResponse {
	return r.scrubCopy(ctx, repo, nil)
}

// Scrub is ReplicaService.Scrub.
func (s *Service) Scrub(ctx context.Context, req *replicav1.ScrubRequest) (*replicav1.ScrubResponse, error) {
	return s.r.Scrub(ctx, req.GetRepo()), nil
}

// scrubCopy checks one copy and, when it is damaged, marks it and heals
// it. The reads run without the copy's guard, so pushes go on; what they
// find wrong is checked again under the guard before the copy is marked,
// and the refs are compared only under it (a push changes refs before it
// records its version).
func (r *Replicas) scrubCopy(ctx context.Context, name string, wait func(context.Context, int) error) *replicav1.ScrubResponse {
	resp := &replicav1.ScrubResponse{NodeId: r.node.ID(), Repo: name}
	defer func() {
		if c := r.lookup(name); c != nil {
			resp.Version = c.pos().version
			if rs := r.Report(name).GetReplicas(); len(rs) == 1 {
				resp.State = rs[0].GetState()
			}
		}
	}()
	t, ok := r.node.Repo(name)
	if !ok {
		resp.Error = fmt.Sprintf("repository %q not found", name)
		return resp
	}
	c := r.lookup(name)
	if c == nil || c.pos().id != t.ID {
		resp.Error = fmt.Sprintf("%s holds no copy of %q yet (it is catching up)", r.node.ID(), name)
		return resp
	}
	r.scrub.repos.Add(1)
	bad, n, err := r.st.VerifyPacks(ctx, name, wait)
	resp.BytesChecked = n
	r.scrub.bytes.Add(n)
	if err != nil {
		resp.Error = err.Error()
		return resp
	}
	fsckErr := r.st.CheckConnectivity(ctx, name)
	if fsckErr != nil && !errors.Is(fsckErr, storage.ErrDamaged) {
		resp.Error = fsckErr.Error()
		return resp
	}
	// Under the guard: no push or catch-up changes the copy meanwhile.
	gctx, cancel := context.WithTimeout(ctx, time.Minute)
	err = c.guard.Lock(gctx)
	cancel()
	if err != nil {
		resp.Error = "the copy stayed busy (a push or a catch-up); next pass"
		return resp
	}
	defer c.guard.Unlock()
	var findings []string
	for _, b := range bad {
		findings = append(findings, fmt.Sprintf("%s: %s", b.Pack, b.Why))
	}
	if fsckErr != nil && len(bad) == 0 {
		// Not yet confirmed: a push or a repack may have moved things.
		fsckErr = r.st.CheckConnectivity(ctx, name)
		if fsckErr != nil && !errors.Is(fsckErr, storage.ErrDamaged) {
			resp.Error = fsckErr.Error()
			return resp
		}
	}
	if fsckErr != nil {
		findings = append(findings, fsckErr.Error())
	}
	t, _ = r.node.Repo(name)
	if p := c.pos(); p.id == t.ID && p.version == t.Version && c.damage() == "" {
		disk, err := r.st.Refs(ctx, name)
		if err != nil {
			findings = append(findings, fmt.Sprintf("refs unreadable: %v", err))
		} else {
			findings = append(findings, diffRefs(disk, t.Refs)...)
		}
		if head, err := r.st.Head(ctx, name); err == nil && t.Head != "" && head != t.Head {
			findings = append(findings, fmt.Sprintf("HEAD: disk %s, state %s", head, t.Head))
		}
	}
	if why := c.damage(); why != "" && len(findings) == 0 {
		findings = append(findings, "marked damaged before: "+why)
	}
	resp.Findings = findings
	if len(findings) == 0 {
		return resp
	}
	r.markDamaged(c, name, findings)
	if len(bad) > 0 {
		packs := make([]string, len(bad))
		for i, b := range bad {
			packs[i] = b.Pack
		}
		dir, err := r.st.SetAsidePacks(name, packs)
		if err != nil {
			resp.Error = fmt.Sprintf("setting the damaged packs aside: %v", err)
			return resp
		}
		r.log.Warn("scrub: damaged packs set aside; their objects are fetched again", "repo", name, "packs", packs, "dir", dir)
	}
	hctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	if err := r.catchUpLocked(hctx, c, name); err != nil {
		resp.Error = fmt.Sprintf("healing failed (retried by the reconciler): %v", err)
		return resp
	}
	resp.Healed = true
	return resp
}

// markDamaged marks a copy damaged: no reads or push acks from here on,
// and a restart remembers it. The caller holds the copy's guard and heals
// it next.
func (r *Replicas) markDamaged(c *copyState, name string, findings []string) {
	why := strings.Join(findings, "; ")
	if len(why) > 500 {
		why = why[:500] + "..."
	}
	if c.damage() == "" {
		r.scrub.damaged.Add(1)
		r.log.Error("copy damaged; it serves no reads until healed from a current peer", "repo", name, "version", c.pos().version, "findings", findings)
	}
	c.damaged.Store(&why)
	if err := r.st.MarkDamaged(name, why); err != nil {
		r.log.Warn("cannot record the damage on disk", "repo", name, "err", err)
	}
}

// diffRefs lists how disk refs differ from the state's, sorted.
func diffRefs(disk, state map[string]string) []string {
	var out []string
	for ref, oid := range state {
		if disk[ref] != oid {
			d := disk[ref]
			if d == "" {
				d = "-"
			}
			out = append(out, fmt.Sprintf("%s: disk %s, state %s", ref, d, oid))
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
