package dbtarget

import (
	"fmt"
	"slices"
	"strings"
	"time"

	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

// Synchronous mode (database.synchronous_mode on or strict), after
// Patroni's synchronous_mode. The state records two things: what the
// primary's synchronous_standby_names should name (State.
// synchronous_standby_names, which the primary's agent applies with ALTER
// SYSTEM and pg_reload_conf), and the one standby known to hold every
// acknowledged transaction (State.synchronous_standby), which is the only
// one a failover promotes. The leader moves them one step at a time
// (SyncStep) so that the recorded standby is always safe:
//
//   - a standby is recorded only after the primary runs with
//     synchronous_standby_names naming it, reports it synchronous, and it
//     has received the primary's WAL position of that report (so it also
//     holds what was acknowledged before it was named);
//   - the record is cleared before the names change, so the primary never
//     acknowledges a commit without the recorded standby.

// AnyStandby is the synchronous_standby_names the state asks for in strict
// mode when no standby is known: the first standby to connect.
const AnyStandby = "*"

// FormatSyncNames is the synchronous_standby_names value for the state's
// names: "" stays "", "*" stays "*", a member name is double-quoted (so
// that names with '-' or '.' parse; PostgreSQL compares them with
// application_name ignoring case).
func FormatSyncNames(names string) string {
	if names == "" || names == AnyStandby {
		return names
	}
	return `"` + strings.ReplaceAll(names, `"`, `""`) + `"`
}

// NewPrimarySyncNames is what synchronous_standby_names a newly promoted
// primary starts with: "*" in strict mode (commits wait for the first
// standby to connect), else none.
func NewPrimarySyncNames(s Settings) string {
	if s.SynchronousMode == SyncStrict {
		return AnyStandby
	}
	return ""
}

func cmdSync(st *dbv1.State, names, standby string) *dbv1.Command {
	return &dbv1.Command{Command: &dbv1.Command_SetSynchronous{SetSynchronous: &dbv1.SetSynchronous{
		Names: names, Standby: standby, ExpectedGeneration: st.GetGeneration(),
	}}}
}

func hasName(list []string, name string) bool {
	return slices.ContainsFunc(list, func(x string) bool { return strings.EqualFold(x, name) })
}

// syncHolder says who holds every acknowledged transaction, for messages.
func syncHolder(st *dbv1.State) string {
	if rec := st.GetSynchronousStandby(); rec != "" {
		return "only the synchronous standby " + rec + " is known to hold every acknowledged transaction"
	}
	return "no standby is recorded as synchronous (the primary ran without one), so none is known to hold every acknowledged transaction"
}

// syncCandidate is PickCandidate in synchronous mode: the recorded
// synchronous standby, if it runs as a standby and may be promoted.
func syncCandidate(st *dbv1.State, obs Observed, s Settings, now time.Time) (string, error) {
	rec := st.GetSynchronousStandby()
	if rec == "" {
		return "", refusal(fsmv1.Reason_REASON_PRECONDITION, "synchronous mode (database.synchronous_mode: %s): %s; promote one anyway with gitraft db failover --to NAME --force",
			s.SynchronousMode, syncHolder(st))
	}
	m := findMember(st, rec)
	r, ok := obs.postgres(rec, now, s)
	switch {
	case m == nil:
		return "", refusal(fsmv1.Reason_REASON_PRECONDITION, "the synchronous standby %s is no longer a member", rec)
	case m.GetNoFailover():
		return "", refusal(fsmv1.Reason_REASON_PRECONDITION, "the synchronous standby %s is configured never to be promoted (no_failover)", rec)
	case !ok:
		return "", refusal(fsmv1.Reason_REASON_PRECONDITION, "the synchronous standby %s has not reported for %s; it alone holds every acknowledged transaction (gitraft db failover --to NAME --force promotes another, losing what it lacks)", rec, s.Fresh())
	case !r.GetRunning() || !r.GetInRecovery():
		return "", refusal(fsmv1.Reason_REASON_PRECONDITION, "the synchronous standby %s is not a running standby (%s)", rec, healthText(r))
	}
	return rec, nil
}

// SyncStep is the leader's next step in keeping the synchronous standby
// (no operation under way, a primary recorded), or nil. It acts only on a
// fresh report of the primary running as one, whose
// synchronous_standby_names in force is what the state asks (otherwise its
// agent is still applying it).
//
//   - off: clear both (the primary then runs asynchronously).
//   - A recorded standby the primary no longer reports synchronous is
//     un-recorded first; in strict mode only when another can take its
//     place (until then commits wait for it, so it still holds them all).
//   - Named but not recorded: recorded once synchronous and caught up;
//     given up for another after a grace (Fresh) if it does not become so.
//   - Nothing named (or "*"): name the best standby streaming from the
//     primary within max_lag_bytes (priority, then name); with none, on
//     clears the names (asynchronous: writes go on) and strict names "*".
func SyncStep(st *dbv1.State, obs Observed, s Settings, now time.Time) *dbv1.Command {
	names, rec := st.GetSynchronousStandbyNames(), st.GetSynchronousStandby()
	if !s.Synchronous() {
		if names != "" || rec != "" {
			return cmdSync(st, "", "")
		}
		return nil
	}
	ph, ok := obs.Postgres[st.GetPrimary()]
	p := ph.Report
	if !ok || now.Sub(ph.At) > s.Fresh() || !p.GetRunning() || p.GetInRecovery() {
		return nil
	}
	if p.GetSynchronousStandbyNames() != FormatSyncNames(names) {
		return nil // its agent applies the names
	}
	isSync := func(x string) bool { return hasName(p.GetSynchronous(), x) }
	// healthy: a standby streaming from the primary, caught up enough to
	// be named (within max_lag_bytes).
	healthy := func(x string) bool {
		m := findMember(st, x)
		r, ok := obs.postgres(x, now, s)
		return m != nil && !m.GetNoFailover() && ok && r.GetRunning() && r.GetInRecovery() && r.GetStreaming() &&
			hasName(p.GetReplicas(), x) && lagBytes(p.GetWriteLsn(), r.GetWriteLsn()) <= s.MaxLagBytes
	}
	pick := func(not string) string {
		var best *dbv1.Member
		for _, m := range st.GetMembers() {
			if m.GetName() == st.GetPrimary() || m.GetName() == not || !healthy(m.GetName()) {
				continue
			}
			if best == nil || m.GetPriority() > best.GetPriority() {
				best = m
			}
		}
		return best.GetName()
	}
	if rec != "" {
		if isSync(rec) {
			return nil
		}
		if s.SynchronousMode == SyncStrict && pick(rec) == "" {
			return nil // commits wait for it: it still holds them all
		}
		return cmdSync(st, names, "")
	}
	if names != "" && names != AnyStandby {
		if isSync(names) && healthy(names) {
			// Caught up: it received the WAL position the primary reported
			// (with names in force) before its own report.
			if r := obs.Postgres[names]; r.At.After(ph.At) && r.Report.GetWriteLsn() >= p.GetWriteLsn() {
				return cmdSync(st, names, names)
			}
			return nil
		}
		if now.Sub(time.Unix(0, st.GetSynchronousSinceUnixNano())) < s.Fresh() {
			return nil
		}
	}
	if names == AnyStandby {
		// Strict, with any standby: narrow to one that is synchronous.
		for _, x := range p.GetSynchronous() {
			if m := findMember(st, x); m != nil && healthy(m.GetName()) {
				return cmdSync(st, m.GetName(), "")
			}
		}
	}
	if t := pick(names); t != "" {
		return cmdSync(st, t, "")
	}
	switch {
	case s.SynchronousMode == SyncOn && names != "":
		return cmdSync(st, "", "")
	case s.SynchronousMode == SyncStrict && names == "":
		return cmdSync(st, AnyStandby, "")
	}
	return nil
}

// syncText says what synchronous mode does now, for logs and status.
func syncText(st *dbv1.State) string {
	if st.GetSynchronousStandby() != "" {
		return fmt.Sprintf("synchronous standby %s", st.GetSynchronousStandby())
	}
	if n := st.GetSynchronousStandbyNames(); n != "" {
		return fmt.Sprintf("synchronous_standby_names %s, not yet confirmed", FormatSyncNames(n))
	}
	return "no synchronous standby"
}
