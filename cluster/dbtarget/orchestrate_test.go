package dbtarget

import (
	"errors"
	"strings"
	"testing"
	"time"

	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

// The leader's decisions (Next) from a state and reports, without Raft.

var testSettings = Settings{AutomaticFailover: true, MaxLagBytes: 1000}.WithDefaults()

// world is a state machine plus what the leader heard.
type world struct {
	*machine
	obs Observed
}

func newWorld(t *testing.T) *world {
	w := &world{machine: twoMembers(t)}
	w.obs = Observed{
		Postgres: map[string]Heard[*dbv1.PostgresReport]{},
		Bouncers: map[string]Heard[*dbv1.BouncerReport]{},
		Probes:   map[string]Heard[*dbv1.ProbeReport]{},
		Voters:   []string{"n1", "n2", "n3"},
		Since:    w.now.Add(-time.Minute),
	}
	w.healthy()
	w.bouncer("b1", &dbv1.BouncerReport{AppliedGeneration: 1})
	return w
}

// healthy: pg1 a primary at LSN 5000, pg2 a streaming standby at 4900.
func (w *world) healthy() {
	w.pg("pg1", &dbv1.PostgresReport{Running: true, WriteLsn: 5000, ReplayLsn: 5000})
	w.pg("pg2", &dbv1.PostgresReport{Running: true, InRecovery: true, Streaming: true, WriteLsn: 4950, ReplayLsn: 4900})
}

func (w *world) pg(name string, r *dbv1.PostgresReport) {
	r.Member = name
	w.obs.Postgres[name] = Heard[*dbv1.PostgresReport]{Report: r, At: w.now}
}

func (w *world) bouncer(name string, r *dbv1.BouncerReport) {
	r.Name = name
	w.obs.Bouncers[name] = Heard[*dbv1.BouncerReport]{Report: r, At: w.now}
}

func (w *world) probe(node string, reachable bool, down time.Duration) {
	st := w.s.View()
	w.obs.Probes[node] = Heard[*dbv1.ProbeReport]{Report: &dbv1.ProbeReport{Primary: st.GetPrimary(), Generation: st.GetGeneration(), Reachable: reachable, UnreachableNanos: int64(down)}, At: w.now}
}

func (w *world) op() *dbv1.Operation { return w.s.View().GetOperation() }

func (w *world) step(phase dbv1.Phase, done bool, errText string, lsn uint64) *dbv1.Step {
	return &dbv1.Step{OpId: w.op().GetId(), Phase: phase, Done: done, Error: errText, Lsn: lsn}
}

// next decides and, when there is a command, applies it; it returns the
// decision.
func (w *world) next() Decision {
	w.t.Helper()
	d := Next(w.s.View(), w.obs, testSettings, w.now)
	if d.Command != nil {
		w.ok(d.Command)
	}
	return d
}

func (w *world) wantPhase(p dbv1.Phase) {
	w.t.Helper()
	if got := w.op().GetPhase(); got != p {
		w.t.Fatalf("phase %s, want %s (note %q)", PhaseName(got), PhaseName(p), w.op().GetNote())
	}
}

func (w *world) wantWait(words ...string) {
	w.t.Helper()
	d := Next(w.s.View(), w.obs, testSettings, w.now)
	if d.Command != nil {
		w.t.Fatalf("decided %v (%s), want to wait", d.Command, d.Why)
	}
	for _, word := range words {
		if !strings.Contains(d.Why, word) {
			w.t.Errorf("waits for %q, which lacks %q", d.Why, word)
		}
	}
}

func (w *world) beginSwitchover() {
	w.t.Helper()
	if err := CheckSwitchover(w.s.View(), w.obs, testSettings, "pg2", w.now); err != nil {
		w.t.Fatal(err)
	}
	w.ok(beginCheckpoint("pg2", 1))
	w.wantPhase(dbv1.Phase_PHASE_CHECKPOINTING)
	w.pg("pg1", &dbv1.PostgresReport{Running: true, WriteLsn: 5000, ReplayLsn: 5000, Step: w.step(dbv1.Phase_PHASE_CHECKPOINTING, true, "", 0)})
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_PAUSING)
}

// beginCheckpoint is the switchover a leader begins now: with a
// CHECKPOINT on the old primary.
func beginCheckpoint(target string, gen uint64) *dbv1.Command {
	c := begin(dbv1.Kind_KIND_SWITCHOVER, target, gen)
	c.GetBegin().Checkpoint = true
	return c
}

func TestNextSwitchover(t *testing.T) {
	w := newWorld(t)
	w.ok(beginCheckpoint("pg2", 1))
	w.wantPhase(dbv1.Phase_PHASE_CHECKPOINTING)
	if ok, _ := Writable(w.s.View()); !ok {
		t.Error("not writable while the old primary checkpoints: clients still write then")
	}
	w.wantWait("pg1 to checkpoint")
	w.pg("pg1", &dbv1.PostgresReport{Running: true, WriteLsn: 5000, ReplayLsn: 5000, Step: w.step(dbv1.Phase_PHASE_CHECKPOINTING, true, "", 0)})
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_PAUSING)
	if w.op().GetNote() != "" {
		t.Errorf("note %q after a checkpoint that went well", w.op().GetNote())
	}
	w.wantWait("pgbouncer b1 to pause")
	w.bouncer("b1", &dbv1.BouncerReport{AppliedGeneration: 1, Paused: true, Step: w.step(dbv1.Phase_PHASE_PAUSING, true, "", 0)})
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_STOPPING_OLD)
	w.wantWait("pg1 to stop")
	w.pg("pg1", &dbv1.PostgresReport{Step: w.step(dbv1.Phase_PHASE_STOPPING_OLD, true, "", 5100)})
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_PROMOTING)
	if w.op().GetWaitLsn() != 5100 {
		t.Fatalf("wait LSN %d, want the old primary's 5100", w.op().GetWaitLsn())
	}
	w.wantWait("pg2 to be promoted")
	w.pg("pg2", &dbv1.PostgresReport{Running: true, WriteLsn: 5100, ReplayLsn: 5100, Step: w.step(dbv1.Phase_PHASE_PROMOTING, true, "", 0)})
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_REPOINTING)
	if st := w.s.View(); st.GetPrimary() != "pg2" || st.GetGeneration() != 2 {
		t.Fatalf("primary %s generation %d", st.GetPrimary(), st.GetGeneration())
	}
	w.wantWait("b1 to apply generation 2")
	w.bouncer("b1", &dbv1.BouncerReport{AppliedGeneration: 2})
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_DEMOTING)
	w.wantWait("pg1 to become a standby of pg2")
	w.pg("pg1", &dbv1.PostgresReport{Running: true, InRecovery: true, Step: w.step(dbv1.Phase_PHASE_DEMOTING, true, "", 0)})
	w.next()
	st := w.s.View()
	if st.GetOperation() != nil {
		t.Fatalf("not finished: %v", st.GetOperation())
	}
	if h := st.GetHistory()[len(st.GetHistory())-1]; h.GetOutcome() != dbv1.Outcome_OUTCOME_DONE || h.GetTo() != "pg2" || h.GetReason() != "" {
		t.Errorf("history %v", h)
	}
}

func TestNextWaitsForReportsAfterElection(t *testing.T) {
	w := newWorld(t)
	w.beginSwitchover()
	w.obs.Since = w.now.Add(-time.Second)
	w.bouncer("b1", &dbv1.BouncerReport{Paused: true, Step: w.step(dbv1.Phase_PHASE_PAUSING, true, "", 0)})
	w.wantWait("hearing from the agents")
	w.obs.Since = w.now.Add(-testSettings.ReportInterval * 3)
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_STOPPING_OLD)
}

func TestNextPauseFailureRollsBack(t *testing.T) {
	w := newWorld(t)
	w.ok(bouncer("b2", "n2"))
	w.bouncer("b2", &dbv1.BouncerReport{AppliedGeneration: 1})
	w.beginSwitchover()
	w.bouncer("b1", &dbv1.BouncerReport{Paused: true, Step: w.step(dbv1.Phase_PHASE_PAUSING, true, "", 0)})
	w.bouncer("b2", &dbv1.BouncerReport{Step: w.step(dbv1.Phase_PHASE_PAUSING, false, "PAUSE: admin console refused", 0)})
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_ROLLING_BACK)
	if !strings.Contains(w.op().GetNote(), "pgbouncer b2 could not pause: PAUSE: admin console refused") {
		t.Errorf("note %q", w.op().GetNote())
	}
	// pg1 never stopped: its agent reports it runs, and the rollback ends.
	w.wantWait("pg1 to run again")
	w.pg("pg1", &dbv1.PostgresReport{Running: true, Step: w.step(dbv1.Phase_PHASE_ROLLING_BACK, true, "", 0)})
	w.next()
	st := w.s.View()
	h := st.GetHistory()[len(st.GetHistory())-1]
	if st.GetOperation() != nil || h.GetOutcome() != dbv1.Outcome_OUTCOME_ABORTED || !strings.Contains(h.GetReason(), "b2 could not pause") || st.GetPrimary() != "pg1" {
		t.Fatalf("operation %v history %v", st.GetOperation(), h)
	}
}

func TestNextPauseTimeoutRollsBack(t *testing.T) {
	w := newWorld(t)
	w.ok(bouncer("b2", "n2"))
	w.bouncer("b2", &dbv1.BouncerReport{AppliedGeneration: 1})
	w.beginSwitchover()
	w.bouncer("b1", &dbv1.BouncerReport{Paused: true, Step: w.step(dbv1.Phase_PHASE_PAUSING, true, "", 0)})
	w.wantWait("b2 to pause")
	w.now = w.now.Add(testSettings.PauseTimeout + time.Millisecond)
	w.bouncer("b1", &dbv1.BouncerReport{Paused: true, Step: w.step(dbv1.Phase_PHASE_PAUSING, true, "", 0)})
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_ROLLING_BACK)
	if !strings.Contains(w.op().GetNote(), "pgbouncer b2 did not report paused within 5s (database.pause_timeout)") {
		t.Errorf("note %q", w.op().GetNote())
	}
}

func TestNextPromotionFailure(t *testing.T) {
	w := newWorld(t)
	w.beginSwitchover()
	w.bouncer("b1", &dbv1.BouncerReport{Paused: true, Step: w.step(dbv1.Phase_PHASE_PAUSING, true, "", 0)})
	w.next()
	w.pg("pg1", &dbv1.PostgresReport{Step: w.step(dbv1.Phase_PHASE_STOPPING_OLD, true, "", 5100)})
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_PROMOTING)

	// An error, but the target runs as a primary: it did promote; go on.
	w.pg("pg2", &dbv1.PostgresReport{Running: true, Step: w.step(dbv1.Phase_PHASE_PROMOTING, false, "timeout", 0)})
	d := Next(w.s.View(), w.obs, testSettings, w.now)
	if d.Command.GetSetPrimary() == nil {
		t.Fatalf("decided %v (%s), want SetPrimary", d.Command, d.Why)
	}
	// An error and still a standby: roll back, the old primary starts again.
	w.pg("pg2", &dbv1.PostgresReport{Running: true, InRecovery: true, Step: w.step(dbv1.Phase_PHASE_PROMOTING, false, "pg_promote failed", 0)})
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_ROLLING_BACK)
	if !strings.Contains(w.op().GetNote(), "pg2 could not be promoted: pg_promote failed") {
		t.Errorf("note %q", w.op().GetNote())
	}
	w.now = w.now.Add(testSettings.SwitchoverTimeout + time.Second)
	w.healthy()
	w.next() // no word from pg1's agent by the deadline
	st := w.s.View()
	if st.GetOperation() != nil || st.GetGeneration() != 1 || st.GetPrimary() != "pg1" {
		t.Fatalf("operation %v primary %s generation %d", st.GetOperation(), st.GetPrimary(), st.GetGeneration())
	}
	if h := st.GetHistory()[len(st.GetHistory())-1]; !strings.Contains(h.GetReason(), "did not report running again") {
		t.Errorf("history reason %q", h.GetReason())
	}
}

func TestNextCheckpointFailureGoesOn(t *testing.T) {
	// A CHECKPOINT that fails, or does not finish in time, only makes the
	// old primary's stop slower: the switchover pauses anyway, noting it.
	w := newWorld(t)
	w.ok(beginCheckpoint("pg2", 1))
	w.pg("pg1", &dbv1.PostgresReport{Running: true, WriteLsn: 5000, ReplayLsn: 5000, Step: w.step(dbv1.Phase_PHASE_CHECKPOINTING, false, "checkpoint: canceling statement", 0)})
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_PAUSING)
	if !strings.Contains(w.op().GetNote(), "CHECKPOINT on pg1 failed (checkpoint: canceling statement); its stop may take longer") {
		t.Errorf("note %q", w.op().GetNote())
	}

	w2 := newWorld(t)
	w2.ok(beginCheckpoint("pg2", 1))
	w2.wantWait("pg1 to checkpoint")
	w2.now = w2.now.Add(5*time.Second + time.Millisecond) // begin's timeout
	w2.healthy()
	w2.bouncer("b1", &dbv1.BouncerReport{AppliedGeneration: 1})
	w2.next()
	w2.wantPhase(dbv1.Phase_PHASE_PAUSING)
	if !strings.Contains(w2.op().GetNote(), "pg1 did not report its CHECKPOINT within") {
		t.Errorf("note %q", w2.op().GetNote())
	}
	// The pausing phase has its own bound (pause_timeout from now).
	if d := time.Duration(w2.op().GetDeadlineUnixNano() - w2.now.UnixNano()); d != testSettings.PauseTimeout {
		t.Errorf("pausing deadline in %s, want %s", d, testSettings.PauseTimeout)
	}
}

func TestNextRepointingTimeoutGoesOn(t *testing.T) {
	w := newWorld(t)
	w.ok(begin(dbv1.Kind_KIND_FAILOVER, "pg2", 1))
	w.bouncer("b1", &dbv1.BouncerReport{Fenced: true, Step: w.step(dbv1.Phase_PHASE_FENCING, true, "", 0)})
	delete(w.obs.Postgres, "pg1")
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_PROMOTING)
	w.pg("pg2", &dbv1.PostgresReport{Running: true, Step: w.step(dbv1.Phase_PHASE_PROMOTING, true, "", 0)})
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_REPOINTING)
	w.wantWait("b1 to apply generation 2")
	w.now = w.now.Add(testSettings.SwitchoverTimeout + time.Second)
	w.pg("pg2", &dbv1.PostgresReport{Running: true})
	w.next()
	st := w.s.View()
	h := st.GetHistory()[len(st.GetHistory())-1]
	if st.GetOperation() != nil || h.GetOutcome() != dbv1.Outcome_OUTCOME_DONE || !strings.Contains(h.GetReason(), "b1 did not apply generation 2") {
		t.Fatalf("operation %v history %v", st.GetOperation(), h)
	}
}

func TestNextFencing(t *testing.T) {
	w := newWorld(t)
	w.ok(bouncer("b2", "n2"))
	w.ok(bouncer("b3", "n3"))
	w.ok(begin(dbv1.Kind_KIND_FAILOVER, "pg2", 1))
	// The old primary still runs: its agent is to stop it first.
	w.bouncer("b1", &dbv1.BouncerReport{Fenced: true, Step: w.step(dbv1.Phase_PHASE_FENCING, true, "", 0)})
	w.bouncer("b2", &dbv1.BouncerReport{Fenced: true, Step: w.step(dbv1.Phase_PHASE_FENCING, true, "", 0)})
	w.wantWait("pg1 to be stopped")
	w.pg("pg1", &dbv1.PostgresReport{Running: false})
	// b3 reports but has not fenced yet: wait for it.
	w.bouncer("b3", &dbv1.BouncerReport{})
	w.wantWait("b3 to fence")
	// b3 has been silent for long (its host is gone): its agent, if it
	// lives, fenced it for isolation.
	w.obs.Bouncers["b3"] = Heard[*dbv1.BouncerReport]{Report: &dbv1.BouncerReport{}, At: w.now.Add(-time.Minute)}
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_PROMOTING)
	if !strings.Contains(w.op().GetNote(), "pgbouncer b3 silent for over 5s: fenced by its agent") {
		t.Errorf("note %q", w.op().GetNote())
	}
	if w.op().GetWaitLsn() != 0 {
		t.Errorf("a failover waits for LSN %d", w.op().GetWaitLsn())
	}
}

// silentFor makes pgbouncer name's last report d old.
func (w *world) silentFor(name string, d time.Duration) {
	w.obs.Bouncers[name] = Heard[*dbv1.BouncerReport]{Report: &dbv1.BouncerReport{Name: name, AppliedGeneration: 1}, At: w.now.Add(-d)}
}

func TestNextFencingWaitsForSilentPgbouncer(t *testing.T) {
	// b2 went silent just before the failover (cut off from the cluster,
	// perhaps with the old primary): promotion waits until its agent has
	// surely fenced it, isolation_fence_after plus the margin after its last
	// report, and past the phase's deadline if need be.
	lease := testSettings.IsolationFenceAfter + testSettings.IsolationMargin() // 3 s + 2 s
	w := newWorld(t)
	w.ok(bouncer("b2", "n2"))
	w.pg("pg1", &dbv1.PostgresReport{Running: false, Error: "connection refused"})
	w.ok(begin(dbv1.Kind_KIND_FAILOVER, "pg2", 1))
	w.bouncer("b1", &dbv1.BouncerReport{Fenced: true, Step: w.step(dbv1.Phase_PHASE_FENCING, true, "", 0)})
	w.silentFor("b2", testSettings.Fresh()+time.Millisecond)
	w.wantWait("b2 (silent: it fences itself after 3s; counted as fenced 5s after its last report)")
	w.now = w.now.Add(testSettings.PauseTimeout + time.Second) // past the deadline
	w.pg("pg1", &dbv1.PostgresReport{Running: false, Error: "connection refused"})
	w.bouncer("b1", &dbv1.BouncerReport{Fenced: true, Step: w.step(dbv1.Phase_PHASE_FENCING, true, "", 0)})
	w.silentFor("b2", lease-time.Millisecond)
	w.wantWait("b2 (silent")
	w.silentFor("b2", lease)
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_PROMOTING)
	if !strings.Contains(w.op().GetNote(), "pgbouncer b2 silent for over 5s: fenced by its agent (database.isolation_fence_after)") {
		t.Errorf("note %q", w.op().GetNote())
	}
}

func TestNextFencingNewLeaderCountsSilenceFromItsStart(t *testing.T) {
	// A new leader that has heard nothing from b2 counts b2's silence from
	// its own start: b2 may have reported to the old leader a moment ago.
	lease := testSettings.IsolationFenceAfter + testSettings.IsolationMargin()
	w := newWorld(t)
	w.ok(bouncer("b2", "n2"))
	w.ok(begin(dbv1.Kind_KIND_FAILOVER, "pg2", 1))
	delete(w.obs.Postgres, "pg1")
	w.obs.Since = w.now.Add(-3 * time.Second)
	w.bouncer("b1", &dbv1.BouncerReport{Fenced: true, Step: w.step(dbv1.Phase_PHASE_FENCING, true, "", 0)})
	w.wantWait("b2 (silent")
	w.obs.Since = w.now.Add(-lease)
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_PROMOTING)
}

func TestNextFencingGoesOnOnceAllFenced(t *testing.T) {
	// Every pgbouncer reported fenced for this operation: promote at once,
	// without waiting for any lease.
	w := newWorld(t)
	w.ok(bouncer("b2", "n2"))
	w.ok(begin(dbv1.Kind_KIND_FAILOVER, "pg2", 1))
	w.pg("pg1", &dbv1.PostgresReport{Running: false})
	w.bouncer("b1", &dbv1.BouncerReport{Fenced: true, Step: w.step(dbv1.Phase_PHASE_FENCING, true, "", 0)})
	// A fence for another operation does not count.
	w.bouncer("b2", &dbv1.BouncerReport{Fenced: true, Step: &dbv1.Step{OpId: w.op().GetId() - 1, Phase: dbv1.Phase_PHASE_FENCING, Done: true}})
	w.wantWait("pgbouncer b2 to fence")
	w.bouncer("b2", &dbv1.BouncerReport{Fenced: true, Step: w.step(dbv1.Phase_PHASE_FENCING, true, "", 0)})
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_PROMOTING)
	if w.op().GetNote() != "" {
		t.Errorf("note %q", w.op().GetNote())
	}
}

func TestNextFencingPgbouncerThatCannotFence(t *testing.T) {
	// b2 reports, but fencing fails. Past the deadline, with the old
	// primary's agent silent (it may run, cut off), the failover rolls
	// back; when that agent says its server is down, it goes on.
	setup := func(t *testing.T) *world {
		w := newWorld(t)
		w.ok(bouncer("b2", "n2"))
		w.ok(begin(dbv1.Kind_KIND_FAILOVER, "pg2", 1))
		delete(w.obs.Postgres, "pg1")
		w.bouncer("b1", &dbv1.BouncerReport{Fenced: true, Step: w.step(dbv1.Phase_PHASE_FENCING, true, "", 0)})
		w.bouncer("b2", &dbv1.BouncerReport{Step: w.step(dbv1.Phase_PHASE_FENCING, false, "fence: admin console: connection refused", 0)})
		w.wantWait("pgbouncer b2 (fence: admin console: connection refused) to fence")
		w.now = w.now.Add(testSettings.PauseTimeout + time.Second)
		w.pg("pg2", &dbv1.PostgresReport{Running: true, InRecovery: true, Streaming: true})
		w.bouncer("b1", &dbv1.BouncerReport{Fenced: true, Step: w.step(dbv1.Phase_PHASE_FENCING, true, "", 0)})
		w.bouncer("b2", &dbv1.BouncerReport{Step: w.step(dbv1.Phase_PHASE_FENCING, false, "fence: admin console: connection refused", 0)})
		return w
	}
	t.Run("old primary silent", func(t *testing.T) {
		w := setup(t)
		w.next()
		w.wantPhase(dbv1.Phase_PHASE_ROLLING_BACK)
		for _, want := range []string{"pgbouncer b2 (fence: admin console: connection refused) did not fence within 5s", "may still route to the old primary pg1", "gitraft db remove b2"} {
			if !strings.Contains(w.op().GetNote(), want) {
				t.Errorf("note %q lacks %q", w.op().GetNote(), want)
			}
		}
	})
	t.Run("old primary down", func(t *testing.T) {
		w := setup(t)
		w.pg("pg1", &dbv1.PostgresReport{Running: false, Error: "connection refused"})
		w.next()
		w.wantPhase(dbv1.Phase_PHASE_PROMOTING)
		if !strings.Contains(w.op().GetNote(), "the old primary pg1 does not run as a primary (not running: connection refused)") {
			t.Errorf("note %q", w.op().GetNote())
		}
	})
}

func TestNextFencingCannotStopOldPrimary(t *testing.T) {
	w := newWorld(t)
	w.ok(begin(dbv1.Kind_KIND_FAILOVER, "pg2", 1))
	w.bouncer("b1", &dbv1.BouncerReport{Fenced: true, Step: w.step(dbv1.Phase_PHASE_FENCING, true, "", 0)})
	w.now = w.now.Add(testSettings.PauseTimeout + time.Second)
	w.healthy() // pg1 still reports running as a primary
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_ROLLING_BACK)
	if !strings.Contains(w.op().GetNote(), "still runs as a primary") {
		t.Errorf("note %q", w.op().GetNote())
	}
}

func TestAutomaticFailover(t *testing.T) {
	w := newWorld(t)
	w.ok(member("pg3", "n3", 5434))
	w.pg("pg1", &dbv1.PostgresReport{Running: false, Error: "connection refused"})
	w.pg("pg2", &dbv1.PostgresReport{Running: true, InRecovery: true, WriteLsn: 4800, ReplayLsn: 4800})
	w.pg("pg3", &dbv1.PostgresReport{Running: true, InRecovery: true, WriteLsn: 4990, ReplayLsn: 4900})
	// One voter is not enough, nor a short outage.
	w.probe("n1", false, 10*time.Second)
	w.probe("n2", false, time.Second)
	w.probe("n3", true, 0)
	if d := Next(w.s.View(), w.obs, testSettings, w.now); d.Command != nil {
		t.Fatalf("failed over with 1 of 3 votes: %s", d.Why)
	}
	// A probe about an older generation does not count.
	w.obs.Probes["n2"] = Heard[*dbv1.ProbeReport]{Report: &dbv1.ProbeReport{Primary: "pg1", Generation: 0, UnreachableNanos: int64(time.Minute)}, At: w.now}
	if d := Next(w.s.View(), w.obs, testSettings, w.now); d.Command != nil {
		t.Fatalf("counted a stale probe: %s", d.Why)
	}
	w.probe("n2", false, 6*time.Second)
	d := w.next()
	op := w.op()
	if op.GetKind() != dbv1.Kind_KIND_FAILOVER || !op.GetAutomatic() || op.GetTarget() != "pg3" {
		t.Fatalf("began %v (%s); want an automatic failover to pg3, the standby with the most WAL", op, d.Why)
	}
	if !strings.Contains(d.Why, "2 of 3 voters") {
		t.Errorf("why %q", d.Why)
	}
}

func TestAutomaticFailoverHeldBack(t *testing.T) {
	w := newWorld(t)
	w.pg("pg1", &dbv1.PostgresReport{Running: false})
	for _, n := range []string{"n1", "n2", "n3"} {
		w.probe(n, false, time.Minute)
	}
	off := testSettings
	off.AutomaticFailover = false
	if d := Next(w.s.View(), w.obs, off, w.now); d.Command != nil || !strings.Contains(d.Why, "automatic failover is off") {
		t.Errorf("with automatic failover off: %v (%s)", d.Command, d.Why)
	}
	w.ok(&dbv1.Command{Command: &dbv1.Command_SetPaused{SetPaused: &dbv1.SetPaused{Paused: true, Reason: "maintenance"}}})
	w.wantWait("paused: maintenance", "gitraft db resume")
	fs := AutomaticFailover(w.s.View(), w.obs, testSettings, w.now)
	if fs.GetVotes() != 3 || fs.GetNeeded() != 2 || !strings.Contains(fs.GetBlocked(), "paused") {
		t.Errorf("failover status %v", fs)
	}
	w.ok(&dbv1.Command{Command: &dbv1.Command_SetPaused{SetPaused: &dbv1.SetPaused{Paused: false}}})
	// No standby fit to promote: say why.
	w.pg("pg2", &dbv1.PostgresReport{Running: false, Error: "down too"})
	w.wantWait("no standby can be promoted", "pg2: not running: down too")
}

func TestPickCandidate(t *testing.T) {
	w := newWorld(t)
	w.ok(member("pg3", "n3", 5434))
	w.ok(&dbv1.Command{Command: &dbv1.Command_RegisterMember{RegisterMember: &dbv1.RegisterMember{Member: &dbv1.Member{Name: "pg4", Host: "h", Port: 1, Node: "n4", Priority: 100}}}})
	w.ok(&dbv1.Command{Command: &dbv1.Command_RegisterMember{RegisterMember: &dbv1.RegisterMember{Member: &dbv1.Member{Name: "pg5", Host: "h", Port: 1, Node: "n5", NoFailover: true}}}})
	w.pg("pg2", &dbv1.PostgresReport{Running: true, InRecovery: true, WriteLsn: 5000})
	w.pg("pg3", &dbv1.PostgresReport{Running: true, InRecovery: true, WriteLsn: 5000})
	w.pg("pg4", &dbv1.PostgresReport{Running: true, InRecovery: true, WriteLsn: 3000}) // lags 2000 > 1000
	w.pg("pg5", &dbv1.PostgresReport{Running: true, InRecovery: true, WriteLsn: 9000})
	got, err := PickCandidate(w.s.View(), w.obs, testSettings, w.now)
	if err != nil || got != "pg2" {
		t.Fatalf("picked %q, %v; want pg2 (most WAL, then name)", got, err)
	}
	w.ok(&dbv1.Command{Command: &dbv1.Command_RegisterMember{RegisterMember: &dbv1.RegisterMember{Member: &dbv1.Member{Name: "pg3", Host: "127.0.0.1", Port: 5434, Node: "n3", Priority: 5}}}})
	if got, _ := PickCandidate(w.s.View(), w.obs, testSettings, w.now); got != "pg3" {
		t.Errorf("picked %q; want pg3 (same WAL, higher priority)", got)
	}
	// The lagging one is chosen by nobody, even with the highest priority.
	for _, n := range []string{"pg2", "pg3"} {
		w.pg(n, &dbv1.PostgresReport{Running: false})
	}
	_, err = PickCandidate(w.s.View(), w.obs, testSettings, w.now)
	if err == nil || !strings.Contains(err.Error(), "pg4: lags 2.0 kB") || !strings.Contains(err.Error(), "pg5: no_failover") {
		t.Errorf("err %v", err)
	}
}

func TestCheckSwitchoverRefusals(t *testing.T) {
	cases := []struct {
		name   string
		change func(w *world)
		target string
		reason fsmv1.Reason
		want   []string
	}{
		{"unknown target", nil, "pg9", fsmv1.Reason_REASON_NOT_FOUND, []string{`no member named "pg9"`, "pg1 (primary), pg2"}},
		{"the primary", nil, "pg1", fsmv1.Reason_REASON_INVALID, []string{"already the primary"}},
		{"target silent", func(w *world) { delete(w.obs.Postgres, "pg2") }, "pg2", fsmv1.Reason_REASON_PRECONDITION, []string{"target pg2 is down", "node n2", "database.postgres.member: pg2"}},
		{"target down", func(w *world) { w.pg("pg2", &dbv1.PostgresReport{Error: "connection refused"}) }, "pg2", fsmv1.Reason_REASON_PRECONDITION, []string{"target pg2 is down: not running: connection refused"}},
		{"target not a standby", func(w *world) { w.pg("pg2", &dbv1.PostgresReport{Running: true}) }, "pg2", fsmv1.Reason_REASON_PRECONDITION, []string{"not a standby"}},
		{"target not streaming", func(w *world) { w.pg("pg2", &dbv1.PostgresReport{Running: true, InRecovery: true, ReplayLsn: 5000}) }, "pg2", fsmv1.Reason_REASON_PRECONDITION, []string{"not streaming"}},
		{"target lagging", func(w *world) {
			w.pg("pg2", &dbv1.PostgresReport{Running: true, InRecovery: true, Streaming: true, ReplayLsn: 2500})
		}, "pg2", fsmv1.Reason_REASON_PRECONDITION, []string{"lags 2.5 kB behind the primary", "limit is 1.0 kB (database.max_lag_bytes)"}},
		{"primary silent", func(w *world) { delete(w.obs.Postgres, "pg1") }, "pg2", fsmv1.Reason_REASON_PRECONDITION, []string{"primary pg1 has not reported", "gitraft db failover --to pg2"}},
		{"pgbouncer silent", func(w *world) { w.ok(bouncer("b2", "n2")) }, "pg2", fsmv1.Reason_REASON_PRECONDITION, []string{"pgbouncer b2 has not reported", "node n2", "gitraft db remove b2"}},
		{"under way", func(w *world) { w.ok(begin(dbv1.Kind_KIND_SWITCHOVER, "pg2", 1)) }, "pg2", fsmv1.Reason_REASON_PRECONDITION, []string{"a switchover from pg1 to pg2 is under way"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			w := newWorld(t)
			if c.change != nil {
				c.change(w)
			}
			err := CheckSwitchover(w.s.View(), w.obs, testSettings, c.target, w.now)
			var r *Refusal
			if !errors.As(err, &r) || !errors.Is(err, ErrRefused) {
				t.Fatalf("err %v, want a refusal", err)
			}
			if r.Reason != c.reason {
				t.Errorf("reason %v, want %v", r.Reason, c.reason)
			}
			for _, s := range c.want {
				if !strings.Contains(r.Message, s) {
					t.Errorf("message %q lacks %q", r.Message, s)
				}
			}
		})
	}
}

func TestScheduledSwitchover(t *testing.T) {
	w := newWorld(t)
	at := w.now.Add(time.Hour)
	w.ok(&dbv1.Command{Command: &dbv1.Command_Begin{Begin: &dbv1.BeginOperation{Kind: dbv1.Kind_KIND_SWITCHOVER, Target: "pg2", ExpectedGeneration: 1, AtUnixNano: at.UnixNano()}}})
	w.wantWait("scheduled at")
	w.now = at.Add(time.Millisecond)
	w.healthy()
	w.bouncer("b1", &dbv1.BouncerReport{AppliedGeneration: 1})
	w.next()
	w.wantPhase(dbv1.Phase_PHASE_CHECKPOINTING)

	// One whose target is down at the time is aborted, with the reason.
	w2 := newWorld(t)
	w2.ok(&dbv1.Command{Command: &dbv1.Command_Begin{Begin: &dbv1.BeginOperation{Kind: dbv1.Kind_KIND_SWITCHOVER, Target: "pg2", ExpectedGeneration: 1, AtUnixNano: at.UnixNano()}}})
	w2.now = at.Add(time.Millisecond)
	w2.healthy()
	w2.bouncer("b1", &dbv1.BouncerReport{AppliedGeneration: 1})
	w2.pg("pg2", &dbv1.PostgresReport{Error: "gone"})
	w2.next()
	st := w2.s.View()
	h := st.GetHistory()[len(st.GetHistory())-1]
	if st.GetOperation() != nil || h.GetOutcome() != dbv1.Outcome_OUTCOME_ABORTED || !strings.Contains(h.GetReason(), "at the scheduled time: target pg2 is down") {
		t.Fatalf("operation %v history %v", st.GetOperation(), h)
	}
}

func TestBootstrapDecision(t *testing.T) {
	w := &world{machine: newMachine(t)}
	w.obs = Observed{Postgres: map[string]Heard[*dbv1.PostgresReport]{}, Since: w.now.Add(-time.Minute)}
	w.ok(member("pg1", "n1", 5432))
	w.ok(member("pg2", "n2", 5433))
	w.wantWait("a member running as a primary")
	w.pg("pg1", &dbv1.PostgresReport{Running: true})
	w.pg("pg2", &dbv1.PostgresReport{Running: true})
	w.wantWait("several members run as primaries (pg1, pg2)")
	w.pg("pg2", &dbv1.PostgresReport{Running: true, InRecovery: true})
	w.next()
	if st := w.s.View(); st.GetPrimary() != "pg1" || st.GetGeneration() != 1 {
		t.Fatalf("primary %q generation %d", st.GetPrimary(), st.GetGeneration())
	}
}

func TestWritable(t *testing.T) {
	if ok, why := Writable(&dbv1.State{}); ok || !strings.Contains(why, "no primary") {
		t.Errorf("empty state: %v %q", ok, why)
	}
	w := newWorld(t)
	if ok, _ := Writable(w.s.View()); !ok {
		t.Error("not writable with a primary and nothing under way")
	}
	w.ok(begin(dbv1.Kind_KIND_FAILOVER, "pg2", 1))
	if ok, why := Writable(w.s.View()); ok || !strings.Contains(why, "failover from pg1 to pg2") || !strings.Contains(why, "fencing") {
		t.Errorf("during fencing: %v %q", ok, why)
	}
}

func TestBytes(t *testing.T) {
	for n, want := range map[uint64]string{0: "0 B", 999: "999 B", 1000: "1.0 kB", 16 << 20: "16.8 MB", 5e9: "5.0 GB"} {
		if got := Bytes(n); got != want {
			t.Errorf("Bytes(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestCheckFailoverLagGuard(t *testing.T) {
	w := newWorld(t)
	st := w.s.View()
	// Within the bound (1000 bytes): promoted.
	if got, err := CheckFailover(st, w.obs, testSettings, "pg2", false, w.now); err != nil || got != "pg2" {
		t.Fatalf("CheckFailover within the bound: %q, %v", got, err)
	}
	// Received everything, but 35 kB to replay, with the primary running:
	// refused, saying nothing acknowledged is lost; --force goes ahead.
	w.pg("pg2", &dbv1.PostgresReport{Running: true, InRecovery: true, Streaming: true, WriteLsn: 5000, ReplayLsn: 1000})
	w.pg("pg1", &dbv1.PostgresReport{Running: true, WriteLsn: 40000, ReplayLsn: 40000})
	w.pg("pg2", &dbv1.PostgresReport{Running: true, InRecovery: true, Streaming: true, WriteLsn: 40000, ReplayLsn: 5000})
	_, err := CheckFailover(st, w.obs, testSettings, "pg2", false, w.now)
	if err == nil || !strings.Contains(err.Error(), "nothing acknowledged would be lost") || !strings.Contains(err.Error(), "replay 35.0 kB") ||
		!strings.Contains(err.Error(), "--force") || !strings.Contains(err.Error(), "switchover --to pg2") {
		t.Errorf("replay lag: %v", err)
	}
	if got, err := CheckFailover(st, w.obs, testSettings, "pg2", true, w.now); err != nil || got != "pg2" {
		t.Errorf("CheckFailover --force: %q, %v", got, err)
	}
	// 30 kB not received: refused, saying what would be lost.
	w.pg("pg2", &dbv1.PostgresReport{Running: true, InRecovery: true, Streaming: true, WriteLsn: 10000, ReplayLsn: 10000})
	_, err = CheckFailover(st, w.obs, testSettings, "pg2", false, w.now)
	if err == nil || !strings.Contains(err.Error(), "loses the 30.0 kB of WAL it has not received") {
		t.Errorf("receive lag: %v", err)
	}
	var r *Refusal
	if !errors.As(err, &r) || r.Reason != fsmv1.Reason_REASON_PRECONDITION {
		t.Errorf("receive lag: %v, want a precondition refusal", err)
	}
}

func TestDiffSettings(t *testing.T) {
	a := Settings{}.WithDefaults()
	b := Settings{FailoverAfter: 2 * time.Second}.WithDefaults()
	if d := DiffSettings(a.Canonical(), a.Canonical()); len(d) != 0 {
		t.Errorf("same settings differ: %v", d)
	}
	got := strings.Join(DiffSettings(a.Canonical(), b.Canonical()), ", ")
	if want := "failover_after=2s (leader: 5s), isolation_fence_after=1s (leader: 3s)"; got != want {
		t.Errorf("DiffSettings = %q, want %q", got, want)
	}
}
