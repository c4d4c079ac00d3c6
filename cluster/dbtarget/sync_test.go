package dbtarget

import (
	"strings"
	"testing"
	"time"

	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

// Synchronous mode: the leader's steps (SyncStep) and what they allow a
// failover, from made-up reports.

func syncSettings(mode string) Settings {
	s := testSettings
	s.SynchronousMode = mode
	return s
}

// syncStep decides with mode and applies the command; it returns it (nil:
// nothing to do).
func (w *world) syncStep(mode string) *dbv1.SetSynchronous {
	w.t.Helper()
	c := SyncStep(w.s.View(), w.obs, syncSettings(mode), w.now)
	if c != nil {
		w.ok(c)
	}
	return c.GetSetSynchronous()
}

func (w *world) wantSync(names, standby string) {
	w.t.Helper()
	st := w.s.View()
	if st.GetSynchronousStandbyNames() != names || st.GetSynchronousStandby() != standby {
		w.t.Fatalf("names %q standby %q, want %q %q", st.GetSynchronousStandbyNames(), st.GetSynchronousStandby(), names, standby)
	}
}

// primarySync: pg1 reports synchronous_standby_names in force, the
// synchronous standbys and the streaming ones, at LSN lsn.
func (w *world) primarySync(names string, lsn uint64, sync []string, replicas ...string) {
	w.pg("pg1", &dbv1.PostgresReport{Running: true, WriteLsn: lsn, ReplayLsn: lsn, SynchronousStandbyNames: FormatSyncNames(names), Synchronous: sync, Replicas: replicas})
}

func (w *world) standby(name string, lsn uint64, streaming bool) {
	w.pg(name, &dbv1.PostgresReport{Running: true, InRecovery: true, Streaming: streaming, WriteLsn: lsn, ReplayLsn: lsn})
}

// recordPg2 takes the world from nothing named to pg2 recorded.
func (w *world) recordPg2(mode string) {
	w.t.Helper()
	w.primarySync("", 5000, nil, "pg2")
	w.standby("pg2", 4990, true)
	if c := w.syncStep(mode); c.GetNames() != "pg2" || c.GetStandby() != "" {
		t := w.t
		t.Fatalf("first step %v, want to name pg2 without recording it", c)
	}
	// Not recorded until the primary runs with the names and reports it
	// synchronous, and pg2 received what the primary had then.
	if c := w.syncStep(mode); c != nil {
		w.t.Fatalf("%v before the primary applied the names", c)
	}
	w.primarySync("pg2", 5100, []string{"pg2"}, "pg2")
	if c := w.syncStep(mode); c != nil {
		w.t.Fatalf("%v before pg2 reported after the primary", c)
	}
	w.now = w.now.Add(10 * time.Millisecond)
	w.standby("pg2", 5050, true)
	if c := w.syncStep(mode); c != nil {
		w.t.Fatalf("%v while pg2 lacks WAL the primary had when it named it", c)
	}
	w.standby("pg2", 5100, true)
	w.syncStep(mode)
	w.wantSync("pg2", "pg2")
	w.now = w.now.Add(10 * time.Millisecond)
	w.primarySync("pg2", 5200, []string{"pg2"}, "pg2")
	if c := w.syncStep(mode); c != nil {
		w.t.Fatalf("%v with pg2 synchronous and recorded", c)
	}
}

func TestSyncOnNamesRecordsAndFallsBack(t *testing.T) {
	w := newWorld(t)
	w.recordPg2(SyncOn)
	// A failover promotes pg2, and no other without --force.
	s := syncSettings(SyncOn)
	w.pg("pg1", &dbv1.PostgresReport{Error: "connection refused"})
	if c, err := PickCandidate(w.s.View(), w.obs, s, w.now); err != nil || c != "pg2" {
		t.Fatalf("candidate %q, %v", c, err)
	}
	// pg2 leaves: un-recorded first (the primary still names it), then
	// after a grace the names are cleared (no other standby): writes go on.
	w.primarySync("pg2", 5300, nil)
	w.standby("pg2", 5200, false)
	if c := w.syncStep(SyncOn); c.GetNames() != "pg2" || c.GetStandby() != "" {
		t.Fatalf("step %v, want to un-record pg2 first", c)
	}
	if c := w.syncStep(SyncOn); c != nil {
		t.Fatalf("%v within the grace", c)
	}
	w.now = w.now.Add(s.Fresh() + time.Millisecond)
	w.primarySync("pg2", 5300, nil)
	w.syncStep(SyncOn)
	w.wantSync("", "")
	if _, err := PickCandidate(w.s.View(), w.obs, s, w.now); err == nil || !strings.Contains(err.Error(), "no standby is recorded as synchronous") {
		t.Errorf("candidate without a synchronous standby: %v", err)
	}
	// Off clears everything.
	w.ok(cmdSync(w.s.View(), "pg2", "pg2"))
	w.syncStep(SyncOff)
	w.wantSync("", "")
}

func TestSyncStrictKeepsItsStandby(t *testing.T) {
	w := newWorld(t)
	w.recordPg2(SyncStrict)
	w.now = w.now.Add(time.Minute)
	w.primarySync("pg2", 5300, nil)
	w.standby("pg2", 5200, false)
	// Commits wait for pg2, which thus still holds every acknowledged one.
	if c := w.syncStep(SyncStrict); c != nil {
		t.Fatalf("strict mode stepped %v with no other standby", c)
	}
	w.wantSync("pg2", "pg2")
	// Another standby streams: strict switches to it, un-recording first.
	w.ok(member("pg3", "n3", 5434))
	w.primarySync("pg2", 5300, nil, "pg3")
	w.standby("pg3", 5300, true)
	if c := w.syncStep(SyncStrict); c.GetNames() != "pg2" || c.GetStandby() != "" {
		t.Fatalf("step %v, want to un-record pg2 first", c)
	}
	if c := w.syncStep(SyncStrict); c.GetNames() != "pg3" {
		t.Fatalf("step %v, want to name pg3", c)
	}
	// Strict never clears the names: with no standby at all it asks for
	// any ("*") and narrows to the one that becomes synchronous.
	w.ok(cmdSync(w.s.View(), "", ""))
	w.primarySync("", 5400, nil)
	w.standby("pg3", 5400, false)
	w.standby("pg2", 5300, false)
	if c := w.syncStep(SyncStrict); c.GetNames() != AnyStandby {
		t.Fatalf("step %v, want *", c)
	}
	w.primarySync(AnyStandby, 5500, []string{"pg3"}, "pg3")
	w.standby("pg3", 5500, true)
	if c := w.syncStep(SyncStrict); c.GetNames() != "pg3" || c.GetStandby() != "" {
		t.Fatalf("step %v, want to name pg3 alone", c)
	}
}

func TestSyncFailoverTargets(t *testing.T) {
	w := newWorld(t)
	w.ok(member("pg3", "n3", 5434))
	w.standby("pg3", 5000, true)
	w.ok(cmdSync(w.s.View(), "pg2", "pg2"))
	s := syncSettings(SyncOn)
	_, err := CheckFailover(w.s.View(), w.obs, s, "pg3", false, w.now)
	if err == nil || !strings.Contains(err.Error(), "only the synchronous standby pg2") || !strings.Contains(err.Error(), "--force") {
		t.Errorf("failover --to pg3: %v", err)
	}
	if got, err := CheckFailover(w.s.View(), w.obs, s, "pg3", true, w.now); err != nil || got != "pg3" {
		t.Errorf("failover --to pg3 --force: %q %v", got, err)
	}
	// The synchronous standby may lag in replay: nothing acknowledged is lost.
	w.standby("pg2", 100, true)
	if got, err := CheckFailover(w.s.View(), w.obs, s, "pg2", false, w.now); err != nil || got != "pg2" {
		t.Errorf("failover --to pg2: %q %v", got, err)
	}
	// Promotion: the new primary starts with the mode's names, and nobody
	// is recorded as its synchronous standby yet.
	w.ok(begin(dbv1.Kind_KIND_FAILOVER, "pg2", 1))
	id := w.op().GetId()
	w.ok(advance(id, dbv1.Phase_PHASE_FENCING, dbv1.Phase_PHASE_PROMOTING, 0))
	sp := setPrimary(id, "pg2", 1)
	sp.GetSetPrimary().SynchronousStandbyNames = NewPrimarySyncNames(syncSettings(SyncStrict))
	w.ok(sp)
	w.wantSync(AnyStandby, "")
}

func TestSetSynchronousRefusals(t *testing.T) {
	m := twoMembers(t)
	m.refused(cmdSync(m.s.View(), "pg1", ""), fsmv1.Reason_REASON_INVALID, "pg1 is the primary")
	m.refused(cmdSync(m.s.View(), "pg9", ""), fsmv1.Reason_REASON_NOT_FOUND, "no member named")
	m.refused(cmdSync(m.s.View(), "pg2", "pg1"), fsmv1.Reason_REASON_INVALID, "must be the one")
	m.refused(cmdSync(m.s.View(), AnyStandby, "pg2"), fsmv1.Reason_REASON_INVALID, "must be the one")
	stale := cmdSync(m.s.View(), "pg2", "")
	stale.GetSetSynchronous().ExpectedGeneration = 7
	m.refused(stale, fsmv1.Reason_REASON_STALE_TOKEN, "generation")
	m.ok(cmdSync(m.s.View(), "pg2", "pg2"))
	m.ok(&dbv1.Command{Command: &dbv1.Command_Forget{Forget: &dbv1.Forget{Name: "pg2"}}})
	if st := m.s.View(); st.GetSynchronousStandby() != "" {
		t.Errorf("a forgotten member stays the synchronous standby: %v", st)
	}
}
