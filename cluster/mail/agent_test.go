package mail

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	mailv1 "github.com/gitraft/gitraft/proto/gitraft/mail/v1"
)

// fakeCluster is a State behind the agent's Cluster interface. stale, when
// set, is what a read without fresh returns (a node behind the leader).
type fakeCluster struct {
	mu    sync.Mutex
	s     *State
	index uint64
	now   func() time.Time
	stale []*mailv1.Host
	down  bool // every call fails, as with no leader
}

func (c *fakeCluster) MailHosts(ctx context.Context, fresh bool) ([]*mailv1.Host, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.down {
		return nil, errors.New("no leader")
	}
	if c.stale != nil && !fresh {
		return c.stale, nil
	}
	var out []*mailv1.Host
	for _, h := range c.s.Hosts() {
		out = append(out, proto.CloneOf(h))
	}
	return out, nil
}

func (c *fakeCluster) ProposeMail(ctx context.Context, cmd *mailv1.Command) (*mailv1.Result, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.down {
		return nil, errors.New("no leader")
	}
	c.index++
	r := c.s.Apply(c.index, c.now(), cmd)
	if r.GetRefusal() != nil {
		return nil, errors.New(r.GetRefusal().GetMessage())
	}
	return r.GetMail(), nil
}

func (c *fakeCluster) apply(t *testing.T, cmd *mailv1.Command) *mailv1.Result {
	t.Helper()
	r, err := c.ProposeMail(context.Background(), cmd)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func (c *fakeCluster) host(t *testing.T, name string) *mailv1.Host {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	h, ok := c.s.Host(name)
	if !ok {
		t.Fatalf("no host %s", name)
	}
	return h
}

// fakeMTA records what the agent asked of the mail server.
type fakeMTA struct {
	deferOn    bool
	handoff    string
	flushes    int
	queue      int
	old        int // smtpd processes of an older configuration
	err        error
	setDefers  int
	setHandoff int
}

func (m *fakeMTA) SetDefer(_ context.Context, on bool) error {
	if m.err != nil {
		return m.err
	}
	m.setDefers++
	m.deferOn = on
	return nil
}

func (m *fakeMTA) SetHandoff(_ context.Context, nexthop string) error {
	if m.err != nil {
		return m.err
	}
	m.setHandoff++
	m.handoff = nexthop
	return nil
}

func (m *fakeMTA) Flush(context.Context) error {
	if m.err != nil {
		return m.err
	}
	m.flushes++
	return nil
}

func (m *fakeMTA) QueueSize(context.Context) (int, error) { return m.queue, m.err }

func (m *fakeMTA) OldSessions(context.Context) (int, error) { return m.old, m.err }

type agentRig struct {
	t     *testing.T
	clock time.Time
	c     *fakeCluster
	mta   *fakeMTA
	a     *Agent
}

func newAgentRig(t *testing.T, cfg AgentConfig) *agentRig {
	r := &agentRig{t: t, clock: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC), mta: &fakeMTA{}}
	r.c = &fakeCluster{s: NewState(), now: func() time.Time { return r.clock }}
	r.newAgent(cfg)
	return r
}

// newAgent starts a new agent on the same cluster and MTA, as after a
// restart of gitraft.
func (r *agentRig) newAgent(cfg AgentConfig) {
	r.t.Helper()
	if cfg.Host == "" {
		cfg.Host = "mx2"
	}
	cfg.NodeID = "n3"
	a, err := NewAgent(cfg, r.c, r.mta, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		r.t.Fatal(err)
	}
	a.now = func() time.Time { return r.clock }
	r.a = a
}

// step advances the clock and runs one agent step.
func (r *agentRig) step(d time.Duration) {
	r.clock = r.clock.Add(d)
	r.a.Step(context.Background())
}

func (r *agentRig) state() mailv1.HostState { return r.c.host(r.t, "mx2").GetState() }

func Test_Agent_DrainFlushDrainedUndrain(t *testing.T) {
	r := newAgentRig(t, AgentConfig{Address: "mx2.example.org", Priority: 20, FlushInterval: 5 * time.Second})
	r.c.apply(t, add("mx1", "mx1.example.org", 10))
	r.mta.queue = 3
	r.step(0)
	h := r.c.host(t, "mx2")
	if h.GetAddress() != "mx2.example.org" || h.GetPriority() != 20 || h.GetState() != mailv1.HostState_HOST_STATE_ACTIVE {
		t.Fatalf("not registered from the config: %v", h)
	}
	if r.mta.deferOn || r.mta.setDefers != 1 || h.GetQueueSize() != 3 || h.GetQueueReportedBy() != "agent:n3" {
		t.Fatalf("active host: mta %+v, host %v", r.mta, h)
	}

	r.c.apply(t, drain("mx2", time.Hour, "maintenance", false))
	r.mta.queue = 0 // mail may still arrive until Postfix defers: not drained yet
	r.step(100 * time.Millisecond)
	if !r.mta.deferOn || r.mta.flushes != 1 {
		t.Fatalf("draining: mta %+v", r.mta)
	}
	if r.state() != mailv1.HostState_HOST_STATE_DRAINING {
		t.Fatalf("drained before new mail was refused for Settle: %v", r.c.host(t, "mx2"))
	}
	r.mta.queue = 2
	for i := 0; i < 20; i++ {
		r.step(time.Second)
	}
	if r.state() != mailv1.HostState_HOST_STATE_DRAINING || r.c.host(t, "mx2").GetQueueSize() != 2 {
		t.Fatalf("with 2 queued: %v", r.c.host(t, "mx2"))
	}
	if r.mta.flushes < 2 {
		t.Fatalf("no periodic flush while draining: %d flushes", r.mta.flushes)
	}
	r.mta.queue = 0
	r.step(2 * time.Second)
	if r.state() != mailv1.HostState_HOST_STATE_DRAINED {
		t.Fatalf("empty queue, not drained: %v", r.c.host(t, "mx2"))
	}
	if !r.mta.deferOn {
		t.Fatal("a drained host takes mail")
	}

	r.c.apply(t, undrain("mx2"))
	r.step(100 * time.Millisecond)
	if r.mta.deferOn || r.state() != mailv1.HostState_HOST_STATE_ACTIVE {
		t.Fatalf("undrained: mta %+v", r.mta)
	}
}

// An SMTP session that began before the defer may still queue mail: with
// the queue empty, the host stays draining while any is open, and the
// count is reported.
func Test_Agent_NotDrainedWhileOldSessionsOpen(t *testing.T) {
	r := newAgentRig(t, AgentConfig{ReportInterval: 10 * time.Second})
	r.c.apply(t, add("mx1", "mx1.example.org", 10))
	r.c.apply(t, add("mx2", "mx2.example.org", 10))
	r.c.apply(t, drain("mx2", time.Hour, "", false))
	r.mta.old = 1
	for i := 0; i < 10; i++ {
		r.step(time.Second)
	}
	h := r.c.host(t, "mx2")
	if h.GetState() != mailv1.HostState_HOST_STATE_DRAINING || h.GetOldSessions() != 1 || h.GetQueueSize() != 0 {
		t.Fatalf("empty queue with a session from before the drain open: %v", h)
	}
	if h.GetAgentReportInterval().AsDuration() != 10*time.Second {
		t.Fatalf("report interval not recorded: %v", h)
	}
	// The session queues a message and ends.
	r.mta.old, r.mta.queue = 0, 1
	r.step(2 * time.Second)
	if h := r.c.host(t, "mx2"); h.GetState() != mailv1.HostState_HOST_STATE_DRAINING || h.GetQueueSize() != 1 || h.GetOldSessions() != 0 {
		t.Fatalf("after the session ended: %v", h)
	}
	r.mta.queue = 0
	r.step(2 * time.Second)
	if r.state() != mailv1.HostState_HOST_STATE_DRAINED {
		t.Fatalf("not drained: %v", r.c.host(t, "mx2"))
	}
}

// A node whose view is behind must not take mail again on the strength of
// it: undraining is confirmed with a linearizable read.
func Test_Agent_UndrainConfirmedByFreshRead(t *testing.T) {
	r := newAgentRig(t, AgentConfig{})
	r.c.apply(t, add("mx1", "mx1.example.org", 10))
	r.c.apply(t, add("mx2", "mx2.example.org", 10))
	active := r.c.host(t, "mx2")
	r.c.apply(t, drain("mx2", time.Hour, "", false))
	r.step(0)
	if !r.mta.deferOn {
		t.Fatal("not deferring")
	}
	r.c.stale = []*mailv1.Host{r.c.host(t, "mx1"), active}
	for i := 0; i < 5; i++ {
		r.step(time.Second)
	}
	if !r.mta.deferOn {
		t.Fatal("took mail again on a stale view")
	}
	r.c.stale = nil
	r.c.apply(t, undrain("mx2"))
	r.step(time.Second)
	if r.mta.deferOn {
		t.Fatal("still deferring after the undrain")
	}
}

func Test_Agent_HandoffAtDeadline(t *testing.T) {
	r := newAgentRig(t, AgentConfig{HandoffPeers: []string{"mx3", "mx1"}})
	r.c.apply(t, add("mx1", "mx1.example.org", 10))
	r.c.apply(t, add("mx2", "mx2.example.org", 10))
	r.c.apply(t, add("mx3", "mx3.example.org", 10))
	r.c.apply(t, drain("mx3", time.Hour, "", false)) // not a candidate while draining
	r.mta.queue = 5
	r.c.apply(t, drain("mx2", 10*time.Second, "", false))
	id := r.c.index
	for i := 0; i < 5; i++ {
		r.step(time.Second)
	}
	if r.mta.handoff != "" {
		t.Fatalf("handed off before the deadline: %q", r.mta.handoff)
	}
	r.clock = r.clock.Add(10 * time.Second)
	r.c.apply(t, overdue("mx2", id))
	flushes := r.mta.flushes
	r.step(time.Second)
	if r.mta.handoff != "[mx1.example.org]:25" || r.mta.flushes == flushes {
		t.Fatalf("overdue: mta %+v", r.mta)
	}
	if h := r.c.host(t, "mx2"); h.GetHandoffPeer() != "mx1" {
		t.Fatalf("handoff not recorded: %v", h)
	}
	r.mta.queue = 0
	r.step(2 * time.Second)
	if r.state() != mailv1.HostState_HOST_STATE_DRAINED || r.mta.handoff == "" {
		t.Fatalf("after handoff: %v, mta %+v", r.c.host(t, "mx2"), r.mta)
	}
	r.c.apply(t, undrain("mx2"))
	r.step(time.Second)
	if r.mta.handoff != "" || r.mta.deferOn {
		t.Fatalf("undrain kept the handoff: %+v", r.mta)
	}
}

func Test_Agent_HandoffNexthopAndNoActivePeer(t *testing.T) {
	r := newAgentRig(t, AgentConfig{HandoffPeers: []string{"mx1=[127.0.0.1]:2526"}})
	r.c.apply(t, add("mx1", "mx1.example.org", 10))
	r.c.apply(t, add("mx2", "mx2.example.org", 10))
	r.c.apply(t, add("mx3", "mx3.example.org", 10))
	r.mta.queue = 1
	r.c.apply(t, drain("mx1", time.Hour, "", false))
	r.c.apply(t, drain("mx2", time.Second, "", false))
	r.clock = r.clock.Add(time.Minute)
	r.c.apply(t, overdue("mx2", r.c.index))
	r.step(time.Second)
	if r.mta.handoff != "" || r.c.host(t, "mx2").GetHandoffPeer() != "" {
		t.Fatalf("handed off to a draining peer: %+v", r.mta)
	}
	r.c.apply(t, undrain("mx1"))
	r.step(time.Second)
	if r.mta.handoff != "[127.0.0.1]:2526" {
		t.Fatalf("configured next hop not used: %+v", r.mta)
	}
}

// After a restart the agent applies the state again: still deferring, and
// an empty queue counts only once new mail was refused for Settle again.
func Test_Agent_RestartIsIdempotent(t *testing.T) {
	r := newAgentRig(t, AgentConfig{})
	r.c.apply(t, add("mx1", "mx1.example.org", 10))
	r.c.apply(t, add("mx2", "mx2.example.org", 10))
	r.mta.queue = 4
	r.c.apply(t, drain("mx2", time.Hour, "", false))
	for i := 0; i < 5; i++ {
		r.step(time.Second)
	}
	r.mta.queue = 0
	r.newAgent(AgentConfig{})
	r.step(time.Millisecond)
	if !r.mta.deferOn || r.state() != mailv1.HostState_HOST_STATE_DRAINING {
		t.Fatalf("after restart: mta %+v, %v", r.mta, r.c.host(t, "mx2"))
	}
	r.step(3 * time.Second)
	if r.state() != mailv1.HostState_HOST_STATE_DRAINED {
		t.Fatalf("not drained after Settle: %v", r.c.host(t, "mx2"))
	}
}

// Failures of Postfix or of the cluster stop the step (nothing is reported
// on a guess) and are retried.
func Test_Agent_FailuresRetried(t *testing.T) {
	r := newAgentRig(t, AgentConfig{})
	r.c.apply(t, add("mx1", "mx1.example.org", 10))
	r.c.apply(t, add("mx2", "mx2.example.org", 10))
	r.c.apply(t, drain("mx2", time.Hour, "", false))
	r.mta.err = fmt.Errorf("%w: postconf: exit status 1", ErrPostfix)
	for i := 0; i < 5; i++ {
		r.step(time.Second)
	}
	if r.state() != mailv1.HostState_HOST_STATE_DRAINING || r.c.host(t, "mx2").GetQueueReportedAt() != nil {
		t.Fatalf("reported although Postfix failed: %v", r.c.host(t, "mx2"))
	}
	r.mta.err = nil
	r.c.down = true
	r.step(time.Second)
	r.c.down = false
	r.step(time.Second)
	r.step(3 * time.Second)
	if r.state() != mailv1.HostState_HOST_STATE_DRAINED {
		t.Fatalf("not drained once Postfix works: %v", r.c.host(t, "mx2"))
	}
}

func Test_Agent_Config(t *testing.T) {
	c := &fakeCluster{s: NewState(), now: time.Now}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, tc := range []struct {
		cfg  AgentConfig
		want string
	}{
		{AgentConfig{}, "name"},
		{AgentConfig{Host: "mx2", Address: "bad address"}, "address"},
		{AgentConfig{Host: "mx2", HandoffPeers: []string{"mx2"}}, "this host itself"},
		{AgentConfig{Host: "mx2", HandoffPeers: []string{"MX1"}}, "handoff peer"},
		{AgentConfig{Host: "mx2", HandoffPeers: []string{"mx1=[a]:1 [b]:2"}}, "one Postfix next hop"},
	} {
		if _, err := NewAgent(tc.cfg, c, &fakeMTA{}, log); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want an error about %q", tc.cfg, err, tc.want)
		}
	}
}

// The peer that takes a drain's leftover mail flushes its own queue while
// it is handed mail and for a while after the giver is drained, so that
// handed mail does not wait for its retry backoff; then it stops.
func Test_Agent_PeerFlushesHandedMail(t *testing.T) {
	r := newAgentRig(t, AgentConfig{Host: "mx1", FlushInterval: 5 * time.Second})
	r.c.apply(t, add("mx1", "mx1.example.org", 10))
	r.c.apply(t, add("mx2", "mx2.example.org", 20))
	r.step(time.Second)
	r.step(10 * time.Second)
	if r.mta.flushes != 0 {
		t.Fatalf("an active host with no giver flushed %d times", r.mta.flushes)
	}
	r.c.apply(t, drain("mx2", 10*time.Second, "", false))
	id := r.c.index
	r.clock = r.clock.Add(20 * time.Second)
	r.c.apply(t, overdue("mx2", id))
	r.step(time.Second)
	if r.mta.flushes != 0 {
		t.Fatal("flushed before any mail was handed to it")
	}
	r.c.apply(t, &mailv1.Command{Command: &mailv1.Command_ReportHandoff{ReportHandoff: &mailv1.ReportHandoff{Name: "mx2", DrainId: id, Peer: "mx1"}}})
	r.step(time.Second)
	if r.mta.flushes != 1 {
		t.Fatalf("no flush at once when mail is handed to it: %d", r.mta.flushes)
	}
	for i := 0; i < 10; i++ {
		r.step(time.Second)
	}
	if r.mta.flushes != 3 {
		t.Fatalf("flushes every 5s while handed mail: %d in 10s, want 3", r.mta.flushes)
	}
	r.c.apply(t, report("mx2", id, 0))
	n := r.mta.flushes
	r.step(handoffFlushTail / 2)
	if r.mta.flushes != n+1 {
		t.Fatal("stopped flushing as soon as the giver was drained")
	}
	r.step(handoffFlushTail)
	r.step(time.Minute)
	if r.mta.flushes != n+1 {
		t.Fatalf("still flushing %s after the giver was drained", handoffFlushTail)
	}
}
