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
	"time"

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
	tmp := a.cfg.StateFile + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return os.Rename(tmp, a.cfg.StateFile)
}

// Run registers the pgbouncer and follows the state until ctx ends.
func (a *BouncerAgent) Run(ctx context.Context) {
	if err := a.load(); err != nil {
		a.log.Error("cannot read the applied generation; starting from 0 (the state's primary is applied again)", "err", err)
	}
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
		if err := a.b.Resume(ctx); err != nil {
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
					if a.fenced && !holdFence {
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
		timeout := a.cfg.PauseTimeout
		if d := time.Until(time.Unix(0, op.GetDeadlineUnixNano())); op.GetDeadlineUnixNano() != 0 && d < timeout {
			timeout = max(d, 100*time.Millisecond)
		}
		pctx, cancel := context.WithTimeout(ctx, timeout)
		err := a.b.Pause(pctx)
		cancel()
		a.pausedOp = op.GetId()
		if err != nil {
			a.step.Error = err.Error()
			a.fail("PAUSE", err)
			// A PAUSE that did not finish may still hold clients: undo it.
			if rerr := a.b.Resume(ctx); rerr != nil {
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
		fctx, cancel := context.WithTimeout(ctx, a.cfg.PauseTimeout)
		err := a.b.Fence(fctx)
		cancel()
		if err != nil {
			a.step.Error = err.Error()
			a.fail("fencing", err)
			return
		}
		a.fencedOp, a.fenced = op.GetId(), true
		a.step.Done = true
		holdFence = true
		a.log.Warn("fenced: routing to no server until the new primary is recorded", "op", op.GetId(), "old_primary", op.GetOldPrimary())
	}

	switch {
	case a.fenced && !holdFence:
		// A fence ends by pointing at the state's primary, then RESUME.
		if havePrimary {
			if err := a.b.Point(ctx, ep); err != nil {
				a.fail("pointing at the primary to end a fence", err)
				return
			}
		}
		a.resume(ctx, "the failover is over")
	case a.paused && !a.fenced && !holdPause && !a.behind:
		a.resume(ctx, "the operation no longer needs the pause")
	case a.paused && !a.fenced && now.Sub(a.pausedAt) >= a.cfg.PauseExpiry:
		a.log.Warn("the PAUSE expired: resuming by itself", "op", a.pausedOp, "paused_for", now.Sub(a.pausedAt).String())
		a.expiredOp = a.pausedOp
		a.resume(ctx, "pause expired")
	}
}

func (a *BouncerAgent) resume(ctx context.Context, why string) {
	if err := a.b.Resume(ctx); err != nil {
		a.fail("RESUME", err)
		return
	}
	a.log.Info("resumed", "why", why)
	a.paused, a.fenced = false, false
}

func (a *BouncerAgent) report(ctx context.Context) {
	r := &dbv1.BouncerReport{
		// A pause adopted at start (pausedOp 0) is a guess, not a fact.
		Name: a.cfg.Name, AppliedGeneration: a.applied, Paused: a.paused && a.pausedOp != 0, Fenced: a.fenced,
		Error: a.lastErr, Step: a.step,
	}
	if t, err := a.b.Target(); err == nil {
		r.Target = t.String()
	}
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := a.c.ReportDatabase(rctx, &dbv1.ReportRequest{Node: a.c.ID(), Bouncer: r}); err != nil {
		a.log.Debug("report to the leader failed", "err", err)
	}
}
