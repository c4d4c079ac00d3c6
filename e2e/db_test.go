package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/gitraft/gitraft/cluster/dbtarget/pgctl/pgtest"
	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
)

// A planned switchover moves the primary with clients writing through
// every pgbouncer the whole time: no transaction fails, every committed
// row is on the new primary, and the old primary follows it as a standby.
// Then back again.
func Test_E2E_DB_SwitchoverAndBack(t *testing.T) {
	e := startDB(t, dbOpts{})
	w := pgtest.StartWriter(t, 30*time.Second, e.bouncers...)
	w.WaitCommitted(100, 30*time.Second)

	// The read-only signal says writable on every node.
	for _, n := range e.c.nodes {
		code, body := httpGet("http://" + n.httpAddr + "/db/writable")
		var v struct {
			Writable   bool   `json:"writable"`
			Primary    string `json:"primary"`
			Generation uint64 `json:"generation"`
		}
		if code != 200 || json.Unmarshal([]byte(body), &v) != nil || !v.Writable || v.Primary != "pg1" || v.Generation != 1 {
			t.Errorf("%s /db/writable: %d %s, want 200 writable pg1 generation 1", n.id, code, body)
		}
	}

	for i, to := range []string{"pg2", "pg1"} {
		from, gen := otherMember(to), uint64(i+2)
		start := time.Now()
		took := e.switchover(to)
		e.waitPrimary(to, gen)
		w.WaitCommitted(100, 30*time.Second)
		r := e.checkWrites(w, e.pg[to], start, time.Now())
		t.Logf("switchover %s -> %s: %s; longest write %s, longest gap between commits %s; %d committed, %d failed",
			from, to, took.Round(time.Millisecond), r.MaxLatency.Round(time.Millisecond), r.MaxGap.Round(time.Millisecond), r.Committed, r.Failed)
		waitFor(t, from+" streaming from "+to, 60*time.Second, func() bool { return e.pg[from].StreamingFrom(e.pg[to]) })
		// Nothing went to the old primary after the new one took writes.
		promoted := time.Unix(0, e.state().GetPrimarySinceUnixNano())
		for _, x := range pgtest.CommitsOn(w.Writes(), e.pg[from].Port, promoted) {
			t.Errorf("row %d committed on the old primary %s after %s was recorded as the primary", x.ID, from, to)
		}
	}
	w.Stop()
	// Every row any client saw committed is on the final primary.
	e.checkWrites(w, e.pg["pg1"], time.Time{}, time.Time{})

	// status and history say what happened.
	out := e.c.must(e.c.nodes[2], "db", "status")
	for _, want := range []string{"pg1 (generation 3", "operation:", "none", "b1", "b2", "b3", "standby", "primary"} {
		if !strings.Contains(out, want) {
			t.Errorf("db status lacks %q:\n%s", want, out)
		}
	}
	var h dbv1.GetHistoryResponse
	e.c.protoOf(e.c.nodes[1], &h, "db", "history")
	var got []string
	for _, x := range h.GetHistory() {
		got = append(got, fmt.Sprintf("%s %s->%s %s gen %d", x.GetKind(), x.GetFrom(), x.GetTo(), x.GetOutcome(), x.GetGeneration()))
	}
	want := []string{
		"KIND_SWITCHOVER pg2->pg1 OUTCOME_DONE gen 3",
		"KIND_SWITCHOVER pg1->pg2 OUTCOME_DONE gen 2",
	}
	if len(got) < 2 || strings.Join(got[:2], "; ") != strings.Join(want, "; ") {
		t.Errorf("db history (newest first) = %q, want it to begin with %q", got, want)
	}
}

// With automatic failover on, killing the primary's postmaster promotes the
// standby and writes resume through pgbouncer. The old primary, started
// again by hand, never takes writes through pgbouncer: its agent demotes it
// into a standby of the new primary.
func Test_E2E_DB_AutomaticFailover(t *testing.T) {
	e := startDB(t, dbOpts{automaticFailover: true, failoverAfter: time.Second})
	w := pgtest.StartWriter(t, 30*time.Second, e.bouncers...)
	w.WaitCommitted(100, 30*time.Second)
	waitFor(t, "every node to see the primary", 10*time.Second, func() bool {
		r := e.status()
		return len(r.GetProbes()) == 3 && r.GetWritable()
	})

	killed := time.Now()
	e.pg["pg1"].Kill()
	e.waitPrimary("pg2", 2)
	var first time.Time
	waitFor(t, "a write committed on pg2", 30*time.Second, func() bool {
		first = pgtest.FirstCommitOn(w.Writes(), e.pg["pg2"].Port, killed)
		return !first.IsZero()
	})
	t.Logf("automatic failover: first committed write %s after the primary was killed", first.Sub(killed).Round(time.Millisecond))
	st := e.state()
	if h := st.GetHistory()[len(st.GetHistory())-1]; h.GetKind() != dbv1.Kind_KIND_FAILOVER || !h.GetAutomatic() || h.GetTo() != "pg2" || h.GetOutcome() != dbv1.Outcome_OUTCOME_DONE {
		t.Errorf("last history entry %v, want an automatic failover to pg2, done", h)
	}
	promoted := time.Unix(0, st.GetPrimarySinceUnixNano())

	// The old primary comes back as it was: a primary on the old timeline.
	restarted := time.Now()
	// Its agent may demote it while pg_ctl still waits for it to come up.
	if err := e.pg["pg1"].StartBeside(); err != nil {
		t.Logf("starting pg1 raced its agent: %v", err)
	}
	waitFor(t, "pg1 to follow pg2", 60*time.Second, func() bool { return e.pg["pg1"].StreamingFrom(e.pg["pg2"]) })
	w.WaitCommitted(100, 30*time.Second)
	w.Stop()
	if !e.routesTo(e.pg["pg2"]) {
		t.Error("a pgbouncer does not route to pg2")
	}
	for _, x := range pgtest.CommitsOn(w.Writes(), e.pg["pg1"].Port, promoted) {
		t.Errorf("row %d committed through pgbouncer on the old primary pg1 after pg2 was promoted (%s after pg1 was restarted)", x.ID, x.End.Sub(restarted))
	}
	// Every write since the failover is on pg2, and none failed.
	e.checkWrites(w, e.pg["pg2"], first, time.Now())
	r := e.status()
	if m := memberStatus(r, "pg1"); m.GetRole() != "standby" {
		t.Errorf("pg1's role %q, want standby\n%s", m.GetRole(), statusText(r))
	}
}

// The leader dies while a switchover waits in the pausing phase (a
// transaction holds a pgbouncer's server connection). The new leader
// finishes the switchover or rolls it back; either way the fleet ends on
// exactly one primary that every pgbouncer routes to.
func Test_E2E_DB_LeaderKilledMidSwitchover(t *testing.T) {
	e := startDB(t, dbOpts{pauseTimeout: 8 * time.Second})
	n3 := e.c.node("n3")
	e.c.must(n3, "cluster", "transfer-leader", "n3")
	waitFor(t, "n3 to lead", 20*time.Second, func() bool { return e.c.leader() == n3 })
	w := pgtest.StartWriter(t, 60*time.Second, e.bouncers...)
	w.WaitCommitted(50, 30*time.Second)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	held, err := e.bouncers[0].Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close(context.Background())
	tx, err := held.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "INSERT INTO rows (id, writer) VALUES (-1, -1)"); err != nil {
		t.Fatal(err)
	}
	out := e.c.must(e.c.node("n1"), "db", "switchover", "--to", "pg2", "--no-wait")
	if !strings.Contains(out, "began") {
		t.Fatalf("switchover --no-wait printed %q", out)
	}
	var op *dbv1.Operation
	waitFor(t, "the switchover in phase pausing", 20*time.Second, func() bool {
		op = e.status().GetState().GetOperation()
		return op.GetPhase() == dbv1.Phase_PHASE_PAUSING
	})
	n3.kill()
	if err := tx.Commit(ctx); err != nil {
		t.Fatalf("the held transaction: %v", err)
	}
	// An init system starts the node again (its pgbouncer agent takes
	// over the pause it left behind).
	n3.start()
	var final *dbv1.HistoryEntry
	waitFor(t, "the switchover to finish or roll back under a new leader", 90*time.Second, func() bool {
		st := e.status().GetState()
		final = historyEntry(st, op.GetId())
		return final != nil && st.GetOperation() == nil
	})
	st := e.state()
	t.Logf("after the leader was killed in pausing: %s, primary %s generation %d (%s)", final.GetOutcome(), st.GetPrimary(), st.GetGeneration(), final.GetReason())
	primary, standby := "pg1", "pg2"
	gen := uint64(1)
	if final.GetOutcome() == dbv1.Outcome_OUTCOME_DONE {
		primary, standby, gen = "pg2", "pg1", 2
	} else if final.GetOutcome() != dbv1.Outcome_OUTCOME_ABORTED {
		t.Fatalf("switchover ended %v, want done or rolled back", final)
	}
	e.waitPrimary(primary, gen)
	waitFor(t, standby+" streaming from "+primary, 60*time.Second, func() bool { return e.pg[standby].StreamingFrom(e.pg[primary]) })
	// Exactly one primary: the other answers in recovery.
	if e.pg[primary].InRecovery() || !e.pg[standby].InRecovery() {
		t.Fatalf("%s should be the only primary", primary)
	}
	w.WaitCommitted(50, 60*time.Second)
	w.Stop()
	have, err := e.pg[primary].IDs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	r := pgtest.ReportBetween(w.Writes(), time.Time{}, time.Time{})
	if miss := pgtest.Missing(append(r.CommittedIDs, -1), have); len(miss) > 0 {
		t.Errorf("%d committed rows missing on %s (first: %v)", len(miss), primary, miss[:min(5, len(miss))])
	}
	t.Logf("writes: %d committed, %d failed, longest write %s", r.Committed, r.Failed, r.MaxLatency.Round(time.Millisecond))
}

// dbSnapshot is what a refused request must leave unchanged.
func (e *dbEnv) snapshot() string {
	st := e.state()
	return fmt.Sprintf("primary %s generation %d operation %d/%s paused %v history %d",
		st.GetPrimary(), st.GetGeneration(), st.GetOperation().GetId(), st.GetOperation().GetPhase(), st.GetPaused(), len(st.GetHistory()))
}

// Requests the cluster refuses say why and change nothing: an unknown
// target, the primary itself, a target that lags, a target that is down,
// a switchover while another runs; and no automatic failover while paused.
func Test_E2E_DB_Refusals(t *testing.T) {
	e := startDB(t, dbOpts{automaticFailover: true, failoverAfter: time.Second, maxLagBytes: 1 << 20})
	c := e.c
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	refused := func(want string, args ...string) {
		t.Helper()
		before := e.snapshot()
		stderr := c.fails(c.other(), args...)
		if !strings.Contains(stderr, want) {
			t.Errorf("gitraft %s: stderr %q, want it to say %q", strings.Join(args, " "), stderr, want)
		}
		if after := e.snapshot(); after != before {
			t.Errorf("refused gitraft %s changed the state: %s, was %s", strings.Join(args, " "), after, before)
		}
	}

	refused(`no member named "pg9"`, "db", "switchover", "--to", "pg9")
	refused(`no member named "pg9"`, "db", "failover", "--to", "pg9")
	refused("pg1 is already the primary", "db", "switchover", "--to", "pg1")

	// A target that lags: replay paused on pg2 while pg1 writes 4 MB.
	pg1, pg2 := e.pg["pg1"], e.pg["pg2"]
	pg2.MustExec(ctx, "postgres", "SELECT pg_wal_replay_pause()")
	pg1.MustExec(ctx, pgtest.Database, "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 20000) g")
	waitFor(t, "pg2 lagging more than 1 MiB", 30*time.Second, func() bool {
		m := memberStatus(e.status(), "pg2")
		return m.GetLagKnown() && m.GetLagBytes() > 1<<20
	})
	refused("max_lag_bytes", "db", "switchover", "--to", "pg2")
	// failover --to holds the target to the same bound while the primary
	// runs, and says what it would cost.
	refused("--force", "db", "failover", "--to", "pg2")
	refused("before it takes writes", "db", "failover", "--to", "pg2")
	pg2.MustExec(ctx, "postgres", "SELECT pg_wal_replay_resume()")
	waitFor(t, "pg2 caught up", 30*time.Second, func() bool {
		m := memberStatus(e.status(), "pg2")
		return m.GetLagKnown() && m.GetLagBytes() < 1<<20
	})

	// A target that is down.
	if out, err := pg2.PgCtl("stop", "-m", "fast", "-w"); err != nil {
		t.Fatalf("pg_ctl stop pg2: %v\n%s", err, out)
	}
	waitFor(t, "pg2 reported down", 30*time.Second, func() bool {
		m := memberStatus(e.status(), "pg2")
		return m.GetRole() == "stopped"
	})
	refused("target pg2 is down", "db", "switchover", "--to", "pg2")
	refused("target pg2 is down", "db", "failover", "--to", "pg2")
	pg2.Start()
	waitFor(t, "pg2 streaming again", 30*time.Second, func() bool { return pg2.StreamingFrom(pg1) })
	waitFor(t, "pg2 reported as a standby", 30*time.Second, func() bool {
		m := memberStatus(e.status(), "pg2")
		return m.GetRole() == "standby" && m.GetHealth().GetStreaming()
	})

	// A switchover while another runs: the first waits in pausing, held by
	// a transaction under way through b1; then it is rolled back.
	held, err := e.bouncers[0].Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close(context.Background())
	tx, err := held.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, "SELECT 1"); err != nil {
		t.Fatal(err)
	}
	c.must(c.other(), "db", "switchover", "--to", "pg2", "--no-wait")
	var op *dbv1.Operation
	waitFor(t, "the switchover in phase pausing", 20*time.Second, func() bool {
		op = e.status().GetState().GetOperation()
		return op.GetPhase() == dbv1.Phase_PHASE_PAUSING
	})
	refused("wait for it to finish", "db", "switchover", "--to", "pg2")
	refused("wait for it to finish", "db", "failover", "--to", "pg2")
	c.must(c.other(), "db", "abort", "--reason", "e2e")
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the switchover rolled back", 60*time.Second, func() bool {
		h := historyEntry(e.status().GetState(), op.GetId())
		return h != nil && h.GetOutcome() == dbv1.Outcome_OUTCOME_ABORTED
	})
	e.waitPrimary("pg1", 1)

	// No automatic failover while paused: the primary dies, a majority sees
	// it gone, and the cluster only says why it holds back.
	c.must(c.other(), "db", "pause", "--reason", "e2e maintenance")
	before := e.snapshot()
	pg1.Kill()
	var blocked string
	waitFor(t, "automatic failover held back by the pause", 30*time.Second, func() bool {
		fo := e.status().GetFailover()
		blocked = fo.GetBlocked()
		return fo.GetVotes() >= fo.GetNeeded() && fo.GetNeeded() > 0 && strings.Contains(blocked, "pause")
	})
	if after := e.snapshot(); after != before {
		t.Errorf("automatic failover while paused changed the state: %s, was %s", after, before)
	}
	if out := c.must(c.other(), "db", "status"); !strings.Contains(out, "held back") || !strings.Contains(out, "e2e maintenance") {
		t.Errorf("db status does not say why failover is held back:\n%s", out)
	}
	if stderr := c.fails(c.other(), "db", "writable"); !strings.Contains(stderr, "not writable") {
		t.Errorf("db writable with the primary gone: %q", stderr)
	}
	// An operator's failover works while paused.
	if out := c.must(c.other(), "db", "failover", "--to", "pg2"); !strings.Contains(out, "pg2 is the primary") {
		t.Errorf("db failover --to pg2 printed:\n%s", out)
	}
	e.waitPrimary("pg2", 2)
	if st := e.state(); !st.GetPaused() {
		t.Error("the failover ended the maintenance pause")
	}
}

// A third member that streamed from the old primary follows the new one
// after a switchover (not cascading through the old primary), and db status
// shows each standby's upstream.
func Test_E2E_DB_ThirdMemberFollowsNewPrimary(t *testing.T) {
	e := startDB(t, dbOpts{thirdMember: true})
	w := pgtest.StartWriter(t, 30*time.Second, e.bouncers...)
	w.WaitCommitted(100, 30*time.Second)
	for i, to := range []string{"pg2", "pg1"} {
		gen := uint64(i + 2)
		e.switchover(to)
		done := time.Now()
		e.waitPrimary(to, gen)
		waitFor(t, "pg3 streaming from "+to, 30*time.Second, func() bool { return e.pg["pg3"].StreamingFrom(e.pg[to]) })
		t.Logf("pg3 streams from %s %s after the switchover finished", to, time.Since(done).Round(time.Millisecond))
		var out string
		waitFor(t, "db status to show every standby streaming from "+to, 30*time.Second, func() bool {
			out = e.c.must(e.c.nodes[0], "db", "status")
			r := e.status()
			for _, name := range []string{"pg1", "pg2", "pg3"} {
				if name == to {
					continue
				}
				if m := memberStatus(r, name); m.GetHealth().GetUpstream() != e.pg[to].Endpoint().String() {
					return false
				}
			}
			return true
		})
		for _, line := range strings.Split(out, "\n") {
			if f := strings.Fields(line); len(f) > 10 && f[0] != to && strings.HasPrefix(f[0], "pg") && f[10] != to {
				t.Errorf("db status: %s's upstream column %q, want %s:\n%s", f[0], f[10], to, out)
			}
		}
	}
	w.WaitCommitted(100, 30*time.Second)
	w.Stop()
	e.checkWrites(w, e.pg["pg1"], time.Time{}, time.Time{})
	waitFor(t, "pg3 to hold every committed row", 30*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		have, err := e.pg["pg3"].IDs(ctx)
		return err == nil && len(pgtest.Missing(pgtest.ReportBetween(w.Writes(), time.Time{}, time.Time{}).CommittedIDs, have)) == 0
	})
}
