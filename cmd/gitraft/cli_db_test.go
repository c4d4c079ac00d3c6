package main

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/gitraft/gitraft/cluster"
	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
)

func TestParseAt(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	cases := map[string]time.Time{
		"+10m":                 now.Add(10 * time.Minute),
		"90s":                  now.Add(90 * time.Second),
		"2026-03-02T02:00:00Z": time.Date(2026, 3, 2, 2, 0, 0, 0, time.UTC),
		"2026-03-02 02:30":     time.Date(2026, 3, 2, 2, 30, 0, 0, time.UTC),
		"23:15":                time.Date(2026, 3, 1, 23, 15, 0, 0, time.UTC),
	}
	for in, want := range cases {
		got, err := parseAt(in, now)
		if err != nil || !got.Equal(want) {
			t.Errorf("parseAt(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	if _, err := parseAt("tomorrow", now); err == nil || !strings.Contains(err.Error(), "RFC 3339") {
		t.Errorf("parseAt(tomorrow): %v", err)
	}
	if _, err := parseAt("-5m", now); err == nil || !strings.Contains(err.Error(), "past") {
		t.Errorf("parseAt(-5m): %v", err)
	}
}

func testStatus(now time.Time) *dbv1.GetStatusResponse {
	return &dbv1.GetStatusResponse{
		State: &dbv1.State{
			Primary: "pg1", Generation: 3, PrimarySinceUnixNano: now.Add(-time.Hour).UnixNano(),
			Paused: true, PausedBy: "alice", PausedReason: "kernel upgrade", PausedUnixNano: now.Add(-time.Minute).UnixNano(),
			SynchronousStandbyNames: "pg2", SynchronousStandby: "pg2",
		},
		Members: []*dbv1.MemberStatus{
			{Member: &dbv1.Member{Name: "pg1", Host: "10.0.0.1", Port: 5432, Node: "n1"}, Role: "primary",
				Health: &dbv1.PostgresReport{Running: true, Timeline: 2, WriteLsn: 0x3000060, ReplayLsn: 0x3000060}, ReportAgeNanos: int64(300 * time.Millisecond)},
			{Member: &dbv1.Member{Name: "pg2", Host: "10.0.0.2", Port: 5432, Node: "n2", NoFailover: true}, Role: "standby",
				Health: &dbv1.PostgresReport{Running: true, InRecovery: true, Streaming: true, Upstream: "10.0.0.1:5432", Timeline: 2, WriteLsn: 0x3000060, ReplayLsn: 0x3000000}, LagBytes: 96, LagKnown: true, ReportAgeNanos: int64(time.Second)},
			{Member: &dbv1.Member{Name: "pg3", Host: "10.0.0.3", Port: 5432, Node: "n3"}, Role: "unknown"},
		},
		Bouncers: []*dbv1.BouncerStatus{
			{Bouncer: &dbv1.Bouncer{Name: "b1", Node: "n1"}, Report: &dbv1.BouncerReport{AppliedGeneration: 3, Target: "10.0.0.1:5432"}, ReportAgeNanos: int64(time.Second)},
			{Bouncer: &dbv1.Bouncer{Name: "b2", Node: "n2"}, Report: &dbv1.BouncerReport{AppliedGeneration: 2, Target: "10.0.0.2:5432", Paused: true, Error: "RESUME: refused"}, ReportAgeNanos: int64(time.Second)},
		},
		Failover: &dbv1.FailoverStatus{Automatic: true, Votes: 2, Needed: 2, Blocked: "paused by alice"},
		Leader:   "n2", Index: 812, Writable: true,
	}
}

func TestWriteDBStatus(t *testing.T) {
	now := time.Now()
	var b bytes.Buffer
	if err := writeDBStatus(&b, testStatus(now), now); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 10 && f[0] == "pg2" && (f[9] != "yes" || f[10] != "pg1") {
			t.Errorf("pg2's streaming and upstream columns %q, want yes pg1:\n%s", f[9:11], out)
		}
	}
	for _, want := range []string{
		"primary:   pg1 (generation 3, since 1h ago)",
		"operation: none",
		"paused:    yes, no automatic failover (since 1m ago, by alice): kernel upgrade",
		"writable:  yes",
		"failover:  automatic, primary unreachable for 2 of 2 needed voters; held back: paused by alice",
		"leader:    n2 (index 812)",
		"sync:      pg2 (a failover promotes only it)",
		"pg1     primary  10.0.0.1:5432  n1    2   0/3000060  0/3000060",
		"96 B",
		"0 (no failover)",
		"pg3     unknown",
		"never",
		"b2         n2    2 (behind)  10.0.0.2:5432  paused",
		"RESUME: refused",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
}

func TestWriteDBHistory(t *testing.T) {
	now := time.Now()
	var b bytes.Buffer
	err := writeDBHistory(&b, &dbv1.GetHistoryResponse{History: []*dbv1.HistoryEntry{
		{OpId: 40, Kind: dbv1.Kind_KIND_FAILOVER, From: "pg2", To: "pg1", Generation: 3, Outcome: dbv1.Outcome_OUTCOME_DONE, Automatic: true,
			StartedUnixNano: now.Add(-time.Minute).UnixNano(), FinishedUnixNano: now.Add(-time.Minute + 1500*time.Millisecond).UnixNano()},
		{OpId: 20, Kind: dbv1.Kind_KIND_SWITCHOVER, From: "pg1", To: "pg2", Generation: 1, Outcome: dbv1.Outcome_OUTCOME_ABORTED, RequestedBy: "alice",
			Reason: "pgbouncer b3 could not pause", StartedUnixNano: now.Add(-time.Hour).UnixNano(), FinishedUnixNano: now.Add(-time.Hour + 5*time.Second).UnixNano()},
	}}, now)
	if err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"OP  KIND", "40  failover    pg2   pg1  3           done     58s ago     1.5s  automatic", "aborted", "alice", "pgbouncer b3 could not pause"} {
		if !strings.Contains(out, want) {
			t.Errorf("history lacks %q:\n%s", want, out)
		}
	}
	b.Reset()
	writeDBHistory(&b, &dbv1.GetHistoryResponse{}, now)
	if b.String() != "no switchovers or failovers yet\n" {
		t.Errorf("empty history: %q", b.String())
	}
}

// fakeDB is a DatabaseService whose operation moves on one phase per
// GetStatus call.
type fakeDB struct {
	dbv1.UnimplementedDatabaseServiceServer
	mu       sync.Mutex
	phases   []dbv1.Phase
	op       *dbv1.Operation
	outcome  dbv1.Outcome
	reason   string
	writable bool
	lastReq  *dbv1.SwitchoverRequest
}

func (f *fakeDB) Switchover(_ context.Context, req *dbv1.SwitchoverRequest) (*dbv1.SwitchoverResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lastReq = req
	if req.GetTo() == "pg9" {
		return nil, status.Error(codes.NotFound, `no member named "pg9"; members: pg1 (primary), pg2`)
	}
	f.op = &dbv1.Operation{Id: 77, Kind: dbv1.Kind_KIND_SWITCHOVER, OldPrimary: "pg1", Target: req.GetTo(), Phase: dbv1.Phase_PHASE_PAUSING}
	if req.GetAtUnixNano() != 0 {
		f.op.Phase, f.op.AtUnixNano = dbv1.Phase_PHASE_SCHEDULED, req.GetAtUnixNano()
	}
	return &dbv1.SwitchoverResponse{Operation: f.op, Index: 77}, nil
}

func (f *fakeDB) GetStatus(context.Context, *dbv1.GetStatusRequest) (*dbv1.GetStatusResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	st := &dbv1.State{Primary: "pg1", Generation: 1}
	if len(f.phases) > 0 {
		f.op.Phase = f.phases[0]
		f.phases = f.phases[1:]
		st.Operation = f.op
	} else {
		st.History = []*dbv1.HistoryEntry{{OpId: 77, Kind: dbv1.Kind_KIND_SWITCHOVER, From: "pg1", To: "pg2", Generation: 2, Outcome: f.outcome, Reason: f.reason,
			StartedUnixNano: 1, FinishedUnixNano: 1 + int64(1200*time.Millisecond)}}
	}
	return &dbv1.GetStatusResponse{State: st}, nil
}

func (f *fakeDB) GetWritable(context.Context, *dbv1.GetWritableRequest) (*dbv1.GetWritableResponse, error) {
	return &dbv1.GetWritableResponse{Writable: f.writable, Reason: "a switchover from pg1 to pg2 is under way (phase pausing, operation 77)", Node: "n1", Primary: "pg1", Generation: 1}, nil
}

func startFakeDB(t *testing.T, f *fakeDB) {
	t.Helper()
	clearEnv(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	dbv1.RegisterDatabaseServiceServer(s, f)
	go s.Serve(ln)
	t.Cleanup(s.Stop)
	t.Setenv(envAddr, ln.Addr().String())
	t.Setenv(envInsecure, "true")
}

func runDB(t *testing.T, args ...string) (string, error) {
	t.Helper()
	g := &globalOpts{}
	root := &cobra.Command{Use: "gitraft", SilenceErrors: true, SilenceUsage: true}
	db := newDBCmd(g)
	g.register(db.PersistentFlags())
	root.AddCommand(db)
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(append([]string{"db"}, args...))
	err := root.Execute()
	return out.String(), err
}

func TestSwitchoverWaitsAndPrintsPhases(t *testing.T) {
	f := &fakeDB{outcome: dbv1.Outcome_OUTCOME_DONE, phases: []dbv1.Phase{
		dbv1.Phase_PHASE_PAUSING, dbv1.Phase_PHASE_STOPPING_OLD, dbv1.Phase_PHASE_PROMOTING, dbv1.Phase_PHASE_REPOINTING, dbv1.Phase_PHASE_DEMOTING,
	}}
	startFakeDB(t, f)
	out, err := runDB(t, "switchover", "--to", "pg2")
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for _, want := range []string{"switchover from pg1 to pg2 (operation 77):", "pausing", "stopping_old", "promoting", "repointing", "demoting", "switchover done in 1.2s: pg2 is the primary (generation 2)"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Index(out, "stopping_old") > strings.Index(out, "promoting") {
		t.Errorf("phases out of order:\n%s", out)
	}
}

func TestSwitchoverRolledBackFails(t *testing.T) {
	f := &fakeDB{outcome: dbv1.Outcome_OUTCOME_ABORTED, reason: "pgbouncer b3 could not pause", phases: []dbv1.Phase{dbv1.Phase_PHASE_PAUSING, dbv1.Phase_PHASE_ROLLING_BACK}}
	startFakeDB(t, f)
	out, err := runDB(t, "switchover", "--to", "pg2")
	if !errors.Is(err, errOperation) || !strings.Contains(err.Error(), "switchover aborted") || !strings.Contains(err.Error(), "pgbouncer b3 could not pause") || !strings.Contains(err.Error(), "pg1 stays the primary") {
		t.Fatalf("err %v\n%s", err, out)
	}
}

func TestSwitchoverScheduledAndRefused(t *testing.T) {
	f := &fakeDB{}
	startFakeDB(t, f)
	out, err := runDB(t, "switchover", "--to", "pg2", "--at", "+1h")
	if err != nil || !strings.Contains(out, "scheduled at") || !strings.Contains(out, "gitraft db abort") {
		t.Fatalf("%v\n%s", err, out)
	}
	if d := time.Until(time.Unix(0, f.lastReq.GetAtUnixNano())); d < 59*time.Minute || d > time.Hour {
		t.Errorf("at is %s from now", d)
	}
	_, err = runDB(t, "switchover", "--to", "pg9")
	if err == nil || !strings.Contains(err.Error(), `switchover to pg9: no member named "pg9"; members: pg1 (primary), pg2`) {
		t.Errorf("refusal: %v", err)
	}
	if _, err := runDB(t, "switchover"); err == nil || !strings.Contains(err.Error(), "--to") {
		t.Errorf("without --to: %v", err)
	}
}

func TestWritableExitStatus(t *testing.T) {
	f := &fakeDB{writable: false}
	startFakeDB(t, f)
	_, err := runDB(t, "writable")
	if err == nil || !strings.Contains(err.Error(), "not writable, as node n1 sees it: a switchover from pg1 to pg2 is under way") {
		t.Fatalf("not writable: %v", err)
	}
	f.writable = true
	out, err := runDB(t, "writable")
	if err != nil || !strings.Contains(out, "writable: primary pg1 (generation 1)") {
		t.Fatalf("writable: %v %q", err, out)
	}
}

func TestDatabaseConfigKeys(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gitraft.yaml")
	os.WriteFile(path, []byte(`database:
  automatic_failover: true
  failover_after: 7s
  isolation_fence_after: 3s
  max_lag_bytes: 1048576
  postgres:
    member: pg1
    port: 5433
    data_dir: /var/lib/postgresql/15/main
    replication_user: replicator
  pgbouncer:
    name: b1
    databases_file: /etc/pgbouncer/gitraft.ini
    databases: [app, jobs]
    pause_expiry: 20s
`), 0o600)
	t.Setenv("GITRAFT_DATABASE_POSTGRES_PRIORITY", "10")
	t.Setenv("GITRAFT_DATABASE_PGBOUNCER_ADMIN_PORT", "6543")
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	load := configFlags(fs)
	if err := fs.Parse([]string{"--config", path, "--database-postgres-host", "10.0.0.1", "--database-switchover-timeout", "40s"}); err != nil {
		t.Fatal(err)
	}
	cfg, err := load()
	if err != nil {
		t.Fatal(err)
	}
	d := cfg.Database
	checks := map[string][2]any{
		"automatic_failover":   {d.AutomaticFailover, true},
		"failover_after":       {d.FailoverAfter, 7 * time.Second},
		"max_lag_bytes":        {d.MaxLagBytes, uint64(1 << 20)},
		"switchover_timeout":   {d.SwitchoverTimeout, 40 * time.Second},
		"postgres.member":      {d.Postgres.Member, "pg1"},
		"postgres.port":        {d.Postgres.Port, 5433},
		"postgres.host (flag)": {d.Postgres.Host, "10.0.0.1"},
		"postgres.priority":    {d.Postgres.Priority, 10},
		"postgres.repl user":   {d.Postgres.ReplicationUser, "replicator"},
		"pgbouncer.databases":  {strings.Join(d.PgBouncer.Databases, ","), "app,jobs"},
		"pgbouncer.admin_port": {d.PgBouncer.AdminPort, 6543},
		"pgbouncer.expiry":     {d.PgBouncer.PauseExpiry, 20 * time.Second},
	}
	for what, c := range checks {
		if c[0] != c[1] {
			t.Errorf("%s = %v, want %v", what, c[0], c[1])
		}
	}
	if err := d.validate(); err != nil {
		t.Errorf("validate: %v", err)
	}
	set := d.clusterSettings()
	if set.PauseTimeout != 5*time.Second || set.FailoverAfter != 7*time.Second || !set.AutomaticFailover || set.IsolationFenceAfter != 3*time.Second {
		t.Errorf("cluster settings %+v", set)
	}
	// Unset, it is failover_after less 2 report intervals, at least half of
	// failover_after.
	if set := (dbSettings{FailoverAfter: 5 * time.Second}).clusterSettings(); set.IsolationFenceAfter != 3*time.Second {
		t.Errorf("default isolation_fence_after %s with failover_after 5s", set.IsolationFenceAfter)
	}
	if set := (dbSettings{FailoverAfter: 3 * time.Second}).clusterSettings(); set.IsolationFenceAfter != 1500*time.Millisecond {
		t.Errorf("default isolation_fence_after %s with failover_after 3s", set.IsolationFenceAfter)
	}
}

func TestDatabaseConfigRefused(t *testing.T) {
	cases := []struct {
		d    dbSettings
		want string
	}{
		{dbSettings{Postgres: postgresSettings{Member: "pg 1"}}, "database.postgres.member"},
		{dbSettings{Postgres: postgresSettings{Member: "pg1"}}, "database.postgres.data_dir is required"},
		{dbSettings{PgBouncer: pgbouncerSettings{Name: "b1", Databases: []string{"app"}}}, "databases_file is required"},
		{dbSettings{PgBouncer: pgbouncerSettings{Name: "b1", DatabasesFile: "/f"}}, "database.pgbouncer.databases is required"},
		{dbSettings{Postgres: postgresSettings{Member: "x", DataDir: "/d"}, PgBouncer: pgbouncerSettings{Name: "x", DatabasesFile: "/f", Databases: []string{"a"}}}, "different names"},
		{dbSettings{FailoverAfter: 2 * time.Second, IsolationFenceAfter: 2 * time.Second}, "database.isolation_fence_after (2s) must be below database.failover_after (2s)"},
		{dbSettings{IsolationFenceAfter: 6 * time.Second}, "set it to 3s or less"},
		{dbSettings{IsolationFenceAfter: -time.Second}, "database.isolation_fence_after -1s: give a positive duration"},
		{dbSettings{SynchronousMode: "yes"}, `database.synchronous_mode "yes": want off, on or strict`},
	}
	for _, c := range cases {
		err := c.d.validate()
		if err == nil || !errors.Is(err, cluster.ErrConfig) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: %v, want %q", c.d, err, c.want)
		}
	}
	if err := (dbSettings{}).validate(); err != nil {
		t.Errorf("no agents: %v", err)
	}
}
