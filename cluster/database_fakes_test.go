package cluster

// Fakes of PostgreSQL and pgbouncer for the in-process tests of the database
// target: they implement dbtarget.Server and dbtarget.Bouncer over a small
// model of streaming replication, so that the orchestration (state, leader
// loop, agents, services) is tested here with Raft but without real servers.
// The e2e tests (e2e/db_*_test.go) drive the real pgctl drivers against real
// PostgreSQL and pgbouncer.

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/gitraft/gitraft/cluster/dbtarget"
	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
)

// fakePG is a set of PostgreSQL servers and pgbouncers sharing one lock, with
// a replication model: a standby copies its upstream's WAL (rows) on each
// tick, and once more after its upstream stopped cleanly (a fast shutdown
// sends everything to connected standbys); WAL a crashed primary did not
// send is lost.
type fakePG struct {
	mu         sync.Mutex
	servers    map[string]*fakeServer
	bouncers   map[string]*fakeBouncer
	violations []string
	events     []string
}

type fakeServer struct {
	pg         *fakePG
	name       string
	ep         dbtarget.Endpoint
	running    bool
	inRecovery bool
	timeline   uint32
	rows       []int // committed rows, in WAL order; the LSN is len(rows)
	upstream   string
	cleanStop  bool   // stopped by a fast shutdown (its WAL reached standbys)
	lagRows    int    // a standby stays this many rows behind
	syncNames  string // synchronous_standby_names in force (a primary)

	// Hooks and injected failures (set under mu).
	promoteGate   chan struct{} // Promote waits until it is closed
	stopGate      chan struct{}
	promoteErr    error
	stopErr       error
	checkpointErr error
}

type fakeBouncer struct {
	pg       *fakePG
	name     string
	target   dbtarget.Endpoint
	paused   bool
	fenced   bool
	pauseErr error
	resumed  chan struct{} // closed and replaced on each resume
}

func newFakePG() *fakePG {
	return &fakePG{servers: map[string]*fakeServer{}, bouncers: map[string]*fakeBouncer{}}
}

// addPrimary adds a running primary; addStandby one that streams from it.
func (pg *fakePG) addPrimary(name string, port int) *fakeServer {
	pg.mu.Lock()
	defer pg.mu.Unlock()
	s := &fakeServer{pg: pg, name: name, ep: dbtarget.Endpoint{Host: "127.0.0.1", Port: port}, running: true, timeline: 1}
	pg.servers[name] = s
	return s
}

func (pg *fakePG) addStandby(name string, port int, upstream string) *fakeServer {
	pg.mu.Lock()
	defer pg.mu.Unlock()
	s := &fakeServer{pg: pg, name: name, ep: dbtarget.Endpoint{Host: "127.0.0.1", Port: port}, running: true, inRecovery: true, timeline: 1, upstream: upstream}
	pg.servers[name] = s
	return s
}

func (pg *fakePG) addBouncer(name string) *fakeBouncer {
	pg.mu.Lock()
	defer pg.mu.Unlock()
	b := &fakeBouncer{pg: pg, name: name, resumed: make(chan struct{})}
	pg.bouncers[name] = b
	return b
}

func (pg *fakePG) byEndpoint(ep dbtarget.Endpoint) *fakeServer {
	for _, s := range pg.servers {
		if s.ep == ep {
			return s
		}
	}
	return nil
}

// syncLocked replicates: every streaming standby copies its upstream's rows.
func (pg *fakePG) syncLocked() {
	for _, s := range pg.servers {
		if !s.running || !s.inRecovery || s.upstream == "" {
			continue
		}
		up := pg.servers[s.upstream]
		if up == nil || (!up.running && !up.cleanStop) {
			continue
		}
		n := len(up.rows) - s.lagRows
		if n > len(s.rows) && up.timeline >= s.timeline {
			s.rows = append(s.rows[:0:0], up.rows[:n]...)
			s.timeline = up.timeline
		}
	}
}

// syncStandbyLocked is the standby a commit on primary p waits for, as
// PostgreSQL would with p's synchronous_standby_names: a running standby
// streaming from p that the names match (FIRST 1); nil when none.
func (pg *fakePG) syncStandbyLocked(p *fakeServer) *fakeServer {
	for _, name := range slices.Sorted(maps.Keys(pg.servers)) {
		s := pg.servers[name]
		if s.running && s.inRecovery && s.upstream == p.name && (p.syncNames == "*" || strings.EqualFold(p.syncNames, `"`+s.name+`"`)) {
			return s
		}
	}
	return nil
}

// checkLocked records a violation of the contract: two writable primaries
// reachable through pgbouncer.
func (pg *fakePG) checkLocked(after string) {
	writable := map[string]bool{}
	for _, b := range pg.bouncers {
		if b.paused || b.fenced {
			continue
		}
		if s := pg.byEndpoint(b.target); s != nil && s.running && !s.inRecovery {
			writable[s.name] = true
		}
	}
	if len(writable) > 1 {
		pg.violations = append(pg.violations, fmt.Sprintf("after %s: writable primaries %v reachable through pgbouncer", after, writable))
	}
}

func (pg *fakePG) event(format string, args ...any) {
	pg.events = append(pg.events, fmt.Sprintf(format, args...))
}

// tick replicates every d until ctx ends.
func (pg *fakePG) run(ctx context.Context, d time.Duration) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			pg.mu.Lock()
			pg.syncLocked()
			pg.mu.Unlock()
		}
	}
}

// commit is one client transaction through pgbouncer b: it waits while b is
// paused (as pgbouncer queues clients), up to wait, then commits row on the
// server b routes to if that is a running primary.
func (pg *fakePG) commit(b *fakeBouncer, row int, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		pg.mu.Lock()
		if !b.paused && !b.fenced {
			s := pg.byEndpoint(b.target)
			switch {
			case s == nil:
				pg.mu.Unlock()
				return fmt.Errorf("pgbouncer %s routes nowhere", b.name)
			case !s.running:
				pg.mu.Unlock()
				return fmt.Errorf("server %s is down", s.name)
			case s.inRecovery:
				pg.mu.Unlock()
				return fmt.Errorf("server %s is read-only", s.name)
			}
			if s.syncNames != "" {
				sb := pg.syncStandbyLocked(s)
				if sb == nil {
					// Synchronous replication without a standby: the
					// commit waits.
					pg.mu.Unlock()
					if time.Now().After(deadline) {
						return fmt.Errorf("server %s: commit waited %s for a synchronous standby (%s)", s.name, wait, s.syncNames)
					}
					time.Sleep(5 * time.Millisecond)
					continue
				}
				s.rows = append(s.rows, row)
				sb.rows = append(sb.rows[:0:0], s.rows...) // acknowledged once the standby has it
				sb.timeline = s.timeline
				pg.mu.Unlock()
				return nil
			}
			s.rows = append(s.rows, row)
			pg.mu.Unlock()
			return nil
		}
		ch := b.resumed
		pg.mu.Unlock()
		select {
		case <-ch:
		case <-time.After(time.Until(deadline)):
			return fmt.Errorf("pgbouncer %s stayed paused for %s", b.name, wait)
		}
	}
}

func (pg *fakePG) snapshot(name string) (running, inRecovery bool, upstream string, rows []int) {
	pg.mu.Lock()
	defer pg.mu.Unlock()
	s := pg.servers[name]
	return s.running, s.inRecovery, s.upstream, append([]int(nil), s.rows...)
}

// ----- dbtarget.Server -----

func (s *fakeServer) Health(ctx context.Context) dbtarget.Health {
	pg := s.pg
	pg.mu.Lock()
	defer pg.mu.Unlock()
	pg.syncLocked()
	if !s.running {
		return dbtarget.Health{Err: "connection refused"}
	}
	h := dbtarget.Health{Running: true, InRecovery: s.inRecovery, Timeline: s.timeline, WriteLSN: dbtarget.LSN(len(s.rows) + 1), ReplayLSN: dbtarget.LSN(len(s.rows) + 1)}
	h.SynchronousStandbyNames = s.syncNames
	if s.inRecovery {
		// A standby streams from a running primary, or cascades through a
		// running standby.
		if up := pg.servers[s.upstream]; up != nil && up.running {
			h.Streaming, h.Upstream = true, up.ep
		}
	} else {
		h.SynchronousStandbyNames = s.syncNames
		if sb := pg.syncStandbyLocked(s); sb != nil {
			h.Synchronous = []string{sb.name}
		}
		for _, name := range slices.Sorted(maps.Keys(pg.servers)) {
			if o := pg.servers[name]; o.running && o.inRecovery && o.upstream == s.name {
				h.Replicas = append(h.Replicas, o.name)
			}
		}
	}
	return h
}

func (s *fakeServer) SetSynchronousStandbyNames(ctx context.Context, value string) error {
	pg := s.pg
	pg.mu.Lock()
	defer pg.mu.Unlock()
	if !s.running {
		return errors.New("synchronous_standby_names: not running")
	}
	if s.syncNames != value {
		pg.event("synchronous_standby_names %s = %q", s.name, value)
	}
	s.syncNames = value
	return nil
}

func (s *fakeServer) Stop(ctx context.Context) (dbtarget.LSN, error) {
	pg := s.pg
	pg.mu.Lock()
	gate, err := s.stopGate, s.stopErr
	pg.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	if err != nil {
		return 0, err
	}
	pg.mu.Lock()
	defer pg.mu.Unlock()
	if s.running {
		s.running, s.cleanStop = false, true
		pg.event("stop %s", s.name)
	}
	pg.syncLocked() // the shutdown checkpoint goes to the standbys
	return dbtarget.LSN(len(s.rows) + 1), nil
}

func (s *fakeServer) Checkpoint(ctx context.Context) error {
	pg := s.pg
	pg.mu.Lock()
	defer pg.mu.Unlock()
	if !s.running {
		return errors.New("checkpoint: not running")
	}
	if s.checkpointErr != nil {
		return s.checkpointErr
	}
	pg.event("checkpoint %s", s.name)
	return nil
}

func (s *fakeServer) Start(ctx context.Context) error {
	pg := s.pg
	pg.mu.Lock()
	defer pg.mu.Unlock()
	s.running, s.cleanStop = true, false
	pg.event("start %s", s.name)
	pg.checkLocked("start " + s.name)
	return nil
}

func (s *fakeServer) Promote(ctx context.Context) error {
	pg := s.pg
	pg.mu.Lock()
	gate, err := s.promoteGate, s.promoteErr
	pg.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if err != nil {
		return err
	}
	pg.mu.Lock()
	defer pg.mu.Unlock()
	if !s.running {
		return errors.New("promote: not running")
	}
	if s.inRecovery {
		s.inRecovery, s.upstream = false, ""
		s.timeline++
		pg.event("promote %s", s.name)
	}
	pg.checkLocked("promote " + s.name)
	return nil
}

func (s *fakeServer) Demote(ctx context.Context, primary dbtarget.Endpoint) error {
	pg := s.pg
	pg.mu.Lock()
	defer pg.mu.Unlock()
	up := pg.byEndpoint(primary)
	if up == nil || up == s {
		return fmt.Errorf("demote: no other server at %s", primary)
	}
	// pg_rewind: drop what diverged, follow the new primary.
	s.running, s.inRecovery, s.upstream, s.cleanStop = true, true, up.name, false
	s.rows = append([]int(nil), up.rows...)
	s.timeline = up.timeline
	pg.event("demote %s to follow %s", s.name, up.name)
	return nil
}

// ----- dbtarget.Bouncer -----

func (b *fakeBouncer) Pause(ctx context.Context) error {
	pg := b.pg
	pg.mu.Lock()
	defer pg.mu.Unlock()
	if b.pauseErr != nil {
		return b.pauseErr
	}
	b.paused = true
	pg.event("pause %s", b.name)
	return nil
}

func (b *fakeBouncer) Resume(ctx context.Context) error {
	pg := b.pg
	pg.mu.Lock()
	defer pg.mu.Unlock()
	if b.paused || b.fenced {
		pg.event("resume %s", b.name)
	}
	b.paused, b.fenced = false, false
	close(b.resumed)
	b.resumed = make(chan struct{})
	pg.checkLocked("resume " + b.name)
	return nil
}

func (b *fakeBouncer) Point(ctx context.Context, primary dbtarget.Endpoint) error {
	pg := b.pg
	pg.mu.Lock()
	defer pg.mu.Unlock()
	if b.target != primary {
		pg.event("point %s at %s", b.name, primary)
	}
	b.target = primary
	pg.checkLocked("point " + b.name)
	return nil
}

func (b *fakeBouncer) Fence(ctx context.Context, drain time.Duration) (bool, error) {
	pg := b.pg
	pg.mu.Lock()
	defer pg.mu.Unlock()
	b.paused, b.fenced = true, true
	pg.event("fence %s", b.name)
	return false, nil
}

func (b *fakeBouncer) Ping(ctx context.Context) error { return nil }

func (b *fakeBouncer) Target() (dbtarget.Endpoint, error) {
	pg := b.pg
	pg.mu.Lock()
	defer pg.mu.Unlock()
	if b.target == (dbtarget.Endpoint{}) {
		return dbtarget.Endpoint{}, errors.New("no include file yet")
	}
	return b.target, nil
}

// ----- a node cut off from the quorum, as its agents see it -----

// cutCluster is a Node as its database agents see it (dbtarget.Cluster).
// Once cut, it behaves as a node on the minority side of a partition:
// linearizable reads, reports and proposals fail, and the state stays what
// the node had applied when it was cut.
type cutCluster struct {
	*Node
	mu     sync.Mutex
	cut    bool
	frozen *dbv1.State
	healed chan struct{}
}

func (c *cutCluster) setCut(cut bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cut == c.cut {
		return
	}
	c.cut = cut
	if cut {
		c.Node.fsm.Read(func(s *State) { c.frozen = s.Database().View() })
		c.healed = make(chan struct{})
	} else {
		close(c.healed)
	}
}

func (c *cutCluster) isCut() (bool, *dbv1.State, chan struct{}) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cut, c.frozen, c.healed
}

var errCut = fmt.Errorf("%w: this node is cut off from the quorum (test)", ErrNoLeader)

func (c *cutCluster) DatabaseState(ctx context.Context, consistent bool) (*dbv1.State, error) {
	cut, frozen, _ := c.isCut()
	if !cut {
		return c.Node.DatabaseState(ctx, consistent)
	}
	if consistent {
		return nil, errCut
	}
	return proto.CloneOf(frozen), nil
}

func (c *cutCluster) WaitDatabaseChange(ctx context.Context, after uint64) error {
	cut, _, healed := c.isCut()
	if !cut {
		return c.Node.WaitDatabaseChange(ctx, after)
	}
	select {
	case <-healed:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (c *cutCluster) ReportDatabase(ctx context.Context, r *dbv1.ReportRequest) error {
	if cut, _, _ := c.isCut(); cut {
		return errCut
	}
	return c.Node.ReportDatabase(ctx, r)
}

func (c *cutCluster) ProposeDatabase(ctx context.Context, cmd *dbv1.Command) (*dbv1.Result, error) {
	if cut, _, _ := c.isCut(); cut {
		return nil, errCut
	}
	return c.Node.ProposeDatabase(ctx, cmd)
}
