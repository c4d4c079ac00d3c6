package dbtarget

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"

	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

// HistoryLimit is how many finished operations the state keeps.
const HistoryLimit = 100

// State is the PostgreSQL failover-target part of the replicated state. Apply is
// deterministic: time comes from the entry, never the local clock.
// It is not safe for concurrent use; the cluster's FSM serialises access.
type State struct {
	st *dbv1.State
}

// NewState returns an empty state.
func NewState() *State { return &State{st: &dbv1.State{}} }

// View returns a copy of the state, safe to keep and to read without locks.
func (s *State) View() *dbv1.State { return proto.CloneOf(s.st) }

// UpdatedIndex is the Raft index of the last entry that changed the state.
func (s *State) UpdatedIndex() uint64 { return s.st.GetUpdatedIndex() }

// Generation is the current generation (0 before the first primary).
func (s *State) Generation() uint64 { return s.st.GetGeneration() }

// Snapshot returns a copy of the state for a Raft snapshot; later applies
// must not change what it returns.
func (s *State) Snapshot() *dbv1.Snapshot { return &dbv1.Snapshot{State: s.View()} }

// Restore builds a state from a snapshot.
func Restore(snap *dbv1.Snapshot) (*State, error) {
	st := proto.CloneOf(snap.GetState())
	if st == nil {
		st = &dbv1.State{}
	}
	if st.GetPrimary() != "" && findMember(st, st.GetPrimary()) == nil {
		return nil, fmt.Errorf("database snapshot: primary %q is not a member", st.GetPrimary())
	}
	return &State{st: st}, nil
}

func refuse(reason fsmv1.Reason, format string, args ...any) *fsmv1.Result {
	return &fsmv1.Result{Refusal: &fsmv1.Refusal{Reason: reason, Message: fmt.Sprintf(format, args...)}}
}

// Apply applies one committed database command at a Raft index, with the
// leader's time from the entry. A refusal goes in the result's Refusal.
func (s *State) Apply(index uint64, now time.Time, c *dbv1.Command) *fsmv1.Result {
	r := s.apply(index, now, c)
	if r.GetRefusal() == nil {
		s.st.UpdatedIndex = index
		r.Database = &dbv1.Result{
			Operation:  proto.CloneOf(s.st.GetOperation()),
			Primary:    s.st.GetPrimary(),
			Generation: s.st.GetGeneration(),
		}
	}
	return r
}

func (s *State) apply(index uint64, now time.Time, c *dbv1.Command) *fsmv1.Result {
	switch x := c.GetCommand().(type) {
	case *dbv1.Command_RegisterMember:
		return s.registerMember(now, x.RegisterMember.GetMember())
	case *dbv1.Command_RegisterBouncer:
		return s.registerBouncer(now, x.RegisterBouncer.GetBouncer())
	case *dbv1.Command_Forget:
		return s.forget(x.Forget.GetName())
	case *dbv1.Command_Begin:
		return s.begin(index, now, x.Begin)
	case *dbv1.Command_Advance:
		return s.advance(now, x.Advance)
	case *dbv1.Command_SetPrimary:
		return s.setPrimary(index, now, x.SetPrimary)
	case *dbv1.Command_Finish:
		return s.finish(now, x.Finish)
	case *dbv1.Command_Abort:
		return s.abort(now, x.Abort)
	case *dbv1.Command_SetSynchronous:
		return s.setSynchronous(now, x.SetSynchronous)
	case *dbv1.Command_SetPaused:
		p := x.SetPaused
		s.st.Paused = p.GetPaused()
		if p.GetPaused() {
			s.st.PausedReason, s.st.PausedBy, s.st.PausedUnixNano = p.GetReason(), p.GetRequestedBy(), now.UnixNano()
		} else {
			s.st.PausedReason, s.st.PausedBy, s.st.PausedUnixNano = "", "", 0
		}
		return &fsmv1.Result{}
	default:
		// Decoded, but a command this binary does not know: applying nothing
		// would let this node diverge (see cluster.State.apply).
		panic(fmt.Sprintf("gitraft: database command at index %d is one this binary does not know (%T); upgrade gitraft on this node", index, c.GetCommand()))
	}
}

// ValidName checks a member or pgbouncer name: 1-63 letters, digits, '.',
// '_' or '-', starting with a letter or digit.
func ValidName(name string) error {
	if name == "" || len(name) > 63 {
		return fmt.Errorf("name %q: use 1 to 63 characters", name)
	}
	for i, r := range name {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || (i > 0 && (r == '-' || r == '_' || r == '.'))
		if !ok {
			return fmt.Errorf("name %q: use letters, digits, '.', '_' and '-', starting with a letter or digit", name)
		}
	}
	return nil
}

func findMember(st *dbv1.State, name string) *dbv1.Member {
	for _, m := range st.GetMembers() {
		if m.GetName() == name {
			return m
		}
	}
	return nil
}

func findBouncer(st *dbv1.State, name string) *dbv1.Bouncer {
	for _, b := range st.GetBouncers() {
		if b.GetName() == name {
			return b
		}
	}
	return nil
}

// FindMember returns the member of st with that name, or nil.
func FindMember(st *dbv1.State, name string) *dbv1.Member { return findMember(st, name) }

// PrimaryEndpoint is where the state's primary listens (ok false when there
// is none).
func PrimaryEndpoint(st *dbv1.State) (Endpoint, bool) {
	m := findMember(st, st.GetPrimary())
	if m == nil {
		return Endpoint{}, false
	}
	return Endpoint{Host: m.GetHost(), Port: int(m.GetPort())}, true
}

// memberList names the members for a message: "pg1 (primary), pg2".
func memberList(st *dbv1.State) string {
	if len(st.GetMembers()) == 0 {
		return "none registered yet (a postgres agent registers its member when gitraft serve starts with database.postgres.member set)"
	}
	var names []string
	for _, m := range st.GetMembers() {
		n := m.GetName()
		if n == st.GetPrimary() {
			n += " (primary)"
		}
		names = append(names, n)
	}
	return strings.Join(names, ", ")
}

func (s *State) registerMember(now time.Time, m *dbv1.Member) *fsmv1.Result {
	if err := ValidName(m.GetName()); err != nil {
		return refuse(fsmv1.Reason_REASON_INVALID, "member %s", err)
	}
	if m.GetHost() == "" || m.GetPort() <= 0 || m.GetPort() > 65535 {
		return refuse(fsmv1.Reason_REASON_INVALID, "member %s needs a host and a port from 1 to 65535 (got %q, %d)", m.GetName(), m.GetHost(), m.GetPort())
	}
	if m.GetNode() == "" {
		return refuse(fsmv1.Reason_REASON_INVALID, "member %s needs the node that registers it", m.GetName())
	}
	if b := findBouncer(s.st, m.GetName()); b != nil {
		return refuse(fsmv1.Reason_REASON_ALREADY_EXISTS, "%q is the name of a pgbouncer (on node %s); give the member another name", m.GetName(), b.GetNode())
	}
	m = proto.CloneOf(m)
	if old := findMember(s.st, m.GetName()); old != nil {
		if old.GetNode() != m.GetNode() {
			return refuse(fsmv1.Reason_REASON_ALREADY_EXISTS, "member %s is registered by node %s; if it moved to node %s, forget it first (gitraft db remove %s), otherwise give this one another name (database.postgres.member)",
				m.GetName(), old.GetNode(), m.GetNode(), m.GetName())
		}
		m.RegisteredUnixNano = old.GetRegisteredUnixNano()
		i := slices.Index(s.st.Members, old)
		s.st.Members[i] = m
		return &fsmv1.Result{}
	}
	m.RegisteredUnixNano = now.UnixNano()
	s.st.Members = append(s.st.Members, m)
	slices.SortFunc(s.st.Members, func(a, b *dbv1.Member) int { return strings.Compare(a.GetName(), b.GetName()) })
	return &fsmv1.Result{}
}

func (s *State) registerBouncer(now time.Time, b *dbv1.Bouncer) *fsmv1.Result {
	if err := ValidName(b.GetName()); err != nil {
		return refuse(fsmv1.Reason_REASON_INVALID, "pgbouncer %s", err)
	}
	if b.GetNode() == "" {
		return refuse(fsmv1.Reason_REASON_INVALID, "pgbouncer %s needs the node that registers it", b.GetName())
	}
	if m := findMember(s.st, b.GetName()); m != nil {
		return refuse(fsmv1.Reason_REASON_ALREADY_EXISTS, "%q is the name of a PostgreSQL member (on node %s); give the pgbouncer another name", b.GetName(), m.GetNode())
	}
	if old := findBouncer(s.st, b.GetName()); old != nil {
		if old.GetNode() != b.GetNode() {
			return refuse(fsmv1.Reason_REASON_ALREADY_EXISTS, "pgbouncer %s is registered by node %s; if it moved to node %s, forget it first (gitraft db remove %s), otherwise give this one another name (database.pgbouncer.name)",
				b.GetName(), old.GetNode(), b.GetNode(), b.GetName())
		}
		return &fsmv1.Result{}
	}
	b = proto.CloneOf(b)
	b.RegisteredUnixNano = now.UnixNano()
	s.st.Bouncers = append(s.st.Bouncers, b)
	slices.SortFunc(s.st.Bouncers, func(a, b *dbv1.Bouncer) int { return strings.Compare(a.GetName(), b.GetName()) })
	return &fsmv1.Result{}
}

func (s *State) forget(name string) *fsmv1.Result {
	if op := s.st.GetOperation(); op != nil {
		return refuse(fsmv1.Reason_REASON_PRECONDITION, "%s; forget %s once it finished", describeOp(op), name)
	}
	if findMember(s.st, name) != nil {
		if name == s.st.GetPrimary() {
			return refuse(fsmv1.Reason_REASON_PRECONDITION, "%s is the primary; switch over to another member first (gitraft db switchover --to NAME)", name)
		}
		s.st.Members = slices.DeleteFunc(s.st.Members, func(m *dbv1.Member) bool { return m.GetName() == name })
		if s.st.GetSynchronousStandby() == name {
			// Gone: no failover may count on it (the leader names another).
			s.st.SynchronousStandby = ""
		}
		return &fsmv1.Result{}
	}
	if findBouncer(s.st, name) != nil {
		s.st.Bouncers = slices.DeleteFunc(s.st.Bouncers, func(b *dbv1.Bouncer) bool { return b.GetName() == name })
		return &fsmv1.Result{}
	}
	return refuse(fsmv1.Reason_REASON_NOT_FOUND, "no member or pgbouncer named %q (see gitraft db status)", name)
}

// PhaseName is a phase as people and the CLI write it: "pausing", "none".
func PhaseName(p dbv1.Phase) string {
	if p == dbv1.Phase_PHASE_UNSPECIFIED {
		return "none"
	}
	return strings.ToLower(strings.TrimPrefix(p.String(), "PHASE_"))
}

// KindName is "switchover", "failover" or "bootstrap".
func KindName(k dbv1.Kind) string {
	return strings.ToLower(strings.TrimPrefix(k.String(), "KIND_"))
}

// OutcomeName is "done", "aborted" or "failed".
func OutcomeName(o dbv1.Outcome) string {
	return strings.ToLower(strings.TrimPrefix(o.String(), "OUTCOME_"))
}

func describeOp(op *dbv1.Operation) string {
	from := op.GetOldPrimary()
	if from == "" {
		from = "(none)"
	}
	return fmt.Sprintf("a %s from %s to %s is under way (phase %s, operation %d)", KindName(op.GetKind()), from, op.GetTarget(), PhaseName(op.GetPhase()), op.GetId())
}

func deadline(now time.Time, timeout int64) int64 {
	if timeout <= 0 {
		return 0
	}
	return now.UnixNano() + timeout
}

func (s *State) begin(index uint64, now time.Time, b *dbv1.BeginOperation) *fsmv1.Result {
	st := s.st
	kind := b.GetKind()
	if kind != dbv1.Kind_KIND_SWITCHOVER && kind != dbv1.Kind_KIND_FAILOVER {
		return refuse(fsmv1.Reason_REASON_INVALID, "an operation is a switchover or a failover, not %v", kind)
	}
	if op := st.GetOperation(); op != nil {
		return refuse(fsmv1.Reason_REASON_PRECONDITION, "%s; wait for it to finish, or roll it back with gitraft db abort", describeOp(op))
	}
	if b.GetAutomatic() && st.GetPaused() {
		return refuse(fsmv1.Reason_REASON_PRECONDITION, "automatic failover is paused (%s); gitraft db resume ends the pause, gitraft db failover --to NAME fails over by hand", pausedText(st))
	}
	if b.GetExpectedGeneration() != st.GetGeneration() {
		return refuse(fsmv1.Reason_REASON_STALE_TOKEN, "the primary changed meanwhile (generation %d, expected %d); look again with gitraft db status", st.GetGeneration(), b.GetExpectedGeneration())
	}
	target := b.GetTarget()
	if target == "" {
		return refuse(fsmv1.Reason_REASON_INVALID, "name the member to promote (--to); members: %s", memberList(st))
	}
	m := findMember(st, target)
	if m == nil {
		return refuse(fsmv1.Reason_REASON_NOT_FOUND, "no member named %q; members: %s", target, memberList(st))
	}
	if target == st.GetPrimary() {
		return refuse(fsmv1.Reason_REASON_INVALID, "%s is already the primary (generation %d)", target, st.GetGeneration())
	}
	if m.GetNoFailover() {
		return refuse(fsmv1.Reason_REASON_PRECONDITION, "%s is configured never to be promoted (database.postgres.no_failover on node %s)", target, m.GetNode())
	}
	op := &dbv1.Operation{
		Id: index, Kind: kind, Target: target, OldPrimary: st.GetPrimary(), Generation: st.GetGeneration(),
		StartedUnixNano: now.UnixNano(), PhaseStartedUnixNano: now.UnixNano(),
		Automatic: b.GetAutomatic(), RequestedBy: b.GetRequestedBy(),
	}
	switch kind {
	case dbv1.Kind_KIND_SWITCHOVER:
		if st.GetPrimary() == "" {
			return refuse(fsmv1.Reason_REASON_PRECONDITION, "there is no primary to switch over from; promote %s with gitraft db failover --to %s", target, target)
		}
		switch at := b.GetAtUnixNano(); {
		case at > now.UnixNano():
			op.Phase, op.AtUnixNano = dbv1.Phase_PHASE_SCHEDULED, at
		case b.GetCheckpoint():
			op.Phase, op.DeadlineUnixNano = dbv1.Phase_PHASE_CHECKPOINTING, deadline(now, b.GetTimeoutNanos())
		default:
			op.Phase, op.DeadlineUnixNano = dbv1.Phase_PHASE_PAUSING, deadline(now, b.GetTimeoutNanos())
		}
	case dbv1.Kind_KIND_FAILOVER:
		if b.GetAtUnixNano() != 0 {
			return refuse(fsmv1.Reason_REASON_INVALID, "a failover cannot be scheduled; only a switchover takes --at")
		}
		op.Phase, op.DeadlineUnixNano = dbv1.Phase_PHASE_FENCING, deadline(now, b.GetTimeoutNanos())
	}
	st.Operation = op
	return &fsmv1.Result{}
}

func pausedText(st *dbv1.State) string {
	t := "paused"
	if st.GetPausedBy() != "" {
		t += " by " + st.GetPausedBy()
	}
	if st.GetPausedReason() != "" {
		t += ": " + st.GetPausedReason()
	}
	return t
}

// steps lists the phase changes AdvancePhase may make, per kind.
var steps = map[dbv1.Kind]map[dbv1.Phase][]dbv1.Phase{
	dbv1.Kind_KIND_SWITCHOVER: {
		dbv1.Phase_PHASE_SCHEDULED:     {dbv1.Phase_PHASE_CHECKPOINTING, dbv1.Phase_PHASE_PAUSING},
		dbv1.Phase_PHASE_CHECKPOINTING: {dbv1.Phase_PHASE_PAUSING},
		dbv1.Phase_PHASE_PAUSING:       {dbv1.Phase_PHASE_STOPPING_OLD, dbv1.Phase_PHASE_ROLLING_BACK},
		dbv1.Phase_PHASE_STOPPING_OLD:  {dbv1.Phase_PHASE_PROMOTING, dbv1.Phase_PHASE_ROLLING_BACK},
		dbv1.Phase_PHASE_PROMOTING:     {dbv1.Phase_PHASE_ROLLING_BACK},
		dbv1.Phase_PHASE_REPOINTING:    {dbv1.Phase_PHASE_DEMOTING},
	},
	dbv1.Kind_KIND_FAILOVER: {
		dbv1.Phase_PHASE_FENCING:   {dbv1.Phase_PHASE_PROMOTING, dbv1.Phase_PHASE_ROLLING_BACK},
		dbv1.Phase_PHASE_PROMOTING: {dbv1.Phase_PHASE_ROLLING_BACK},
	},
}

// checkOp refuses a leader step for an operation that is not (or no longer)
// the one under way in the phase the step expects: a deposed leader's late
// proposal, or a step a new leader already took.
func (s *State) checkOp(id uint64, from dbv1.Phase) (*dbv1.Operation, *fsmv1.Result) {
	op := s.st.GetOperation()
	if op == nil {
		return nil, refuse(fsmv1.Reason_REASON_STALE_TOKEN, "operation %d is over; no operation is under way", id)
	}
	if op.GetId() != id {
		return nil, refuse(fsmv1.Reason_REASON_STALE_TOKEN, "operation %d is over; %s", id, describeOp(op))
	}
	if op.GetPhase() != from {
		return nil, refuse(fsmv1.Reason_REASON_STALE_TOKEN, "operation %d is in phase %s, not %s", id, PhaseName(op.GetPhase()), PhaseName(from))
	}
	return op, nil
}

func (s *State) advance(now time.Time, a *dbv1.AdvancePhase) *fsmv1.Result {
	op, r := s.checkOp(a.GetOpId(), a.GetFrom())
	if r != nil {
		return r
	}
	if !slices.Contains(steps[op.GetKind()][a.GetFrom()], a.GetTo()) {
		return refuse(fsmv1.Reason_REASON_INVALID, "a %s does not go from phase %s to %s", KindName(op.GetKind()), PhaseName(a.GetFrom()), PhaseName(a.GetTo()))
	}
	if a.GetTo() == dbv1.Phase_PHASE_PROMOTING && op.GetKind() == dbv1.Kind_KIND_SWITCHOVER && a.GetWaitLsn() == 0 {
		return refuse(fsmv1.Reason_REASON_INVALID, "a switchover promotes only after the target replayed the old primary's last WAL position, and none was given")
	}
	op.Phase = a.GetTo()
	op.PhaseStartedUnixNano = now.UnixNano()
	op.DeadlineUnixNano = deadline(now, a.GetTimeoutNanos())
	op.WaitLsn = a.GetWaitLsn()
	if a.GetNote() != "" {
		op.Note = joinNote(op.GetNote(), a.GetNote())
	}
	return &fsmv1.Result{}
}

func joinNote(a, b string) string {
	if a == "" {
		return b
	}
	if b == "" {
		return a
	}
	return a + "; " + b
}

func (s *State) setPrimary(index uint64, now time.Time, p *dbv1.SetPrimary) *fsmv1.Result {
	st := s.st
	if p.GetExpectedGeneration() != st.GetGeneration() {
		return refuse(fsmv1.Reason_REASON_STALE_TOKEN, "generation is %d, not %d: the primary changed meanwhile", st.GetGeneration(), p.GetExpectedGeneration())
	}
	m := findMember(st, p.GetName())
	if m == nil {
		return refuse(fsmv1.Reason_REASON_NOT_FOUND, "no member named %q; members: %s", p.GetName(), memberList(st))
	}
	if p.GetOpId() == 0 {
		if st.GetOperation() != nil {
			return refuse(fsmv1.Reason_REASON_PRECONDITION, "%s", describeOp(st.GetOperation()))
		}
		if st.GetGeneration() != 0 {
			return refuse(fsmv1.Reason_REASON_PRECONDITION, "%s is the primary already (generation %d); change it with a switchover or failover", st.GetPrimary(), st.GetGeneration())
		}
		st.Primary, st.Generation, st.PrimarySinceUnixNano = m.GetName(), 1, now.UnixNano()
		s.record(&dbv1.HistoryEntry{
			OpId: index, Kind: dbv1.Kind_KIND_BOOTSTRAP, To: m.GetName(), Generation: 1, Outcome: dbv1.Outcome_OUTCOME_DONE,
			Reason: "the only member running as a primary", StartedUnixNano: now.UnixNano(), FinishedUnixNano: now.UnixNano(), Automatic: true,
		})
		return &fsmv1.Result{}
	}
	op, r := s.checkOp(p.GetOpId(), dbv1.Phase_PHASE_PROMOTING)
	if r != nil {
		return r
	}
	if p.GetName() != op.GetTarget() {
		return refuse(fsmv1.Reason_REASON_INVALID, "operation %d promotes %s, not %s", op.GetId(), op.GetTarget(), p.GetName())
	}
	st.Primary, st.Generation, st.PrimarySinceUnixNano = m.GetName(), st.GetGeneration()+1, now.UnixNano()
	// A new primary: what the old one waited for means nothing to it.
	if st.GetSynchronousStandbyNames() != p.GetSynchronousStandbyNames() {
		st.SynchronousSinceUnixNano = now.UnixNano()
	}
	st.SynchronousStandbyNames, st.SynchronousStandby = p.GetSynchronousStandbyNames(), ""
	op.Phase = dbv1.Phase_PHASE_REPOINTING
	op.PhaseStartedUnixNano = now.UnixNano()
	op.DeadlineUnixNano = deadline(now, p.GetTimeoutNanos())
	op.WaitLsn = 0
	return &fsmv1.Result{}
}

// promoted reports whether the phase comes after SetPrimary.
func promoted(p dbv1.Phase) bool {
	return p == dbv1.Phase_PHASE_REPOINTING || p == dbv1.Phase_PHASE_DEMOTING
}

func (s *State) finish(now time.Time, f *dbv1.FinishOperation) *fsmv1.Result {
	op, r := s.checkOp(f.GetOpId(), f.GetFrom())
	if r != nil {
		return r
	}
	switch out := f.GetOutcome(); {
	case promoted(op.GetPhase()) && out != dbv1.Outcome_OUTCOME_DONE:
		return refuse(fsmv1.Reason_REASON_INVALID, "operation %d promoted %s already; it can only finish as done", op.GetId(), op.GetTarget())
	case !promoted(op.GetPhase()) && out == dbv1.Outcome_OUTCOME_DONE:
		return refuse(fsmv1.Reason_REASON_INVALID, "operation %d has not promoted %s; it cannot finish as done", op.GetId(), op.GetTarget())
	case out == dbv1.Outcome_OUTCOME_UNSPECIFIED:
		return refuse(fsmv1.Reason_REASON_INVALID, "finishing operation %d needs an outcome", op.GetId())
	case op.GetPhase() == dbv1.Phase_PHASE_PAUSING || op.GetPhase() == dbv1.Phase_PHASE_STOPPING_OLD:
		return refuse(fsmv1.Reason_REASON_INVALID, "operation %d in phase %s must roll back first", op.GetId(), PhaseName(op.GetPhase()))
	case op.GetPhase() == dbv1.Phase_PHASE_PROMOTING && op.GetKind() == dbv1.Kind_KIND_SWITCHOVER:
		return refuse(fsmv1.Reason_REASON_INVALID, "operation %d in phase %s must roll back first", op.GetId(), PhaseName(op.GetPhase()))
	}
	s.st.Operation = nil
	s.record(&dbv1.HistoryEntry{
		OpId: op.GetId(), Kind: op.GetKind(), From: op.GetOldPrimary(), To: op.GetTarget(),
		Generation: s.st.GetGeneration(), Outcome: f.GetOutcome(), Reason: joinNote(op.GetNote(), f.GetReason()),
		StartedUnixNano: op.GetStartedUnixNano(), FinishedUnixNano: now.UnixNano(),
		Automatic: op.GetAutomatic(), RequestedBy: op.GetRequestedBy(),
	})
	return &fsmv1.Result{}
}

// setSynchronous records what the primary's synchronous_standby_names
// should name and which standby is synchronous (see SyncStep).
func (s *State) setSynchronous(now time.Time, c *dbv1.SetSynchronous) *fsmv1.Result {
	st := s.st
	if c.GetExpectedGeneration() != st.GetGeneration() {
		return refuse(fsmv1.Reason_REASON_STALE_TOKEN, "generation is %d, not %d: the primary changed meanwhile", st.GetGeneration(), c.GetExpectedGeneration())
	}
	names, standby := c.GetNames(), c.GetStandby()
	if names != "" && names != AnyStandby {
		if findMember(st, names) == nil {
			return refuse(fsmv1.Reason_REASON_NOT_FOUND, "no member named %q; members: %s", names, memberList(st))
		}
		if names == st.GetPrimary() {
			return refuse(fsmv1.Reason_REASON_INVALID, "%s is the primary; it cannot be its own synchronous standby", names)
		}
	}
	if standby != "" && standby != names {
		return refuse(fsmv1.Reason_REASON_INVALID, "the synchronous standby %s must be the one synchronous_standby_names names (%q)", standby, names)
	}
	if names != st.GetSynchronousStandbyNames() {
		st.SynchronousSinceUnixNano = now.UnixNano()
	}
	st.SynchronousStandbyNames, st.SynchronousStandby = names, standby
	return &fsmv1.Result{}
}

func (s *State) record(h *dbv1.HistoryEntry) {
	s.st.History = append(s.st.History, h)
	if n := len(s.st.History); n > HistoryLimit {
		s.st.History = slices.Clone(s.st.History[n-HistoryLimit:])
	}
}

func (s *State) abort(now time.Time, a *dbv1.AbortOperation) *fsmv1.Result {
	op := s.st.GetOperation()
	if op == nil {
		return refuse(fsmv1.Reason_REASON_NOT_FOUND, "no switchover or failover is under way")
	}
	reason := "aborted"
	if a.GetRequestedBy() != "" {
		reason += " by " + a.GetRequestedBy()
	}
	if a.GetReason() != "" {
		reason += ": " + a.GetReason()
	}
	switch op.GetPhase() {
	case dbv1.Phase_PHASE_SCHEDULED, dbv1.Phase_PHASE_CHECKPOINTING:
		// Nothing paused or stopped yet: it ends at once.
		return s.finish(now, &dbv1.FinishOperation{OpId: op.GetId(), From: op.GetPhase(), Outcome: dbv1.Outcome_OUTCOME_ABORTED, Reason: reason})
	case dbv1.Phase_PHASE_ROLLING_BACK:
		return refuse(fsmv1.Reason_REASON_PRECONDITION, "operation %d is rolling back already (%s)", op.GetId(), op.GetNote())
	case dbv1.Phase_PHASE_REPOINTING, dbv1.Phase_PHASE_DEMOTING:
		return refuse(fsmv1.Reason_REASON_PRECONDITION, "%s was promoted already (generation %d); after promotion a %s only goes forward: wait for it to finish, then switch back if you must",
			op.GetTarget(), s.st.GetGeneration(), KindName(op.GetKind()))
	}
	op.Phase = dbv1.Phase_PHASE_ROLLING_BACK
	op.PhaseStartedUnixNano = now.UnixNano()
	op.DeadlineUnixNano = deadline(now, a.GetTimeoutNanos())
	op.WaitLsn = 0
	op.Note = joinNote(op.GetNote(), reason)
	return &fsmv1.Result{}
}
