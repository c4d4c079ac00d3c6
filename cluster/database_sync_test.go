package cluster

// Synchronous mode (database.synchronous_mode) in-process, with the fake
// servers' model of synchronous replication: a commit on a primary whose
// synchronous_standby_names matches a streaming standby is on that standby
// when it is acknowledged, and waits while none matches.

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/gitraft/gitraft/cluster/dbtarget"
	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
)

// waitSync waits until the state records standby (any, if "") as the
// synchronous standby and the primary's synchronous_standby_names names
// it, and returns it.
func (h *dbHarness) waitSync(primary, standby string) string {
	h.t.Helper()
	var rec string
	waitFor(h.t, "a synchronous standby of "+primary+" recorded "+standby, 20*time.Second, func() bool {
		st := h.state()
		h.pg.mu.Lock()
		defer h.pg.mu.Unlock()
		rec = st.GetSynchronousStandby()
		return rec != "" && (standby == "" || rec == standby) && h.pg.servers[primary].syncNames == dbtarget.FormatSyncNames(rec)
	})
	return rec
}

// waitStreaming waits until the leader hears name streaming.
func (h *dbHarness) waitStreaming(name string) {
	h.t.Helper()
	waitFor(h.t, name+" reported streaming", 10*time.Second, func() bool {
		st, err := h.client("n1").GetStatus(context.Background(), &dbv1.GetStatusRequest{})
		if err != nil {
			return false
		}
		for _, m := range st.GetMembers() {
			if m.GetMember().GetName() == name {
				return m.GetRole() == "standby" && m.GetHealth().GetStreaming()
			}
		}
		return false
	})
}

func Test_DB_SynchronousFailoverLosesNothing(t *testing.T) {
	set := fastDBSettings()
	set.AutomaticFailover = true
	set.SynchronousMode = dbtarget.SyncOn
	h := newDBHarness(t, set, map[string]agentsOf{"n1": {"pg1", "b1"}, "n2": {"pg2", "b2"}, "n3": {"pg3", "b3"}})
	h.waitSettled("pg1", 1)
	sync := h.waitSync("pg1", "")
	w := h.startWriter("b1", "b2", "b3")
	waitFor(t, "writes", 5*time.Second, func() bool { w.mu.Lock(); defer w.mu.Unlock(); return len(w.committed) > 50 })
	// The primary's postmaster dies: what it had not sent is lost to
	// asynchronous standbys (pg3), not to the synchronous one.
	h.pg.mu.Lock()
	h.pg.servers["pg1"].running = false
	h.pg.event("kill pg1")
	h.pg.mu.Unlock()
	h.waitSettled(sync, 2)
	committed, _ := w.finish()
	h.checkAllRows(sync, committed) // every acknowledged row
	st := h.state()
	if e := st.GetHistory()[len(st.GetHistory())-1]; e.GetKind() != dbv1.Kind_KIND_FAILOVER || e.GetTo() != sync || !e.GetAutomatic() {
		t.Errorf("history %v", e)
	}
	h.checkNoViolations()
}

func Test_DB_SynchronousOnFallsBackToAsync(t *testing.T) {
	set := fastDBSettings()
	set.AutomaticFailover = true
	set.SynchronousMode = dbtarget.SyncOn
	h := newDBHarness(t, set, twoPG)
	h.waitSettled("pg1", 1)
	h.waitSync("pg1", "pg2")
	w := h.startWriter("b1", "b3")
	// The only standby stops: the cluster un-records it, then clears
	// synchronous_standby_names, and writes go on.
	h.pg.mu.Lock()
	h.pg.servers["pg2"].running = false
	h.pg.mu.Unlock()
	waitFor(t, "synchronous_standby_names cleared on pg1", 10*time.Second, func() bool {
		st := h.state()
		h.pg.mu.Lock()
		defer h.pg.mu.Unlock()
		return st.GetSynchronousStandby() == "" && st.GetSynchronousStandbyNames() == "" && h.pg.servers["pg1"].syncNames == ""
	})
	w.mu.Lock()
	n := len(w.committed)
	w.mu.Unlock()
	waitFor(t, "writes going on without a standby", 5*time.Second, func() bool { w.mu.Lock(); defer w.mu.Unlock(); return len(w.committed) > n+50 })
	// No standby holds every acknowledged transaction: no failover
	// promotes one without --force.
	_, err := h.client("n3").Failover(context.Background(), &dbv1.FailoverRequest{})
	if err == nil || !strings.Contains(err.Error(), "no standby is recorded as synchronous") || !strings.Contains(err.Error(), "--force") {
		t.Errorf("failover without a synchronous standby: %v", err)
	}
	// It comes back: named, confirmed and recorded again.
	h.pg.mu.Lock()
	h.pg.servers["pg2"].running = true
	h.pg.mu.Unlock()
	h.waitSync("pg1", "pg2")
	_, failed := w.finish()
	if len(failed) > 0 {
		t.Errorf("%d failed writes in on mode; first %s", len(failed), failed[0])
	}
	h.checkNoViolations()
}

func Test_DB_SynchronousStrictWaits(t *testing.T) {
	set := fastDBSettings()
	set.SynchronousMode = dbtarget.SyncStrict
	h := newDBHarness(t, set, twoPG)
	h.waitSettled("pg1", 1)
	h.waitSync("pg1", "pg2")
	h.pg.mu.Lock()
	h.pg.servers["pg2"].running = false
	h.pg.mu.Unlock()
	// Commits wait rather than run without a standby; the record stays
	// (pg2 still holds every acknowledged transaction).
	err := h.pg.commit(h.pg.bouncers["b1"], 1_000_000, 500*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "synchronous standby") {
		t.Fatalf("commit without a standby in strict mode: %v, want it to wait", err)
	}
	time.Sleep(3 * set.Fresh())
	if st := h.state(); st.GetSynchronousStandby() != "pg2" || st.GetSynchronousStandbyNames() != "pg2" {
		t.Errorf("strict mode let go of its standby: names %q standby %q", st.GetSynchronousStandbyNames(), st.GetSynchronousStandby())
	}
	// A failover may promote it, and only it.
	h.pg.mu.Lock()
	h.pg.servers["pg2"].running = true
	h.pg.mu.Unlock()
	if err := h.pg.commit(h.pg.bouncers["b1"], 1_000_001, 5*time.Second); err != nil {
		t.Fatalf("commit once the standby is back: %v", err)
	}
	h.waitStreaming("pg2")
	// A switchover: the new primary starts with "*" and takes the old one
	// as its synchronous standby once that streams from it.
	e := h.switchover("n3", "pg2")
	if e.GetOutcome() != dbv1.Outcome_OUTCOME_DONE {
		t.Fatalf("switchover: %v", e)
	}
	h.waitSync("pg2", "pg1")
	// pg2 had "*" in force before it was promoted: not one commit ran on
	// it without a standby.
	h.pg.mu.Lock()
	named, promote := slices.Index(h.pg.events, `synchronous_standby_names pg2 = "*"`), slices.Index(h.pg.events, "promote pg2")
	h.pg.mu.Unlock()
	if named < 0 || promote < 0 || named > promote {
		t.Errorf("pg2 got synchronous_standby_names '*' at event %d, was promoted at %d; want it set first", named, promote)
	}
	h.checkNoViolations()
}
