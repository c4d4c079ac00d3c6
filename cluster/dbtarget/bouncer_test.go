package dbtarget

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
)

// The pgbouncer agent alone, against a fake cluster and a fake pgbouncer,
// with a clock the test moves for the isolation lease.

// fakeClock is the time the agent's isolation lease sees.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// fakeCluster is the node the agent runs in. Cut off (cut), its linearizable
// reads, reports and proposals fail and its local state stops moving, as on a
// node that lost the quorum; the state the rest of the cluster moves on to
// is still kept (st), and shows once it is healed.
type fakeCluster struct {
	mu          sync.Mutex
	st          *dbv1.State
	frozen      *dbv1.State // what the node has applied while cut off
	cut         bool
	reportsFail bool
	reads       int // linearizable reads tried
	reports     int // reports that reached the leader
	changed     chan struct{}
}

func newFakeCluster(st *dbv1.State) *fakeCluster {
	return &fakeCluster{st: st, changed: make(chan struct{})}
}

func (c *fakeCluster) ID() string { return "n1" }

func (c *fakeCluster) local() *dbv1.State {
	if c.cut {
		return c.frozen
	}
	return c.st
}

func (c *fakeCluster) DatabaseState(ctx context.Context, consistent bool) (*dbv1.State, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if consistent {
		c.reads++
		if c.cut {
			return nil, errors.New("no leader: cannot confirm a consistent read")
		}
	}
	return proto.CloneOf(c.local()), nil
}

func (c *fakeCluster) WaitDatabaseChange(ctx context.Context, after uint64) error {
	for {
		c.mu.Lock()
		idx, ch := c.local().GetUpdatedIndex(), c.changed
		c.mu.Unlock()
		if idx > after {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (c *fakeCluster) ReportDatabase(ctx context.Context, r *dbv1.ReportRequest) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cut || c.reportsFail {
		return errors.New("no leader")
	}
	c.reports++
	return nil
}

func (c *fakeCluster) ProposeDatabase(ctx context.Context, cmd *dbv1.Command) (*dbv1.Result, error) {
	return nil, errors.New("the test proposes nothing")
}

// update changes the cluster's state (on the side that has the quorum).
func (c *fakeCluster) update(fn func(st *dbv1.State)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := proto.CloneOf(c.st)
	fn(st)
	st.UpdatedIndex++
	c.st = st
	close(c.changed)
	c.changed = make(chan struct{})
}

func (c *fakeCluster) setCut(cut bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cut, c.frozen = cut, c.st
	close(c.changed)
	c.changed = make(chan struct{})
}

func (c *fakeCluster) counts() (reads, reports int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reads, c.reports
}

// fakeBouncer records what the agent does to pgbouncer.
type fakeBouncer struct {
	mu        sync.Mutex
	target    Endpoint
	paused    bool
	fenced    bool
	events    []string
	pauseGate chan struct{} // Pause waits until it is closed
}

func (b *fakeBouncer) event(e string) { b.events = append(b.events, e) }

func (b *fakeBouncer) Pause(ctx context.Context) error {
	b.mu.Lock()
	gate := b.pauseGate
	b.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.paused = true
	b.event("pause")
	return nil
}

func (b *fakeBouncer) Resume(ctx context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.paused || b.fenced {
		b.event("resume")
	}
	b.paused, b.fenced = false, false
	return nil
}

func (b *fakeBouncer) Point(ctx context.Context, primary Endpoint) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.target != primary {
		b.event("point " + primary.String())
	}
	b.target = primary
	return nil
}

func (b *fakeBouncer) Fence(ctx context.Context, drain time.Duration) (bool, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.paused, b.fenced = true, true
	b.event("fence")
	return false, nil
}

func (b *fakeBouncer) Ping(ctx context.Context) error { return nil }

func (b *fakeBouncer) Target() (Endpoint, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.target == (Endpoint{}) {
		return Endpoint{}, errors.New("no include file yet")
	}
	return b.target, nil
}

// routing reports where pgbouncer routes clients, "" when it holds them.
func (b *fakeBouncer) routing() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.paused || b.fenced {
		return ""
	}
	return b.target.String()
}

func (b *fakeBouncer) isFenced() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.fenced
}

func (b *fakeBouncer) eventList() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.events)
}

// testLog logs to the test's output.
func testLog(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

var (
	pg1Endpoint = Endpoint{Host: "127.0.0.1", Port: 5432}
	pg2Endpoint = Endpoint{Host: "127.0.0.1", Port: 5433}
)

// isolationWorld: pg1 the primary at generation 1, pgbouncer b1 on n1,
// and its agent running with a 1 s isolation lease on a fake clock.
func isolationWorld(t *testing.T) (*fakeCluster, *fakeBouncer, *fakeClock) {
	t.Helper()
	c := newFakeCluster(&dbv1.State{
		Members: []*dbv1.Member{
			{Name: "pg1", Host: "127.0.0.1", Port: 5432, Node: "n1"},
			{Name: "pg2", Host: "127.0.0.1", Port: 5433, Node: "n2"},
		},
		Bouncers:     []*dbv1.Bouncer{{Name: "b1", Node: "n1"}},
		Primary:      "pg1",
		Generation:   1,
		UpdatedIndex: 10,
	})
	b := &fakeBouncer{}
	clock := &fakeClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	a := NewBouncerAgent(BouncerAgentConfig{
		Name: "b1", ReportInterval: 20 * time.Millisecond, PauseTimeout: 30 * time.Second, PauseExpiry: time.Minute,
		IsolationFenceAfter: time.Second, Now: clock.Now,
	}, c, b, testLog(t))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); a.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	waitUntil(t, "b1 to route to pg1", func() bool { return b.routing() == pg1Endpoint.String() })
	return c, b, clock
}

// moreProbes waits until the agent tried n more linearizable reads (its
// guard's probes, which fail while cut off), and so finished a round of
// probing in between.
func moreProbes(t *testing.T, c *fakeCluster, n int) {
	t.Helper()
	from, _ := c.counts()
	waitUntil(t, fmt.Sprintf("%d more linearizable reads", n), func() bool { r, _ := c.counts(); return r >= from+n })
}

func TestBouncerAgentFencesWhenCutOff(t *testing.T) {
	c, b, clock := isolationWorld(t)
	c.setCut(true)
	// The majority side fails over to pg2 meanwhile; the cut-off node does
	// not learn it.
	c.update(func(st *dbv1.State) { st.Primary, st.Generation = "pg2", 2 })

	// Before the lease runs out, nothing happens, however often it probes.
	moreProbes(t, c, 5)
	clock.advance(900 * time.Millisecond)
	moreProbes(t, c, 5)
	if got := b.routing(); got != pg1Endpoint.String() {
		t.Fatalf("routes to %q after 0.9 s cut off, want still %s (lease 1 s)", got, pg1Endpoint)
	}

	clock.advance(200 * time.Millisecond)
	waitUntil(t, "b1 to fence itself", b.isFenced)
	moreProbes(t, c, 5)
	if got := b.routing(); got != "" {
		t.Fatalf("routes to %q while cut off", got)
	}

	// The node reaches the quorum again: point at the state's primary,
	// then RESUME.
	c.setCut(false)
	waitUntil(t, "b1 to route to pg2", func() bool { return b.routing() == pg2Endpoint.String() })
	ev := b.eventList()
	i := slices.Index(ev, "fence")
	if want := []string{"fence", "point " + pg2Endpoint.String(), "resume"}; i < 0 || !slices.Equal(ev[i:], want) {
		t.Errorf("events %v, want to end with %v", ev, want)
	}
}

func TestBouncerAgentFencesWhenReportsFail(t *testing.T) {
	// Reads work but no report reaches the leader: the leader counts the
	// pgbouncer silent, so the agent must fence all the same.
	c, b, clock := isolationWorld(t)
	c.mu.Lock()
	c.reportsFail = true
	c.mu.Unlock()
	moreProbes(t, c, 3)
	clock.advance(1100 * time.Millisecond)
	waitUntil(t, "b1 to fence itself", b.isFenced)

	// Reads alone do not lift it.
	moreProbes(t, c, 5)
	if !b.isFenced() {
		t.Fatal("lifted the fence while reports still fail")
	}
	c.mu.Lock()
	c.reportsFail = false
	c.mu.Unlock()
	waitUntil(t, "b1 to route to pg1 again", func() bool { return b.routing() == pg1Endpoint.String() })
}

func TestBouncerAgentKeepsLeaseDuringLongPause(t *testing.T) {
	// The main loop waits in a PAUSE (transactions under way) longer than
	// the lease: the guard's heartbeats keep it, so nothing is fenced.
	c, b, clock := isolationWorld(t)
	gate := make(chan struct{})
	b.mu.Lock()
	b.pauseGate = gate
	b.mu.Unlock()
	c.update(func(st *dbv1.State) {
		st.Operation = &dbv1.Operation{Id: 20, Kind: dbv1.Kind_KIND_SWITCHOVER, Phase: dbv1.Phase_PHASE_PAUSING, Target: "pg2", OldPrimary: "pg1"}
	})
	for range 10 { // 3 s on the lease's clock, in steps the guard sees
		clock.advance(300 * time.Millisecond)
		moreProbes(t, c, 2)
	}
	if b.isFenced() {
		t.Fatalf("fenced during a PAUSE while the cluster answers: %v", b.eventList())
	}
	close(gate)
	waitUntil(t, "the pause", func() bool { return slices.Contains(b.eventList(), "pause") })
	if b.isFenced() {
		t.Fatalf("fenced: %v", b.eventList())
	}
}

func TestIsolationSettings(t *testing.T) {
	s := Settings{FailoverAfter: 4 * time.Second}.WithDefaults()
	if s.IsolationFenceAfter != 2*time.Second {
		t.Errorf("default isolation_fence_after %s with failover_after 4s, want 2s (4s less 2 report intervals)", s.IsolationFenceAfter)
	}
	if d := (Settings{}).WithDefaults().IsolationFenceAfter; d != 3*time.Second {
		t.Errorf("default isolation_fence_after %s, want 3s", d)
	}
	if d := (Settings{FailoverAfter: time.Second}).WithDefaults().IsolationFenceAfter; d != 500*time.Millisecond {
		t.Errorf("default isolation_fence_after %s with failover_after 1s, want half of it", d)
	}
	if s.IsolationMargin() != 2*s.ReportInterval {
		t.Errorf("margin %s, want 2 report intervals", s.IsolationMargin())
	}
}

func TestBouncerAgentPauseLeftByDeadRunEndsWhenDue(t *testing.T) {
	// The previous run PAUSEd for operation 20 and died 50 s into a
	// one-minute pause_expiry. The new run cannot register (its proposals
	// fail, so its main loop never starts), yet the pause ends when it was
	// due: 10 s later on the agent's clock, not a minute after the restart.
	c := newFakeCluster(&dbv1.State{
		Members:      []*dbv1.Member{{Name: "pg1", Host: "127.0.0.1", Port: 5432, Node: "n1"}},
		Primary:      "pg1",
		Generation:   1,
		UpdatedIndex: 10,
		Operation:    &dbv1.Operation{Id: 20, Kind: dbv1.Kind_KIND_SWITCHOVER, Phase: dbv1.Phase_PHASE_STOPPING_OLD, Target: "pg2", OldPrimary: "pg1"},
	})
	clock := &fakeClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	file := t.TempDir() + "/pgbouncer.json"
	prev := fmt.Sprintf(`{"generation":1,"primary":"pg1","endpoint":"127.0.0.1:5432","paused_op":20,"paused_at_unix_nano":%d}`, clock.Now().Add(-50*time.Second).UnixNano())
	if err := os.WriteFile(file, []byte(prev), 0o600); err != nil {
		t.Fatal(err)
	}
	b := &fakeBouncer{target: pg1Endpoint, paused: true}
	a := NewBouncerAgent(BouncerAgentConfig{
		Name: "b1", StateFile: file, ReportInterval: 20 * time.Millisecond, PauseTimeout: 30 * time.Second, PauseExpiry: time.Minute,
		IsolationFenceAfter: time.Hour, Now: clock.Now,
	}, c, b, testLog(t))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); a.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	moreProbes(t, c, 3)
	clock.advance(9 * time.Second)
	moreProbes(t, c, 3)
	if got := b.routing(); got != "" {
		t.Fatalf("routes to %q 59 s into the pause, want still paused", got)
	}
	clock.advance(1500 * time.Millisecond)
	waitUntil(t, "the pause to end at its expiry", func() bool { return b.routing() == pg1Endpoint.String() })
	// The agent resumes, then records it: wait for the record too.
	waitUntil(t, "the state file to forget the pause", func() bool {
		raw, err := os.ReadFile(file)
		return err == nil && !strings.Contains(string(raw), "paused_op")
	})
}
