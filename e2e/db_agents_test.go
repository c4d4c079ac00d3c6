package e2e

import (
	"context"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gitraft/gitraft/cluster/dbtarget/pgctl/pgtest"
	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
)

// Tests of what an agent leaves behind when it, or the leader, dies or
// stalls: a pause never outlives pause_expiry, and a Raft election costs
// clients a pause, never an error.

// signalNode sends sig to a node's process group.
func signalNode(t testing.TB, n *node, sig syscall.Signal) {
	t.Helper()
	if n.cmd == nil || n.cmd.Process == nil {
		t.Fatalf("%s is not running", n.id)
	}
	if err := syscall.Kill(-n.cmd.Process.Pid, sig); err != nil {
		t.Fatalf("signal %v to %s: %v", sig, n.id, err)
	}
}

// writesVia returns the writes that went through pgbouncer i.
func writesVia(ws []pgtest.Write, i int) []pgtest.Write {
	var out []pgtest.Write
	for _, w := range ws {
		if w.Writer == i {
			out = append(out, w)
		}
	}
	return out
}

// nodeLog is what a node logged so far.
func nodeLog(t testing.TB, n *node) string {
	b, err := os.ReadFile(n.dir + ".log")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// The node whose agent PAUSEd a pgbouncer dies mid-switchover, and it was
// the leader too. An init system starts it again a few seconds later. The
// switchover stays in pausing (a transaction holds another pgbouncer), yet
// the dead agent's pgbouncer resumes pause_expiry after its PAUSE, not when
// the switchover ends; its clients see a pause and no error.
func Test_E2E_DB_AgentKilledMidSwitchover(t *testing.T) {
	const expiry = 6 * time.Second
	// The isolation fence is not what this test is about: with the 1.6 s
	// default of these tests, the election after the leader's SIGKILL on a
	// loaded machine can outlast it, and b1 would then rightly KILL the
	// transaction the test holds open.
	e := startDB(t, dbOpts{pauseTimeout: 20 * time.Second, pauseExpiry: expiry, failoverAfter: 12 * time.Second, isolationFenceAfter: 10 * time.Second})
	n3 := e.c.node("n3")
	e.c.must(n3, "cluster", "transfer-leader", "n3")
	waitFor(t, "n3 to lead", 20*time.Second, func() bool { return e.c.leader() == n3 })
	w := pgtest.StartWriter(t, 60*time.Second, e.bouncers...)
	w.WaitCommitted(50, 30*time.Second)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
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
	e.c.must(e.c.node("n1"), "db", "switchover", "--to", "pg2", "--no-wait")
	var op *dbv1.Operation
	var pausedSeen time.Time
	waitFor(t, "b3 paused in phase pausing", 20*time.Second, func() bool {
		r := e.status()
		op = r.GetState().GetOperation()
		for _, b := range r.GetBouncers() {
			if b.GetBouncer().GetName() == "b3" && b.GetReport().GetPaused() && op.GetPhase() == dbv1.Phase_PHASE_PAUSING {
				pausedSeen = time.Now()
				return true
			}
		}
		return false
	})
	killed := time.Now()
	n3.kill()
	time.Sleep(2 * time.Second)
	n3.start() // as an init system would (systemd Restart=)

	// b3's clients wait at most pause_expiry from its PAUSE (reported
	// before pausedSeen), plus the margin of a write under way.
	waitFor(t, "a write through b3 to commit after the kill", 30*time.Second, func() bool {
		for _, x := range writesVia(w.Writes(), 2) {
			if x.Err == nil && x.End.After(killed) {
				return true
			}
		}
		return false
	})
	resumed := time.Now()
	if d := resumed.Sub(pausedSeen); d > expiry+2*time.Second {
		t.Errorf("b3 resumed %s after it was seen paused, want within pause_expiry %s (+2s)", d.Round(time.Millisecond), expiry)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatalf("the held transaction: %v", err)
	}
	var final *dbv1.HistoryEntry
	waitFor(t, "the switchover to finish or roll back", 90*time.Second, func() bool {
		st := e.status().GetState()
		final = historyEntry(st, op.GetId())
		return final != nil && st.GetOperation() == nil
	})
	primary, gen := "pg1", uint64(1)
	if final.GetOutcome() == dbv1.Outcome_OUTCOME_DONE {
		primary, gen = "pg2", 2
	}
	e.waitPrimary(primary, gen)
	w.WaitCommitted(50, 60*time.Second)
	w.Stop()
	r := e.checkWrites(w, e.pg[primary], time.Time{}, time.Time{})
	b3 := pgtest.ReportBetween(writesVia(w.Writes(), 2), killed, time.Time{})
	t.Logf("switchover %s (%s); b3 resumed %s after it was seen paused; b3's longest write %s; all writes: %d committed, %d failed",
		final.GetOutcome(), final.GetReason(), resumed.Sub(pausedSeen).Round(time.Millisecond), b3.MaxLatency.Round(time.Millisecond), r.Committed, r.Failed)
}

// A Raft election longer than isolation_fence_after (and shorter than
// failover_after): two of three nodes stop (SIGSTOP) for twice the fence
// window, so no node can confirm the state. Every pgbouncer agent holds its
// clients (PAUSE) rather than drop them, and resumes once the cluster
// answers: clients writing the whole time see no failed transaction. Then
// the leader stops with SIGTERM: it hands leadership over first, again with
// no failed transaction.
func Test_E2E_DB_ElectionLongerThanFenceWindow(t *testing.T) {
	const fence = 2 * time.Second
	e := startDB(t, dbOpts{automaticFailover: true, failoverAfter: 6 * time.Second, isolationFenceAfter: fence})
	w := pgtest.StartWriter(t, 60*time.Second, e.bouncers...)
	w.WaitCommitted(100, 30*time.Second)

	leader := e.c.leader()
	var other *node
	for _, n := range e.c.nodes {
		if n != leader {
			other = n
			break
		}
	}
	start := time.Now()
	signalNode(t, leader, syscall.SIGSTOP)
	signalNode(t, other, syscall.SIGSTOP)
	time.Sleep(2 * fence)
	signalNode(t, leader, syscall.SIGCONT)
	signalNode(t, other, syscall.SIGCONT)
	e.waitPrimary("pg1", 1)
	w.WaitCommitted(100, 30*time.Second)
	r := e.checkWrites(w, e.pg["pg1"], start, time.Now())
	held := 0
	for _, n := range e.c.nodes {
		if strings.Contains(nodeLog(t, n), "cut off from the cluster") {
			held++
		}
	}
	if held == 0 {
		t.Error("no pgbouncer agent held its clients: the test did not cut the nodes off for long enough")
	}
	t.Logf("no quorum for %s (fence window %s): %d pgbouncer(s) held their clients; longest write %s; %d committed, %d failed",
		2*fence, fence, held, r.MaxLatency.Round(time.Millisecond), r.Committed, r.Failed)

	// A graceful stop of the leader hands leadership over.
	leader = e.c.leader()
	stopped := time.Now()
	leader.stop()
	if !strings.Contains(nodeLog(t, leader), "handed leadership over") {
		t.Errorf("%s stopped with SIGTERM without handing leadership over", leader.id)
	}
	w.WaitCommitted(100, 30*time.Second)
	leader.start()
	leader.waitReady(60 * time.Second)
	w.WaitCommitted(100, 30*time.Second)
	w.Stop()
	r = e.checkWrites(w, e.pg["pg1"], stopped, time.Now())
	t.Logf("leader %s stopped with SIGTERM and started again: longest write %s; %d committed, %d failed", leader.id, r.MaxLatency.Round(time.Millisecond), r.Committed, r.Failed)
}

// A pgbouncer that died (as 1.18 can on KILL) routes nothing: its agent
// reports it down, db status shows it, and a failover counts it as fenced
// rather than wait for it. Started again, it routes nothing until its agent
// points it at the new primary, then routes there.
func Test_E2E_DB_DeadPgbouncerCountsAsFenced(t *testing.T) {
	e := startDB(t, dbOpts{})
	b3 := e.bouncers[2]
	b3.Kill()
	waitFor(t, "b3 reported down", 20*time.Second, func() bool {
		for _, b := range e.status().GetBouncers() {
			if b.GetBouncer().GetName() == "b3" {
				return b.GetReport().GetDown()
			}
		}
		return false
	})
	if out := e.c.must(e.c.other(), "db", "status"); !strings.Contains(out, "down (routes nothing)") {
		t.Errorf("db status does not show b3 down:\n%s", out)
	}
	start := time.Now()
	out := e.c.must(e.c.other(), "db", "failover", "--to", "pg2")
	took := time.Since(start)
	if !strings.Contains(out, "pg2 is the primary") {
		t.Fatalf("db failover --to pg2 printed:\n%s", out)
	}
	if took > 10*time.Second {
		t.Errorf("the failover took %s with a pgbouncer down, want it not to wait for it", took.Round(time.Millisecond))
	}
	t.Logf("failover with b3 down: %s", took.Round(time.Millisecond))
	b3.Restart()
	e.waitPrimary("pg2", 2)
}
