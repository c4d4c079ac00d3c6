package e2e

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gitraft/gitraft/cluster/dbtarget/pgctl/pgtest"
	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
)

// dbEnv is a real PostgreSQL 15 primary (pg1) with a streaming standby
// (pg2), three pgbouncers in transaction pooling (b1, b2, b3), and a 3-node
// gitraft cluster whose agents drive them: n1 runs pg1's agent and b1's, n2
// pg2's and b2's, n3 b3's only.
type dbEnv struct {
	t        testing.TB
	c        *cluster
	pg       map[string]*pgtest.Postgres
	bouncers []*pgtest.Bouncer
	conns    map[string]dbv1.DatabaseServiceClient
}

// dbOpts are the cluster-wide database settings of a dbEnv.
type dbOpts struct {
	automaticFailover bool
	failoverAfter     time.Duration
	maxLagBytes       uint64
	pauseTimeout      time.Duration
	// reportInterval is how often agents report and nodes probe the
	// primary (default 200ms; gitraft's own default is 1s).
	reportInterval time.Duration
	// pauseExpiry is each pgbouncer's pause_expiry (default 20s).
	pauseExpiry time.Duration
	// isolationFenceAfter, when set, is database.isolation_fence_after.
	isolationFenceAfter time.Duration
	// synchronousMode, when set, is database.synchronous_mode.
	synchronousMode string
	// thirdMember adds pg3, a second standby of pg1, driven by n3.
	thirdMember bool
}

func needPostgres(t testing.TB) {
	t.Helper()
	if why := pgtest.Available(); why != "" {
		t.Fatalf("the database tests need PostgreSQL 15 and pgbouncer: %s (./e2e/test.sh installs them)", why)
	}
}

// startDB starts PostgreSQL, the pgbouncers and the cluster, and waits
// until the cluster recorded pg1 as the primary (generation 1) and every
// pgbouncer routes to it.
func startDB(t testing.TB, o dbOpts) *dbEnv {
	t.Helper()
	needPostgres(t)
	if o.failoverAfter == 0 {
		o.failoverAfter = 2 * time.Second
	}
	if o.maxLagBytes == 0 {
		o.maxLagBytes = 16 << 20
	}
	if o.pauseTimeout == 0 {
		o.pauseTimeout = 10 * time.Second
	}
	if o.reportInterval == 0 {
		o.reportInterval = 200 * time.Millisecond
	}
	if o.pauseExpiry == 0 {
		o.pauseExpiry = 20 * time.Second
	}
	dir := pgtest.Dir(t)
	e := &dbEnv{t: t, pg: map[string]*pgtest.Postgres{}, conns: map[string]dbv1.DatabaseServiceClient{}}
	e.pg["pg1"] = pgtest.StartPrimary(t, dir, "pg1")
	e.pg["pg2"] = e.pg["pg1"].StartStandby(t, dir, "pg2")
	if o.thirdMember {
		e.pg["pg3"] = e.pg["pg1"].StartStandby(t, dir, "pg3")
	}
	for _, name := range []string{"b1", "b2", "b3"} {
		e.bouncers = append(e.bouncers, pgtest.StartBouncer(t, dir, name, e.pg["pg1"]))
	}
	agents := map[string][]string{
		"n1": append(e.postgresFlags("pg1"), bouncerFlags(e.bouncers[0], o.pauseExpiry)...),
		"n2": append(e.postgresFlags("pg2"), bouncerFlags(e.bouncers[1], o.pauseExpiry)...),
		"n3": bouncerFlags(e.bouncers[2], o.pauseExpiry),
	}
	if o.thirdMember {
		agents["n3"] = append(e.postgresFlags("pg3"), agents["n3"]...)
	}
	e.c = startCluster(t, 3, func(n *node) {
		n.args = append(n.args,
			"--database-automatic-failover="+strconv.FormatBool(o.automaticFailover),
			"--database-failover-after", o.failoverAfter.String(),
			"--database-max-lag-bytes", strconv.FormatUint(o.maxLagBytes, 10),
			"--database-pause-timeout", o.pauseTimeout.String(),
			"--database-switchover-timeout", "30s",
			"--database-report-interval", o.reportInterval.String(),
			"--database-probe-timeout", min(o.reportInterval, time.Second).String(),
		)
		if o.synchronousMode != "" {
			n.args = append(n.args, "--database-synchronous-mode", o.synchronousMode)
		}
		if o.isolationFenceAfter > 0 {
			n.args = append(n.args, "--database-isolation-fence-after", o.isolationFenceAfter.String())
		}
		n.args = append(n.args, agents[n.id]...)
	})
	e.waitPrimary("pg1", 1)
	// As an operator would check gitraft db status first: every member
	// registered, and the standby reporting that it streams.
	for name := range e.pg {
		if name == "pg1" {
			continue
		}
		waitFor(t, name+" registered and reporting as a standby", 30*time.Second, func() bool {
			for _, m := range e.status().GetMembers() {
				if m.GetMember().GetName() == name {
					return m.GetRole() == "standby" && m.GetHealth().GetStreaming()
				}
			}
			return false
		})
	}
	return e
}

func (e *dbEnv) postgresFlags(name string) []string {
	sc := e.pg[name].ServerConfig()
	return []string{
		"--database-postgres-member", sc.Name,
		"--database-postgres-host", sc.Host,
		"--database-postgres-port", strconv.Itoa(sc.Port),
		"--database-postgres-data-dir", sc.DataDir,
		"--database-postgres-log-file", sc.LogFile,
		"--database-postgres-user", sc.User,
		"--database-postgres-replication-user", sc.ReplicationUser,
		"--database-postgres-timeout", "30s",
	}
}

func bouncerFlags(b *pgtest.Bouncer, pauseExpiry time.Duration) []string {
	bc := b.BouncerConfig()
	return []string{
		"--database-pgbouncer-name", b.Name,
		"--database-pgbouncer-admin-port", strconv.Itoa(bc.AdminPort),
		"--database-pgbouncer-admin-user", bc.AdminUser,
		"--database-pgbouncer-databases-file", bc.DatabasesFile,
		"--database-pgbouncer-databases", strings.Join(bc.Databases, ","),
		"--database-pgbouncer-pause-expiry", pauseExpiry.String(),
	}
}

// status asks a running node for the database status over gRPC; nil when
// no node answers.
func (e *dbEnv) status() *dbv1.GetStatusResponse {
	for _, n := range e.c.nodes {
		if !n.running() {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		resp, err := e.api(n).GetStatus(ctx, &dbv1.GetStatusRequest{})
		cancel()
		if err == nil {
			return resp
		}
	}
	return nil
}

// api is the DatabaseService of node n (one connection per node; it
// reconnects after a restart).
func (e *dbEnv) api(n *node) dbv1.DatabaseServiceClient {
	if c, ok := e.conns[n.id]; ok {
		return c
	}
	c := dbv1.NewDatabaseServiceClient(e.c.grpcConn(n, "admin"))
	e.conns[n.id] = c
	return c
}

func (e *dbEnv) state() *dbv1.State {
	e.t.Helper()
	var st *dbv1.State
	waitFor(e.t, "a node to answer db status", 30*time.Second, func() bool {
		r := e.status()
		st = r.GetState()
		return r != nil
	})
	return st
}

// routesTo reports whether a new transaction through every pgbouncer runs
// on p.
func (e *dbEnv) routesTo(p *pgtest.Postgres) bool {
	for _, b := range e.bouncers {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		port, err := b.ServerPort(ctx)
		cancel()
		if err != nil || port != p.Port {
			return false
		}
	}
	return true
}

// waitPrimary waits until name is the primary at generation gen with no
// operation under way, every pgbouncer agent applied it, and every
// pgbouncer routes to it.
func (e *dbEnv) waitPrimary(name string, gen uint64) {
	e.t.Helper()
	var last *dbv1.GetStatusResponse
	deadline := time.Now().Add(60 * time.Second)
	for {
		r := e.status()
		if r != nil {
			last = r
		}
		if r != nil && r.GetState().GetPrimary() == name && r.GetState().GetGeneration() == gen && r.GetState().GetOperation() == nil &&
			e.bouncersApplied(r, gen) && e.routesTo(e.pg[name]) {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("timed out waiting for %s as the primary at generation %d, applied and routed by every pgbouncer; last status:\n%s", name, gen, statusText(last))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (e *dbEnv) bouncersApplied(r *dbv1.GetStatusResponse, gen uint64) bool {
	if len(r.GetBouncers()) != len(e.bouncers) {
		return false
	}
	for _, b := range r.GetBouncers() {
		if b.GetReport().GetAppliedGeneration() != gen || b.GetReport().GetPaused() || b.GetReport().GetFenced() {
			return false
		}
	}
	return true
}

// statusText is a short form of a status for failure messages.
func statusText(r *dbv1.GetStatusResponse) string {
	if r == nil {
		return "(no answer)"
	}
	st := r.GetState()
	var b strings.Builder
	fmt.Fprintf(&b, "primary %s generation %d operation %v paused %v\n", st.GetPrimary(), st.GetGeneration(), st.GetOperation(), st.GetPaused())
	for _, m := range r.GetMembers() {
		fmt.Fprintf(&b, "  member %s role %s health {%v}\n", m.GetMember().GetName(), m.GetRole(), m.GetHealth())
	}
	for _, x := range r.GetBouncers() {
		fmt.Fprintf(&b, "  pgbouncer %s report {%v}\n", x.GetBouncer().GetName(), x.GetReport())
	}
	fmt.Fprintf(&b, "  failover {%v}\n", r.GetFailover())
	for _, h := range st.GetHistory() {
		fmt.Fprintf(&b, "  history {%v}\n", h)
	}
	return b.String()
}

// memberStatus finds a member in a status.
func memberStatus(r *dbv1.GetStatusResponse, name string) *dbv1.MemberStatus {
	for _, m := range r.GetMembers() {
		if m.GetMember().GetName() == name {
			return m
		}
	}
	return nil
}

// historyEntry finds an operation in the history.
func historyEntry(st *dbv1.State, op uint64) *dbv1.HistoryEntry {
	for _, h := range st.GetHistory() {
		if h.GetOpId() == op {
			return h
		}
	}
	return nil
}

// switchover runs `gitraft db switchover --to` (it waits until the
// switchover finished) and returns how long the command took.
func (e *dbEnv) switchover(to string) time.Duration {
	e.t.Helper()
	start := time.Now()
	out := e.c.must(e.c.other(), "db", "switchover", "--to", to)
	took := time.Since(start)
	if !strings.Contains(out, "switchover done") || !strings.Contains(out, to+" is the primary") {
		e.t.Fatalf("switchover to %s printed:\n%s", to, out)
	}
	return took
}

// checkWrites fails the test when a write failed, or a committed row is
// missing on p, among the writes that ended in [from, to].
func (e *dbEnv) checkWrites(w *pgtest.Writer, p *pgtest.Postgres, from, to time.Time) pgtest.Report {
	e.t.Helper()
	r := pgtest.ReportBetween(w.Writes(), from, to)
	if r.Failed > 0 {
		e.t.Errorf("%d failed transactions, want none: %v", r.Failed, r.FirstErrors)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	have, err := p.IDs(ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	if miss := pgtest.Missing(r.CommittedIDs, have); len(miss) > 0 {
		e.t.Errorf("%d committed rows missing on %s (first: %v)", len(miss), p.Name, miss[:min(5, len(miss))])
	}
	return r
}

// waitSyncStandby waits until the state records name as the synchronous
// standby and the primary runs with it synchronous (db status).
func (e *dbEnv) waitSyncStandby(name string) {
	e.t.Helper()
	waitFor(e.t, name+" recorded as the synchronous standby", 60*time.Second, func() bool {
		r := e.status()
		p := memberStatus(r, r.GetState().GetPrimary())
		return r.GetState().GetSynchronousStandby() == name && slicesContain(p.GetHealth().GetSynchronous(), name)
	})
}

func slicesContain(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// killPrimaryAndFailOverAny is killPrimaryAndFailOver to whichever member
// the cluster promotes.
func (e *dbEnv) killPrimaryAndFailOverAny(w *pgtest.Writer, from string, gen uint64) (time.Duration, int) {
	e.t.Helper()
	killed := time.Now()
	e.pg[from].Kill()
	var to string
	waitFor(e.t, "a new primary recorded", 60*time.Second, func() bool {
		st := e.status().GetState()
		to = st.GetPrimary()
		return st.GetGeneration() == gen && st.GetOperation() == nil
	})
	return e.failedOver(w, from, to, gen, killed)
}

// killPrimaryAndFailOver SIGKILLs the primary's postmaster with w writing,
// waits until the failover to target is done and a write committed on it,
// stops w, and returns the time from the kill to that write and the
// acknowledged transactions target lacks.
func (e *dbEnv) killPrimaryAndFailOver(w *pgtest.Writer, from, target string, gen uint64) (time.Duration, int) {
	e.t.Helper()
	killed := time.Now()
	e.pg[from].Kill()
	return e.failedOver(w, from, target, gen, killed)
}

func (e *dbEnv) failedOver(w *pgtest.Writer, from, target string, gen uint64, killed time.Time) (time.Duration, int) {
	e.t.Helper()
	e.waitPrimary(target, gen)
	var first time.Time
	waitFor(e.t, "a write committed on "+target, 30*time.Second, func() bool {
		first = pgtest.FirstCommitOn(w.Writes(), e.pg[target].Port, killed)
		return !first.IsZero()
	})
	w.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	have, err := e.pg[target].IDs(ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	lost := pgtest.Missing(pgtest.ReportBetween(w.Writes(), time.Time{}, time.Time{}).CommittedIDs, have)
	if len(lost) > 0 {
		e.t.Logf("%d acknowledged transactions lost in the failover from %s to %s (first: %v)", len(lost), from, target, lost[:min(5, len(lost))])
	}
	return first.Sub(killed), len(lost)
}

// other returns the member that is not name.
func otherMember(name string) string {
	if name == "pg1" {
		return "pg2"
	}
	return "pg1"
}
