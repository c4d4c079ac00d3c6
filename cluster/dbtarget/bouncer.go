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
	// Drain bounds how long a fence waits for pgbouncer's busy server
	// connections (transactions under way) before it KILLs them (default
	// ReportInterval, half the margin the leader allows a silent pgbouncer).
	Drain time.Duration
	// Now replaces time.Now for the isolation lease and the pause expiry
	// (tests).
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
	down        bool   // pgbouncer did not run at the last look
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
	// pauseUntil is when the planned pause in force ends by itself (zero:
	// none); the guard RESUMEs then, whatever the main loop is doing.
	pauseUntil time.Time
	pauseOp    uint64 // the operation of that pause
	expired    uint64 // the operation whose pause the guard ended, for the main loop

	fileMu sync.Mutex
	file   bouncerFile // what StateFile holds
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
	if cfg.Drain <= 0 {
		cfg.Drain = cfg.ReportInterval
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if log == nil {
		log = slog.Default()
	}
	return &BouncerAgent{cfg: cfg, c: c, b: b, log: log.With("pgbouncer", cfg.Name)}
}

// bouncerFile is what the agent keeps across restarts: the generation it
// applied, and the pause or fence it put in force, so that an agent started
// again after it died ends that pause when it was due, not pause_expiry
// after the restart.
type bouncerFile struct {
	Generation uint64 `json:"generation"`
	Primary    string `json:"primary"`
	Endpoint   string `json:"endpoint"`
	// PausedOp and PausedAt: the operation a PAUSE was issued for, and
	// when (recorded before the PAUSE goes out); 0 when not paused.
	PausedOp uint64 `json:"paused_op,omitempty"`
	PausedAt int64  `json:"paused_at_unix_nano,omitempty"`
	// Fenced: a fence is in force (a fence does not expire).
	Fenced   bool   `json:"fenced,omitempty"`
	FencedOp uint64 `json:"fenced_op,omitempty"`
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
	a.fileMu.Lock()
	a.file = f
	a.fileMu.Unlock()
	return nil
}

// record changes what StateFile holds and writes it.
func (a *BouncerAgent) record(change func(f *bouncerFile)) error {
	a.fileMu.Lock()
	defer a.fileMu.Unlock()
	change(&a.file)
	if a.cfg.StateFile == "" {
		return nil
	}
	b, err := json.Marshal(a.file)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(a.cfg.StateFile), 0o700); err != nil {
		return err
	}
	return atomicfile.Write(a.cfg.StateFile, b, 0o600)
}

func (a *BouncerAgent) save(st *dbv1.State, ep Endpoint) error {
	return a.record(func(f *bouncerFile) {
		f.Generation, f.Primary, f.Endpoint = st.GetGeneration(), st.GetPrimary(), ep.String()
	})
}

// recordPause notes a planned pause for op issued at t (before the PAUSE
// goes out) and arms the guard's expiry; op 0 clears it.
func (a *BouncerAgent) recordPause(op uint64, t time.Time) {
	a.mu.Lock()
	if op == 0 {
		a.pauseUntil, a.pauseOp = time.Time{}, 0
	} else {
		a.pauseUntil, a.pauseOp = t.Add(a.cfg.PauseExpiry), op
	}
	a.mu.Unlock()
	if err := a.record(func(f *bouncerFile) {
		f.PausedOp, f.PausedAt = op, 0
		if op != 0 {
			f.PausedAt = t.UnixNano()
		}
	}); err != nil {
		a.fail("recording the pause", err)
	}
}

// recordFence notes a fence in force (for op; 0: for isolation), or none.
// A fence ends any planned pause: it does not expire.
func (a *BouncerAgent) recordFence(fenced bool, op uint64) {
	a.mu.Lock()
	if fenced {
		a.pauseUntil, a.pauseOp = time.Time{}, 0
	}
	a.mu.Unlock()
	if err := a.record(func(f *bouncerFile) {
		f.Fenced, f.FencedOp = fenced, op
		if fenced {
			f.PausedOp, f.PausedAt = 0, 0
		}
	}); err != nil {
		a.fail("recording the fence", err)
	}
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
	// A pause or fence the previous run left in force: a pause still ends
	// pause_expiry after it was issued, whether or not this run reaches
	// the cluster (the guard ends it), and a fence stays until the state's
	// primary is pointed at.
	a.fileMu.Lock()
	f := a.file
	a.fileMu.Unlock()
	switch {
	case f.Fenced:
		a.fenced, a.fencedOp = true, f.FencedOp
		a.log.Info("a fence left by the previous run is in force", "op", f.FencedOp)
	case f.PausedAt != 0:
		at := time.Unix(0, f.PausedAt)
		a.paused, a.pausedOp, a.pausedAt = true, f.PausedOp, at
		a.mu.Lock()
		a.pauseUntil, a.pauseOp = at.Add(a.cfg.PauseExpiry), f.PausedOp
		a.mu.Unlock()
		a.log.Info("a PAUSE left by the previous run is in force; it ends when it was due", "op", f.PausedOp,
			"paused_for", t0.Sub(at).Round(time.Millisecond).String(), "ends_in", max(0, at.Add(a.cfg.PauseExpiry).Sub(t0)).Round(time.Millisecond).String())
	}
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

// guard fences pgbouncer when the lease runs out, and ends a planned pause
// when it expires: neither waits for the main loop, which may be stuck
// registering, in a long admin command, or on a cluster that does not
// answer.
func (a *BouncerAgent) guard(ctx context.Context) {
	every := a.probeEvery()
	for ctx.Err() == nil {
		now := a.cfg.Now()
		a.mu.Lock()
		left, isolated := a.leaseLeft(now), a.isolated
		until := a.pauseUntil
		a.mu.Unlock()
		if left <= 0 && !isolated {
			a.isolate(ctx)
			left = every
		}
		if !until.IsZero() {
			if d := until.Sub(now); d <= 0 {
				a.expire(ctx)
			} else {
				left = min(left, d)
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(min(max(left, 5*time.Millisecond), every)):
		}
	}
}

// expire RESUMEs a planned pause that is due, unless a fence stands.
func (a *BouncerAgent) expire(ctx context.Context) {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.cfg.Now()
	if a.pauseUntil.IsZero() || now.Before(a.pauseUntil) || a.isolated {
		return
	}
	rctx, cancel := context.WithTimeout(ctx, a.cfg.PauseTimeout)
	err := a.b.Resume(rctx)
	cancel()
	if err != nil && !errors.Is(err, ErrBouncerDown) {
		a.log.Error("the PAUSE expired, and RESUME failed; retrying", "op", a.pauseOp, "err", err)
		return
	}
	a.log.Warn("the PAUSE expired: resumed by itself (database.pgbouncer.pause_expiry)", "op", a.pauseOp, "pause_expiry", a.cfg.PauseExpiry.String())
	a.expired = a.pauseOp
	if a.expired == 0 {
		a.expired = ^uint64(0)
	}
	a.pauseUntil, a.pauseOp = time.Time{}, 0
	if err := a.record(func(f *bouncerFile) { f.PausedOp, f.PausedAt = 0, 0 }); err != nil {
		a.log.Warn("recording the end of the pause failed", "err", err)
	}
}

// takeExpired returns the operation whose pause the guard ended since the
// last call (^0 for a pause of no operation), or 0.
func (a *BouncerAgent) takeExpired() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	e := a.expired
	a.expired = 0
	return e
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
	killed, err := a.b.Fence(fctx, a.cfg.Drain)
	cancel()
	args := []any{"isolation_fence_after", a.cfg.IsolationFenceAfter.String(),
		"last_confirmed", now.Sub(a.readAt).Round(time.Millisecond).String(), "last_report", now.Sub(a.reportAt).Round(time.Millisecond).String()}
	switch {
	case errors.Is(err, ErrBouncerDown):
		args = append(args, "pgbouncer", "not running")
	case err != nil:
		a.log.Error("cut off from the cluster, and fencing pgbouncer failed; retrying (it may still route to the old primary)", append(args, "err", err)...)
		return
	case killed:
		args = append(args, "killed", "transactions still under way after "+a.cfg.Drain.String())
	}
	a.isolated, a.isolatedAt = true, now
	a.pauseUntil, a.pauseOp = time.Time{}, 0
	a.log.Warn("cut off from the cluster: pgbouncer holds its clients (PAUSE; it routes to no server) until this node confirms the state with the quorum and reaches the leader again", args...)
	if err := a.record(func(f *bouncerFile) { f.Fenced, f.FencedOp, f.PausedOp, f.PausedAt = true, 0, 0, 0 }); err != nil {
		a.log.Warn("recording the isolation fence failed", "err", err)
	}
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
	if _, err := a.b.Fence(fctx, a.cfg.Drain); err != nil && !errors.Is(err, ErrBouncerDown) {
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
	recorded := a.paused && a.pausedOp != 0 // a pause the previous run recorded
	switch {
	case a.fenced:
		// A fence the previous run recorded: it ends by pointing at the
		// state's primary (act).
	case recorded && op.GetId() == a.pausedOp && holdsPause(op.GetPhase()):
		// Still this operation's: it keeps its expiry. In pausing, act
		// PAUSEs again (the previous run may have died before the PAUSE
		// completed) and reports it, with the expiry of the first.
		if op.GetPhase() == dbv1.Phase_PHASE_PAUSING {
			a.pausedOp = 0
		}
	case recorded:
		// The operation moved on: point at the state's primary, then
		// RESUME (act).
		a.pausedOp = 0
	case op != nil && op.GetKind() == dbv1.Kind_KIND_SWITCHOVER && holdsPause(op.GetPhase()) && op.GetPhase() != dbv1.Phase_PHASE_PAUSING:
		now := a.cfg.Now()
		a.paused, a.pausedOp, a.pausedAt = true, op.GetId(), now
		a.recordPause(op.GetId(), now)
	case op.GetPhase() == dbv1.Phase_PHASE_PAUSING:
		if _, err := a.bResume(ctx); err != nil {
			a.log.Warn("RESUME at start failed", "err", err)
		}
	default:
		a.paused, a.pausedAt = true, a.cfg.Now()
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
	if e := a.takeExpired(); e != 0 && a.paused && !a.fenced {
		// The guard ended the pause (pause_expiry): this operation does
		// not PAUSE it again, and the leader hears that this pgbouncer no
		// longer holds its clients, so a switchover still pausing rolls
		// back rather than stop the primary under them.
		a.paused, a.expiredOp = false, a.pausedOp
		if a.step != nil && a.step.GetOpId() == e && a.step.GetPhase() == dbv1.Phase_PHASE_PAUSING {
			a.step = &dbv1.Step{OpId: e, Phase: dbv1.Phase_PHASE_PAUSING, Error: fmt.Sprintf("the PAUSE expired after %s (database.pgbouncer.pause_expiry) before the switchover moved on", a.cfg.PauseExpiry)}
		}
	}
	// Does pgbouncer run? One that does not routes nothing; one that came
	// back runs without the pause or fence it had, so put that back first.
	wasDown := a.down
	perr := a.b.Ping(ctx)
	a.down = errors.Is(perr, ErrBouncerDown)
	switch {
	case a.down && !wasDown:
		a.log.Error("pgbouncer does not run: it routes nothing (counted as paused and fenced); start it again (systemd: Restart=)", "err", perr)
	case wasDown && !a.down:
		a.log.Warn("pgbouncer runs again")
		if a.fenced || a.isIsolated() {
			fctx, cancel := context.WithTimeout(ctx, a.cfg.PauseTimeout)
			_, err := a.b.Fence(fctx, a.cfg.Drain)
			cancel()
			if err != nil {
				a.fail("fencing pgbouncer again after it started", err)
			}
		} else if a.paused {
			pctx, cancel := context.WithTimeout(ctx, a.cfg.PauseTimeout)
			err := a.b.Pause(pctx)
			cancel()
			if err != nil {
				a.fail("pausing pgbouncer again after it started", err)
			}
		}
	}
	holdPause := a.paused && op != nil && op.GetId() == a.pausedOp && holdsPause(op.GetPhase())
	holdFence := a.fenced && op != nil && op.GetId() == a.fencedOp && holdsFence(op.GetPhase())
	a.behind = false

	// Point at the state's primary: a newer generation, or the include file
	// no longer says what the applied generation does (not while a fence
	// stands: a fenced pgbouncer that was down keeps an include file that
	// routes nothing until the fence ends).
	if havePrimary && st.GetGeneration() >= a.applied && !a.down {
		cur, terr := a.b.Target()
		repair := (terr != nil || cur != ep) && !a.fenced && !a.isIsolated()
		if st.GetGeneration() > a.applied || repair {
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
	} else if a.down && st.GetGeneration() > a.applied && havePrimary {
		// pgbouncer is down: it routes nothing now, and reads the include
		// file when it starts. Point writes the file before it RELOADs.
		if err := a.b.Point(ctx, ep); err != nil && !errors.Is(err, ErrBouncerDown) {
			a.fail("writing the include file while pgbouncer is down", err)
		} else {
			a.applied = st.GetGeneration()
			if err := a.save(st, ep); err != nil {
				a.fail("recording the applied generation", err)
			}
		}
	}

	switch {
	case op == nil:
	case op.GetPhase() == dbv1.Phase_PHASE_PAUSING && a.pausedOp != op.GetId() && a.expiredOp != op.GetId():
		a.step = &dbv1.Step{OpId: op.GetId(), Phase: op.GetPhase()}
		if a.fenced || a.down {
			// Fenced already (cut off from the cluster a moment ago), or
			// not running: clients wait as under PAUSE, or have no
			// pgbouncer, and no server connection is left.
			a.pausedOp, a.paused, a.pausedAt = op.GetId(), true, now
			a.step.Done = true
			holdPause = true
			a.log.Info("paused (fenced or down already)", "op", op.GetId(), "down", a.down)
			break
		}
		// A PAUSE counts from when it is first issued for the operation,
		// also across a restart of this agent.
		issued := now
		a.fileMu.Lock()
		if a.file.PausedOp == op.GetId() && a.file.PausedAt != 0 {
			issued = time.Unix(0, a.file.PausedAt)
		}
		a.fileMu.Unlock()
		a.recordPause(op.GetId(), issued)
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
			a.recordPause(0, time.Time{})
			return
		}
		a.paused, a.pausedAt = true, issued
		a.step.Done = true
		holdPause = true
		a.log.Info("paused", "op", op.GetId(), "expires_in", issued.Add(a.cfg.PauseExpiry).Sub(a.cfg.Now()).Round(time.Millisecond).String())
	case op.GetPhase() == dbv1.Phase_PHASE_FENCING && a.fencedOp != op.GetId():
		a.step = &dbv1.Step{OpId: op.GetId(), Phase: op.GetPhase()}
		if !a.fenced { // fenced already for isolation: nothing routes
			fctx, cancel := context.WithTimeout(ctx, a.cfg.PauseTimeout)
			killed, err := a.b.Fence(fctx, a.cfg.Drain)
			cancel()
			switch {
			case errors.Is(err, ErrBouncerDown):
				a.down = true // it routes nothing, and will not when it starts
			case err != nil:
				a.step.Error = err.Error()
				a.fail("fencing", err)
				return
			case killed:
				a.log.Warn("fencing: transactions still under way were dropped (KILL)", "op", op.GetId(), "drain", a.cfg.Drain.String())
			}
		}
		a.fencedOp, a.fenced = op.GetId(), true
		a.recordFence(true, op.GetId())
		a.step.Done = true
		holdFence = true
		a.log.Warn("fenced: holding clients, routing to no server until the new primary is recorded", "op", op.GetId(), "old_primary", op.GetOldPrimary(), "down", a.down)
	}

	switch {
	case a.isIsolated():
		// Cut off from the cluster: fenced until lift says otherwise.
	case a.fenced && !holdFence && !holdPause:
		// A fence ends by pointing at the state's primary, then RESUME.
		if havePrimary && !a.down {
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
	}
}

func (a *BouncerAgent) resume(ctx context.Context, why string) {
	did, err := a.bResume(ctx)
	if err != nil && !errors.Is(err, ErrBouncerDown) {
		a.fail("RESUME", err)
		return
	}
	if !did {
		return // fenced for isolation meanwhile
	}
	a.log.Info("resumed", "why", why)
	wasFenced := a.fenced
	a.paused, a.fenced = false, false
	a.recordPause(0, time.Time{})
	if wasFenced {
		a.recordFence(false, 0)
	}
}

func (a *BouncerAgent) report(ctx context.Context) {
	r := &dbv1.BouncerReport{
		// A pause adopted at start (pausedOp 0) is a guess, not a fact.
		Name: a.cfg.Name, AppliedGeneration: a.applied, Paused: a.paused && a.pausedOp != 0, Fenced: a.fenced || a.isIsolated(),
		Error: a.lastErr, Step: a.step, Down: a.down,
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
