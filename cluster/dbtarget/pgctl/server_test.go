package pgctl_test

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/gitraft/gitraft/cluster/dbtarget"
	"github.com/gitraft/gitraft/cluster/dbtarget/pgctl"
	"github.com/gitraft/gitraft/cluster/dbtarget/pgctl/pgtest"
)

// These tests drive a real PostgreSQL 15 and pgbouncer (./e2e/test.sh
// installs them when missing).
func needPostgres(t *testing.T) {
	t.Helper()
	if why := pgtest.Available(); why != "" {
		t.Fatalf("%s (./e2e/test.sh installs it)", why)
	}
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func newServer(t *testing.T, p *pgtest.Postgres) *pgctl.Server {
	t.Helper()
	s, err := pgctl.NewServer(p.ServerConfig(), testLogger(t).With("pg", p.Name))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func newBouncer(t *testing.T, b *pgtest.Bouncer) *pgctl.Bouncer {
	t.Helper()
	d, err := pgctl.NewBouncer(b.BouncerConfig(), testLogger(t).With("bouncer", b.Name))
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// waitHealth polls a server's health until cond holds.
func waitHealth(t *testing.T, s *pgctl.Server, what string, cond func(dbtarget.Health) bool) dbtarget.Health {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		h := s.Health(ctxT(t, 5*time.Second))
		if cond(h) {
			return h
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s: last health %+v", what, h)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// switchover is the planned switchover the orchestrator runs, with the
// drivers only: pause, stop the old primary, wait for the target to replay
// its last WAL, promote, repoint, resume, demote the old primary.
func switchover(t *testing.T, from, to *pgctl.Server, toEP dbtarget.Endpoint, bouncers ...*pgctl.Bouncer) {
	t.Helper()
	ctx := ctxT(t, 2*time.Minute)
	if err := from.Checkpoint(ctx); err != nil {
		t.Fatal(err)
	}
	for _, b := range bouncers {
		if err := b.Pause(ctxT(t, 10*time.Second)); err != nil {
			t.Fatal(err)
		}
	}
	lsn, err := from.Stop(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if lsn == 0 {
		t.Fatal("Stop returned LSN 0")
	}
	waitHealth(t, to, "the target replaying "+lsn.String(), func(h dbtarget.Health) bool { return h.Running && h.ReplayLSN >= lsn })
	if err := to.Promote(ctx); err != nil {
		t.Fatal(err)
	}
	for _, b := range bouncers {
		if err := b.Point(ctx, toEP); err != nil {
			t.Fatal(err)
		}
	}
	for _, b := range bouncers {
		if err := b.Resume(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := from.Demote(ctx, toEP); err != nil {
		t.Fatal(err)
	}
}

// checkRows fails the test unless every committed write is on p and none
// failed.
func checkRows(t *testing.T, w *pgtest.Writer, p *pgtest.Postgres, from time.Time, wantNoFailures bool) pgtest.Report {
	t.Helper()
	r := pgtest.ReportBetween(w.Writes(), from, time.Time{})
	if wantNoFailures && r.Failed > 0 {
		t.Errorf("%d failed transactions, want none: %v", r.Failed, r.FirstErrors)
	}
	have, err := p.IDs(ctxT(t, 30*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if miss := pgtest.Missing(r.CommittedIDs, have); len(miss) > 0 {
		t.Errorf("%d committed rows missing on %s (first: %v)", len(miss), p.Name, miss[:min(5, len(miss))])
	}
	return r
}

func Test_Server_SwitchoverFailoverRewind(t *testing.T) {
	needPostgres(t)
	dir := pgtest.Dir(t)
	p1 := pgtest.StartPrimary(t, dir, "pg1")
	p2 := p1.StartStandby(t, dir, "pg2")
	b := pgtest.StartBouncer(t, dir, "bouncer1", p1)
	s1, s2 := newServer(t, p1), newServer(t, p2)
	bd := newBouncer(t, b)

	t.Run("health", func(t *testing.T) {
		h1 := s1.Health(ctxT(t, 10*time.Second))
		if !h1.Running || h1.InRecovery || h1.Timeline != 1 || h1.WriteLSN == 0 || h1.ReplayLSN != h1.WriteLSN || h1.Err != "" {
			t.Errorf("primary health %+v, want running, not in recovery, timeline 1, an LSN", h1)
		}
		h2 := waitHealth(t, s2, "standby streaming", func(h dbtarget.Health) bool { return h.Streaming })
		if !h2.Running || !h2.InRecovery || h2.Timeline != 1 || h2.ReplayLSN == 0 || h2.WriteLSN < h2.ReplayLSN {
			t.Errorf("standby health %+v, want running, in recovery, streaming, timeline 1, LSNs", h2)
		}
	})

	t.Run("idempotent calls", func(t *testing.T) {
		ctx := ctxT(t, time.Minute)
		if err := s1.Promote(ctx); err != nil {
			t.Errorf("promoting a primary: %v, want nil", err)
		}
		if err := s1.Start(ctx); err != nil {
			t.Errorf("starting a running server: %v, want nil", err)
		}
		pid := p2.PostmasterPID()
		if err := s2.Demote(ctx, p1.Endpoint()); err != nil {
			t.Errorf("demoting a standby of the same primary: %v", err)
		}
		if got := p2.PostmasterPID(); got != pid {
			t.Errorf("demoting a standby already streaming from the primary restarted it (pid %d, was %d)", got, pid)
		}
		if err := s1.Demote(ctx, p1.Endpoint()); !errors.Is(err, pgctl.ErrConfig) {
			t.Errorf("demoting a server to follow itself: %v, want ErrConfig", err)
		}
		if !p1.Answers() || p1.InRecovery() {
			t.Fatal("the refused demote changed the primary")
		}
	})

	w := pgtest.StartWriter(t, 30*time.Second, b)
	w.WaitCommitted(50, 30*time.Second)

	t.Run("switchover and back", func(t *testing.T) {
		from := time.Now()
		switchover(t, s1, s2, p2.Endpoint(), bd)
		w.WaitCommitted(50, 30*time.Second)
		if p2.InRecovery() {
			t.Fatal("new primary pg2 in recovery")
		}
		if !p1.InRecovery() || !p1.StreamingFrom(p2) {
			t.Fatal("old primary pg1 is not a streaming standby of pg2")
		}
		if h := s2.Health(ctxT(t, 5*time.Second)); h.Timeline != 2 {
			t.Errorf("new primary on timeline %d, want 2", h.Timeline)
		}
		if port, err := b.ServerPort(ctxT(t, 10*time.Second)); err != nil || port != p2.Port {
			t.Errorf("pgbouncer routes to port %d (%v), want pg2's %d", port, err, p2.Port)
		}
		if ep, err := bd.Target(); err != nil || ep != p2.Endpoint() {
			t.Errorf("Target() = %v, %v; want %v", ep, err, p2.Endpoint())
		}
		r := checkRows(t, w, p2, from, true)
		t.Logf("switchover pg1 -> pg2: %d committed, %d failed, longest write %s", r.Committed, r.Failed, r.MaxLatency)

		from = time.Now()
		switchover(t, s2, s1, p1.Endpoint(), bd)
		w.WaitCommitted(50, 30*time.Second)
		if p1.InRecovery() || !p2.InRecovery() || !p2.StreamingFrom(p1) {
			t.Fatal("after switching back, pg1 is not the primary with pg2 streaming from it")
		}
		r = checkRows(t, w, p1, from, true)
		t.Logf("switchover pg2 -> pg1: %d committed, %d failed, longest write %s", r.Committed, r.Failed, r.MaxLatency)
	})

	t.Run("stop is repeatable", func(t *testing.T) {
		ctx := ctxT(t, time.Minute)
		l1, err := s2.Stop(ctx)
		if err != nil {
			t.Fatal(err)
		}
		l2, err := s2.Stop(ctx)
		if err != nil || l2 != l1 {
			t.Errorf("second Stop = %s, %v; want %s", l2, err, l1)
		}
		if h := s2.Health(ctx); h.Running || h.Err == "" {
			t.Errorf("health of a stopped server %+v, want not running with a reason", h)
		}
		if err := s2.Checkpoint(ctx); !errors.Is(err, pgctl.ErrNotRunning) {
			t.Errorf("CHECKPOINT on a stopped server: %v, want ErrNotRunning", err)
		}
		if err := s2.Start(ctx); err != nil {
			t.Fatal(err)
		}
		waitHealth(t, s2, "pg2 streaming again", func(h dbtarget.Health) bool { return h.InRecovery && h.Streaming })
	})

	t.Run("failover, then the old primary returns", func(t *testing.T) {
		ctx := ctxT(t, 2*time.Minute)
		died := time.Now()
		p1.Kill()
		if _, err := bd.Fence(ctx, time.Second); err != nil {
			t.Fatal(err)
		}
		// Backends of a killed postmaster may still commit a transaction
		// under way (and its WAL may never reach the standby); from here
		// on none reaches pg1 through pgbouncer.
		fenced := time.Now()
		if err := s2.Promote(ctx); err != nil {
			t.Fatal(err)
		}
		if err := bd.Point(ctx, p2.Endpoint()); err != nil {
			t.Fatal(err)
		}
		if err := bd.Resume(ctx); err != nil {
			t.Fatal(err)
		}
		w.WaitCommitted(20, 30*time.Second)
		t.Logf("failover: first commit on pg2 %s after the primary died",
			pgtest.FirstCommitOn(w.Writes(), p2.Port, died).Sub(died).Round(time.Millisecond))

		// An operator starts the old primary by hand and writes to it
		// directly: its history diverges from pg2's.
		p1.Start()
		if p1.InRecovery() {
			t.Fatal("restarted old primary came up in recovery; the test wants it writable to diverge")
		}
		p1.MustExec(ctx, pgtest.Database, "INSERT INTO rows (id, writer) VALUES (-1, -1)")
		if port, err := b.ServerPort(ctx); err != nil || port != p2.Port {
			t.Fatalf("pgbouncer routes to port %d (%v), want pg2's %d", port, err, p2.Port)
		}
		if err := s1.Demote(ctx, p2.Endpoint()); err != nil {
			t.Fatal(err)
		}
		if !p1.InRecovery() || !p1.StreamingFrom(p2) {
			t.Fatal("pg1 is not a streaming standby of pg2 after Demote")
		}
		have, err := p1.IDs(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if have[-1] {
			t.Error("the row written only on the diverged old primary survived pg_rewind")
		}
		// Rows committed through pgbouncer since the failover reach pg1
		// as a standby (pg_rewind copied pg2's configuration files, and
		// Demote put pg1's own back: it still listens on its own port).
		w.WaitCommitted(20, 30*time.Second)
		lsn := s2.Health(ctx).WriteLSN
		waitHealth(t, s1, "pg1 replaying pg2's WAL", func(h dbtarget.Health) bool { return h.ReplayLSN >= lsn })
		checkRows(t, w, p1, fenced, false)
		if late := pgtest.CommitsOn(w.Writes(), p1.Port, fenced); len(late) > 0 {
			t.Errorf("%d writes committed on the old primary pg1 after it was fenced (first: row %d)", len(late), late[0].ID)
		}
	})
}

// A third member keeps following the old primary after a switchover: its
// WAL receiver reconnects to it, a standby by then, and cascades through
// it. Health reports that upstream, and Demote points the running standby
// at the new primary in place (no restart, no rewind).
func Test_Server_ThirdStandbyRepointedInPlace(t *testing.T) {
	needPostgres(t)
	dir := pgtest.Dir(t)
	p1 := pgtest.StartPrimary(t, dir, "pg1")
	p2 := p1.StartStandby(t, dir, "pg2")
	p3 := p1.StartStandby(t, dir, "pg3")
	s1, s2, s3 := newServer(t, p1), newServer(t, p2), newServer(t, p3)
	h3 := waitHealth(t, s3, "pg3 streaming from pg1", func(h dbtarget.Health) bool { return h.Streaming })
	if h3.Upstream != p1.Endpoint() {
		t.Errorf("pg3's upstream %v, want pg1 %v", h3.Upstream, p1.Endpoint())
	}
	if h1 := s1.Health(ctxT(t, 5*time.Second)); h1.Upstream != (dbtarget.Endpoint{}) || len(h1.Replicas) != 2 {
		t.Errorf("primary health %+v: want no upstream and two replicas", h1)
	}
	switchover(t, s1, s2, p2.Endpoint())
	waitHealth(t, s3, "pg3 cascading through pg1", func(h dbtarget.Health) bool { return h.Streaming && h.Upstream == p1.Endpoint() })
	pid := p3.PostmasterPID()
	ctx := ctxT(t, time.Minute)
	if err := s3.Demote(ctx, p2.Endpoint()); err != nil {
		t.Fatal(err)
	}
	if !p3.StreamingFrom(p2) {
		t.Fatal("pg3 does not stream from pg2 after Demote")
	}
	if got := p3.PostmasterPID(); got != pid {
		t.Errorf("Demote restarted the running standby (pid %d, was %d); want it pointed in place", got, pid)
	}
	p2.MustExec(ctx, pgtest.Database, "INSERT INTO rows (id, writer) VALUES (42, 0)")
	lsn := s2.Health(ctx).WriteLSN
	waitHealth(t, s3, "pg3 replaying pg2's WAL", func(h dbtarget.Health) bool { return h.ReplayLSN >= lsn && h.Upstream == p2.Endpoint() })
	if have, err := p3.IDs(ctx); err != nil || !have[42] {
		t.Errorf("row written on pg2 not on pg3 (%v)", err)
	}
}
