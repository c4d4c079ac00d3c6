package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/gitraft/gitraft/cluster/dbtarget/pgctl/pgtest"
	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
)

// Synchronous mode (database.synchronous_mode: on): the cluster names the
// standby in the primary's synchronous_standby_names and records it once
// the primary reports it synchronous. With the writer running, the
// primary's postmaster is SIGKILLed: the automatic failover promotes that
// standby, and not one acknowledged transaction is lost.
func Test_E2E_DB_SynchronousFailoverLosesNothing(t *testing.T) {
	e := startDB(t, dbOpts{automaticFailover: true, failoverAfter: time.Second, synchronousMode: "on"})
	e.waitSyncStandby("pg2")
	out := e.c.must(e.c.nodes[2], "db", "status")
	if !strings.Contains(out, "pg2 (a failover promotes only it)") {
		t.Errorf("db status does not name the synchronous standby:\n%s", out)
	}
	w := pgtest.StartWriter(t, 30*time.Second, e.bouncers...)
	w.WaitCommitted(500, 30*time.Second)
	waitFor(t, "every node to see the primary", 10*time.Second, func() bool {
		r := e.status()
		return len(r.GetProbes()) == 3 && r.GetWritable()
	})
	// Under the write load a standby that falls behind is un-recorded (on
	// mode goes asynchronous rather than block writes): kill the primary
	// only while pg2 is recorded synchronous, as this test is about that
	// case.
	e.waitSyncStandby("pg2")
	took, lost := e.killPrimaryAndFailOver(w, "pg1", "pg2", 2)
	r := pgtest.ReportBetween(w.Writes(), time.Time{}, time.Time{})
	t.Logf("synchronous failover: first write %s after the SIGKILL; %d acknowledged transactions, %d lost", took.Round(time.Millisecond), r.Committed, lost)
	if lost != 0 {
		t.Errorf("%d acknowledged transactions lost in a synchronous-mode failover, want 0", lost)
	}
	st := e.state()
	if h := st.GetHistory()[len(st.GetHistory())-1]; h.GetKind() != dbv1.Kind_KIND_FAILOVER || !h.GetAutomatic() || h.GetTo() != "pg2" {
		t.Errorf("last history entry %v, want an automatic failover to pg2", h)
	}
	// pg2 runs alone now: on mode falls back to asynchronous replication,
	// so writes go on, with no synchronous standby recorded.
	waitFor(t, "pg2 running without synchronous_standby_names", 30*time.Second, func() bool {
		r := e.status()
		return r.GetState().GetSynchronousStandby() == "" && memberStatus(r, "pg2").GetHealth().GetSynchronousStandbyNames() == ""
	})
}
