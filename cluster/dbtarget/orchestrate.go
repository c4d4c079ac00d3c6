package dbtarget

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"

	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

// Settings are the cluster-wide settings the leader applies
// (database.* in gitraft serve's configuration).
type Settings struct {
	// AutomaticFailover lets the leader fail over by itself when a majority
	// of voters has seen the primary unreachable for FailoverAfter.
	AutomaticFailover bool
	FailoverAfter     time.Duration
	// MaxLagBytes bounds how far behind the primary a target may be.
	MaxLagBytes uint64
	// PauseTimeout bounds the pausing and fencing phases.
	PauseTimeout time.Duration
	// SwitchoverTimeout bounds each later phase.
	SwitchoverTimeout time.Duration
	// ReportInterval is how often agents report and nodes probe the primary.
	ReportInterval time.Duration
	// ProbeTimeout bounds one probe of the primary.
	ProbeTimeout time.Duration
	// IsolationFenceAfter is how long a pgbouncer agent keeps routing when
	// its node can neither confirm the state with the quorum (a
	// linearizable read) nor get a report to the leader; then it fences its
	// pgbouncer until both work again. The leader counts a pgbouncer that
	// has been silent this long plus IsolationMargin as fenced. It must be
	// the same on every node and below FailoverAfter.
	IsolationFenceAfter time.Duration
	// SynchronousMode is SyncOff (asynchronous replication), SyncOn or
	// SyncStrict (see SyncStep).
	SynchronousMode string
}

// Values of Settings.SynchronousMode (database.synchronous_mode).
const (
	// SyncOff: asynchronous replication; a failover may lose the
	// acknowledged transactions the standby had not received.
	SyncOff = "off"
	// SyncOn: the cluster keeps one synchronous standby when it can, and
	// a failover promotes only it; without one, the primary falls back to
	// asynchronous replication (writes go on) and no failover promotes
	// anyone without --force.
	SyncOn = "on"
	// SyncStrict: as SyncOn, but synchronous_standby_names is never
	// cleared: without a synchronous standby, commits wait.
	SyncStrict = "strict"
)

// CheckSynchronousMode checks a database.synchronous_mode value.
func CheckSynchronousMode(m string) error {
	switch m {
	case "", SyncOff, SyncOn, SyncStrict:
		return nil
	}
	return fmt.Errorf("synchronous_mode %q: want off, on or strict", m)
}

// Synchronous reports whether the settings ask for synchronous replication.
func (s Settings) Synchronous() bool {
	return s.SynchronousMode == SyncOn || s.SynchronousMode == SyncStrict
}

// Defaults of Settings.
const (
	DefaultFailoverAfter     = 5 * time.Second
	DefaultMaxLagBytes       = 16 << 20
	DefaultPauseTimeout      = 5 * time.Second
	DefaultSwitchoverTimeout = 30 * time.Second
	DefaultReportInterval    = time.Second
	DefaultProbeTimeout      = time.Second
)

// DefaultIsolationFenceAfter is the default of IsolationFenceAfter:
// failover_after less the leader's margin (two report intervals), and at
// least half of failover_after. By the time a partition has lasted long
// enough for the majority to fail over, every pgbouncer cut off with the old
// primary has fenced itself and the leader need not wait for it; and a
// leader election (about 1-2 s with the default Raft timeouts), during which
// no node can read linearizably, rarely lasts long enough to fence anyone.
func DefaultIsolationFenceAfter(failoverAfter, reportInterval time.Duration) time.Duration {
	return max(failoverAfter-2*reportInterval, failoverAfter/2)
}

// WithDefaults fills the unset settings.
func (s Settings) WithDefaults() Settings {
	if s.FailoverAfter <= 0 {
		s.FailoverAfter = DefaultFailoverAfter
	}
	if s.MaxLagBytes == 0 {
		s.MaxLagBytes = DefaultMaxLagBytes
	}
	if s.PauseTimeout <= 0 {
		s.PauseTimeout = DefaultPauseTimeout
	}
	if s.SwitchoverTimeout <= 0 {
		s.SwitchoverTimeout = DefaultSwitchoverTimeout
	}
	if s.ReportInterval <= 0 {
		s.ReportInterval = DefaultReportInterval
	}
	if s.ProbeTimeout <= 0 {
		s.ProbeTimeout = DefaultProbeTimeout
	}
	if s.IsolationFenceAfter <= 0 {
		s.IsolationFenceAfter = DefaultIsolationFenceAfter(s.FailoverAfter, s.ReportInterval)
	}
	if s.SynchronousMode == "" {
		s.SynchronousMode = SyncOff
	}
	return s
}

// Canonical is the settings as "key=value" pairs in key order, the way
// nodes tell the leader theirs so that it notices nodes configured
// differently (see DiffSettings).
func (s Settings) Canonical() string {
	return strings.Join([]string{
		fmt.Sprintf("automatic_failover=%t", s.AutomaticFailover),
		"failover_after=" + s.FailoverAfter.String(),
		"isolation_fence_after=" + s.IsolationFenceAfter.String(),
		fmt.Sprintf("max_lag_bytes=%d", s.MaxLagBytes),
		"pause_timeout=" + s.PauseTimeout.String(),
		"probe_timeout=" + s.ProbeTimeout.String(),
		"report_interval=" + s.ReportInterval.String(),
		"switchover_timeout=" + s.SwitchoverTimeout.String(),
		"synchronous_mode=" + s.SynchronousMode,
	}, " ")
}

// DiffSettings lists how other (a Canonical form) differs from mine:
// "failover_after=2s (leader: 5s)".
func DiffSettings(mine, other string) []string {
	kv := func(s string) map[string]string {
		m := map[string]string{}
		for _, f := range strings.Fields(s) {
			k, v, _ := strings.Cut(f, "=")
			m[k] = v
		}
		return m
	}
	a, b := kv(mine), kv(other)
	var keys []string
	for k := range a {
		keys = append(keys, k)
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	var out []string
	for _, k := range keys {
		if a[k] != b[k] {
			out = append(out, fmt.Sprintf("%s=%s (leader: %s)", k, b[k], a[k]))
		}
	}
	return out
}

// IsolationMargin is what the leader adds to IsolationFenceAfter before it
// counts a silent pgbouncer as fenced by itself: the agent's own lateness
// (it fences at expiry, plus the admin command) and the time a node takes to
// notice a change of leader.
func (s Settings) IsolationMargin() time.Duration { return 2 * s.ReportInterval }

// Fresh is how old a report may be and still count.
func (s Settings) Fresh() time.Duration { return max(3*s.ReportInterval, 2*time.Second) }

// Heard is one report and when the leader received it (by its own clock).
type Heard[T any] struct {
	Report T
	At     time.Time
}

// Observed is what the leader has heard from the agents; it lives in the
// leader's memory only.
type Observed struct {
	Postgres map[string]Heard[*dbv1.PostgresReport] // by member
	Bouncers map[string]Heard[*dbv1.BouncerReport]  // by pgbouncer
	Probes   map[string]Heard[*dbv1.ProbeReport]    // by node
	// Voters are the Raft voters' node IDs.
	Voters []string
	// Since is when this node became leader; reports it has not had time to
	// hear yet are not taken for silence.
	Since time.Time
}

func (o Observed) postgres(name string, now time.Time, s Settings) (*dbv1.PostgresReport, bool) {
	h, ok := o.Postgres[name]
	if !ok || now.Sub(h.At) > s.Fresh() {
		return nil, false
	}
	return h.Report, true
}

func (o Observed) bouncer(name string, now time.Time, s Settings) (*dbv1.BouncerReport, bool) {
	h, ok := o.Bouncers[name]
	if !ok || now.Sub(h.At) > s.Fresh() {
		return nil, false
	}
	return h.Report, true
}

// Decision is the leader's next step: a command to propose, or nothing
// (Command nil) with what it waits for.
type Decision struct {
	Command *dbv1.Command
	Why     string
}

// ErrRefused is wrapped by a Refusal.
var ErrRefused = errors.New("refused")

// Refusal is the leader's refusal of an operator's request before anything
// is proposed: the target is not ready (down, lagging, not a standby).
type Refusal struct {
	Reason  fsmv1.Reason
	Message string
}

func (r *Refusal) Error() string { return r.Message }
func (r *Refusal) Unwrap() error { return ErrRefused }

func refusal(reason fsmv1.Reason, format string, args ...any) *Refusal {
	return &Refusal{Reason: reason, Message: fmt.Sprintf(format, args...)}
}

// Bytes formats a byte count for people: 512 B, 3.2 MB.
func Bytes(n uint64) string {
	const unit = 1000
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %cB", float64(n)/float64(div), "kMGTPE"[exp])
}

// CheckSwitchover checks a switchover to target now, with what the leader
// heard: the target is a healthy, streaming standby within MaxLagBytes of a
// running primary. The state machine checks the rest again when it applies.
func CheckSwitchover(st *dbv1.State, obs Observed, s Settings, target string, now time.Time) error {
	if op := st.GetOperation(); op != nil {
		return refusal(fsmv1.Reason_REASON_PRECONDITION, "%s; wait for it to finish, or roll it back with gitraft db abort", describeOp(op))
	}
	m := findMember(st, target)
	switch {
	case target == "":
		return refusal(fsmv1.Reason_REASON_INVALID, "name the member to switch over to (--to); members: %s", memberList(st))
	case m == nil:
		return refusal(fsmv1.Reason_REASON_NOT_FOUND, "no member named %q; members: %s", target, memberList(st))
	case target == st.GetPrimary():
		return refusal(fsmv1.Reason_REASON_INVALID, "%s is already the primary (generation %d)", target, st.GetGeneration())
	case st.GetPrimary() == "":
		return refusal(fsmv1.Reason_REASON_PRECONDITION, "there is no primary to switch over from; promote %s with gitraft db failover --to %s", target, target)
	case m.GetNoFailover():
		return refusal(fsmv1.Reason_REASON_PRECONDITION, "%s is configured never to be promoted (database.postgres.no_failover on node %s)", target, m.GetNode())
	}
	p, ok := obs.postgres(st.GetPrimary(), now, s)
	if !ok {
		return refusal(fsmv1.Reason_REASON_PRECONDITION, "the primary %s has not reported for %s (is gitraft serve running on node %s?); if it is gone, use gitraft db failover --to %s",
			st.GetPrimary(), s.Fresh(), findMember(st, st.GetPrimary()).GetNode(), target)
	}
	if !p.GetRunning() || p.GetInRecovery() {
		return refusal(fsmv1.Reason_REASON_PRECONDITION, "the primary %s is not running as a primary (%s); if it is gone, use gitraft db failover --to %s", st.GetPrimary(), healthText(p), target)
	}
	for _, b := range st.GetBouncers() {
		if _, ok := obs.bouncer(b.GetName(), now, s); !ok {
			return refusal(fsmv1.Reason_REASON_PRECONDITION, "pgbouncer %s has not reported for %s, so it could not pause (is gitraft serve running on node %s?); bring it back, or forget it with gitraft db remove %s",
				b.GetName(), s.Fresh(), b.GetNode(), b.GetName())
		}
	}
	return checkStandby(st, obs, s, m, p.GetWriteLsn(), now)
}

// checkStandby checks that m is a running, streaming standby within the lag
// bound of ref.
func checkStandby(st *dbv1.State, obs Observed, s Settings, m *dbv1.Member, ref uint64, now time.Time) error {
	t, ok := obs.postgres(m.GetName(), now, s)
	if !ok {
		return refusal(fsmv1.Reason_REASON_PRECONDITION, "target %s is down: no report from its agent for %s (is gitraft serve running on node %s with database.postgres.member: %s?)",
			m.GetName(), s.Fresh(), m.GetNode(), m.GetName())
	}
	if !t.GetRunning() {
		return refusal(fsmv1.Reason_REASON_PRECONDITION, "target %s is down: %s", m.GetName(), healthText(t))
	}
	if !t.GetInRecovery() {
		return refusal(fsmv1.Reason_REASON_PRECONDITION, "target %s is not a standby: it runs as a primary outside the cluster's record (its agent demotes it)", m.GetName())
	}
	if !t.GetStreaming() {
		return refusal(fsmv1.Reason_REASON_PRECONDITION, "target %s is not streaming from the primary %s (its WAL receiver is not connected)", m.GetName(), st.GetPrimary())
	}
	if lag := lagBytes(ref, t.GetReplayLsn()); lag > s.MaxLagBytes {
		return refusal(fsmv1.Reason_REASON_PRECONDITION, "target %s lags %s behind the primary (replayed %s of %s); the limit is %s (database.max_lag_bytes)",
			m.GetName(), Bytes(lag), LSN(t.GetReplayLsn()), LSN(ref), Bytes(s.MaxLagBytes))
	}
	return nil
}

func lagBytes(ref, pos uint64) uint64 {
	if pos >= ref {
		return 0
	}
	return ref - pos
}

func healthText(r *dbv1.PostgresReport) string {
	switch {
	case r.GetRunning() && r.GetInRecovery():
		return "running as a standby"
	case r.GetRunning():
		return "running as a primary"
	case r.GetError() != "":
		return "not running: " + r.GetError()
	}
	return "not running"
}

// position is how far a standby has WAL: received or replayed.
func position(r *dbv1.PostgresReport) uint64 { return max(r.GetWriteLsn(), r.GetReplayLsn()) }

// PickCandidate chooses the member to fail over to: among running standbys
// that may be promoted and that are within MaxLagBytes of the best position
// known (the primary's last report, or the furthest standby), the one with
// the most WAL, then the highest priority, then the first by name. If none
// fits, it says why each was passed over.
func PickCandidate(st *dbv1.State, obs Observed, s Settings, now time.Time) (string, error) {
	if s.Synchronous() {
		return syncCandidate(st, obs, s, now)
	}
	var ref uint64
	if h, ok := obs.Postgres[st.GetPrimary()]; ok {
		ref = h.Report.GetWriteLsn()
	}
	type cand struct {
		m   *dbv1.Member
		pos uint64
	}
	var cands []cand
	var why []string
	for _, m := range st.GetMembers() {
		if m.GetName() == st.GetPrimary() {
			continue
		}
		r, ok := obs.postgres(m.GetName(), now, s)
		switch {
		case m.GetNoFailover():
			why = append(why, m.GetName()+": no_failover")
		case !ok:
			why = append(why, m.GetName()+": no recent report")
		case !r.GetRunning():
			why = append(why, m.GetName()+": "+healthText(r))
		case !r.GetInRecovery():
			why = append(why, m.GetName()+": not a standby")
		default:
			cands = append(cands, cand{m, position(r)})
			ref = max(ref, position(r))
			continue
		}
	}
	var ok []cand
	for _, c := range cands {
		if lag := lagBytes(ref, c.pos); lag > s.MaxLagBytes {
			why = append(why, fmt.Sprintf("%s: lags %s (limit %s, database.max_lag_bytes)", c.m.GetName(), Bytes(lag), Bytes(s.MaxLagBytes)))
			continue
		}
		ok = append(ok, c)
	}
	if len(ok) == 0 {
		if len(why) == 0 {
			return "", refusal(fsmv1.Reason_REASON_PRECONDITION, "no standby to promote: the primary is the only member")
		}
		return "", refusal(fsmv1.Reason_REASON_PRECONDITION, "no standby can be promoted (%s)", strings.Join(why, "; "))
	}
	slices.SortFunc(ok, func(a, b cand) int {
		if c := cmp.Compare(b.pos, a.pos); c != 0 {
			return c
		}
		if c := cmp.Compare(b.m.GetPriority(), a.m.GetPriority()); c != 0 {
			return c
		}
		return strings.Compare(a.m.GetName(), b.m.GetName())
	})
	return ok[0].m.GetName(), nil
}

// CheckFailover checks a failover to target (or, when target is "", picks
// one) and returns the member to promote. A target named by the operator is
// held to the lag bound as a switchover target is, unless force: WAL it has
// not received is lost with the acknowledged transactions in it, and WAL it
// has not replayed delays its first write. The refusal says how much of
// each.
func CheckFailover(st *dbv1.State, obs Observed, s Settings, target string, force bool, now time.Time) (string, error) {
	if op := st.GetOperation(); op != nil {
		return "", refusal(fsmv1.Reason_REASON_PRECONDITION, "%s; wait for it to finish, or roll it back with gitraft db abort", describeOp(op))
	}
	if target == "" {
		return PickCandidate(st, obs, s, now)
	}
	m := findMember(st, target)
	switch {
	case m == nil:
		return "", refusal(fsmv1.Reason_REASON_NOT_FOUND, "no member named %q; members: %s", target, memberList(st))
	case target == st.GetPrimary():
		return "", refusal(fsmv1.Reason_REASON_INVALID, "%s is already the primary (generation %d)", target, st.GetGeneration())
	case m.GetNoFailover():
		return "", refusal(fsmv1.Reason_REASON_PRECONDITION, "%s is configured never to be promoted (database.postgres.no_failover on node %s)", target, m.GetNode())
	}
	r, ok := obs.postgres(target, now, s)
	switch {
	case !ok:
		return "", refusal(fsmv1.Reason_REASON_PRECONDITION, "target %s is down: no report from its agent for %s (is gitraft serve running on node %s with database.postgres.member: %s?)",
			target, s.Fresh(), m.GetNode(), target)
	case !r.GetRunning():
		return "", refusal(fsmv1.Reason_REASON_PRECONDITION, "target %s is down: %s", target, healthText(r))
	case !r.GetInRecovery():
		return "", refusal(fsmv1.Reason_REASON_PRECONDITION, "target %s is not a standby", target)
	}
	if s.Synchronous() && !force {
		if rec := st.GetSynchronousStandby(); target != rec {
			return "", refusal(fsmv1.Reason_REASON_PRECONDITION, "synchronous mode (database.synchronous_mode: %s): %s; promoting %s may lose acknowledged transactions: fail over to it anyway with --force",
				s.SynchronousMode, syncHolder(st), target)
		}
		// It holds every acknowledged transaction: nothing is lost,
		// whatever it has yet to replay.
		return target, nil
	}
	// The best known WAL position: the primary's, while it reports as a
	// running primary; otherwise its last report and every running standby.
	var ref uint64
	refName := "the best known WAL position"
	if p, ok := obs.postgres(st.GetPrimary(), now, s); ok && p.GetRunning() && !p.GetInRecovery() {
		ref, refName = p.GetWriteLsn(), "the primary "+st.GetPrimary()+", which still runs"
	} else {
		if h, ok := obs.Postgres[st.GetPrimary()]; ok {
			ref = h.Report.GetWriteLsn()
		}
		for _, o := range st.GetMembers() {
			if or, ok := obs.postgres(o.GetName(), now, s); ok && o.GetName() != st.GetPrimary() && or.GetRunning() {
				ref = max(ref, position(or))
			}
		}
	}
	lost, behind := lagBytes(ref, position(r)), lagBytes(ref, r.GetReplayLsn())
	if force || (lost <= s.MaxLagBytes && behind <= s.MaxLagBytes) {
		return target, nil
	}
	what := fmt.Sprintf("nothing acknowledged would be lost (it received all but %s), but it must replay %s before it takes writes", Bytes(lost), Bytes(behind))
	if lost > 0 {
		what = fmt.Sprintf("a failover now loses the %s of WAL it has not received, and the acknowledged transactions in it; it must also replay %s before it takes writes", Bytes(lost), Bytes(behind))
	}
	hint := "wait for it to catch up"
	if strings.HasPrefix(refName, "the primary") {
		hint = fmt.Sprintf("wait for it to catch up, or switch over instead (gitraft db switchover --to %s loses nothing)", target)
	}
	return "", refusal(fsmv1.Reason_REASON_PRECONDITION, "target %s lags %s behind %s (%s, received %s, replayed %s); the limit is %s (database.max_lag_bytes): %s; %s, or fail over anyway with --force",
		target, Bytes(max(lost, behind)), refName, LSN(ref), LSN(position(r)), LSN(r.GetReplayLsn()), Bytes(s.MaxLagBytes), what, hint)
}

// FailoverVotes counts the voters whose fresh probe says the state's primary
// has been unreachable for FailoverAfter, and how many votes a failover needs.
func FailoverVotes(st *dbv1.State, obs Observed, s Settings, now time.Time) (votes, needed int) {
	needed = len(obs.Voters)/2 + 1
	for _, v := range obs.Voters {
		h, ok := obs.Probes[v]
		if !ok || now.Sub(h.At) > s.Fresh() {
			continue
		}
		p := h.Report
		if p.GetPrimary() == st.GetPrimary() && p.GetGeneration() == st.GetGeneration() && !p.GetReachable() &&
			time.Duration(p.GetUnreachableNanos()) >= s.FailoverAfter {
			votes++
		}
	}
	return votes, needed
}

// AutomaticFailover says what automatic failover would do now: the votes,
// and why it is held back although they suffice ("" if it is not).
func AutomaticFailover(st *dbv1.State, obs Observed, s Settings, now time.Time) *dbv1.FailoverStatus {
	fs := &dbv1.FailoverStatus{Automatic: s.AutomaticFailover}
	if st.GetPrimary() == "" {
		return fs
	}
	votes, needed := FailoverVotes(st, obs, s, now)
	fs.Votes, fs.Needed = int32(votes), int32(needed)
	if votes < needed {
		return fs
	}
	switch {
	case !s.AutomaticFailover:
		fs.Blocked = fmt.Sprintf("the primary %s is unreachable from %d of %d voters, but automatic failover is off (database.automatic_failover); fail over by hand with gitraft db failover", st.GetPrimary(), votes, len(obs.Voters))
	case st.GetPaused():
		fs.Blocked = fmt.Sprintf("the primary %s is unreachable from %d of %d voters, but automatic failover is %s; gitraft db resume ends the pause", st.GetPrimary(), votes, len(obs.Voters), pausedText(st))
	case st.GetOperation() != nil:
		fs.Blocked = describeOp(st.GetOperation())
	default:
		if _, err := PickCandidate(st, obs, s, now); err != nil {
			fs.Blocked = err.Error()
		}
	}
	return fs
}

func cmdAdvance(op *dbv1.Operation, to dbv1.Phase, timeout time.Duration, lsn uint64, note string) *dbv1.Command {
	return &dbv1.Command{Command: &dbv1.Command_Advance{Advance: &dbv1.AdvancePhase{
		OpId: op.GetId(), From: op.GetPhase(), To: to, TimeoutNanos: int64(timeout), WaitLsn: lsn, Note: note,
	}}}
}

func cmdFinish(op *dbv1.Operation, out dbv1.Outcome, reason string) *dbv1.Command {
	return &dbv1.Command{Command: &dbv1.Command_Finish{Finish: &dbv1.FinishOperation{
		OpId: op.GetId(), From: op.GetPhase(), Outcome: out, Reason: reason,
	}}}
}

func wait(format string, args ...any) Decision { return Decision{Why: fmt.Sprintf(format, args...)} }

func do(c *dbv1.Command, format string, args ...any) Decision {
	return Decision{Command: c, Why: fmt.Sprintf(format, args...)}
}

// Next is the leader's next step, from the replicated state, what it heard
// from the agents and the settings. It is a pure function: the leader loop
// proposes its command, the state machine checks it again, and a new leader
// reaches the same decisions from the same state and fresh reports.
func Next(st *dbv1.State, obs Observed, s Settings, now time.Time) Decision {
	if settle := 2 * s.ReportInterval; now.Sub(obs.Since) < settle {
		return wait("hearing from the agents after becoming leader")
	}
	op := st.GetOperation()
	if op == nil {
		return idle(st, obs, s, now)
	}
	past := op.GetDeadlineUnixNano() != 0 && now.UnixNano() > op.GetDeadlineUnixNano()
	rollBack := func(format string, args ...any) Decision {
		return do(cmdAdvance(op, dbv1.Phase_PHASE_ROLLING_BACK, s.SwitchoverTimeout, 0, fmt.Sprintf(format, args...)), "roll back: "+format, args...)
	}
	switch op.GetPhase() {
	case dbv1.Phase_PHASE_SCHEDULED:
		if now.UnixNano() < op.GetAtUnixNano() {
			return wait("switchover to %s scheduled at %s", op.GetTarget(), time.Unix(0, op.GetAtUnixNano()).UTC().Format(time.RFC3339))
		}
		if err := checkScheduled(st, obs, s, op, now); err != nil {
			return do(cmdFinish(op, dbv1.Outcome_OUTCOME_ABORTED, "at the scheduled time: "+err.Error()), "scheduled switchover cannot start: %v", err)
		}
		return do(cmdAdvance(op, dbv1.Phase_PHASE_CHECKPOINTING, s.SwitchoverTimeout, 0, ""), "scheduled switchover to %s begins", op.GetTarget())

	case dbv1.Phase_PHASE_CHECKPOINTING:
		// The old primary runs CHECKPOINT while clients still write, so
		// that its fast stop under the pause has little left to flush. A
		// checkpoint that fails or takes too long only makes that stop
		// slower: the switchover goes on.
		pause := func(note, format string, args ...any) Decision {
			return do(cmdAdvance(op, dbv1.Phase_PHASE_PAUSING, s.PauseTimeout, 0, note), format, args...)
		}
		r, _ := obs.postgres(op.GetOldPrimary(), now, s)
		if step := r.GetStep(); step.GetOpId() == op.GetId() && step.GetPhase() == op.GetPhase() {
			if step.GetError() != "" {
				return pause(fmt.Sprintf("CHECKPOINT on %s failed (%s); its stop may take longer", op.GetOldPrimary(), step.GetError()),
					"CHECKPOINT on the old primary %s failed: %s; pause every pgbouncer anyway", op.GetOldPrimary(), step.GetError())
			}
			if step.GetDone() {
				return pause("", "old primary %s checkpointed; pause every pgbouncer", op.GetOldPrimary())
			}
		}
		if past {
			return pause(fmt.Sprintf("%s did not report its CHECKPOINT within %s; its stop may take longer", op.GetOldPrimary(), s.SwitchoverTimeout),
				"the old primary %s did not report its CHECKPOINT in time; pause every pgbouncer anyway", op.GetOldPrimary())
		}
		return wait("the old primary %s to checkpoint", op.GetOldPrimary())

	case dbv1.Phase_PHASE_PAUSING:
		var notYet []string
		for _, b := range st.GetBouncers() {
			r, _ := obs.bouncer(b.GetName(), now, s)
			step := r.GetStep()
			if step.GetOpId() == op.GetId() && step.GetPhase() == op.GetPhase() {
				if step.GetError() != "" {
					return rollBack("pgbouncer %s could not pause: %s", b.GetName(), step.GetError())
				}
				if step.GetDone() {
					continue
				}
			}
			notYet = append(notYet, b.GetName())
		}
		if len(notYet) > 0 {
			if past {
				return rollBack("pgbouncer %s did not report paused within %s (database.pause_timeout)", strings.Join(notYet, ", "), s.PauseTimeout)
			}
			return wait("pgbouncer %s to pause", strings.Join(notYet, ", "))
		}
		if t, ok := obs.postgres(op.GetTarget(), now, s); !ok || !t.GetRunning() || !t.GetInRecovery() {
			return rollBack("target %s is no longer a running standby", op.GetTarget())
		}
		return do(cmdAdvance(op, dbv1.Phase_PHASE_STOPPING_OLD, s.SwitchoverTimeout, 0, ""), "every pgbouncer paused; stop the old primary %s", op.GetOldPrimary())

	case dbv1.Phase_PHASE_STOPPING_OLD:
		r, _ := obs.postgres(op.GetOldPrimary(), now, s)
		if step := r.GetStep(); step.GetOpId() == op.GetId() && step.GetPhase() == op.GetPhase() {
			if step.GetError() != "" {
				return rollBack("the old primary %s could not be stopped: %s", op.GetOldPrimary(), step.GetError())
			}
			if step.GetDone() {
				return do(cmdAdvance(op, dbv1.Phase_PHASE_PROMOTING, s.SwitchoverTimeout, step.GetLsn(), ""),
					"old primary %s stopped at %s; promote %s once it replayed that", op.GetOldPrimary(), LSN(step.GetLsn()), op.GetTarget())
			}
		}
		if past {
			return rollBack("the old primary %s did not report stopped within %s (database.switchover_timeout)", op.GetOldPrimary(), s.SwitchoverTimeout)
		}
		return wait("the old primary %s to stop", op.GetOldPrimary())

	case dbv1.Phase_PHASE_PROMOTING:
		r, fresh := obs.postgres(op.GetTarget(), now, s)
		step := r.GetStep()
		mine := step.GetOpId() == op.GetId() && step.GetPhase() == op.GetPhase()
		if mine && step.GetDone() {
			return do(&dbv1.Command{Command: &dbv1.Command_SetPrimary{SetPrimary: &dbv1.SetPrimary{
				OpId: op.GetId(), Name: op.GetTarget(), ExpectedGeneration: st.GetGeneration(), TimeoutNanos: int64(s.SwitchoverTimeout),
				SynchronousStandbyNames: NewPrimarySyncNames(s),
			}}}, "%s promoted; record it as the primary (generation %d)", op.GetTarget(), st.GetGeneration()+1)
		}
		failed := mine && step.GetError() != ""
		if !failed && !past {
			return wait("%s to be promoted", op.GetTarget())
		}
		if fresh && r.GetRunning() && !r.GetInRecovery() {
			// Promoted after all, though the agent saw an error: only forward.
			return do(&dbv1.Command{Command: &dbv1.Command_SetPrimary{SetPrimary: &dbv1.SetPrimary{
				OpId: op.GetId(), Name: op.GetTarget(), ExpectedGeneration: st.GetGeneration(), TimeoutNanos: int64(s.SwitchoverTimeout),
				SynchronousStandbyNames: NewPrimarySyncNames(s),
			}}}, "%s runs as a primary; record it (generation %d)", op.GetTarget(), st.GetGeneration()+1)
		}
		if failed {
			return rollBack("%s could not be promoted: %s", op.GetTarget(), step.GetError())
		}
		return rollBack("%s was not promoted within %s (database.switchover_timeout)", op.GetTarget(), s.SwitchoverTimeout)

	case dbv1.Phase_PHASE_REPOINTING:
		var notYet []string
		for _, b := range st.GetBouncers() {
			if r, _ := obs.bouncer(b.GetName(), now, s); r.GetAppliedGeneration() < st.GetGeneration() {
				notYet = append(notYet, b.GetName())
			}
		}
		note := ""
		if len(notYet) > 0 {
			if !past {
				return wait("pgbouncer %s to apply generation %d", strings.Join(notYet, ", "), st.GetGeneration())
			}
			note = fmt.Sprintf("pgbouncer %s did not apply generation %d within %s; it catches up when it reports again", strings.Join(notYet, ", "), st.GetGeneration(), s.SwitchoverTimeout)
		}
		if op.GetKind() == dbv1.Kind_KIND_SWITCHOVER && op.GetOldPrimary() != "" {
			return do(cmdAdvance(op, dbv1.Phase_PHASE_DEMOTING, s.SwitchoverTimeout, 0, note), "pgbouncers point at %s; demote the old primary %s", op.GetTarget(), op.GetOldPrimary())
		}
		return do(cmdFinish(op, dbv1.Outcome_OUTCOME_DONE, note), "pgbouncers point at %s; %s done", op.GetTarget(), KindName(op.GetKind()))

	case dbv1.Phase_PHASE_DEMOTING:
		r, _ := obs.postgres(op.GetOldPrimary(), now, s)
		if step := r.GetStep(); step.GetOpId() == op.GetId() && step.GetPhase() == op.GetPhase() {
			if step.GetError() != "" {
				return do(cmdFinish(op, dbv1.Outcome_OUTCOME_DONE, fmt.Sprintf("the old primary %s could not become a standby (%s); it stays stopped", op.GetOldPrimary(), step.GetError())),
					"old primary %s failed to demote: %s", op.GetOldPrimary(), step.GetError())
			}
			if step.GetDone() {
				return do(cmdFinish(op, dbv1.Outcome_OUTCOME_DONE, ""), "old primary %s follows %s; switchover done", op.GetOldPrimary(), op.GetTarget())
			}
		}
		if past {
			return do(cmdFinish(op, dbv1.Outcome_OUTCOME_DONE, fmt.Sprintf("the old primary %s did not report becoming a standby within %s; its agent demotes it when it sees it running", op.GetOldPrimary(), s.SwitchoverTimeout)),
				"old primary %s did not demote in time", op.GetOldPrimary())
		}
		return wait("the old primary %s to become a standby of %s", op.GetOldPrimary(), op.GetTarget())

	case dbv1.Phase_PHASE_FENCING:
		return fencing(st, obs, s, op, now, past, rollBack)

	case dbv1.Phase_PHASE_ROLLING_BACK:
		if op.GetOldPrimary() == "" {
			return do(cmdFinish(op, dbv1.Outcome_OUTCOME_ABORTED, ""), "rolled back")
		}
		r, fresh := obs.postgres(op.GetOldPrimary(), now, s)
		if !fresh && op.GetKind() == dbv1.Kind_KIND_FAILOVER {
			return do(cmdFinish(op, dbv1.Outcome_OUTCOME_ABORTED, ""), "rolled back; the old primary %s does not report", op.GetOldPrimary())
		}
		if step := r.GetStep(); step.GetOpId() == op.GetId() && step.GetPhase() == op.GetPhase() {
			if step.GetError() != "" {
				return do(cmdFinish(op, dbv1.Outcome_OUTCOME_ABORTED, fmt.Sprintf("the old primary %s could not be started again: %s", op.GetOldPrimary(), step.GetError())),
					"rolled back, but %s did not start: %s", op.GetOldPrimary(), step.GetError())
			}
			if step.GetDone() {
				return do(cmdFinish(op, dbv1.Outcome_OUTCOME_ABORTED, ""), "rolled back; %s is the primary again", op.GetOldPrimary())
			}
		}
		if past {
			return do(cmdFinish(op, dbv1.Outcome_OUTCOME_ABORTED, fmt.Sprintf("the old primary %s did not report running again within %s", op.GetOldPrimary(), s.SwitchoverTimeout)),
				"rolled back without word from %s", op.GetOldPrimary())
		}
		return wait("the old primary %s to run again", op.GetOldPrimary())
	}
	return wait("operation %d in phase %s, which this leader does not drive", op.GetId(), PhaseName(op.GetPhase()))
}

// fencing decides in a failover's fencing phase. Promotion waits until no
// pgbouncer can still route to the old primary: each one either reported
// fenced for this operation, or has been silent (no report reached this
// leader since the later of its last report and this leader's start) for
// IsolationFenceAfter plus IsolationMargin, by which time its agent fenced it
// for being cut off. A silent pgbouncer is waited for past the phase's
// deadline (the wait is bounded by that lease). One that reports but has not
// fenced by the deadline rolls the failover back, unless the old primary's
// agent reports that it does not run as a primary, so a pgbouncer that
// routes to it reaches no writable server.
func fencing(st *dbv1.State, obs Observed, s Settings, op *dbv1.Operation, now time.Time, past bool, rollBack func(string, ...any) Decision) Decision {
	lease := s.IsolationFenceAfter + s.IsolationMargin()
	var fenced int
	var silent, waiting, unfenced, forget []string
	for _, b := range st.GetBouncers() {
		name := b.GetName()
		h, heard := obs.Bouncers[name]
		step := h.Report.GetStep()
		mine := heard && step.GetOpId() == op.GetId() && step.GetPhase() == op.GetPhase()
		if mine && step.GetDone() {
			fenced++
			continue
		}
		last := obs.Since
		if heard && h.At.After(last) {
			last = h.At
		}
		switch quiet := now.Sub(last); {
		case quiet >= lease:
			silent = append(silent, name)
		case !heard || quiet > s.Fresh():
			waiting = append(waiting, fmt.Sprintf("%s (silent: it fences itself after %s; counted as fenced %s after its last report)", name, s.IsolationFenceAfter, lease))
		case mine && step.GetError() != "":
			unfenced, forget = append(unfenced, fmt.Sprintf("%s (%s)", name, step.GetError())), append(forget, "gitraft db remove "+name)
		default:
			unfenced, forget = append(unfenced, name), append(forget, "gitraft db remove "+name)
		}
	}
	old, oldFresh := obs.postgres(op.GetOldPrimary(), now, s)
	if oldFresh && old.GetRunning() && !old.GetInRecovery() {
		if past {
			return rollBack("the old primary %s still runs as a primary and could not be fenced within %s", op.GetOldPrimary(), s.PauseTimeout)
		}
		return wait("the old primary %s to be stopped by its agent", op.GetOldPrimary())
	}
	var notes []string
	if len(unfenced) > 0 {
		if !past {
			return wait("pgbouncer %s to fence", strings.Join(append(unfenced, waiting...), ", "))
		}
		if !oldFresh {
			return rollBack("pgbouncer %s did not fence within %s (database.pause_timeout) and may still route to the old primary %s, whose agent does not report; fix it, or forget it (%s)",
				strings.Join(unfenced, ", "), s.PauseTimeout, op.GetOldPrimary(), strings.Join(forget, "; "))
		}
		notes = append(notes, fmt.Sprintf("pgbouncer %s not fenced; the old primary %s does not run as a primary (%s)", strings.Join(unfenced, ", "), op.GetOldPrimary(), healthText(old)))
	}
	if len(waiting) > 0 {
		return wait("pgbouncer %s", strings.Join(waiting, ", "))
	}
	if len(silent) > 0 {
		notes = append(notes, fmt.Sprintf("pgbouncer %s silent for over %s: fenced by its agent (database.isolation_fence_after)", strings.Join(silent, ", "), lease))
	}
	total := len(st.GetBouncers())
	return do(cmdAdvance(op, dbv1.Phase_PHASE_PROMOTING, s.SwitchoverTimeout, 0, strings.Join(notes, "; ")),
		"%d of %d pgbouncers fenced, %d silent long enough to have fenced themselves; promote %s", fenced, total, len(silent), op.GetTarget())
}

func checkScheduled(st *dbv1.State, obs Observed, s Settings, op *dbv1.Operation, now time.Time) error {
	cp := proto.CloneOf(st)
	cp.Operation = nil
	return CheckSwitchover(cp, obs, s, op.GetTarget(), now)
}

// idle decides with no operation under way: record the first primary, or
// fail over by itself.
func idle(st *dbv1.State, obs Observed, s Settings, now time.Time) Decision {
	if st.GetGeneration() == 0 {
		var primaries []string
		for _, m := range st.GetMembers() {
			if r, ok := obs.postgres(m.GetName(), now, s); ok && r.GetRunning() && !r.GetInRecovery() {
				primaries = append(primaries, m.GetName())
			}
		}
		switch len(primaries) {
		case 0:
			return wait("a member running as a primary, to record it as the first primary")
		case 1:
			return do(&dbv1.Command{Command: &dbv1.Command_SetPrimary{SetPrimary: &dbv1.SetPrimary{Name: primaries[0]}}},
				"%s is the only member running as a primary; record it (generation 1)", primaries[0])
		}
		return wait("several members run as primaries (%s); not choosing one: stop all but one", strings.Join(primaries, ", "))
	}
	fs := AutomaticFailover(st, obs, s, now)
	if fs.GetVotes() < fs.GetNeeded() {
		if c := SyncStep(st, obs, s, now); c != nil {
			x := c.GetSetSynchronous()
			return do(c, "synchronous mode %s: synchronous_standby_names %q, synchronous standby %q (was %s)", s.SynchronousMode, FormatSyncNames(x.GetNames()), x.GetStandby(), syncText(st))
		}
		return Decision{}
	}
	if fs.GetBlocked() != "" {
		return wait("%s", fs.GetBlocked())
	}
	target, err := PickCandidate(st, obs, s, now)
	if err != nil {
		return wait("%v", err)
	}
	return do(&dbv1.Command{Command: &dbv1.Command_Begin{Begin: &dbv1.BeginOperation{
		Kind: dbv1.Kind_KIND_FAILOVER, Target: target, ExpectedGeneration: st.GetGeneration(),
		Automatic: true, RequestedBy: "automatic failover", TimeoutNanos: int64(s.PauseTimeout),
	}}}, "the primary %s is unreachable from %d of %d voters for %s; fail over to %s", st.GetPrimary(), fs.GetVotes(), len(obs.Voters), s.FailoverAfter, target)
}

// Writable is the read-only signal as the replicated state alone gives it:
// whether a primary is recorded and no operation holds writes back.
func Writable(st *dbv1.State) (bool, string) {
	if st.GetPrimary() == "" {
		return false, "no primary is recorded yet"
	}
	op := st.GetOperation()
	switch op.GetPhase() {
	case dbv1.Phase_PHASE_UNSPECIFIED, dbv1.Phase_PHASE_SCHEDULED, dbv1.Phase_PHASE_CHECKPOINTING, dbv1.Phase_PHASE_DEMOTING:
		return true, ""
	}
	return false, describeOp(op)
}
