package dbtarget

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/gitraft/gitraft/cluster/atomicfile"
	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
)

// DefaultPauseExpiry is how long a PAUSE lasts before the agent RESUMEs by
// itself.
const DefaultPauseExpiry = 30 * time.Second

// BouncerAgentConfig configures the agent of one pgbouncer.
type BouncerAgentConfig struct {
	Name string
	// StateFile keeps the generation the agent applied last, so that it
	// never goes back to an older one, across restarts too.
	StateFile string
	// PauseExpiry ends a PAUSE by itself, counted from when it took effect.
	PauseExpiry time.Duration
	// PauseTimeout bounds one PAUSE (default DefaultPauseTimeout).
	PauseTimeout   time.Duration
	ReportInterval time.Duration
	// IsolationFenceAfter: when for this long the node could not both
	// confirm the state with the quorum (a linearizable read) and get a
	// report to the leader, the agent fences pgbouncer until it can again
	// (default DefaultIsolationFenceAfter of the default settings).
	IsolationFenceAfter time.Duration
	// Now replaces time.Now for the isolation lease (tests).
	Now func() time.Time
}

// BouncerAgent drives one pgbouncer after the replicated state: it points
// it at the state's primary, generation by generation in order, and pauses
// or fences it while an operation's phase asks.
type BouncerAgent struct {
	cfg BouncerAgentConfig
	c   Cluster
	b   Bouncer
	log *slog.Logger

	applied     uint64 // generation applied
	paused      bool
	pausedOp    uint64
	pausedAt    time.Time
	expiredOp   uint64 // the operation whose pause expired: not paused again
	fenced      bool
	fencedOp    uint64
	step        *dbv1.Step
	lastErr     string
	lastPointAt time.Time
	behind      bool // pointing at a newer generation failed: retry soon, keep any pause

	// The isolation lease, shared by the main loop and the guard: under mu.
	// mu is also held around the admin commands that fence for isolation
	// and that RESUME, so that no RESUME slips in after an isolation fence.
	mu           sync.Mutex
	readAt       time.Time // start of the last linearizable read that succeeded
	reportAt     time.Time // start of the last report that reached the leader
	mainReportAt time.Time // the same, for the main loop's reports
	isolated     bool      // fenced for isolation: no RESUME until lifted
	isolatedAt   time.Time
	published    *dbv1.BouncerReport // the main loop's last report, for the guard's heartbeats
	sendMu       sync.Mutex          // one report in flight at a time, so they arrive in order
}

// NewBouncerAgent returns an agent; Run starts it.
func NewBouncerAgent(cfg BouncerAgentConfig, c Cluster, b Bouncer, log *slog.Logger) *BouncerAgent {
	if cfg.PauseExpiry <= 0 {
		cfg.PauseExpiry = DefaultPauseExpiry
	}
	if cfg.PauseTimeout <= 0 {
		cfg.PauseTimeout = DefaultPauseTimeout
	}
	if cfg.ReportInterval <= 0 {
		cfg.ReportInterval = DefaultReportInterval
	}
	if cfg.IsolationFenceAfter <= 0 {
		cfg.IsolationFenceAfter = DefaultIsolationFenceAfter(DefaultFailoverAfter, cfg.ReportInterval)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if log == nil {
		log = slog.Default()
	}
	return &BouncerAgent{cfg: cfg, c: c, b: b, log: log.With("pgbouncer", cfg.Name)}
}

type bouncerFile struct {
	Generation uint64 `json:"generation"`
	Primary    string `json:"primary"`
	Endpoint   string `json:"endpoint"`
}

func (a *BouncerAgent) load() error {
	if a.cfg.StateFile == "" {
		return nil
	}
	b, err := os.ReadFile(a.cfg.StateFile)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var f bouncerFile
	if err := json.Unmarshal(b, &f); err != nil {
		return fmt.Errorf("%s: %w", a.cfg.StateFile, err)
	}
	a.applied = f.Generation
	return nil
}

func (a *BouncerAgent) save(st *dbv1.State, ep Endpoint) error {
	if a.cfg.StateFile == "" {
		return nil
	}
	b, err := json.Marshal(bouncerFile{Generation: st.GetGeneration(), Primary: st.GetPrimary(), Endpoint: ep.String()})
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(a.cfg.StateFile), 0o700); err != nil {
		return err
	}
	return atomicfile.Write(a.cfg.StateFile, b, 0o600)
}

// Run registers the pgbouncer and follows the state until ctx ends.
func (a *BouncerAgent) Run(ctx context.Context) {
	if err := a.load(); err != nil {
		a.log.Error("cannot read the applied generation; starting from 0 (the state's primary is applied again)", "err", err)
	}
	// The isolation lease runs from the start, registration included: a
	// node cut off from the quorum never registers, and its pgbouncer must
	// not route for longer than IsolationFenceAfter either way.
	a.mu.Lock()
	t0 := a.cfg.Now()
	a.readAt, a.reportAt = t0, t0
	a.mu.Unlock()
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Add(2)
	go func() { defer wg.Done(); a.guard(ctx) }()
	go func() { defer wg.Done(); a.renew(ctx) }()

	register(ctx, a.c, a.log, a.cfg.ReportInterval, func(st *dbv1.State) bool {
		b := findBouncer(st, a.cfg.Name)
		return b != nil && b.GetNode() == a.c.ID()
	}, &dbv1.Command{Command: &dbv1.Command_RegisterBouncer{RegisterBouncer: &dbv1.RegisterBouncer{Bouncer: &dbv1.Bouncer{Name: a.cfg.Name, Node: a.c.ID()}}}})
	started := false
	for ctx.Err() == nil {
		st, err := a.c.DatabaseState(ctx, false)
		if err != nil {
			waitChange(ctx, a.c, 0, a.cfg.ReportInterval)
			continue
		}
		if !started {
			started = true
			a.adopt(ctx, st)
		}
		st = a.lift(ctx, st)
		a.act(ctx, st, time.Now())
		a.report(ctx)
		d := a.cfg.ReportInterval
		if a.behind {
			d = 100 * time.Millisecond
		}
		if a.paused && !a.fenced {
			d = min(d, time.Until(a.pausedAt.Add(a.cfg.PauseExpiry))+10*time.Millisecond)
		}
		waitChange(ctx, a.c, st.GetUpdatedIndex(), max(d, 10*time.Millisecond))
	}
}

// ----- isolation fence -----
//
// A pgbouncer agent holds a lease on routing: it may route while its node
// confirmed the state with the quorum (a linearizable read) and got a report
// to the leader, both within IsolationFenceAfter. The lease counts from the
// start of the read and of the report, so it never outlasts what the leader
// saw: the leader, which counts a pgbouncer's silence from when its last
// report arrived, may take one that has been silent for IsolationFenceAfter
// plus a margin as fenced. The guard renews the lease every probe period
// and fences pgbouncer when it runs out, whatever the main loop is doing (a
// PAUSE can take pause_timeout). The main loop lifts the fence once the
// lease holds again, from a state read linearizably.

// probeEvery is how often the guard renews the lease.
func (a *BouncerAgent) probeEvery() time.Duration {
	return max(min(a.cfg.ReportInterval, a.cfg.IsolationFenceAfter/4), 10*time.Millisecond)
}

// leaseLeft is how long the lease still holds (under mu).
func (a *BouncerAgent) leaseLeft(now time.Time) time.Duration {
	base := a.readAt
	if a.reportAt.Before(base) {
		base = a.reportAt
	}
	return a.cfg.IsolationFenceAfter - now.Sub(base)
}

// guard fences pgbouncer when the lease runs out.
func (a *BouncerAgent) guard(ctx context.Context) {
	every := a.probeEvery()
	for ctx.Err() == nil {
		a.mu.Lock()
		left, isolated := a.leaseLeft(a.cfg.Now()), a.isolated
		a.mu.Unlock()
		if left <= 0 && !isolated {
			a.isolate(ctx)
			left = every
		}
		select {
		case <-ctx.Done():
		case <-time.After(min(max(left, 5*time.Millisecond), every)):
		}
	}
}

// renew confirms the state with the quorum every probe period, and reports
// to the leader when the main loop has not just done so.
func (a *BouncerAgent) renew(ctx context.Context) {
	every := a.probeEvery()
	timeout := max(a.cfg.IsolationFenceAfter/2, every)
	t := time.NewTicker(every)
	defer t.Stop()
	for ctx.Err() == nil {
		start := a.cfg.Now()
		rctx, cancel := context.WithTimeout(ctx, timeout)
		_, err := a.c.DatabaseState(rctx, true)
		cancel()
		if err == nil {
			a.mu.Lock()
			if start.After(a.readAt) {
				a.readAt = start
			}
			a.mu.Unlock()
		}
		a.heartbeat(ctx, start, timeout)
		select {
		case <-ctx.Done():
		case <-t.C:
		}
	}
}

// heartbeat sends the main loop's last report again, so that a main loop
// busy with a long admin command does not let the lease run out.
func (a *BouncerAgent) heartbeat(ctx context.Context, start time.Time, timeout time.Duration) {
	a.mu.Lock()
	r, recent := a.published, start.Sub(a.mainReportAt) < a.probeEvery()
	a.mu.Unlock()
	if recent || !a.sendMu.TryLock() {
		return // the main loop reported just now, or is reporting
	}
	defer a.sendMu.Unlock()
	if r == nil {
		r = &dbv1.BouncerReport{Name: a.cfg.Name}
	}
	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if err := a.c.ReportDatabase(rctx, &dbv1.ReportRequest{Node: a.c.ID(), Bouncer: r}); err != nil {
		return
	}
	a.mu.Lock()
	if start.After(a.reportAt) {
		a.reportAt = start
	}
	a.mu.Unlock()
}

// isolate fences pgbouncer for isolation if the lease has run out.
func (a *BouncerAgent) isolate(ctx context.Context) {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.cfg.Now()
	if a.isolated || a.leaseLeft(now) > 0 {
		return
	}
	fctx, cancel := context.WithTimeout(ctx, a.cfg.PauseTimeout)
	err := a.b.Fence(fctx)
	cancel()
	args := []any{"isolation_fence_after", a.cfg.IsolationFenceAfter.String(),
		"last_confirmed", now.Sub(a.readAt).Round(time.Millisecond).String(), "last_report", now.Sub(a.reportAt).Round(time.Millisecond).String()}
	if err != nil {
		a.log.Error("cut off from the cluster, and fencing pgbouncer failed; retrying (it may still route to the old primary)", append(args, "err", err)...)
		return
	}
	a.isolated, a.isolatedAt = true, now
	a.log.Warn("cut off from the cluster: pgbouncer fenced (it routes to no server) until this node confirms the state with the quorum and reaches the leader again", args...)
}

// lift ends an isolation fence once a linearizable read succeeds and the
// lease holds again; it returns the state to act on (the one just read).
// While the fence stays, the main loop counts pgbouncer as fenced.
func (a *BouncerAgent) lift(ctx context.Context, st *dbv1.State) *dbv1.State {
	a.mu.Lock()
	isolated := a.isolated
	a.mu.Unlock()
	if !isolated {
		return st
	}
	if !a.fenced {
		a.fenced, a.fencedOp = true, 0 // no operation holds this fence
	}
	start := a.cfg.Now()
	rctx, cancel := context.WithTimeout(ctx, max(a.cfg.IsolationFenceAfter/2, a.probeEvery()))
	cur, err := a.c.DatabaseState(rctx, true)
	cancel()
	if err != nil {
		return st
	}
	a.mu.Lock()
	if start.After(a.readAt) {
		a.readAt = start
	}
	now := a.cfg.Now()
	ok := a.leaseLeft(now) > 0
	fencedFor := now.Sub(a.isolatedAt)
	if ok {
		a.isolated = false
	}
	a.mu.Unlock()
	if !ok {
		return st // reports do not reach the leader yet
	}
	a.log.Warn("the cluster answers again: lifting the isolation fence (pointing at the state's primary, then RESUME)",
		"fenced_for", fencedFor.Round(time.Millisecond).String(), "primary", cur.GetPrimary(), "generation", cur.GetGeneration())
	return cur
}

func (a *BouncerAgent) isIsolated() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.isolated
}

// bResume issues RESUME unless pgbouncer is fenced for isolation; it
// reports whether it did.
func (a *BouncerAgent) bResume(ctx context.Context) (bool, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.isolated {
		return false, nil
	}
	return true, a.b.Resume(ctx)
}

// refence fences again for isolation after an admin command that may have
// undone it (pgctl's Pause RESUMEs when it fails).
func (a *BouncerAgent) refence(ctx context.Context) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.isolated {
		return
	}
	fctx, cancel := context.WithTimeout(ctx, a.cfg.PauseTimeout)
	defer cancel()
	if err := a.b.Fence(fctx); err != nil {
		a.log.Error("fencing pgbouncer again for isolation failed", "err", err)
	}
}

// adopt settles what a previous run may have left: pgbouncer paused by an
// agent that died. Inside a phase that holds pgbouncer paused, the agent
// takes the pause as its own (and RESUMEs at the latest at expiry). In
// pausing it RESUMEs, to PAUSE again for this run. Otherwise it treats
// pgbouncer as paused, so that it first points at the state's primary and
// only then RESUMEs.
func (a *BouncerAgent) adopt(ctx context.Context, st *dbv1.State) {
	op := st.GetOperation()
	switch {
	case op != nil && op.GetKind() == dbv1.Kind_KIND_SWITCHOVER && holdsPause(op.GetPhase()) && op.GetPhase() != dbv1.Phase_PHASE_PAUSING:
		a.paused, a.pausedOp, a.pausedAt = true, op.GetId(), time.Now()
	case op.GetPhase() == dbv1.Phase_PHASE_PAUSING:
		if _, err := a.bResume(ctx); err != nil {
			a.log.Warn("RESUME at start failed", "err", err)
		}
	default:
		a.paused, a.pausedAt = true, time.Now()
	}
}

// holdsPause: phases during which a pgbouncer paused for the operation stays
// paused.
func holdsPause(p dbv1.Phase) bool {
	switch p {
	case dbv1.Phase_PHASE_PAUSING, dbv1.Phase_PHASE_STOPPING_OLD, dbv1.Phase_PHASE_PROMOTING, dbv1.Phase_PHASE_ROLLING_BACK:
		return true
	}
	return false
}

// holdsFence: phases during which a fenced pgbouncer stays fenced.
func holdsFence(p dbv1.Phase) bool {
	switch p {
	case dbv1.Phase_PHASE_FENCING, dbv1.Phase_PHASE_PROMOTING, dbv1.Phase_PHASE_ROLLING_BACK:
		return true
	}
	return false
}

func (a *BouncerAgent) fail(what string, err error) {
	a.lastErr = fmt.Sprintf("%s: %v", what, err)
	a.log.Warn(what+" failed", "err", err)
}

// act brings pgbouncer to what the state asks.
func (a *BouncerAgent) act(ctx context.Context, st *dbv1.State, now time.Time) {
	op := st.GetOperation()
	ep, havePrimary := PrimaryEndpoint(st)
	holdPause := a.paused && op != nil && op.GetId() == a.pausedOp && holdsPause(op.GetPhase())
	holdFence := a.fenced && op != nil && op.GetId() == a.fencedOp && holdsFence(op.GetPhase())
	a.behind = false

	// Point at the state's primary: a newer generation, or the include file
	// no longer says what the applied generation does.
	if havePrimary && st.GetGeneration() >= a.applied {
		cur, terr := a.b.Target()
		if st.GetGeneration() > a.applied || terr != nil || cur != ep {
			if now.Sub(a.lastPointAt) >= 200*time.Millisecond || st.GetGeneration() > a.applied {
				a.lastPointAt = now
				if err := a.b.Point(ctx, ep); err != nil {
					a.fail(fmt.Sprintf("pointing at %s (%s, generation %d)", st.GetPrimary(), ep, st.GetGeneration()), err)
					a.behind = st.GetGeneration() > a.applied
				} else {
					if st.GetGeneration() > a.applied {
						a.log.Info("pointing at the primary", "primary", st.GetPrimary(), "endpoint", ep.String(), "generation", st.GetGeneration())
					}
					a.applied = st.GetGeneration()
					if err := a.save(st, ep); err != nil {
						a.fail("recording the applied generation", err)
					}
					a.lastErr = ""
					if a.fenced && !holdFence && !holdPause {
						a.resume(ctx, "pointed at the new primary")
					}
				}
			}
		}
	}

	switch {
	case op == nil:
	case op.GetPhase() == dbv1.Phase_PHASE_PAUSING && a.pausedOp != op.GetId() && a.expiredOp != op.GetId():
		a.step = &dbv1.Step{OpId: op.GetId(), Phase: op.GetPhase()}
		if a.fenced {
			// Fenced already (cut off from the cluster a moment ago): clients
			// wait as under PAUSE, and no server connection is left.
			a.pausedOp, a.paused, a.pausedAt = op.GetId(), true, time.Now()
			a.step.Done = true
			holdPause = true
			a.log.Info("paused (fenced already)", "op", op.GetId())
			break
		}
		timeout := a.cfg.PauseTimeout
		if d := time.Until(time.Unix(0, op.GetDeadlineUnixNano())); op.GetDeadlineUnixNano() != 0 && d < timeout {
			timeout = max(d, 100*time.Millisecond)
		}
		pctx, cancel := context.WithTimeout(ctx, timeout)
		err := a.b.Pause(pctx)
		cancel()
		a.refence(ctx)
		a.pausedOp = op.GetId()
		if err != nil {
			a.step.Error = err.Error()
			a.fail("PAUSE", err)
			// A PAUSE that did not finish may still hold clients: undo it.
			if _, rerr := a.bResume(ctx); rerr != nil {
				a.fail("RESUME after a failed PAUSE", rerr)
			}
			return
		}
		a.paused, a.pausedAt = true, time.Now()
		a.step.Done = true
		holdPause = true
		a.log.Info("paused", "op", op.GetId(), "expires_in", a.cfg.PauseExpiry.String())
	case op.GetPhase() == dbv1.Phase_PHASE_FENCING && a.fencedOp != op.GetId():
		a.step = &dbv1.Step{OpId: op.GetId(), Phase: op.GetPhase()}
		if !a.fenced { // fenced already for isolation: nothing routes
			fctx, cancel := context.WithTimeout(ctx, a.cfg.PauseTimeout)
			err := a.b.Fence(fctx)
			cancel()
			if err != nil {
				a.step.Error = err.Error()
				a.fail("fencing", err)
				return
			}
		}
		a.fencedOp, a.fenced = op.GetId(), true
		a.step.Done = true
		holdFence = true
		a.log.Warn("fenced: routing to no server until the new primary is recorded", "op", op.GetId(), "old_primary", op.GetOldPrimary())
	}

	switch {
	case a.isIsolated():
		// Cut off from the cluster: fenced until lift says otherwise.
	case a.fenced && !holdFence && !holdPause:
		// A fence ends by pointing at the state's primary, then RESUME.
		if havePrimary {
			if err := a.b.Point(ctx, ep); err != nil {
				a.fail("pointing at the primary to end a fence", err)
				return
			}
		}
		why := "the failover is over"
		if a.fencedOp == 0 {
			why = "the isolation fence is lifted"
		}
		a.resume(ctx, why)
	case a.paused && !a.fenced && !holdPause && !a.behind:
		a.resume(ctx, "the operation no longer needs the pause")
	case a.paused && (!a.fenced || a.fencedOp == 0) && now.Sub(a.pausedAt) >= a.cfg.PauseExpiry:
		a.log.Warn("the PAUSE expired: resuming by itself", "op", a.pausedOp, "paused_for", now.Sub(a.pausedAt).String())
		a.expiredOp = a.pausedOp
		a.resume(ctx, "pause expired")
	}
}

func (a *BouncerAgent) resume(ctx context.Context, why string) {
	did, err := a.bResume(ctx)
	if err != nil {
		a.fail("RESUME", err)
		return
	}
	if !did {
		return // fenced for isolation meanwhile
	}
	a.log.Info("resumed", "why", why)
	a.paused, a.fenced = false, false
}

func (a *BouncerAgent) report(ctx context.Context) {
	r := &dbv1.BouncerReport{
		// A pause adopted at start (pausedOp 0) is a guess, not a fact.
		Name: a.cfg.Name, AppliedGeneration: a.applied, Paused: a.paused && a.pausedOp != 0, Fenced: a.fenced || a.isIsolated(),
		Error: a.lastErr, Step: a.step,
	}
	if t, err := a.b.Target(); err == nil {
		r.Target = t.String()
	}
	a.mu.Lock()
	a.published = r
	a.mu.Unlock()
	a.sendMu.Lock()
	defer a.sendMu.Unlock()
	start := a.cfg.Now()
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := a.c.ReportDatabase(rctx, &dbv1.ReportRequest{Node: a.c.ID(), Bouncer: r}); err != nil {
		a.log.Debug("report to the leader failed", "err", err)
		return
	}
	a.mu.Lock()
	if start.After(a.reportAt) {
		a.reportAt = start
	}
	a.mainReportAt = start
	a.mu.Unlock()
}
