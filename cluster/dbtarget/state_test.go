package dbtarget

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

// The state machine alone: every rule and refusal, without Raft.

var t0 = time.Date(2026, 3, 1, 2, 0, 0, 0, time.UTC)

type machine struct {
	t     *testing.T
	s     *State
	index uint64
	now   time.Time
}

func newMachine(t *testing.T) *machine { return &machine{t: t, s: NewState(), now: t0} }

func (m *machine) apply(c *dbv1.Command) *fsmv1.Result {
	m.index++
	m.now = m.now.Add(100 * time.Millisecond)
	return m.s.Apply(m.index, m.now, c)
}

func (m *machine) ok(c *dbv1.Command) *dbv1.Result {
	m.t.Helper()
	r := m.apply(c)
	if r.GetRefusal() != nil {
		m.t.Fatalf("refused: %v (%s)", r.GetRefusal().GetReason(), r.GetRefusal().GetMessage())
	}
	return r.GetDatabase()
}

// refused applies c, expects a refusal with reason and a message holding
// every word in want, and checks the state did not change.
func (m *machine) refused(c *dbv1.Command, reason fsmv1.Reason, want ...string) {
	m.t.Helper()
	before := m.s.View()
	r := m.apply(c)
	ref := r.GetRefusal()
	if ref == nil {
		m.t.Fatalf("applied, want a refusal (%v)", reason)
	}
	if ref.GetReason() != reason {
		m.t.Errorf("reason %v, want %v (%s)", ref.GetReason(), reason, ref.GetMessage())
	}
	for _, w := range want {
		if !strings.Contains(ref.GetMessage(), w) {
			m.t.Errorf("message %q lacks %q", ref.GetMessage(), w)
		}
	}
	if !proto.Equal(before, m.s.View()) {
		m.t.Errorf("a refused command changed the state:\nbefore %v\nafter  %v", before, m.s.View())
	}
}

func member(name, node string, port int32) *dbv1.Command {
	return &dbv1.Command{Command: &dbv1.Command_RegisterMember{RegisterMember: &dbv1.RegisterMember{Member: &dbv1.Member{Name: name, Host: "127.0.0.1", Port: port, Node: node}}}}
}

func bouncer(name, node string) *dbv1.Command {
	return &dbv1.Command{Command: &dbv1.Command_RegisterBouncer{RegisterBouncer: &dbv1.RegisterBouncer{Bouncer: &dbv1.Bouncer{Name: name, Node: node}}}}
}

func begin(kind dbv1.Kind, target string, gen uint64) *dbv1.Command {
	return &dbv1.Command{Command: &dbv1.Command_Begin{Begin: &dbv1.BeginOperation{Kind: kind, Target: target, ExpectedGeneration: gen, TimeoutNanos: int64(5 * time.Second)}}}
}

func advance(id uint64, from, to dbv1.Phase, lsn uint64) *dbv1.Command {
	return &dbv1.Command{Command: &dbv1.Command_Advance{Advance: &dbv1.AdvancePhase{OpId: id, From: from, To: to, WaitLsn: lsn, TimeoutNanos: int64(30 * time.Second)}}}
}

func setPrimary(id uint64, name string, gen uint64) *dbv1.Command {
	return &dbv1.Command{Command: &dbv1.Command_SetPrimary{SetPrimary: &dbv1.SetPrimary{OpId: id, Name: name, ExpectedGeneration: gen}}}
}

func finish(id uint64, from dbv1.Phase, out dbv1.Outcome) *dbv1.Command {
	return &dbv1.Command{Command: &dbv1.Command_Finish{Finish: &dbv1.FinishOperation{OpId: id, From: from, Outcome: out}}}
}

// twoMembers registers pg1 (primary, generation 1) and pg2, and pgbouncer b1.
func twoMembers(t *testing.T) *machine {
	m := newMachine(t)
	m.ok(member("pg1", "n1", 5432))
	m.ok(member("pg2", "n2", 5433))
	m.ok(bouncer("b1", "n1"))
	m.ok(setPrimary(0, "pg1", 0))
	return m
}

func TestRegister(t *testing.T) {
	m := newMachine(t)
	m.ok(member("pg2", "n2", 5433))
	m.ok(member("pg1", "n1", 5432))
	st := m.s.View()
	if len(st.GetMembers()) != 2 || st.GetMembers()[0].GetName() != "pg1" {
		t.Fatalf("members not sorted by name: %v", st.GetMembers())
	}
	registered := st.GetMembers()[0].GetRegisteredUnixNano()
	// The same node may update its member (a new port); the registration
	// time stays.
	m.ok(member("pg1", "n1", 6000))
	if got := FindMember(m.s.View(), "pg1"); got.GetPort() != 6000 || got.GetRegisteredUnixNano() != registered {
		t.Errorf("after an update: %v", got)
	}
	m.refused(member("pg1", "n3", 5432), fsmv1.Reason_REASON_ALREADY_EXISTS, "registered by node n1", "gitraft db remove pg1")
	m.refused(member("bad name", "n1", 5432), fsmv1.Reason_REASON_INVALID, "bad name")
	m.refused(member("pg3", "n1", 0), fsmv1.Reason_REASON_INVALID, "port")
	m.refused(member("pg3", "", 5432), fsmv1.Reason_REASON_INVALID, "node")
	m.ok(bouncer("b1", "n1"))
	m.ok(bouncer("b1", "n1")) // again: no-op
	m.refused(bouncer("b1", "n2"), fsmv1.Reason_REASON_ALREADY_EXISTS, "registered by node n1")
	m.refused(bouncer("pg1", "n1"), fsmv1.Reason_REASON_ALREADY_EXISTS, "PostgreSQL member")
	m.refused(member("b1", "n1", 5432), fsmv1.Reason_REASON_ALREADY_EXISTS, "pgbouncer")
}

func TestBootstrapPrimary(t *testing.T) {
	m := newMachine(t)
	m.refused(setPrimary(0, "pg1", 0), fsmv1.Reason_REASON_NOT_FOUND, "no member")
	m.ok(member("pg1", "n1", 5432))
	m.ok(member("pg2", "n2", 5433))
	m.refused(setPrimary(0, "pg1", 3), fsmv1.Reason_REASON_STALE_TOKEN)
	m.ok(setPrimary(0, "pg1", 0))
	st := m.s.View()
	if st.GetPrimary() != "pg1" || st.GetGeneration() != 1 {
		t.Fatalf("primary %q generation %d", st.GetPrimary(), st.GetGeneration())
	}
	if h := st.GetHistory(); len(h) != 1 || h[0].GetKind() != dbv1.Kind_KIND_BOOTSTRAP || h[0].GetTo() != "pg1" {
		t.Errorf("history %v", h)
	}
	// Only ever once: later changes go through an operation.
	m.refused(setPrimary(0, "pg2", 1), fsmv1.Reason_REASON_PRECONDITION, "switchover or failover")
}

func TestSwitchoverPhases(t *testing.T) {
	m := twoMembers(t)
	r := m.ok(begin(dbv1.Kind_KIND_SWITCHOVER, "pg2", 1))
	op := r.GetOperation()
	if op.GetPhase() != dbv1.Phase_PHASE_PAUSING || op.GetOldPrimary() != "pg1" || op.GetTarget() != "pg2" || op.GetId() != m.index {
		t.Fatalf("began %v", op)
	}
	if op.GetDeadlineUnixNano() != m.now.Add(5*time.Second).UnixNano() {
		t.Errorf("deadline %v, want the entry's time + timeout", unix(op.GetDeadlineUnixNano()))
	}
	id := op.GetId()
	if ok, _ := Writable(m.s.View()); ok {
		t.Error("writable while pausing")
	}
	m.ok(advance(id, dbv1.Phase_PHASE_PAUSING, dbv1.Phase_PHASE_STOPPING_OLD, 0))
	m.refused(advance(id, dbv1.Phase_PHASE_STOPPING_OLD, dbv1.Phase_PHASE_PROMOTING, 0), fsmv1.Reason_REASON_INVALID, "WAL position")
	m.ok(advance(id, dbv1.Phase_PHASE_STOPPING_OLD, dbv1.Phase_PHASE_PROMOTING, 0x3000060))
	if got := m.s.View().GetOperation().GetWaitLsn(); got != 0x3000060 {
		t.Errorf("wait LSN %x", got)
	}
	m.refused(setPrimary(id, "pg1", 1), fsmv1.Reason_REASON_INVALID, "promotes pg2")
	m.refused(setPrimary(id, "pg2", 0), fsmv1.Reason_REASON_STALE_TOKEN)
	m.ok(setPrimary(id, "pg2", 1))
	st := m.s.View()
	if st.GetPrimary() != "pg2" || st.GetGeneration() != 2 || st.GetOperation().GetPhase() != dbv1.Phase_PHASE_REPOINTING {
		t.Fatalf("after SetPrimary: primary %s generation %d phase %v", st.GetPrimary(), st.GetGeneration(), st.GetOperation().GetPhase())
	}
	// After promotion only forward.
	m.refused(advance(id, dbv1.Phase_PHASE_REPOINTING, dbv1.Phase_PHASE_ROLLING_BACK, 0), fsmv1.Reason_REASON_INVALID)
	m.refused(&dbv1.Command{Command: &dbv1.Command_Abort{Abort: &dbv1.AbortOperation{}}}, fsmv1.Reason_REASON_PRECONDITION, "only goes forward")
	m.refused(finish(id, dbv1.Phase_PHASE_REPOINTING, dbv1.Outcome_OUTCOME_ABORTED), fsmv1.Reason_REASON_INVALID, "only finish as done")
	m.ok(advance(id, dbv1.Phase_PHASE_REPOINTING, dbv1.Phase_PHASE_DEMOTING, 0))
	if ok, why := Writable(m.s.View()); !ok {
		t.Errorf("not writable while demoting: %s", why)
	}
	m.ok(finish(id, dbv1.Phase_PHASE_DEMOTING, dbv1.Outcome_OUTCOME_DONE))
	st = m.s.View()
	if st.GetOperation() != nil {
		t.Fatalf("operation still under way: %v", st.GetOperation())
	}
	h := st.GetHistory()[len(st.GetHistory())-1]
	if h.GetOpId() != id || h.GetFrom() != "pg1" || h.GetTo() != "pg2" || h.GetGeneration() != 2 || h.GetOutcome() != dbv1.Outcome_OUTCOME_DONE {
		t.Errorf("history %v", h)
	}
	// A deposed leader's late step for the finished operation changes nothing.
	m.refused(advance(id, dbv1.Phase_PHASE_REPOINTING, dbv1.Phase_PHASE_DEMOTING, 0), fsmv1.Reason_REASON_STALE_TOKEN, "over")
	m.refused(setPrimary(id, "pg2", 1), fsmv1.Reason_REASON_STALE_TOKEN)
}

func unix(ns int64) time.Time { return time.Unix(0, ns).UTC() }

func TestStaleSteps(t *testing.T) {
	m := twoMembers(t)
	id := m.ok(begin(dbv1.Kind_KIND_SWITCHOVER, "pg2", 1)).GetOperation().GetId()
	m.ok(advance(id, dbv1.Phase_PHASE_PAUSING, dbv1.Phase_PHASE_STOPPING_OLD, 0))
	// The same step again (a new leader that did not see it yet; a retry).
	m.refused(advance(id, dbv1.Phase_PHASE_PAUSING, dbv1.Phase_PHASE_STOPPING_OLD, 0), fsmv1.Reason_REASON_STALE_TOKEN, "phase stopping_old, not pausing")
	m.refused(advance(id+7, dbv1.Phase_PHASE_STOPPING_OLD, dbv1.Phase_PHASE_PROMOTING, 1), fsmv1.Reason_REASON_STALE_TOKEN, "is over")
	m.refused(advance(id, dbv1.Phase_PHASE_STOPPING_OLD, dbv1.Phase_PHASE_DEMOTING, 1), fsmv1.Reason_REASON_INVALID, "does not go from")
	m.refused(finish(id, dbv1.Phase_PHASE_STOPPING_OLD, dbv1.Outcome_OUTCOME_ABORTED), fsmv1.Reason_REASON_INVALID, "roll back first")
	m.refused(finish(id, dbv1.Phase_PHASE_STOPPING_OLD, dbv1.Outcome_OUTCOME_DONE), fsmv1.Reason_REASON_INVALID, "not promoted")
}

func TestBeginRefusals(t *testing.T) {
	m := twoMembers(t)
	m.ok(member("pg3", "n3", 5434))
	m.ok(&dbv1.Command{Command: &dbv1.Command_RegisterMember{RegisterMember: &dbv1.RegisterMember{Member: &dbv1.Member{Name: "pg4", Host: "h", Port: 1, Node: "n4", NoFailover: true}}}})
	m.refused(begin(dbv1.Kind_KIND_SWITCHOVER, "pg9", 1), fsmv1.Reason_REASON_NOT_FOUND, `"pg9"`, "pg1 (primary), pg2, pg3")
	m.refused(begin(dbv1.Kind_KIND_SWITCHOVER, "", 1), fsmv1.Reason_REASON_INVALID, "--to")
	m.refused(begin(dbv1.Kind_KIND_SWITCHOVER, "pg1", 1), fsmv1.Reason_REASON_INVALID, "already the primary")
	m.refused(begin(dbv1.Kind_KIND_SWITCHOVER, "pg4", 1), fsmv1.Reason_REASON_PRECONDITION, "no_failover")
	m.refused(begin(dbv1.Kind_KIND_SWITCHOVER, "pg2", 0), fsmv1.Reason_REASON_STALE_TOKEN, "generation 1")
	m.refused(begin(dbv1.Kind_KIND_UNSPECIFIED, "pg2", 1), fsmv1.Reason_REASON_INVALID)
	m.refused(&dbv1.Command{Command: &dbv1.Command_Begin{Begin: &dbv1.BeginOperation{Kind: dbv1.Kind_KIND_FAILOVER, Target: "pg2", ExpectedGeneration: 1, AtUnixNano: m.now.Add(time.Hour).UnixNano()}}},
		fsmv1.Reason_REASON_INVALID, "cannot be scheduled")
	id := m.ok(begin(dbv1.Kind_KIND_SWITCHOVER, "pg2", 1)).GetOperation().GetId()
	m.refused(begin(dbv1.Kind_KIND_SWITCHOVER, "pg3", 1), fsmv1.Reason_REASON_PRECONDITION, "a switchover from pg1 to pg2 is under way", "phase pausing", "gitraft db abort")
	m.refused(begin(dbv1.Kind_KIND_FAILOVER, "pg3", 1), fsmv1.Reason_REASON_PRECONDITION, "under way")
	m.refused(&dbv1.Command{Command: &dbv1.Command_Forget{Forget: &dbv1.Forget{Name: "pg3"}}}, fsmv1.Reason_REASON_PRECONDITION, "under way")
	m.refused(finish(id, dbv1.Phase_PHASE_PAUSING, dbv1.Outcome_OUTCOME_ABORTED), fsmv1.Reason_REASON_INVALID, "roll back first")
}

func TestSwitchoverNeedsPrimary(t *testing.T) {
	m := newMachine(t)
	m.ok(member("pg1", "n1", 5432))
	m.refused(begin(dbv1.Kind_KIND_SWITCHOVER, "pg1", 0), fsmv1.Reason_REASON_PRECONDITION, "no primary to switch over from", "failover --to pg1")
	// A failover may record the first primary.
	m.ok(begin(dbv1.Kind_KIND_FAILOVER, "pg1", 0))
}

func TestPauseBlocksAutomaticFailoverOnly(t *testing.T) {
	m := twoMembers(t)
	m.ok(&dbv1.Command{Command: &dbv1.Command_SetPaused{SetPaused: &dbv1.SetPaused{Paused: true, Reason: "kernel upgrade", RequestedBy: "alice"}}})
	st := m.s.View()
	if !st.GetPaused() || st.GetPausedBy() != "alice" || st.GetPausedReason() != "kernel upgrade" || st.GetPausedUnixNano() != m.now.UnixNano() {
		t.Fatalf("pause not recorded: %v", st)
	}
	auto := &dbv1.Command{Command: &dbv1.Command_Begin{Begin: &dbv1.BeginOperation{Kind: dbv1.Kind_KIND_FAILOVER, Target: "pg2", ExpectedGeneration: 1, Automatic: true}}}
	m.refused(auto, fsmv1.Reason_REASON_PRECONDITION, "automatic failover is paused", "by alice", "kernel upgrade", "gitraft db resume")
	// An operator's failover still works while paused.
	id := m.ok(begin(dbv1.Kind_KIND_FAILOVER, "pg2", 1)).GetOperation().GetId()
	m.ok(&dbv1.Command{Command: &dbv1.Command_Abort{Abort: &dbv1.AbortOperation{}}})
	m.ok(finish(id, dbv1.Phase_PHASE_ROLLING_BACK, dbv1.Outcome_OUTCOME_ABORTED))
	m.ok(&dbv1.Command{Command: &dbv1.Command_SetPaused{SetPaused: &dbv1.SetPaused{Paused: false}}})
	if st := m.s.View(); st.GetPaused() || st.GetPausedReason() != "" {
		t.Errorf("still paused: %v", st)
	}
	m.ok(auto)
}

func TestFailoverPhases(t *testing.T) {
	m := twoMembers(t)
	op := m.ok(begin(dbv1.Kind_KIND_FAILOVER, "pg2", 1)).GetOperation()
	if op.GetPhase() != dbv1.Phase_PHASE_FENCING {
		t.Fatalf("failover begins in %v", op.GetPhase())
	}
	m.refused(advance(op.GetId(), dbv1.Phase_PHASE_FENCING, dbv1.Phase_PHASE_STOPPING_OLD, 0), fsmv1.Reason_REASON_INVALID)
	m.ok(advance(op.GetId(), dbv1.Phase_PHASE_FENCING, dbv1.Phase_PHASE_PROMOTING, 0)) // no LSN to wait for
	m.ok(setPrimary(op.GetId(), "pg2", 1))
	m.refused(advance(op.GetId(), dbv1.Phase_PHASE_REPOINTING, dbv1.Phase_PHASE_DEMOTING, 0), fsmv1.Reason_REASON_INVALID)
	m.ok(finish(op.GetId(), dbv1.Phase_PHASE_REPOINTING, dbv1.Outcome_OUTCOME_DONE))
	if st := m.s.View(); st.GetPrimary() != "pg2" || st.GetGeneration() != 2 {
		t.Errorf("primary %s generation %d", st.GetPrimary(), st.GetGeneration())
	}
}

func TestAbort(t *testing.T) {
	m := twoMembers(t)
	m.refused(&dbv1.Command{Command: &dbv1.Command_Abort{Abort: &dbv1.AbortOperation{}}}, fsmv1.Reason_REASON_NOT_FOUND, "no switchover or failover")
	// A scheduled switchover ends at once.
	at := m.now.Add(time.Hour).UnixNano()
	sched := &dbv1.Command{Command: &dbv1.Command_Begin{Begin: &dbv1.BeginOperation{Kind: dbv1.Kind_KIND_SWITCHOVER, Target: "pg2", ExpectedGeneration: 1, AtUnixNano: at}}}
	op := m.ok(sched).GetOperation()
	if op.GetPhase() != dbv1.Phase_PHASE_SCHEDULED || op.GetAtUnixNano() != at || op.GetDeadlineUnixNano() != 0 {
		t.Fatalf("scheduled %v", op)
	}
	if ok, _ := Writable(m.s.View()); !ok {
		t.Error("a scheduled switchover holds writes back before its time")
	}
	m.ok(&dbv1.Command{Command: &dbv1.Command_Abort{Abort: &dbv1.AbortOperation{Reason: "not tonight", RequestedBy: "bob"}}})
	st := m.s.View()
	h := st.GetHistory()[len(st.GetHistory())-1]
	if st.GetOperation() != nil || h.GetOutcome() != dbv1.Outcome_OUTCOME_ABORTED || !strings.Contains(h.GetReason(), "by bob: not tonight") {
		t.Fatalf("operation %v history %v", st.GetOperation(), h)
	}
	// One still checkpointing ends at once: nothing is paused or stopped.
	ck := begin(dbv1.Kind_KIND_SWITCHOVER, "pg2", 1)
	ck.GetBegin().Checkpoint = true
	if op := m.ok(ck).GetOperation(); op.GetPhase() != dbv1.Phase_PHASE_CHECKPOINTING || op.GetDeadlineUnixNano() == 0 {
		t.Fatalf("begin with a checkpoint: %v", op)
	}
	m.refused(advance(m.s.View().GetOperation().GetId(), dbv1.Phase_PHASE_CHECKPOINTING, dbv1.Phase_PHASE_STOPPING_OLD, 0), fsmv1.Reason_REASON_INVALID, "does not go from phase checkpointing to stopping_old")
	m.ok(&dbv1.Command{Command: &dbv1.Command_Abort{Abort: &dbv1.AbortOperation{Reason: "later"}}})
	if st := m.s.View(); st.GetOperation() != nil || st.GetHistory()[len(st.GetHistory())-1].GetOutcome() != dbv1.Outcome_OUTCOME_ABORTED {
		t.Fatalf("abort while checkpointing: %v", st.GetOperation())
	}
	// One before promotion rolls back.
	id := m.ok(begin(dbv1.Kind_KIND_SWITCHOVER, "pg2", 1)).GetOperation().GetId()
	m.ok(advance(id, dbv1.Phase_PHASE_PAUSING, dbv1.Phase_PHASE_STOPPING_OLD, 0))
	m.ok(&dbv1.Command{Command: &dbv1.Command_Abort{Abort: &dbv1.AbortOperation{Reason: "oops"}}})
	if p := m.s.View().GetOperation().GetPhase(); p != dbv1.Phase_PHASE_ROLLING_BACK {
		t.Fatalf("phase %v", p)
	}
	m.refused(&dbv1.Command{Command: &dbv1.Command_Abort{Abort: &dbv1.AbortOperation{}}}, fsmv1.Reason_REASON_PRECONDITION, "rolling back already")
	m.ok(finish(id, dbv1.Phase_PHASE_ROLLING_BACK, dbv1.Outcome_OUTCOME_ABORTED))
	if st := m.s.View(); st.GetPrimary() != "pg1" || st.GetGeneration() != 1 {
		t.Errorf("a rollback changed the primary: %s %d", st.GetPrimary(), st.GetGeneration())
	}
}

func TestForget(t *testing.T) {
	m := twoMembers(t)
	m.refused(&dbv1.Command{Command: &dbv1.Command_Forget{Forget: &dbv1.Forget{Name: "pg1"}}}, fsmv1.Reason_REASON_PRECONDITION, "is the primary")
	m.refused(&dbv1.Command{Command: &dbv1.Command_Forget{Forget: &dbv1.Forget{Name: "zz"}}}, fsmv1.Reason_REASON_NOT_FOUND)
	m.ok(&dbv1.Command{Command: &dbv1.Command_Forget{Forget: &dbv1.Forget{Name: "pg2"}}})
	m.ok(&dbv1.Command{Command: &dbv1.Command_Forget{Forget: &dbv1.Forget{Name: "b1"}}})
	st := m.s.View()
	if len(st.GetMembers()) != 1 || len(st.GetBouncers()) != 0 {
		t.Errorf("members %v bouncers %v", st.GetMembers(), st.GetBouncers())
	}
}

func TestHistoryIsBounded(t *testing.T) {
	m := twoMembers(t)
	for i := 0; i < HistoryLimit+10; i++ {
		id := m.ok(begin(dbv1.Kind_KIND_SWITCHOVER, "pg2", 1)).GetOperation().GetId()
		m.ok(&dbv1.Command{Command: &dbv1.Command_Abort{Abort: &dbv1.AbortOperation{}}})
		m.ok(finish(id, dbv1.Phase_PHASE_ROLLING_BACK, dbv1.Outcome_OUTCOME_ABORTED))
	}
	h := m.s.View().GetHistory()
	if len(h) != HistoryLimit {
		t.Fatalf("%d history entries, want %d", len(h), HistoryLimit)
	}
	if h[len(h)-1].GetOpId() <= h[0].GetOpId() {
		t.Error("history is not oldest first")
	}
}

// script runs a whole switchover and failover through the state machine.
func script(m *machine) {
	m.ok(member("pg1", "n1", 5432))
	m.ok(member("pg2", "n2", 5433))
	m.ok(bouncer("b1", "n1"))
	m.ok(setPrimary(0, "pg1", 0))
	id := m.ok(begin(dbv1.Kind_KIND_SWITCHOVER, "pg2", 1)).GetOperation().GetId()
	m.ok(advance(id, dbv1.Phase_PHASE_PAUSING, dbv1.Phase_PHASE_STOPPING_OLD, 0))
	m.ok(advance(id, dbv1.Phase_PHASE_STOPPING_OLD, dbv1.Phase_PHASE_PROMOTING, 99))
	m.ok(setPrimary(id, "pg2", 1))
	m.ok(advance(id, dbv1.Phase_PHASE_REPOINTING, dbv1.Phase_PHASE_DEMOTING, 0))
	m.ok(finish(id, dbv1.Phase_PHASE_DEMOTING, dbv1.Outcome_OUTCOME_DONE))
	m.ok(&dbv1.Command{Command: &dbv1.Command_SetPaused{SetPaused: &dbv1.SetPaused{Paused: true}}})
	id = m.ok(begin(dbv1.Kind_KIND_FAILOVER, "pg1", 2)).GetOperation().GetId()
	m.ok(advance(id, dbv1.Phase_PHASE_FENCING, dbv1.Phase_PHASE_PROMOTING, 0))
}

func TestDeterministic(t *testing.T) {
	a, b := newMachine(t), newMachine(t)
	script(a)
	script(b)
	if !proto.Equal(a.s.View(), b.s.View()) {
		t.Fatal("the same commands gave different states")
	}
	x, _ := proto.MarshalOptions{Deterministic: true}.Marshal(a.s.Snapshot())
	y, _ := proto.MarshalOptions{Deterministic: true}.Marshal(b.s.Snapshot())
	if string(x) != string(y) {
		t.Fatal("snapshots differ byte for byte")
	}
}

func TestSnapshotRoundTrip(t *testing.T) {
	m := newMachine(t)
	script(m)
	snap := m.s.Snapshot()
	// A snapshot is a capture: later applies do not change it.
	frozen := proto.CloneOf(snap)
	m.ok(setPrimary(m.s.View().GetOperation().GetId(), "pg1", 2))
	if !proto.Equal(frozen, snap) {
		t.Fatal("an apply after Snapshot changed the snapshot")
	}
	r, err := Restore(snap)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(r.View(), frozen.GetState()) {
		t.Fatalf("restored state differs:\n%v\n%v", r.View(), frozen.GetState())
	}
	// The restored state goes on like the original would have.
	r2 := &machine{t: t, s: r, index: 100, now: m.now}
	r2.ok(setPrimary(r.View().GetOperation().GetId(), "pg1", 2))
	if r.View().GetGeneration() != 3 {
		t.Errorf("generation %d after restore and promotion", r.View().GetGeneration())
	}
	if _, err := Restore(&dbv1.Snapshot{State: &dbv1.State{Primary: "ghost"}}); err == nil {
		t.Error("restored a snapshot whose primary is not a member")
	}
	if e, err := Restore(&dbv1.Snapshot{}); err != nil || e.View().GetGeneration() != 0 {
		t.Errorf("empty snapshot: %v", err)
	}
}

func TestUnknownCommandPanics(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Error("an unknown command did not panic")
		}
	}()
	NewState().Apply(1, t0, &dbv1.Command{})
}
