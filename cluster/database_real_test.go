package cluster

// The database target with real PostgreSQL 15 and pgbouncer (package
// pgtest starts them on loopback) and the real pgctl drivers, driven by the
// agents of an in-process Raft cluster. The e2e tests do the same through
// the gitraft binary; this one is quicker to debug.

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/gitraft/gitraft/cluster/dbtarget"
	"github.com/gitraft/gitraft/cluster/dbtarget/pgctl"
	"github.com/gitraft/gitraft/cluster/dbtarget/pgctl/pgtest"
	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
)

type realDB struct {
	t        *testing.T
	c        *testCluster
	pg       map[string]*pgtest.Postgres
	bouncers []*pgtest.Bouncer
	cancels  []context.CancelFunc
}

// newRealDB starts pg1 (primary) and pg2 (standby), pgbouncers b1 and b2,
// and a 3-node cluster whose n1 drives pg1 and b1, n2 pg2 and b2.
func newRealDB(t *testing.T, set dbtarget.Settings) *realDB {
	if why := pgtest.Available(); why != "" {
		t.Fatalf("this test needs PostgreSQL 15 and pgbouncer: %s (./e2e/test.sh installs them)", why)
	}
	dir := pgtest.Dir(t)
	r := &realDB{t: t, pg: map[string]*pgtest.Postgres{}}
	r.pg["pg1"] = pgtest.StartPrimary(t, dir, "pg1")
	r.pg["pg2"] = r.pg["pg1"].StartStandby(t, dir, "pg2")
	r.bouncers = []*pgtest.Bouncer{pgtest.StartBouncer(t, dir, "b1", r.pg["pg1"]), pgtest.StartBouncer(t, dir, "b2", r.pg["pg1"])}
	r.c = mustNewCluster(t, 3)
	t.Cleanup(func() {
		for _, c := range r.cancels {
			c()
		}
	})
	for i, id := range []string{"n1", "n2", "n3"} {
		n := r.c.nodes[id]
		n.SetDatabaseSettings(set)
		ctx, cancel := context.WithCancel(context.Background())
		r.cancels = append(r.cancels, cancel)
		log := testLogger(t).With("node", id)
		go dbtarget.NewProber(dbtarget.ProberConfig{Interval: set.ReportInterval, Timeout: set.ProbeTimeout}, n, log).Run(ctx)
		if i == 2 {
			continue
		}
		p := r.pg[fmt.Sprintf("pg%d", i+1)]
		sc := p.ServerConfig()
		sc.Timeout = 30 * time.Second
		srv, err := pgctl.NewServer(sc, log)
		if err != nil {
			t.Fatal(err)
		}
		go dbtarget.NewPostgresAgent(dbtarget.PostgresAgentConfig{
			Member: &dbv1.Member{Name: p.Name, Host: p.Host, Port: int32(p.Port)}, ReportInterval: set.ReportInterval,
		}, n, srv, log).Run(ctx)
		b := r.bouncers[i]
		bc, err := pgctl.NewBouncer(b.BouncerConfig(), log)
		if err != nil {
			t.Fatal(err)
		}
		go dbtarget.NewBouncerAgent(dbtarget.BouncerAgentConfig{
			Name: b.Name, StateFile: filepath.Join(t.TempDir(), b.Name+".json"), PauseExpiry: 20 * time.Second,
			PauseTimeout: set.PauseTimeout, ReportInterval: set.ReportInterval,
		}, n, bc, log).Run(ctx)
	}
	return r
}

func (r *realDB) state() *dbv1.State {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, _ := r.c.any().DatabaseState(ctx, true)
	return st
}

// waitPrimary waits until name is the primary at gen, settled, and every
// pgbouncer applied it.
func (r *realDB) waitPrimary(name string, gen uint64) {
	r.t.Helper()
	waitFor(r.t, fmt.Sprintf("%s primary at generation %d, applied by every pgbouncer", name, gen), 60*time.Second, func() bool {
		st := r.state()
		if st.GetPrimary() != name || st.GetGeneration() != gen || st.GetOperation() != nil {
			return false
		}
		for _, b := range r.bouncers {
			if port, err := b.ServerPort(context.Background()); err != nil || port != r.pg[name].Port {
				return false
			}
		}
		return true
	})
	waitFor(r.t, "the leader to hear every member", 10*time.Second, func() bool {
		l := r.c.waitLeader()
		obs, set := l.db.observed(nil)
		for n := range r.pg {
			if h, ok := obs.Postgres[n]; !ok || time.Since(h.At) > set.Fresh() {
				return false
			}
		}
		return true
	})
}

func (r *realDB) switchover(to string) (*dbv1.HistoryEntry, time.Duration) {
	r.t.Helper()
	start := time.Now()
	resp, err := (&dbService{n: r.c.waitLeader()}).Switchover(context.Background(), &dbv1.SwitchoverRequest{To: to})
	if err != nil {
		r.t.Fatalf("switchover to %s: %v", to, err)
	}
	var e *dbv1.HistoryEntry
	waitFor(r.t, "the switchover to finish", 60*time.Second, func() bool {
		for _, h := range r.state().GetHistory() {
			if h.GetOpId() == resp.GetOperation().GetId() {
				e = h
				return true
			}
		}
		return false
	})
	return e, time.Since(start)
}

func Test_DB_Real_SwitchoverAndFailover(t *testing.T) {
	set := fastDBSettings()
	set.MaxLagBytes = 16 << 20
	set.AutomaticFailover = true
	set.FailoverAfter = time.Second
	set.ProbeTimeout = 300 * time.Millisecond
	set.ReportInterval = 200 * time.Millisecond
	set.SwitchoverTimeout = 30 * time.Second
	r := newRealDB(t, set)
	r.waitPrimary("pg1", 1)
	w := pgtest.StartWriter(t, 15*time.Second, r.bouncers...)
	w.WaitCommitted(50, 20*time.Second)

	for i, to := range []string{"pg2", "pg1"} {
		from := time.Now()
		e, took := r.switchover(to)
		if e.GetOutcome() != dbv1.Outcome_OUTCOME_DONE {
			t.Fatalf("switchover to %s: %v", to, e)
		}
		r.waitPrimary(to, uint64(i+2))
		w.WaitCommitted(w.Committed()+20, 20*time.Second)
		rep := pgtest.ReportBetween(w.Writes(), from, time.Now())
		t.Logf("switchover to %s: %s, write pause (max latency) %s, max gap %s, %d committed, %d failed", to, took.Round(time.Millisecond), rep.MaxLatency.Round(time.Millisecond), rep.MaxGap.Round(time.Millisecond), rep.Committed, rep.Failed)
		if rep.Failed > 0 {
			t.Errorf("%d failed transactions during the switchover to %s: %v", rep.Failed, to, rep.FirstErrors)
		}
	}
	waitFor(t, "pg2 streaming from pg1", 30*time.Second, func() bool { return r.pg["pg2"].StreamingFrom(r.pg["pg1"]) })

	// Failover: the primary's postmaster is killed.
	killed := time.Now()
	r.pg["pg1"].Kill()
	r.waitPrimary("pg2", 4)
	first := pgtest.FirstCommitOn(w.Writes(), r.pg["pg2"].Port, killed)
	waitFor(t, "a write committed on pg2 after the kill", 20*time.Second, func() bool {
		first = pgtest.FirstCommitOn(w.Writes(), r.pg["pg2"].Port, killed)
		return !first.IsZero()
	})
	t.Logf("failover: first committed write %s after the kill", first.Sub(killed).Round(time.Millisecond))

	// The old primary restarted as it was: its agent demotes it, perhaps
	// while pg_ctl still waits for it to come up.
	if err := r.pg["pg1"].StartBeside(); err != nil {
		t.Logf("starting pg1 raced its agent: %v", err)
	}
	waitFor(t, "pg1 to follow pg2", 60*time.Second, func() bool { return r.pg["pg1"].StreamingFrom(r.pg["pg2"]) })
	w.Stop()
	// Backends of a killed postmaster go on until they notice, and
	// pgbouncer's server connections with them: the fence (KILL) ends that
	// before the promotion. Nothing that began after it reached pg1.
	promoted := time.Unix(0, r.state().GetPrimarySinceUnixNano())
	for _, x := range pgtest.CommitsOn(w.Writes(), r.pg["pg1"].Port, killed) {
		if x.Start.After(promoted) {
			t.Errorf("row %d, begun %s after pg2 was promoted, committed on the old primary", x.ID, x.Start.Sub(promoted))
		}
	}
	ctx := context.Background()
	have, err := r.pg["pg2"].IDs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Rows committed before the last switchover ended are all on pg2 (the
	// failover may lose what pg1 had not sent when it was killed).
	rep := pgtest.ReportBetween(w.Writes(), time.Time{}, killed.Add(-2*time.Second))
	if miss := pgtest.Missing(rep.CommittedIDs, have); len(miss) > 0 {
		t.Errorf("%d committed rows missing on pg2, first %d", len(miss), miss[0])
	}
}
