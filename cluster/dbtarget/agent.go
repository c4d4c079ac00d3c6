package dbtarget

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
)

// Cluster is what the agents need of the gitraft node they run in.
// *cluster.Node implements it.
type Cluster interface {
	// ID is the node's ID.
	ID() string
	// DatabaseState returns the database state this node has applied; with
	// consistent, after a Raft read barrier (linearizable), which fails when
	// the node cannot reach a quorum.
	DatabaseState(ctx context.Context, consistent bool) (*dbv1.State, error)
	// WaitDatabaseChange blocks until the state's UpdatedIndex exceeds after
	// or ctx ends.
	WaitDatabaseChange(ctx context.Context, after uint64) error
	// ReportDatabase sends an agent's report to the leader.
	ReportDatabase(ctx context.Context, r *dbv1.ReportRequest) error
	// ProposeDatabase commits a database command; a refusal is an error.
	ProposeDatabase(ctx context.Context, c *dbv1.Command) (*dbv1.Result, error)
}

// maxAttempts is how often an agent tries a step before it reports an error
// (the leader then rolls back, or notes it).
const maxAttempts = 3

// stepper remembers an agent's step for the operation's current phase.
type stepper struct {
	step     *dbv1.Step
	attempts int
	lastTry  time.Time
}

// current returns the step if it is for op's current phase.
func (s *stepper) current(op *dbv1.Operation) *dbv1.Step {
	if s.step != nil && s.step.GetOpId() == op.GetId() && s.step.GetPhase() == op.GetPhase() {
		return s.step
	}
	return nil
}

// due reports whether the step for op's phase should be (re)tried now.
func (s *stepper) due(op *dbv1.Operation, now time.Time) bool {
	st := s.current(op)
	if st == nil {
		s.step, s.attempts = &dbv1.Step{OpId: op.GetId(), Phase: op.GetPhase()}, 0
		return true
	}
	if st.GetDone() || st.GetError() != "" {
		return false
	}
	return now.Sub(s.lastTry) >= 500*time.Millisecond
}

// result records one attempt; it reports an error only after maxAttempts.
func (s *stepper) result(now time.Time, lsn LSN, err error) {
	s.attempts++
	s.lastTry = now
	if err == nil {
		s.step.Done, s.step.Lsn, s.step.Error = true, uint64(lsn), ""
		return
	}
	if s.attempts >= maxAttempts {
		s.step.Error = err.Error()
	}
}

// still re-reads the state with a read barrier and reports whether op is
// still in the same phase: agents check this before anything destructive,
// so a node cut off from the quorum acts on nothing stale.
func still(ctx context.Context, c Cluster, op *dbv1.Operation) (*dbv1.State, error) {
	st, err := c.DatabaseState(ctx, true)
	if err != nil {
		return nil, fmt.Errorf("confirm the state with the leader: %w", err)
	}
	cur := st.GetOperation()
	if op == nil {
		return st, nil
	}
	if cur.GetId() != op.GetId() || cur.GetPhase() != op.GetPhase() {
		return nil, errMoved
	}
	return st, nil
}

var errMoved = errors.New("the operation moved on meanwhile")

// waitChange waits for a state change after idx, at most d.
func waitChange(ctx context.Context, c Cluster, idx uint64, d time.Duration) {
	wctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	c.WaitDatabaseChange(wctx, idx)
}

// ----- postgres agent -----

// PostgresAgentConfig configures the agent of one PostgreSQL server.
type PostgresAgentConfig struct {
	// Member is this server's record: name, host, port, priority,
	// no_failover (node is filled in from the cluster).
	Member *dbv1.Member
	// ReportInterval is how often it reports when nothing happens.
	ReportInterval time.Duration
	// Probe replaces the real Probe of the primary (tests).
	Probe func(ctx context.Context, ep Endpoint, timeout time.Duration) error
	// SynchronousMode is the cluster-wide database.synchronous_mode: a
	// standby about to be promoted first gets the
	// synchronous_standby_names a new primary starts with
	// (NewPrimarySyncNames), so that it never runs a moment with a stale
	// value of its own.
	SynchronousMode string
}

// PostgresAgent drives one PostgreSQL server after the replicated state: it
// stops, promotes, demotes and restarts it as the operation's phase asks, and
// demotes it when it runs as a primary the state does not know.
type PostgresAgent struct {
	cfg  PostgresAgentConfig
	c    Cluster
	srv  Server
	log  *slog.Logger
	name string

	step  stepper
	soon  bool // something to check again shortly (waiting for replay)
	stale time.Time

	notStreaming time.Time // since when this standby has not streamed
	lastFollow   time.Time
	followedGen  uint64    // the generation whose primary this standby was last seen streaming from
	lastSync     time.Time // last attempt to set synchronous_standby_names
	probe        func(ctx context.Context, ep Endpoint, timeout time.Duration) error
}

// NewPostgresAgent returns an agent; Run starts it.
func NewPostgresAgent(cfg PostgresAgentConfig, c Cluster, srv Server, log *slog.Logger) *PostgresAgent {
	if cfg.ReportInterval <= 0 {
		cfg.ReportInterval = DefaultReportInterval
	}
	if log == nil {
		log = slog.Default()
	}
	name := cfg.Member.GetName()
	if cfg.Probe == nil {
		cfg.Probe = Probe
	}
	return &PostgresAgent{cfg: cfg, c: c, srv: srv, log: log.With("member", name), name: name, probe: cfg.Probe}
}

// Run registers the member and follows the state until ctx ends.
func (a *PostgresAgent) Run(ctx context.Context) {
	m := &dbv1.Member{
		Name: a.name, Host: a.cfg.Member.GetHost(), Port: a.cfg.Member.GetPort(),
		Priority: a.cfg.Member.GetPriority(), NoFailover: a.cfg.Member.GetNoFailover(), Node: a.c.ID(),
	}
	register(ctx, a.c, a.log, a.cfg.ReportInterval, func(st *dbv1.State) bool {
		cur := findMember(st, a.name)
		return cur != nil && cur.GetHost() == m.GetHost() && cur.GetPort() == m.GetPort() && cur.GetPriority() == m.GetPriority() &&
			cur.GetNoFailover() == m.GetNoFailover() && cur.GetNode() == m.GetNode()
	}, &dbv1.Command{Command: &dbv1.Command_RegisterMember{RegisterMember: &dbv1.RegisterMember{Member: m}}})
	a.startup(ctx)
	for ctx.Err() == nil {
		st, err := a.c.DatabaseState(ctx, false)
		if err != nil {
			waitChange(ctx, a.c, 0, a.cfg.ReportInterval)
			continue
		}
		h := a.srv.Health(ctx)
		a.soon = false
		if a.act(ctx, st, h) {
			h = a.srv.Health(ctx)
		}
		a.report(ctx, h)
		d := a.cfg.ReportInterval
		if a.soon {
			d = 50 * time.Millisecond
		}
		waitChange(ctx, a.c, st.GetUpdatedIndex(), d)
	}
}

// startup brings a stopped server to what the state says, once, when the
// agent starts (gitraft serve starting with the host, or after it died in the
// middle of a switchover that then rolled back without it): the primary is
// started, a standby is started following the primary (once that answers).
// Nothing happens while an operation is under way, and a server that runs is
// left to the loop.
func (a *PostgresAgent) startup(ctx context.Context) {
	if h := a.srv.Health(ctx); h.Running {
		return
	}
	st, err := still(ctx, a.c, nil)
	if err != nil || st.GetGeneration() == 0 || st.GetOperation() != nil {
		return
	}
	if st.GetPrimary() == a.name {
		a.log.Info("the cluster's primary is stopped: starting it", "generation", st.GetGeneration())
		if err := a.srv.Start(ctx); err != nil {
			a.log.Error("starting the primary failed", "err", err)
		}
		return
	}
	ep, ok := PrimaryEndpoint(st)
	if !ok || a.probe(ctx, ep, 2*time.Second) != nil {
		a.log.Info("this standby is stopped and the primary does not answer: leaving it stopped", "primary", st.GetPrimary())
		return
	}
	a.log.Info("this standby is stopped: starting it as a standby of the primary", "primary", st.GetPrimary(), "endpoint", ep.String())
	if err := a.srv.Demote(ctx, ep); err != nil {
		a.log.Error("starting the standby failed", "err", err)
	}
}

// register proposes cmd until registered says the state holds it.
func register(ctx context.Context, c Cluster, log *slog.Logger, every time.Duration, registered func(*dbv1.State) bool, cmd *dbv1.Command) {
	backoff := every
	for ctx.Err() == nil {
		if st, err := c.DatabaseState(ctx, true); err == nil && registered(st) {
			return
		}
		if _, err := c.ProposeDatabase(ctx, cmd); err != nil {
			log.Warn("registering in the replicated state failed; will retry", "err", err, "retry_in", backoff.String())
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 30*time.Second)
			continue
		}
		log.Info("registered in the replicated state")
		return
	}
}

func (a *PostgresAgent) report(ctx context.Context, h Health) {
	r := &dbv1.PostgresReport{
		Member: a.name, Running: h.Running, InRecovery: h.InRecovery, Timeline: h.Timeline,
		WriteLsn: uint64(h.WriteLSN), ReplayLsn: uint64(h.ReplayLSN), Streaming: h.Streaming, Error: h.Err,
		Step: a.step.step, Upstream: upstreamText(h), SynchronousStandbyNames: h.SynchronousStandbyNames, Synchronous: h.Synchronous, Replicas: h.Replicas,
	}
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := a.c.ReportDatabase(rctx, &dbv1.ReportRequest{Node: a.c.ID(), Postgres: r}); err != nil {
		a.log.Debug("report to the leader failed", "err", err)
	}
}

func upstreamText(h Health) string {
	if !h.Streaming || h.Upstream == (Endpoint{}) {
		return ""
	}
	return h.Upstream.String()
}

// act does what the state asks of this server; it reports whether it did
// anything (so health is read again).
func (a *PostgresAgent) act(ctx context.Context, st *dbv1.State, h Health) bool {
	op := st.GetOperation()
	now := time.Now()
	me := a.name
	synced := a.applySync(ctx, st, h)
	switch {
	case op == nil:
	case op.GetPhase() == dbv1.Phase_PHASE_CHECKPOINTING && op.GetOldPrimary() == me:
		if a.step.due(op, now) {
			// Not destructive: no read barrier first. Clients still write.
			t0 := time.Now()
			err := a.srv.Checkpoint(ctx)
			a.step.result(time.Now(), 0, err)
			a.logStep(op, err, "took", time.Since(t0).Round(time.Millisecond).String())
			a.soon = err != nil
			return true
		}
	case op.GetPhase() == dbv1.Phase_PHASE_STOPPING_OLD && op.GetOldPrimary() == me:
		if a.step.due(op, now) {
			if _, err := still(ctx, a.c, op); err != nil {
				return false
			}
			a.log.Info("fast-stopping the old primary", "op", op.GetId(), "phase", PhaseName(op.GetPhase()))
			lsn, err := a.srv.Stop(ctx)
			a.step.result(time.Now(), lsn, err)
			a.logStep(op, err, "lsn", lsn.String())
			a.soon = err != nil
			return true
		}
	case op.GetPhase() == dbv1.Phase_PHASE_PROMOTING && op.GetTarget() == me:
		if !a.step.due(op, now) {
			return false
		}
		if h.Running && !h.InRecovery {
			// Promoted already (by an earlier attempt or before a restart).
			a.step.result(now, h.WriteLSN, nil)
			return false
		}
		if want := LSN(op.GetWaitLsn()); h.ReplayLSN < want {
			a.soon = true
			if time.Duration(now.UnixNano()-op.GetPhaseStartedUnixNano()) > 5*time.Second {
				a.log.Info("waiting to replay the old primary's last WAL before promoting", "lsn", want.String(), "replayed", h.ReplayLSN.String())
			}
			return false
		}
		if _, err := still(ctx, a.c, op); err != nil {
			a.soon = true
			return false
		}
		// Its postgresql.auto.conf may name standbys from an earlier time
		// as primary: in force at promotion, they would hold commits (or,
		// empty in strict mode, not hold them). ALTER SYSTEM works on a
		// standby.
		if want := FormatSyncNames(NewPrimarySyncNames(Settings{SynchronousMode: a.cfg.SynchronousMode})); h.SynchronousStandbyNames != want {
			if err := a.srv.SetSynchronousStandbyNames(ctx, want); err != nil {
				a.log.Warn("setting synchronous_standby_names before promoting failed; set once it is the primary", "want", want, "err", err)
			}
		}
		a.log.Info("promoting", "op", op.GetId(), "replayed", h.ReplayLSN.String(), "lsn", LSN(op.GetWaitLsn()).String())
		err := a.srv.Promote(ctx)
		if err != nil {
			if h2 := a.srv.Health(ctx); h2.Running && !h2.InRecovery {
				err = nil // it did promote
			}
		}
		a.step.result(time.Now(), 0, err)
		a.logStep(op, err)
		a.soon = err != nil
		return true
	case (op.GetPhase() == dbv1.Phase_PHASE_FENCING || (op.GetPhase() == dbv1.Phase_PHASE_PROMOTING && op.GetKind() == dbv1.Kind_KIND_FAILOVER)) &&
		op.GetOldPrimary() == me:
		if h.Running && !h.InRecovery {
			if _, err := still(ctx, a.c, op); err != nil {
				return false
			}
			// The leader waits in fencing until this report says stopped.
			a.log.Warn("failover under way: fast-stopping this old primary", "op", op.GetId(), "target", op.GetTarget())
			if _, err := a.srv.Stop(ctx); err != nil {
				a.log.Error("stopping the old primary failed", "op", op.GetId(), "err", err)
				a.soon = true
			}
			return true
		}
	case op.GetPhase() == dbv1.Phase_PHASE_DEMOTING && op.GetOldPrimary() == me:
		if a.step.due(op, now) {
			st2, err := still(ctx, a.c, op)
			if err != nil {
				return false
			}
			ep, ok := PrimaryEndpoint(st2)
			if !ok {
				return false
			}
			a.log.Info("demoting to a standby of the new primary", "op", op.GetId(), "primary", st2.GetPrimary(), "endpoint", ep.String())
			err = a.srv.Demote(ctx, ep)
			a.step.result(time.Now(), 0, err)
			a.logStep(op, err)
			a.soon = err != nil
			return true
		}
	case op.GetPhase() == dbv1.Phase_PHASE_ROLLING_BACK && op.GetOldPrimary() == me:
		if a.step.due(op, now) {
			if h.Running && !h.InRecovery {
				a.step.result(now, h.WriteLSN, nil)
				a.logStep(op, nil)
				return false
			}
			if _, err := still(ctx, a.c, op); err != nil {
				return false
			}
			var err error
			if !h.Running {
				a.log.Info("rolling back: starting the old primary again", "op", op.GetId(), "why", op.GetNote())
				err = a.srv.Start(ctx)
			}
			if err == nil {
				if h2 := a.srv.Health(ctx); !h2.Running || h2.InRecovery {
					err = fmt.Errorf("after start it is %s", healthText(&dbv1.PostgresReport{Running: h2.Running, InRecovery: h2.InRecovery, Error: h2.Err}))
				}
			}
			a.step.result(time.Now(), 0, err)
			a.logStep(op, err)
			a.soon = err != nil
			return true
		}
	}
	return a.demoteStale(ctx, st, h) || a.follow(ctx, st, h) || synced
}

// applySync gives the state's primary the synchronous_standby_names the
// state asks for (synchronous mode), after a linearizable read: a node cut
// off from the quorum changes nothing on stale state.
func (a *PostgresAgent) applySync(ctx context.Context, st *dbv1.State, h Health) bool {
	want := FormatSyncNames(st.GetSynchronousStandbyNames())
	if st.GetPrimary() != a.name || !h.Running || h.InRecovery || h.SynchronousStandbyNames == want || time.Since(a.lastSync) < 200*time.Millisecond {
		return false
	}
	a.lastSync = time.Now()
	st2, err := still(ctx, a.c, nil)
	if err != nil || st2.GetPrimary() != a.name {
		return false
	}
	want = FormatSyncNames(st2.GetSynchronousStandbyNames())
	if err := a.srv.SetSynchronousStandbyNames(ctx, want); err != nil {
		a.log.Error("setting synchronous_standby_names failed", "want", want, "err", err)
		a.soon = true
		return false
	}
	a.log.Info("synchronous_standby_names set", "was", h.SynchronousStandbyNames, "now", want, "synchronous_standby", st2.GetSynchronousStandby())
	return true
}

// follow points a standby that does not stream from the state's primary
// at it (Demote: in place while it runs, else with pg_rewind), once the
// primary answers a probe:
//
//   - at once when the primary changed since this agent last saw it stream
//     from the primary (a switchover or failover: a third member that
//     followed the old primary, cascading through it once that is a
//     standby, or waiting for it while it is gone), from the moment the
//     new primary is recorded (phase repointing) on;
//   - otherwise only when it has not streamed for a while (10 report
//     intervals, at least 5s) and no operation is under way: the primary
//     may only be restarting.
//
// The old primary of an operation under way is left to its demoting step.
func (a *PostgresAgent) follow(ctx context.Context, st *dbv1.State, h Health) bool {
	now := time.Now()
	op := st.GetOperation()
	ep, havePrimary := PrimaryEndpoint(st)
	if st.GetGeneration() == 0 || !havePrimary || st.GetPrimary() == a.name || !h.Running || !h.InRecovery {
		a.notStreaming = time.Time{}
		return false
	}
	if h.Streaming && h.Upstream == ep {
		a.notStreaming, a.followedGen = time.Time{}, st.GetGeneration()
		return false
	}
	if op != nil && (!promoted(op.GetPhase()) || op.GetOldPrimary() == a.name) {
		return false // the primary is not recorded yet, or demoting is this server's step
	}
	newPrimary := st.GetGeneration() > a.followedGen
	if !h.Streaming && a.notStreaming.IsZero() {
		a.notStreaming = now
	}
	switch {
	case newPrimary:
		if now.Sub(a.lastFollow) < 2*time.Second {
			a.soon = true
			return false
		}
	case !h.Streaming:
		if op != nil || now.Sub(a.notStreaming) < max(10*a.cfg.ReportInterval, 5*time.Second) || now.Sub(a.lastFollow) < 30*time.Second {
			return false
		}
	default:
		// Streaming, through another server than the primary, with no
		// change of primary since it was last seen streaming from the
		// primary: pointed there by hand; it is pointed back in a while.
		if now.Sub(a.lastFollow) < 30*time.Second {
			return false
		}
	}
	if a.probe(ctx, ep, 2*time.Second) != nil {
		a.soon = newPrimary
		return false // the primary does not answer: leave the standby be
	}
	st2, err := still(ctx, a.c, nil)
	if err != nil || st2.GetPrimary() != st.GetPrimary() || st2.GetGeneration() != st.GetGeneration() {
		return false
	}
	a.lastFollow = now
	upstream := "none (not streaming)"
	if h.Streaming {
		upstream = h.Upstream.String()
	}
	a.log.Warn("this standby does not stream from the primary: pointing it there", "primary", st.GetPrimary(), "endpoint", ep.String(), "upstream", upstream, "generation", st.GetGeneration())
	if err := a.srv.Demote(ctx, ep); err != nil {
		a.log.Error("pointing the standby at the primary failed", "err", err)
		return true
	}
	a.followedGen = st.GetGeneration()
	return true
}

// demoteStale turns this server into a standby of the state's primary when
// it runs as a primary that the state does not record (an old primary that
// came back after a failover). If that fails it stops it.
func (a *PostgresAgent) demoteStale(ctx context.Context, st *dbv1.State, h Health) bool {
	me := a.name
	if st.GetGeneration() == 0 || st.GetPrimary() == me || !h.Running || h.InRecovery {
		return false
	}
	if op := st.GetOperation(); op != nil && op.GetTarget() == me && op.GetPhase() == dbv1.Phase_PHASE_PROMOTING {
		return false // promoted, and about to be recorded
	}
	if time.Since(a.stale) < time.Second {
		return false
	}
	a.stale = time.Now()
	st2, err := still(ctx, a.c, nil)
	if err != nil || st2.GetPrimary() == me || st2.GetGeneration() == 0 {
		return false
	}
	if op := st2.GetOperation(); op != nil && op.GetTarget() == me && op.GetPhase() == dbv1.Phase_PHASE_PROMOTING {
		return false
	}
	ep, ok := PrimaryEndpoint(st2)
	if !ok {
		return false
	}
	a.log.Error("this server runs as a primary, but the cluster's primary is another member: demoting it to a standby", "primary", st2.GetPrimary(), "generation", st2.GetGeneration())
	if err := a.srv.Demote(ctx, ep); err != nil {
		a.log.Error("demoting failed; stopping the server so it takes no writes", "err", err)
		if _, serr := a.srv.Stop(ctx); serr != nil {
			a.log.Error("stopping failed too", "err", serr)
		}
	}
	return true
}

func (a *PostgresAgent) logStep(op *dbv1.Operation, err error, args ...any) {
	args = append(args, "op", op.GetId(), "phase", PhaseName(op.GetPhase()))
	if err != nil {
		a.log.Warn("step failed", append(args, "err", err, "attempt", a.step.attempts)...)
		return
	}
	a.log.Info("step done", args...)
}
