package e2e

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/gitraft/gitraft/cluster/dbtarget/pgctl/pgtest"
)

// BenchmarkDatabaseSwitchover measures planned switchovers and a failover
// of a real PostgreSQL 15 primary and standby behind three pgbouncers
// (transaction pooling) driven by a 3-node gitraft cluster, with a client
// writing one row per transaction through every pgbouncer the whole time:
// for each of 20 switchovers the write pause clients see (their longest single
// write), the whole switchover (begin to done, demotion of the old primary
// included) and failed transactions; then the time from a SIGKILL of the
// primary's postmaster to the first write committed on the new primary
// (automatic failover). Agents report every second, gitraft's default.
// Run it with
//
//	go test ./e2e -run '^$' -bench DatabaseSwitchover -benchtime 1x
func BenchmarkDatabaseSwitchover(b *testing.B) {
	const failoverAfter = 2 * time.Second
	e := startDB(b, dbOpts{automaticFailover: true, failoverAfter: failoverAfter, reportInterval: time.Second, pauseTimeout: 5 * time.Second})
	w := pgtest.StartWriter(b, 30*time.Second, e.bouncers...)
	w.WaitCommitted(200, 30*time.Second)

	type row struct {
		name             string
		whole, cli       time.Duration
		pause, gap       time.Duration
		committed, fails int
	}
	var rows []row
	var pauses []time.Duration
	failed := 0
	to := "pg2"
	const switchovers = 20
	for i := range switchovers {
		from := otherMember(to)
		start := time.Now()
		cli := e.switchover(to)
		e.waitPrimary(to, uint64(i+2))
		w.WaitCommitted(100, 30*time.Second)
		rep := pgtest.ReportBetween(w.Writes(), start, time.Now())
		st := e.state()
		h := st.GetHistory()[len(st.GetHistory())-1]
		whole := time.Duration(h.GetFinishedUnixNano() - h.GetStartedUnixNano())
		rows = append(rows, row{fmt.Sprintf("switchover %s -> %s", from, to), whole, cli, rep.MaxLatency, rep.MaxGap, rep.Committed, rep.Failed})
		pauses = append(pauses, rep.MaxLatency)
		failed += rep.Failed
		waitFor(b, from+" streaming from "+to, 60*time.Second, func() bool { return e.pg[from].StreamingFrom(e.pg[to]) })
		// As an operator would: the next switchover once db status shows
		// the old primary streaming.
		waitFor(b, "db status to show "+from+" streaming", 30*time.Second, func() bool {
			m := memberStatus(e.status(), from)
			return m.GetRole() == "standby" && m.GetHealth().GetStreaming()
		})
		to = from
	}
	// to is pg2 again here: pg1 is the primary. Lost in the switchovers:
	// rows a client saw committed that pg1 lacks.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cut := time.Now() // rows committed before it are on pg1 when it is read
	have1, err := e.pg["pg1"].IDs(ctx)
	if err != nil {
		b.Fatal(err)
	}
	lostSwitchovers := len(pgtest.Missing(pgtest.ReportBetween(w.Writes(), time.Time{}, cut).CommittedIDs, have1))
	killed := time.Now()
	e.pg["pg1"].Kill()
	e.waitPrimary("pg2", switchovers+2)
	var first time.Time
	waitFor(b, "a write committed on pg2", 30*time.Second, func() bool {
		first = pgtest.FirstCommitOn(w.Writes(), e.pg["pg2"].Port, killed)
		return !first.IsZero()
	})
	failover := first.Sub(killed)
	w.Stop()
	// Lost in the failover: rows a client saw committed that pg2 lacks.
	have2, err := e.pg["pg2"].IDs(ctx)
	if err != nil {
		b.Fatal(err)
	}
	lostFailover := len(pgtest.Missing(pgtest.ReportBetween(w.Writes(), time.Time{}, time.Time{}).CommittedIDs, have2))

	sort.Slice(pauses, func(i, j int) bool { return pauses[i] < pauses[j] })
	p50, worst := pauses[len(pauses)/2], pauses[len(pauses)-1]
	r := func(d time.Duration) string { return d.Round(time.Millisecond).String() }
	fmt.Printf("\ngitraft db: planned switchover with clients writing through 3 pgbouncers (transaction pooling), PostgreSQL 15, 3 nodes, report interval 1s\n")
	fmt.Printf("%-26s %10s %10s %12s %12s %10s %7s\n", "run", "whole", "CLI", "write pause", "commit gap", "committed", "failed")
	for _, x := range rows {
		fmt.Printf("%-26s %10s %10s %12s %12s %10d %7d\n", x.name, r(x.whole), r(x.cli), r(x.pause), r(x.gap), x.committed, x.fails)
	}
	fmt.Printf("write pause: p50 %s, max %s over %d switchovers; failed transactions: %d\n", r(p50), r(worst), len(rows), failed)
	fmt.Printf("\n%-34s %12s %12s\n", "", "this run", "issue 10")
	fmt.Printf("%-34s %12s %12s\n", "switchovers", fmt.Sprint(len(rows)), "44")
	fmt.Printf("%-34s %12s %12s\n", "write pause p50", r(p50), "810ms")
	fmt.Printf("%-34s %12s %12s\n", "write pause max", r(worst), "2.71s")
	fmt.Printf("%-34s %12d %12s\n", "failed transactions", failed, "0")
	fmt.Printf("%-34s %12d %12s\n", "lost (switchovers)", lostSwitchovers, "0")
	fmt.Printf("%-34s %12s %12s\n", "failover: kill to first write", r(failover), "7.5-8.1s")
	fmt.Printf("%-34s %12d %12s\n", "lost (async failover)", lostFailover, "0, 1, 3")
	fmt.Printf("automatic failover (failover_after %s): SIGKILL of the primary's postmaster to the first committed write on the new primary: %s\n", failoverAfter, r(failover))
	fmt.Printf("(for scale: Patroni switchovers take about 5 s; stolon-pgbouncer pauses about 10 s)\n%s\n", strings.Repeat("-", 40))
	b.ReportMetric(ms(p50), "pause-p50-ms")
	b.ReportMetric(ms(worst), "pause-max-ms")
	b.ReportMetric(float64(failed), "failed-tx")
	b.ReportMetric(float64(lostSwitchovers), "lost-tx")
	b.ReportMetric(ms(failover), "failover-ms")
	var wholes []time.Duration
	for _, x := range rows {
		wholes = append(wholes, x.whole)
	}
	sort.Slice(wholes, func(i, j int) bool { return wholes[i] < wholes[j] })
	b.ReportMetric(ms(wholes[len(wholes)/2]), "switchover-p50-ms")
}
