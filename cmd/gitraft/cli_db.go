package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"

	"github.com/gitraft/gitraft/cluster/dbtarget"
	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
)

// newDBCmd is `gitraft db`: the PostgreSQL primary, switchover and failover.
func newDBCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "db",
		Short: "PostgreSQL primary, switchover and failover",
		Long: `The cluster records which PostgreSQL server is the primary, with a
generation that goes up with every change, and drives switchovers and
failovers through the postgres and pgbouncer agents of gitraft serve
(configuration keys database.*).`,
	}
	cmd.AddCommand(newDBStatusCmd(g), newDBSwitchoverCmd(g), newDBFailoverCmd(g), newDBAbortCmd(g),
		newDBPauseCmd(g), newDBResumeCmd(g), newDBHistoryCmd(g), newDBWritableCmd(g), newDBRemoveCmd(g))
	return cmd
}

func newDBStatusCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Members with roles, health and lag; generation, phase and pgbouncers",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := dbv1.NewDatabaseServiceClient(conn).GetStatus(ctx, &dbv1.GetStatusRequest{})
			if err != nil {
				return rpcError("database status", err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			return writeDBStatus(cmd.OutOrStdout(), resp, time.Now())
		},
	}
}

func unixTime(ns int64) time.Time { return time.Unix(0, ns) }

// sinceText is "3m05s ago" for a Unix nanosecond time, "-" when unset.
func sinceText(now time.Time, ns int64) string {
	if ns == 0 {
		return "-"
	}
	d := now.Sub(unixTime(ns))
	if d < 0 {
		return "just now"
	}
	return humanDuration(d) + " ago"
}

func operationText(op *dbv1.Operation, now time.Time) string {
	if op == nil {
		return "none"
	}
	from := op.GetOldPrimary()
	if from == "" {
		from = "(none)"
	}
	s := fmt.Sprintf("%s %s -> %s, phase %s (operation %d", dbtarget.KindName(op.GetKind()), from, op.GetTarget(), dbtarget.PhaseName(op.GetPhase()), op.GetId())
	if op.GetAutomatic() {
		s += ", automatic"
	} else if op.GetRequestedBy() != "" {
		s += ", by " + op.GetRequestedBy()
	}
	s += ", began " + sinceText(now, op.GetStartedUnixNano())
	switch {
	case op.GetPhase() == dbv1.Phase_PHASE_SCHEDULED:
		s += ", starts at " + unixTime(op.GetAtUnixNano()).Local().Format("2006-01-02 15:04:05 MST")
	case op.GetDeadlineUnixNano() != 0:
		if d := unixTime(op.GetDeadlineUnixNano()).Sub(now); d > 0 {
			s += ", phase deadline in " + humanDuration(d)
		} else {
			s += ", phase deadline passed"
		}
	}
	s += ")"
	if op.GetNote() != "" {
		s += ": " + op.GetNote()
	}
	return s
}

func lsnText(v uint64) string {
	if v == 0 {
		return ""
	}
	return dbtarget.LSN(v).String()
}

func ageText(ns int64) string {
	if ns == 0 {
		return "never"
	}
	return humanDuration(time.Duration(ns)) + " ago"
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// writeDBStatus prints a GetStatusResponse for people.
func writeDBStatus(w io.Writer, r *dbv1.GetStatusResponse, now time.Time) error {
	st := r.GetState()
	kv := newKV(w)
	primary := st.GetPrimary()
	if primary == "" {
		primary = "none recorded yet"
	} else {
		primary = fmt.Sprintf("%s (generation %d, since %s)", primary, st.GetGeneration(), sinceText(now, st.GetPrimarySinceUnixNano()))
	}
	kv.row("primary:", primary)
	kv.row("operation:", operationText(st.GetOperation(), now))
	paused := "no"
	if st.GetPaused() {
		paused = "yes, no automatic failover (since " + sinceText(now, st.GetPausedUnixNano())
		if st.GetPausedBy() != "" {
			paused += ", by " + st.GetPausedBy()
		}
		paused += ")"
		if st.GetPausedReason() != "" {
			paused += ": " + st.GetPausedReason()
		}
	}
	kv.row("paused:", paused)
	writable := "yes"
	if !r.GetWritable() {
		writable = "no: " + r.GetWritableReason()
	}
	kv.row("writable:", writable)
	fo := r.GetFailover()
	failover := "off (database.automatic_failover)"
	if fo.GetAutomatic() {
		failover = "automatic"
	}
	if fo.GetNeeded() > 0 {
		failover += fmt.Sprintf(", primary unreachable for %d of %d needed voters", fo.GetVotes(), fo.GetNeeded())
	}
	if fo.GetBlocked() != "" {
		failover += "; held back: " + fo.GetBlocked()
	}
	kv.row("failover:", failover)
	sync := "none (asynchronous replication)"
	switch names, rec := st.GetSynchronousStandbyNames(), st.GetSynchronousStandby(); {
	case rec != "":
		sync = rec + " (a failover promotes only it)"
	case names == dbtarget.AnyStandby:
		sync = "any standby (strict mode: commits wait for the first to connect), none confirmed"
	case names != "":
		sync = names + " named, not yet confirmed (no failover without --force meanwhile)"
	}
	kv.row("sync:", sync)
	kv.row("leader:", fmt.Sprintf("%s (index %d)", r.GetLeader(), r.GetIndex()))
	for i, m := range r.GetSettingsMismatch() {
		label := ""
		if i == 0 {
			label = "settings differ:"
		}
		kv.row(label, m+" (switchovers refused until every node has the leader's database.* settings)")
	}
	if err := kv.flush(); err != nil {
		return err
	}
	fmt.Fprintln(w)
	if len(r.GetMembers()) == 0 {
		fmt.Fprintln(w, "no PostgreSQL members registered (set database.postgres.member on the nodes that run PostgreSQL)")
	} else {
		byAddr := map[string]string{}
		for _, m := range r.GetMembers() {
			byAddr[fmt.Sprintf("%s:%d", m.GetMember().GetHost(), m.GetMember().GetPort())] = m.GetMember().GetName()
		}
		t := newTable(w, "MEMBER", "ROLE", "ADDRESS", "NODE", "TL", "WRITE LSN", "REPLAY LSN", "LAG", "STREAMING", "UPSTREAM", "PRIORITY", "REPORTED", "ERROR")
		for _, m := range r.GetMembers() {
			mm, h := m.GetMember(), m.GetHealth()
			lag := ""
			if m.GetLagKnown() {
				lag = dbtarget.Bytes(m.GetLagBytes())
			}
			prio := strconv.Itoa(int(mm.GetPriority()))
			if mm.GetNoFailover() {
				prio += " (no failover)"
			}
			streaming, upstream := "", ""
			if h.GetRunning() && h.GetInRecovery() {
				streaming = yesNo(h.GetStreaming())
				upstream = h.GetUpstream()
				if name, ok := byAddr[upstream]; ok {
					upstream = name
					if name != st.GetPrimary() {
						upstream += " (cascading)"
					}
				}
			}
			tl := ""
			if h.GetTimeline() != 0 {
				tl = strconv.Itoa(int(h.GetTimeline()))
			}
			t.row(mm.GetName(), m.GetRole(), fmt.Sprintf("%s:%d", mm.GetHost(), mm.GetPort()), mm.GetNode(), tl,
				lsnText(h.GetWriteLsn()), lsnText(h.GetReplayLsn()), lag, streaming, upstream, prio, ageText(m.GetReportAgeNanos()), h.GetError())
		}
		if err := t.flush(); err != nil {
			return err
		}
	}
	fmt.Fprintln(w)
	if len(r.GetBouncers()) == 0 {
		fmt.Fprintln(w, "no pgbouncers registered (set database.pgbouncer.name on the nodes that run pgbouncer)")
		return nil
	}
	t := newTable(w, "PGBOUNCER", "NODE", "GENERATION", "TARGET", "STATE", "REPORTED", "ERROR")
	for _, b := range r.GetBouncers() {
		rep := b.GetReport()
		state := "routing"
		switch {
		case rep == nil:
			state = "unknown"
		case rep.GetDown():
			state = "down (routes nothing)"
		case rep.GetFenced():
			state = "fenced"
		case rep.GetPaused():
			state = "paused"
		}
		gen := ""
		if rep != nil {
			gen = strconv.FormatUint(rep.GetAppliedGeneration(), 10)
			if rep.GetAppliedGeneration() < st.GetGeneration() {
				gen += " (behind)"
			}
		}
		t.row(b.GetBouncer().GetName(), b.GetBouncer().GetNode(), gen, rep.GetTarget(), state, ageText(b.GetReportAgeNanos()), rep.GetError())
	}
	return t.flush()
}

// parseAt reads --at: RFC 3339, "2006-01-02 15:04[:05]" or "15:04[:05]"
// in local time, or a duration from now ("+10m" or "10m").
func parseAt(s string, now time.Time) (time.Time, error) {
	s = strings.TrimSpace(s)
	if d, err := time.ParseDuration(strings.TrimPrefix(s, "+")); err == nil {
		if d < 0 {
			return time.Time{}, fmt.Errorf("--at %q is in the past", s)
		}
		return now.Add(d), nil
	}
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	for _, layout := range []string{"2006-01-02 15:04:05", "2006-01-02 15:04", "2006-01-02T15:04:05", "2006-01-02T15:04"} {
		if t, err := time.ParseInLocation(layout, s, now.Location()); err == nil {
			return t, nil
		}
	}
	for _, layout := range []string{"15:04:05", "15:04"} {
		if t, err := time.ParseInLocation(layout, s, now.Location()); err == nil {
			y, m, d := now.Date()
			return time.Date(y, m, d, t.Hour(), t.Minute(), t.Second(), 0, now.Location()), nil
		}
	}
	return time.Time{}, fmt.Errorf("--at %q: use RFC 3339 (2026-03-01T02:00:00Z), \"2026-03-01 02:00\" or \"02:00\" in local time, or a delay such as +10m", s)
}

// longConn is a connection for a command that waits longer than --timeout:
// each RPC gets --timeout, the wait as a whole gets wait.
func (g *globalOpts) longConn(cmd *cobra.Command, wait time.Duration) (context.Context, *grpc.ClientConn, func(), error) {
	cmd.SilenceUsage = true
	ctx := cmd.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, cancel := context.WithTimeout(ctx, wait)
	conn, err := g.dial(ctx)
	if err != nil {
		cancel()
		return nil, nil, nil, err
	}
	return ctx, conn, func() { conn.Close(); cancel() }, nil
}

func (g *globalOpts) rpcCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	if g.Timeout > 0 {
		return context.WithTimeout(ctx, g.Timeout)
	}
	return context.WithCancel(ctx)
}

// errOperation is returned when the awaited operation rolled back or failed.
var errOperation = errors.New("operation did not complete")

// waitOperation follows operation id until it is in the history, printing
// each phase as it passes, and returns its history entry.
func (g *globalOpts) waitOperation(ctx context.Context, w io.Writer, c dbv1.DatabaseServiceClient, op *dbv1.Operation) (*dbv1.HistoryEntry, error) {
	start := time.Now()
	lastPhase := dbv1.Phase(-1)
	printPhase := func(cur *dbv1.Operation) {
		if cur.GetPhase() == lastPhase {
			return
		}
		lastPhase = cur.GetPhase()
		line := fmt.Sprintf("  %6.1fs  %s", time.Since(start).Seconds(), dbtarget.PhaseName(cur.GetPhase()))
		if cur.GetPhase() == dbv1.Phase_PHASE_ROLLING_BACK && cur.GetNote() != "" {
			line += ": " + cur.GetNote()
		}
		fmt.Fprintln(w, line)
	}
	printPhase(op)
	var lastErr error
	for {
		rctx, cancel := g.rpcCtx(ctx)
		resp, err := c.GetStatus(rctx, &dbv1.GetStatusRequest{})
		cancel()
		if err == nil {
			st := resp.GetState()
			if cur := st.GetOperation(); cur.GetId() == op.GetId() {
				printPhase(cur)
			} else {
				for _, h := range st.GetHistory() {
					if h.GetOpId() == op.GetId() {
						return h, nil
					}
				}
				return nil, fmt.Errorf("operation %d is no longer under way, and not in the history either", op.GetId())
			}
		} else {
			// A leader change answers Unavailable for a moment: keep asking.
			lastErr = err
		}
		select {
		case <-ctx.Done():
			if lastErr != nil {
				return nil, rpcError(fmt.Sprintf("waiting for operation %d (still under way; see gitraft db status)", op.GetId()), lastErr)
			}
			return nil, fmt.Errorf("gave up waiting for operation %d after %s; it goes on: follow it with gitraft db status (--wait sets how long to wait)", op.GetId(), time.Since(start).Round(time.Second))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// reportOutcome prints how an operation ended and fails unless it is done.
func reportOutcome(w io.Writer, h *dbv1.HistoryEntry) error {
	took := time.Duration(h.GetFinishedUnixNano() - h.GetStartedUnixNano())
	switch h.GetOutcome() {
	case dbv1.Outcome_OUTCOME_DONE:
		fmt.Fprintf(w, "%s done in %.1fs: %s is the primary (generation %d)\n", dbtarget.KindName(h.GetKind()), took.Seconds(), h.GetTo(), h.GetGeneration())
		if h.GetReason() != "" {
			fmt.Fprintf(w, "note: %s\n", h.GetReason())
		}
		return nil
	}
	return fmt.Errorf("%w: %s %s after %.1fs; %s stays the primary (generation %d): %s", errOperation, dbtarget.KindName(h.GetKind()), dbtarget.OutcomeName(h.GetOutcome()),
		took.Seconds(), orDash(h.GetFrom()), h.GetGeneration(), h.GetReason())
}

func newDBSwitchoverCmd(g *globalOpts) *cobra.Command {
	var to, at string
	var noWait bool
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "switchover --to MEMBER [--at TIME]",
		Short: "Planned switchover to a standby, without failed transactions",
		Long: `Switch the primary over to a healthy standby. The cluster pauses every
pgbouncer, fast-stops the old primary, waits until the target replayed its
last WAL, promotes the target, points every pgbouncer at it and resumes them,
then makes the old primary a standby of the new one. Clients wait during the
pause instead of failing. If a step fails before the promotion, everything
rolls back and the old primary stays.

It waits until the switchover finished and prints each phase as it passes;
--no-wait returns once it began. With --at it is scheduled (RFC 3339,
"2026-03-01 02:00" or "02:00" in local time, or +10m) and does not wait.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if to == "" {
				return errors.New("name the standby to switch over to: --to MEMBER (see gitraft db status)")
			}
			req := &dbv1.SwitchoverRequest{To: to}
			if at != "" {
				t, err := parseAt(at, time.Now())
				if err != nil {
					return err
				}
				if time.Until(t) < -time.Minute {
					return fmt.Errorf("--at %s is in the past", t.Format(time.RFC3339))
				}
				req.AtUnixNano = t.UnixNano()
				noWait = true
			}
			ctx, conn, done, err := g.longConn(cmd, wait)
			if err != nil {
				return err
			}
			defer done()
			c := dbv1.NewDatabaseServiceClient(conn)
			rctx, cancel := g.rpcCtx(ctx)
			resp, err := c.Switchover(rctx, req)
			cancel()
			if err != nil {
				return rpcError("switchover to "+to, err)
			}
			return followOperation(ctx, g, cmd.OutOrStdout(), c, resp.GetOperation(), noWait)
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "the standby to promote")
	cmd.Flags().StringVar(&at, "at", "", "schedule it: RFC 3339, \"2006-01-02 15:04\", \"15:04\" (local time) or +DURATION")
	cmd.Flags().BoolVar(&noWait, "no-wait", false, "return once it began")
	cmd.Flags().DurationVar(&wait, "wait", 5*time.Minute, "how long to wait for it to finish")
	return cmd
}

// followOperation prints that an operation began and, unless noWait, waits
// for it.
func followOperation(ctx context.Context, g *globalOpts, w io.Writer, c dbv1.DatabaseServiceClient, op *dbv1.Operation, noWait bool) error {
	kind := dbtarget.KindName(op.GetKind())
	if noWait {
		if g.JSON {
			return printProtoJSON(w, opResponse(op))
		}
		if op.GetPhase() == dbv1.Phase_PHASE_SCHEDULED {
			fmt.Fprintf(w, "%s from %s to %s scheduled at %s (operation %d); cancel with gitraft db abort\n", kind, orDash(op.GetOldPrimary()), op.GetTarget(),
				unixTime(op.GetAtUnixNano()).Local().Format("2006-01-02 15:04:05 MST"), op.GetId())
			return nil
		}
		fmt.Fprintf(w, "%s from %s to %s began (operation %d); follow it with gitraft db status\n", kind, orDash(op.GetOldPrimary()), op.GetTarget(), op.GetId())
		return nil
	}
	out := w
	if g.JSON {
		out = io.Discard
	}
	fmt.Fprintf(out, "%s from %s to %s (operation %d):\n", kind, orDash(op.GetOldPrimary()), op.GetTarget(), op.GetId())
	h, err := g.waitOperation(ctx, out, c, op)
	if err != nil {
		return err
	}
	if g.JSON {
		if err := printProtoJSON(w, h); err != nil {
			return err
		}
		if h.GetOutcome() != dbv1.Outcome_OUTCOME_DONE {
			return fmt.Errorf("%w: %s %s: %s", errOperation, kind, dbtarget.OutcomeName(h.GetOutcome()), h.GetReason())
		}
		return nil
	}
	return reportOutcome(w, h)
}

func opResponse(op *dbv1.Operation) *dbv1.SwitchoverResponse {
	return &dbv1.SwitchoverResponse{Operation: op, Index: op.GetId()}
}

func newDBFailoverCmd(g *globalOpts) *cobra.Command {
	var to string
	var noWait, force bool
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "failover [--to MEMBER]",
		Short: "Promote a standby when the primary is gone",
		Long: `Fail over to a standby: every pgbouncer stops routing to the old primary
(and the old primary's agent stops it if it still runs), the standby is
promoted, and every pgbouncer points at it. Without --to, the standby with the
most WAL (then the highest priority) is chosen. It works while automatic
failover is paused. An old primary that comes back is demoted by its agent.

A standby named with --to must be within database.max_lag_bytes of the
primary (of the best known position when the primary is gone), in WAL
received and replayed, as for a switchover; otherwise the failover is refused
with what it would lose. --force promotes it anyway.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, conn, done, err := g.longConn(cmd, wait)
			if err != nil {
				return err
			}
			defer done()
			c := dbv1.NewDatabaseServiceClient(conn)
			rctx, cancel := g.rpcCtx(ctx)
			resp, err := c.Failover(rctx, &dbv1.FailoverRequest{To: to, Force: force})
			cancel()
			if err != nil {
				what := "failover"
				if to != "" {
					what += " to " + to
				}
				return rpcError(what, err)
			}
			return followOperation(ctx, g, cmd.OutOrStdout(), c, resp.GetOperation(), noWait)
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "the standby to promote (default: the healthiest)")
	cmd.Flags().BoolVar(&force, "force", false, "promote the --to standby although it lags beyond database.max_lag_bytes (WAL it has not received is lost)")
	cmd.Flags().BoolVar(&noWait, "no-wait", false, "return once it began")
	cmd.Flags().DurationVar(&wait, "wait", 5*time.Minute, "how long to wait for it to finish")
	return cmd
}

func newDBAbortCmd(g *globalOpts) *cobra.Command {
	var reason string
	cmd := &cobra.Command{
		Use:   "abort [--reason TEXT]",
		Short: "Roll back the switchover or failover under way (before promotion only)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := dbv1.NewDatabaseServiceClient(conn).Abort(ctx, &dbv1.AbortRequest{Reason: reason})
			if err != nil {
				return rpcError("abort", err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			if resp.GetOperation() == nil {
				fmt.Fprintln(cmd.OutOrStdout(), "cancelled the scheduled switchover")
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "operation %d is rolling back; follow it with gitraft db status\n", resp.GetOperation().GetId())
			return nil
		},
	}
	cmd.Flags().StringVar(&reason, "reason", "", "why, for the history")
	return cmd
}

func newDBPauseCmd(g *globalOpts) *cobra.Command {
	var reason string
	cmd := &cobra.Command{
		Use:   "pause [--reason TEXT]",
		Short: "Maintenance mode: no automatic failover until resume",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := dbv1.NewDatabaseServiceClient(conn).Pause(ctx, &dbv1.PauseRequest{Reason: reason})
			if err != nil {
				return rpcError("pause", err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "paused: no automatic failover until gitraft db resume (index %d)\n", resp.GetIndex())
			return nil
		},
	}
	cmd.Flags().StringVar(&reason, "reason", "", "why, shown by db status")
	return cmd
}

func newDBResumeCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "resume",
		Short: "End maintenance mode: automatic failover as configured",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := dbv1.NewDatabaseServiceClient(conn).Resume(ctx, &dbv1.ResumeRequest{})
			if err != nil {
				return rpcError("resume", err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "resumed (index %d)\n", resp.GetIndex())
			return nil
		},
	}
}

func newDBHistoryCmd(g *globalOpts) *cobra.Command {
	var limit int
	cmd := &cobra.Command{
		Use:   "history [--limit N]",
		Short: "Past switchovers and failovers, newest first",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := dbv1.NewDatabaseServiceClient(conn).GetHistory(ctx, &dbv1.GetHistoryRequest{Limit: int32(limit)})
			if err != nil {
				return rpcError("database history", err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			return writeDBHistory(cmd.OutOrStdout(), resp, time.Now())
		},
	}
	cmd.Flags().IntVar(&limit, "limit", 0, "show at most N entries (0: all kept)")
	return cmd
}

func writeDBHistory(w io.Writer, r *dbv1.GetHistoryResponse, now time.Time) error {
	if len(r.GetHistory()) == 0 {
		_, err := fmt.Fprintln(w, "no switchovers or failovers yet")
		return err
	}
	t := newTable(w, "OP", "KIND", "FROM", "TO", "GENERATION", "RESULT", "FINISHED", "TOOK", "BY", "REASON")
	for _, h := range r.GetHistory() {
		by := h.GetRequestedBy()
		if h.GetAutomatic() {
			by = "automatic"
		}
		took := time.Duration(h.GetFinishedUnixNano() - h.GetStartedUnixNano())
		t.row(strconv.FormatUint(h.GetOpId(), 10), dbtarget.KindName(h.GetKind()), h.GetFrom(), h.GetTo(), strconv.FormatUint(h.GetGeneration(), 10),
			dbtarget.OutcomeName(h.GetOutcome()), sinceText(now, h.GetFinishedUnixNano()), fmt.Sprintf("%.1fs", took.Seconds()), by, h.GetReason())
	}
	return t.flush()
}

func newDBWritableCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "writable",
		Short: "The read-only signal: whether the database takes writes now (exit 1 if not)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := dbv1.NewDatabaseServiceClient(conn).GetWritable(ctx, &dbv1.GetWritableRequest{})
			if err != nil {
				return rpcError("writable", err)
			}
			if g.JSON {
				if err := printProtoJSON(cmd.OutOrStdout(), resp); err != nil {
					return err
				}
			} else if resp.GetWritable() {
				fmt.Fprintf(cmd.OutOrStdout(), "writable: primary %s (generation %d), as node %s sees it\n", resp.GetPrimary(), resp.GetGeneration(), resp.GetNode())
			}
			if !resp.GetWritable() {
				return fmt.Errorf("not writable, as node %s sees it: %s", resp.GetNode(), resp.GetReason())
			}
			return nil
		},
	}
}

func newDBRemoveCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "remove NAME",
		Short: "Forget a PostgreSQL member or pgbouncer that is gone for good",
		Long: `Forget a PostgreSQL member or pgbouncer. Not the primary, and not while a
switchover or failover is under way. An agent that still runs registers its
member or pgbouncer again when gitraft serve restarts.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := dbv1.NewDatabaseServiceClient(conn).Forget(ctx, &dbv1.ForgetRequest{Name: args[0]})
			if err != nil {
				return rpcError("remove "+args[0], err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed %s (index %d)\n", args[0], resp.GetIndex())
			return nil
		},
	}
}
