package mail

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	mailv1 "github.com/gitraft/gitraft/proto/gitraft/mail/v1"
)

// applier applies commands to a State at increasing indexes and times.
type applier struct {
	t     *testing.T
	s     *State
	index uint64
	now   time.Time
}

func newApplier(t *testing.T) *applier {
	return &applier{t: t, s: NewState(), now: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
}

func (a *applier) apply(c *mailv1.Command) *fsmv1.Result {
	a.index++
	a.now = a.now.Add(time.Second)
	return a.s.Apply(a.index, a.now, c)
}

// ok applies and fails the test on a refusal.
func (a *applier) ok(c *mailv1.Command) *mailv1.Result {
	a.t.Helper()
	r := a.apply(c)
	if r.GetRefusal() != nil {
		a.t.Fatalf("%v refused: %v", c, r.GetRefusal())
	}
	return r.GetMail()
}

// refused applies, expects a refusal with the reason whose message
// contains want, and checks that the state did not change.
func (a *applier) refused(c *mailv1.Command, reason fsmv1.Reason, want string) {
	a.t.Helper()
	before := a.s.Snapshot()
	r := a.apply(c)
	if r.GetRefusal() == nil {
		a.t.Fatalf("%v: applied, want a refusal containing %q", c, want)
	}
	if r.GetRefusal().GetReason() != reason || !strings.Contains(r.GetRefusal().GetMessage(), want) {
		a.t.Fatalf("%v: refusal %v, want %v containing %q", c, r.GetRefusal(), reason, want)
	}
	if !proto.Equal(before, a.s.Snapshot()) {
		a.t.Fatalf("%v: a refusal changed the state", c)
	}
}

func add(name, addr string, prio uint32) *mailv1.Command {
	return &mailv1.Command{Command: &mailv1.Command_AddHost{AddHost: &mailv1.AddHost{Name: name, Address: addr, Priority: prio, By: "admin:test"}}}
}

func drain(name string, d time.Duration, reason string, force bool) *mailv1.Command {
	return &mailv1.Command{Command: &mailv1.Command_Drain{Drain: &mailv1.Drain{Name: name, Deadline: durationpb.New(d), Reason: reason, By: "admin:test", Force: force}}}
}

func undrain(name string) *mailv1.Command {
	return &mailv1.Command{Command: &mailv1.Command_Undrain{Undrain: &mailv1.Undrain{Name: name, By: "admin:test"}}}
}

func report(name string, drainID, size uint64) *mailv1.Command {
	return &mailv1.Command{Command: &mailv1.Command_ReportQueue{ReportQueue: &mailv1.ReportQueue{Name: name, DrainId: drainID, QueueSize: size, By: "agent:n1"}}}
}

func overdue(name string, drainID uint64) *mailv1.Command {
	return &mailv1.Command{Command: &mailv1.Command_MarkOverdue{MarkOverdue: &mailv1.MarkOverdue{Name: name, DrainId: drainID, By: "leader:n1"}}}
}

func (a *applier) host(name string) *mailv1.Host {
	a.t.Helper()
	h, ok := a.s.Host(name)
	if !ok {
		a.t.Fatalf("no host %s", name)
	}
	return h
}

func mx(s *State) string {
	var parts []string
	for _, r := range s.MXSet() {
		parts = append(parts, fmt.Sprintf("%s/%d", r.GetHost(), r.GetPriority()))
	}
	return strings.Join(parts, " ")
}

func Test_DrainCycle(t *testing.T) {
	a := newApplier(t)
	a.ok(add("mx1", "mx1.example.org", 10))
	a.ok(add("mx2", "mx2.example.org", 20))
	a.ok(add("mx3", "mx3.example.org", 10))
	if got := mx(a.s); got != "mx1/10 mx3/10 mx2/20" {
		t.Fatalf("MX set %q", got)
	}
	a.ok(report("mx2", 0, 3))

	r := a.ok(drain("mx2", time.Hour, "kernel update", false))
	id := a.index
	h := r.GetHost()
	if !r.GetChanged() || h.GetState() != mailv1.HostState_HOST_STATE_DRAINING || h.GetDrainId() != id || h.GetReason() != "kernel update" ||
		!h.GetDeadline().AsTime().Equal(a.now.Add(time.Hour)) || h.GetDrainedBy() != "admin:test" {
		t.Fatalf("after drain: %v", h)
	}
	if got := mx(a.s); got != "mx1/10 mx3/10" {
		t.Fatalf("MX set while draining %q", got)
	}
	// Draining again changes nothing and says so; no history entry.
	hist := len(a.s.History("", 0))
	r = a.ok(drain("mx2", time.Minute, "other", false))
	if r.GetChanged() || !strings.Contains(r.GetNote(), "already draining") || a.host("mx2").GetDrainId() != id || len(a.s.History("", 0)) != hist {
		t.Fatalf("second drain: %v (history %d -> %d)", r, hist, len(a.s.History("", 0)))
	}
	// A report for no drain, or an older one, or a non-empty queue: still draining.
	for _, c := range []*mailv1.Command{report("mx2", 0, 0), report("mx2", id-1, 0), report("mx2", id, 2)} {
		a.ok(c)
		if st := a.host("mx2").GetState(); st != mailv1.HostState_HOST_STATE_DRAINING {
			t.Fatalf("after %v: %v", c, st)
		}
	}
	if a.host("mx2").GetQueueSize() != 2 || a.host("mx2").GetQueueReportedBy() != "agent:n1" {
		t.Fatalf("queue not recorded: %v", a.host("mx2"))
	}
	// The empty queue of this drain: drained.
	r = a.ok(report("mx2", id, 0))
	if r.GetHost().GetState() != mailv1.HostState_HOST_STATE_DRAINED {
		t.Fatalf("empty queue: %v", r.GetHost())
	}
	r = a.ok(drain("mx2", time.Hour, "", false))
	if r.GetChanged() || !strings.Contains(r.GetNote(), "already drained") {
		t.Fatalf("drain a drained host: %v", r)
	}
	// Mail queued again on a drained host: back to draining.
	a.ok(report("mx2", id, 1))
	if st := a.host("mx2").GetState(); st != mailv1.HostState_HOST_STATE_DRAINING {
		t.Fatalf("refilled: %v", st)
	}
	a.ok(report("mx2", id, 0))

	r = a.ok(undrain("mx2"))
	h = r.GetHost()
	if h.GetState() != mailv1.HostState_HOST_STATE_ACTIVE || h.GetDrainId() != 0 || h.GetDeadline() != nil || h.GetReason() != "" {
		t.Fatalf("after undrain: %v", h)
	}
	if got := mx(a.s); got != "mx1/10 mx3/10 mx2/20" {
		t.Fatalf("MX set after undrain %q", got)
	}
	r = a.ok(undrain("mx2"))
	if r.GetChanged() || !strings.Contains(r.GetNote(), "already active") {
		t.Fatalf("undrain an active host: %v", r)
	}

	var events []string
	for _, e := range a.s.History("mx2", 0) {
		events = append(events, fmt.Sprintf("%s:%s>%s", strings.TrimPrefix(e.GetEvent().String(), "EVENT_"),
			strings.TrimPrefix(e.GetFrom().String(), "HOST_STATE_"), strings.TrimPrefix(e.GetTo().String(), "HOST_STATE_")))
	}
	want := "ADDED:UNSPECIFIED>ACTIVE DRAIN:ACTIVE>DRAINING DRAINED:DRAINING>DRAINED REFILLED:DRAINED>DRAINING DRAINED:DRAINING>DRAINED UNDRAIN:DRAINED>ACTIVE"
	if got := strings.Join(events, " "); got != want {
		t.Fatalf("history of mx2:\n got %s\nwant %s", got, want)
	}
	if got := a.s.History("mx2", 2); len(got) != 2 || got[1].GetEvent() != mailv1.Event_EVENT_UNDRAIN {
		t.Fatalf("history with limit: %v", got)
	}
}

func Test_LastActiveHostNeedsForce(t *testing.T) {
	a := newApplier(t)
	a.ok(add("mx1", "mx1.example.org", 10))
	a.ok(add("mx2", "mx2.example.org", 20))
	a.ok(drain("mx1", time.Hour, "", false))
	a.refused(drain("mx2", time.Hour, "", false), fsmv1.Reason_REASON_PRECONDITION, "mx2 is the last active mail host")
	a.refused(&mailv1.Command{Command: &mailv1.Command_RemoveHost{RemoveHost: &mailv1.RemoveHost{Name: "mx2"}}}, fsmv1.Reason_REASON_PRECONDITION, "last active")
	// A draining host cannot be removed: its mail would be forgotten.
	a.refused(&mailv1.Command{Command: &mailv1.Command_RemoveHost{RemoveHost: &mailv1.RemoveHost{Name: "mx1", Force: true}}}, fsmv1.Reason_REASON_PRECONDITION, "mx1 is draining")

	r := a.ok(drain("mx2", time.Hour, "datacenter move", true))
	if r.GetHost().GetState() != mailv1.HostState_HOST_STATE_DRAINING || mx(a.s) != "" {
		t.Fatalf("forced drain: %v, MX %q", r.GetHost(), mx(a.s))
	}
	last := a.s.History("mx2", 1)[0]
	if !strings.Contains(last.GetReason(), "datacenter move") || !strings.Contains(last.GetReason(), "forced") {
		t.Fatalf("forced drain history: %v", last)
	}
	if !strings.Contains(ZoneFragment(a.s.MXSet()), "MX set is empty") {
		t.Fatalf("empty fragment: %q", ZoneFragment(a.s.MXSet()))
	}
}

func Test_RefusalsChangeNothing(t *testing.T) {
	a := newApplier(t)
	a.refused(drain("mx9", time.Hour, "", false), fsmv1.Reason_REASON_NOT_FOUND, "no mail hosts are registered")
	a.ok(add("mx1", "mx1.example.org", 10))
	a.ok(add("mx2", "mx2.example.org", 10))
	a.refused(drain("mx9", time.Hour, "", false), fsmv1.Reason_REASON_NOT_FOUND, `mail host "mx9" not found; known hosts: mx1, mx2`)
	a.refused(undrain("mx9"), fsmv1.Reason_REASON_NOT_FOUND, "mx9")
	a.refused(report("mx9", 0, 1), fsmv1.Reason_REASON_NOT_FOUND, "mx9")
	a.refused(drain("mx1", 0, "", false), fsmv1.Reason_REASON_INVALID, "deadline")
	a.refused(drain("mx1", MaxDeadline+time.Second, "", false), fsmv1.Reason_REASON_INVALID, "deadline")
	for _, c := range []*mailv1.Command{
		add("", "mx.example.org", 1),
		add("MX1", "mx.example.org", 1),
		add("-mx", "mx.example.org", 1),
		add("mx3", "", 1),
		add("mx3", "mx 3.example.org", 1),
		add("mx3", "mx..example.org", 1),
		add("mx3", "-mx.example.org", 1),
		add("mx3", "mx3.example.org", 70000),
	} {
		a.refused(c, fsmv1.Reason_REASON_INVALID, "")
	}
	for i := 3; i <= 12; i++ {
		a.ok(add(fmt.Sprintf("mx%d", i), "mx.example.org", 10))
	}
	a.refused(drain("nope", time.Hour, "", false), fsmv1.Reason_REASON_NOT_FOUND, "12 hosts are registered")
}

func Test_AddUpdateRemove(t *testing.T) {
	a := newApplier(t)
	a.ok(add("mx1", "mx1.example.org", 10))
	r := a.ok(add("mx1", "mx1.example.org", 10))
	if r.GetChanged() || !strings.Contains(r.GetNote(), "already has") {
		t.Fatalf("same add: %v", r)
	}
	r = a.ok(&mailv1.Command{Command: &mailv1.Command_AddHost{AddHost: &mailv1.AddHost{Name: "mx1", Address: "other.example.org", Priority: 5, IfAbsent: true}}})
	if r.GetChanged() || a.host("mx1").GetAddress() != "mx1.example.org" {
		t.Fatalf("if_absent changed the host: %v", r)
	}
	r = a.ok(add("mx1", "new.example.org", 5))
	if !r.GetChanged() || a.host("mx1").GetAddress() != "new.example.org" || a.host("mx1").GetPriority() != 5 {
		t.Fatalf("update: %v", r)
	}
	a.ok(add("mx2", "mx2.example.org", 10))
	a.ok(&mailv1.Command{Command: &mailv1.Command_RemoveHost{RemoveHost: &mailv1.RemoveHost{Name: "mx1"}}})
	if _, ok := a.s.Host("mx1"); ok {
		t.Fatal("mx1 not removed")
	}
	a.ok(&mailv1.Command{Command: &mailv1.Command_RemoveHost{RemoveHost: &mailv1.RemoveHost{Name: "mx2", Force: true}}})
	if got := len(a.s.History("mx1", 0)); got != 3 {
		t.Fatalf("mx1 history has %d entries, want 3 (added, updated, removed)", got)
	}
}

func Test_OverdueAndHandoff(t *testing.T) {
	a := newApplier(t)
	a.ok(add("mx1", "mx1.example.org", 10))
	a.ok(add("mx2", "mx2.example.org", 20))
	a.ok(report("mx2", 0, 4))
	a.ok(drain("mx2", 10*time.Second, "", false))
	id := a.index
	if got := a.s.Overdue(a.now.Add(9 * time.Second)); len(got) != 0 {
		t.Fatalf("overdue before the deadline: %v", got)
	}
	r := a.ok(overdue("mx2", id)) // the entry's time is before the deadline
	if r.GetChanged() || a.host("mx2").GetOverdue() {
		t.Fatalf("overdue too early: %v", r)
	}
	a.now = a.now.Add(20 * time.Second)
	if got := a.s.Overdue(a.now); len(got) != 1 {
		t.Fatalf("Overdue: %v", got)
	}
	hist := len(a.s.History("", 0))
	r = a.ok(overdue("mx2", id))
	if !r.GetChanged() || !a.host("mx2").GetOverdue() || a.host("mx2").GetState() != mailv1.HostState_HOST_STATE_DRAINING {
		t.Fatalf("overdue: %v", r)
	}
	last := a.s.History("mx2", 1)[0]
	if last.GetEvent() != mailv1.Event_EVENT_OVERDUE || !strings.Contains(last.GetReason(), "4 messages") {
		t.Fatalf("overdue history: %v", last)
	}
	// Recorded once.
	if r := a.ok(overdue("mx2", id)); r.GetChanged() || len(a.s.History("", 0)) != hist+1 || len(a.s.Overdue(a.now)) != 0 {
		t.Fatalf("second overdue: %v", r)
	}
	hand := &mailv1.Command{Command: &mailv1.Command_ReportHandoff{ReportHandoff: &mailv1.ReportHandoff{Name: "mx2", DrainId: id, Peer: "mx1", By: "agent:n3"}}}
	if r := a.ok(hand); !r.GetChanged() || a.host("mx2").GetHandoffPeer() != "mx1" {
		t.Fatalf("handoff: %v", r)
	}
	if r := a.ok(hand); r.GetChanged() {
		t.Fatalf("second handoff report changed: %v", r)
	}
	a.ok(report("mx2", id, 0))
	a.ok(undrain("mx2"))
	if h := a.host("mx2"); h.GetOverdue() || h.GetHandoffPeer() != "" {
		t.Fatalf("undrain kept drain fields: %v", h)
	}
	// A stale overdue mark of the old drain changes nothing.
	if r := a.ok(overdue("mx2", id)); r.GetChanged() {
		t.Fatalf("stale overdue: %v", r)
	}
}

func Test_HistoryBounded(t *testing.T) {
	a := newApplier(t)
	a.ok(add("mx1", "mx1.example.org", 10))
	a.ok(add("mx2", "mx2.example.org", 10))
	for i := 0; i < MaxHistory; i++ {
		a.ok(drain("mx2", time.Hour, "", false))
		a.ok(undrain("mx2"))
	}
	h := a.s.History("", 0)
	if len(h) != MaxHistory || h[len(h)-1].GetIndex() != a.index || h[0].GetIndex() != a.index-MaxHistory+1 {
		t.Fatalf("history: %d entries, first %d last %d (index %d)", len(h), h[0].GetIndex(), h[len(h)-1].GetIndex(), a.index)
	}
}

// A snapshot restores to the same state, and later applies do not change
// a snapshot already taken.
func Test_SnapshotRestore(t *testing.T) {
	a := newApplier(t)
	a.ok(add("mx1", "mx1.example.org", 10))
	a.ok(add("mx2", "mx2.example.org", 20))
	a.ok(drain("mx2", time.Hour, "maintenance", false))
	snap := a.s.Snapshot()
	frozen := proto.Clone(snap)
	a.ok(report("mx2", a.index, 0))
	a.ok(undrain("mx2"))
	if !proto.Equal(snap, frozen) {
		t.Fatal("applies changed a snapshot already taken")
	}
	b, err := proto.Marshal(snap)
	if err != nil {
		t.Fatal(err)
	}
	var decoded mailv1.Snapshot
	if err := proto.Unmarshal(b, &decoded); err != nil {
		t.Fatal(err)
	}
	r, err := Restore(&decoded)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(r.Snapshot(), frozen) {
		t.Fatalf("restored state differs:\n%v\n%v", r.Snapshot(), frozen)
	}
	if _, err := Restore(&mailv1.Snapshot{Hosts: []*mailv1.Host{{Name: "a"}, {Name: "a"}}}); err == nil {
		t.Fatal("a snapshot with a host twice restored")
	}
}

// The same commands give the same state, byte for byte.
func Test_Deterministic(t *testing.T) {
	run := func() []byte {
		a := newApplier(t)
		for i := 0; i < 20; i++ {
			a.ok(add(fmt.Sprintf("mx%d", i), "mx.example.org", uint32(i%3)))
		}
		for i := 0; i < 20; i += 2 {
			a.ok(drain(fmt.Sprintf("mx%d", i), time.Hour, "r", false))
		}
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(a.s.Snapshot())
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if string(run()) != string(run()) {
		t.Fatal("two runs of the same commands gave different states")
	}
}

func Test_ZoneFragment(t *testing.T) {
	got := ZoneFragment([]*mailv1.MXRecord{
		{Host: "mx1", Priority: 10, Address: "mx1.example.org"},
		{Host: "mx2", Priority: 20, Address: "mx2.example.org."},
		{Host: "mx3", Priority: 30, Address: "mx3"},
	})
	for _, want := range []string{"@\tIN\tMX\t10\tmx1.example.org.\t; mx1\n", "@\tIN\tMX\t20\tmx2.example.org.\t; mx2\n", "@\tIN\tMX\t30\tmx3\t; mx3\n"} {
		if !strings.Contains(got, want) {
			t.Errorf("fragment lacks %q:\n%s", want, got)
		}
	}
	for _, line := range strings.Split(strings.TrimSpace(got), "\n") {
		if !strings.HasPrefix(line, ";") && !strings.HasPrefix(line, "@\tIN\tMX\t") {
			t.Errorf("line %q is neither a comment nor an MX record", line)
		}
	}
}

// A drain's deadline can be moved while it drains; moved past now, an
// overdue drain is no longer overdue nor handed off. A drain without a new
// deadline still changes nothing.
func Test_MoveDeadline(t *testing.T) {
	a := newApplier(t)
	a.ok(add("mx1", "mx1.example.org", 10))
	a.ok(add("mx2", "mx2.example.org", 20))
	a.ok(drain("mx2", 10*time.Second, "", false))
	id := a.index
	start := a.now
	a.now = a.now.Add(20 * time.Second)
	a.ok(overdue("mx2", id))
	a.ok(&mailv1.Command{Command: &mailv1.Command_ReportHandoff{ReportHandoff: &mailv1.ReportHandoff{Name: "mx2", DrainId: id, Peer: "mx1"}}})
	if r := a.ok(drain("mx2", time.Hour, "", false)); r.GetChanged() || !strings.Contains(r.GetNote(), "already draining") {
		t.Fatalf("drain without a new deadline: %v", r)
	}
	move := drain("mx2", 2*time.Hour, "more time", false)
	move.GetDrain().UpdateDeadline = true
	r := a.ok(move)
	h := a.host("mx2")
	if !r.GetChanged() || !h.GetDeadline().AsTime().Equal(a.now.Add(2*time.Hour)) || h.GetOverdue() || h.GetHandoffPeer() != "" ||
		h.GetDrainId() != id || !h.GetDrainStartedAt().AsTime().Equal(start) || h.GetState() != mailv1.HostState_HOST_STATE_DRAINING {
		t.Fatalf("moved deadline: %v %v", r, h)
	}
	if !strings.Contains(r.GetNote(), "no longer overdue") || !strings.Contains(r.GetNote(), "no longer handed to mx1") {
		t.Fatalf("note: %q", r.GetNote())
	}
	if last := a.s.History("mx2", 1)[0]; last.GetEvent() != mailv1.Event_EVENT_UPDATED || !strings.Contains(last.GetReason(), "more time") {
		t.Fatalf("history: %v", last)
	}
	// Drained: nothing to move.
	a.ok(report("mx2", id, 0))
	if r := a.ok(move); r.GetChanged() {
		t.Fatalf("moved the deadline of a drained host: %v", r)
	}
}
