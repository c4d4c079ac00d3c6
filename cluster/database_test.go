package cluster

// In-process tests of the database target: a Raft cluster of real Nodes,
// the real agents, leader loop and DatabaseService, and fake PostgreSQL and
// pgbouncer (database_fakes_test.go). The e2e tests cover the real parts.

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/gitraft/gitraft/cluster/dbtarget"
	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
)

// agentsOf says which agents a node runs.
type agentsOf struct{ member, bouncer string }

type dbHarness struct {
	t       *testing.T
	c       *testCluster
	pg      *fakePG
	set     dbtarget.Settings
	layout  map[string]agentsOf
	ports   map[string]int
	stateFs map[string]string
	cancels map[string]context.CancelFunc
	cuts    map[string]*cutCluster // what each node's agents see of it
	wg      sync.WaitGroup
}

func fastDBSettings() dbtarget.Settings {
	return dbtarget.Settings{
		FailoverAfter: 500 * time.Millisecond, MaxLagBytes: 100, PauseTimeout: 2 * time.Second,
		SwitchoverTimeout: 5 * time.Second, ReportInterval: 100 * time.Millisecond, ProbeTimeout: 100 * time.Millisecond,
		IsolationFenceAfter: 400 * time.Millisecond,
	}.WithDefaults()
}

// newDBHarness starts a 3-node cluster, PostgreSQL pg1 (primary) and the
// other members as its standbys, the pgbouncers, and every node's agents.
func newDBHarness(t *testing.T, set dbtarget.Settings, layout map[string]agentsOf) *dbHarness {
	h := &dbHarness{
		t: t, c: mustNewCluster(t, 3), pg: newFakePG(), set: set, layout: layout,
		ports: map[string]int{}, stateFs: map[string]string{}, cancels: map[string]context.CancelFunc{},
		cuts: map[string]*cutCluster{},
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.wg.Add(1)
	go func() { defer h.wg.Done(); h.pg.run(ctx, 20*time.Millisecond) }()
	t.Cleanup(func() {
		for _, c := range h.cancels {
			c()
		}
		cancel()
		h.wg.Wait()
	})
	for _, id := range slices.Sorted(maps.Keys(layout)) {
		a := layout[id]
		if a.member == "pg1" {
			h.pg.addPrimary("pg1", 5432)
		}
		if a.bouncer != "" {
			h.pg.addBouncer(a.bouncer)
			h.stateFs[a.bouncer] = fmt.Sprintf("%s/%s.json", t.TempDir(), a.bouncer)
		}
	}
	port := 5433
	for _, id := range slices.Sorted(maps.Keys(layout)) {
		if m := layout[id].member; m != "" && m != "pg1" {
			h.pg.addStandby(m, port, "pg1")
			port++
		}
	}
	for id := range layout {
		h.startAgents(id)
	}
	return h
}

// startAgents runs node id's agents (and its prober) against the fakes.
func (h *dbHarness) startAgents(id string) {
	n := h.c.nodes[id]
	n.SetDatabaseSettings(h.set)
	ctx, cancel := context.WithCancel(context.Background())
	h.cancels[id] = cancel
	cc := &cutCluster{Node: n}
	h.cuts[id] = cc
	log := testLogger(h.t).With("node", id)
	a := h.layout[id]
	run := func(fn func(context.Context)) {
		h.wg.Add(1)
		go func() { defer h.wg.Done(); fn(ctx) }()
	}
	probe := func(ctx context.Context, ep dbtarget.Endpoint, _ time.Duration) error {
		h.pg.mu.Lock()
		defer h.pg.mu.Unlock()
		if s := h.pg.byEndpoint(ep); s != nil && s.running {
			return nil
		}
		return fmt.Errorf("dial tcp %s: connection refused", ep)
	}
	run(dbtarget.NewProber(dbtarget.ProberConfig{Interval: h.set.ReportInterval, Timeout: h.set.ProbeTimeout, Probe: probe}, n, log).Run)
	if a.member != "" {
		s := h.pg.servers[a.member]
		run(dbtarget.NewPostgresAgent(dbtarget.PostgresAgentConfig{
			Member:          &dbv1.Member{Name: a.member, Host: s.ep.Host, Port: int32(s.ep.Port)},
			ReportInterval:  h.set.ReportInterval,
			Probe:           probe,
			SynchronousMode: h.set.SynchronousMode,
		}, cc, s, log).Run)
	}
	if a.bouncer != "" {
		run(dbtarget.NewBouncerAgent(dbtarget.BouncerAgentConfig{
			Name: a.bouncer, StateFile: h.stateFs[a.bouncer], PauseExpiry: 20 * time.Second,
			PauseTimeout: h.set.PauseTimeout, ReportInterval: h.set.ReportInterval, IsolationFenceAfter: h.set.IsolationFenceAfter,
		}, cc, h.pg.bouncers[a.bouncer], log).Run)
	}
}

// kill stops node id and its agents, as if its host died.
func (h *dbHarness) kill(id string) {
	h.cancels[id]()
	delete(h.cancels, id)
	h.c.stop(id)
}

func (h *dbHarness) restart(id string) {
	h.c.restart(id)
	h.startAgents(id)
}

func (h *dbHarness) client(id string) dbv1.DatabaseServiceClient {
	conn, err := grpc.NewClient(h.c.nodes[id].GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { conn.Close() })
	return dbv1.NewDatabaseServiceClient(conn)
}

// state is the database state, read linearizably (nil while there is no
// quorum).
func (h *dbHarness) state() *dbv1.State {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := h.c.any().DatabaseState(ctx, true)
	if err != nil {
		h.t.Logf("database state: %v", err)
	}
	return st
}

// waitSettled waits until primary is recorded at generation gen, no
// operation is under way, and every pgbouncer routes to it, unpaused.
func (h *dbHarness) waitSettled(primary string, gen uint64) {
	h.t.Helper()
	waitFor(h.t, fmt.Sprintf("%s primary at generation %d, every pgbouncer routing to it", primary, gen), 20*time.Second, func() bool {
		st := h.state()
		if st.GetPrimary() != primary || st.GetGeneration() != gen || st.GetOperation() != nil {
			return false
		}
		h.pg.mu.Lock()
		defer h.pg.mu.Unlock()
		ep := h.pg.servers[primary].ep
		for _, b := range h.pg.bouncers {
			if b.target != ep || b.paused || b.fenced {
				return false
			}
		}
		return true
	})
	h.waitReports()
}

// waitReports waits until the leader has heard every member's agent.
func (h *dbHarness) waitReports() {
	h.t.Helper()
	waitFor(h.t, "the leader to hear every member", 10*time.Second, func() bool {
		l := h.c.waitLeader()
		var st *dbv1.State
		l.fsm.Read(func(s *State) { st = s.Database().View() })
		obs, set := l.db.observed(nil)
		for _, m := range st.GetMembers() {
			r, ok := obs.Postgres[m.GetName()]
			if !ok || time.Since(r.At) > set.Fresh() {
				return false
			}
		}
		return true
	})
}

// waitOp waits until operation id is in the history and returns its entry.
func (h *dbHarness) waitOp(id uint64) *dbv1.HistoryEntry {
	h.t.Helper()
	var found *dbv1.HistoryEntry
	waitFor(h.t, fmt.Sprintf("operation %d to finish", id), 30*time.Second, func() bool {
		for _, e := range h.state().GetHistory() {
			if e.GetOpId() == id {
				found = e
				return true
			}
		}
		return false
	})
	return found
}

func (h *dbHarness) checkNoViolations() {
	h.t.Helper()
	h.pg.mu.Lock()
	defer h.pg.mu.Unlock()
	for _, v := range h.pg.violations {
		h.t.Error(v)
	}
	if h.t.Failed() {
		h.t.Logf("events: %s", strings.Join(h.pg.events, "; "))
	}
}

// writer is a client writing numbered rows through pgbouncers the whole time.
type writer struct {
	stop      chan struct{}
	done      chan struct{}
	mu        sync.Mutex
	committed []int
	failed    []string
}

func (h *dbHarness) startWriter(bouncers ...string) *writer {
	w := &writer{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for i := 1; ; i++ {
			select {
			case <-w.stop:
				return
			default:
			}
			b := h.pg.bouncers[bouncers[i%len(bouncers)]]
			err := h.pg.commit(b, i, 10*time.Second)
			w.mu.Lock()
			if err != nil {
				w.failed = append(w.failed, fmt.Sprintf("row %d: %v", i, err))
			} else {
				w.committed = append(w.committed, i)
			}
			w.mu.Unlock()
			time.Sleep(2 * time.Millisecond)
		}
	}()
	return w
}

func (w *writer) finish() ([]int, []string) {
	close(w.stop)
	<-w.done
	return w.committed, w.failed
}

// checkAllRows checks that server name holds every committed row.
func (h *dbHarness) checkAllRows(name string, committed []int) {
	h.t.Helper()
	_, _, _, rows := h.pg.snapshot(name)
	have := map[int]bool{}
	for _, r := range rows {
		have[r] = true
	}
	var lost []int
	for _, r := range committed {
		if !have[r] {
			lost = append(lost, r)
		}
	}
	if len(lost) > 0 {
		h.t.Errorf("%d committed rows missing on %s (first %d)", len(lost), name, lost[0])
	}
}

func (h *dbHarness) switchover(via, to string) *dbv1.HistoryEntry {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := h.client(via).Switchover(ctx, &dbv1.SwitchoverRequest{To: to})
	if err != nil {
		h.t.Fatalf("switchover to %s: %v", to, err)
	}
	return h.waitOp(resp.GetOperation().GetId())
}

var twoPG = map[string]agentsOf{"n1": {"pg1", "b1"}, "n2": {"pg2", "b2"}, "n3": {"", "b3"}}

func Test_DB_SwitchoverAndBack(t *testing.T) {
	h := newDBHarness(t, fastDBSettings(), twoPG)
	h.waitSettled("pg1", 1)
	w := h.startWriter("b1", "b2", "b3")
	waitFor(t, "some writes", 5*time.Second, func() bool { w.mu.Lock(); defer w.mu.Unlock(); return len(w.committed) > 20 })

	e := h.switchover("n3", "pg2") // n3 runs no PostgreSQL: the request is forwarded as needed
	if e.GetOutcome() != dbv1.Outcome_OUTCOME_DONE || e.GetFrom() != "pg1" || e.GetTo() != "pg2" || e.GetGeneration() != 2 {
		t.Fatalf("switchover: %v", e)
	}
	h.waitSettled("pg2", 2)
	h.pg.mu.Lock()
	ck, pause := slices.Index(h.pg.events, "checkpoint pg1"), slices.IndexFunc(h.pg.events, func(e string) bool { return strings.HasPrefix(e, "pause ") })
	h.pg.mu.Unlock()
	if ck < 0 || pause < 0 || ck > pause {
		t.Errorf("want a CHECKPOINT on pg1 before the first PAUSE: checkpoint at event %d, pause at %d", ck, pause)
	}
	waitFor(t, "pg1 to follow pg2", 10*time.Second, func() bool {
		running, rec, up, _ := h.pg.snapshot("pg1")
		return running && rec && up == "pg2"
	})
	waitFor(t, "more writes on pg2", 5*time.Second, func() bool {
		_, _, _, rows := h.pg.snapshot("pg2")
		w.mu.Lock()
		defer w.mu.Unlock()
		return len(w.committed) > 0 && slices.Contains(rows, w.committed[len(w.committed)-1]) && len(rows) > 40
	})

	e = h.switchover("n1", "pg1")
	if e.GetOutcome() != dbv1.Outcome_OUTCOME_DONE || e.GetGeneration() != 3 {
		t.Fatalf("switch back: %v", e)
	}
	h.waitSettled("pg1", 3)
	committed, failed := w.finish()
	if len(failed) > 0 {
		t.Errorf("%d failed transactions, want none; first: %s", len(failed), failed[0])
	}
	h.checkAllRows("pg1", committed)
	h.checkNoViolations()

	// Every pgbouncer reports the generation it applied.
	resp, err := h.client("n2").GetStatus(context.Background(), &dbv1.GetStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "status to show every pgbouncer at generation 3", 5*time.Second, func() bool {
		resp, err = h.client("n2").GetStatus(context.Background(), &dbv1.GetStatusRequest{})
		if err != nil || len(resp.GetBouncers()) != 3 {
			return false
		}
		for _, b := range resp.GetBouncers() {
			if b.GetReport().GetAppliedGeneration() != 3 {
				return false
			}
		}
		return true
	})
	roles := map[string]string{}
	for _, m := range resp.GetMembers() {
		roles[m.GetMember().GetName()] = m.GetRole()
	}
	if roles["pg1"] != "primary" || roles["pg2"] != "standby" {
		t.Errorf("roles %v", roles)
	}
	hist, err := h.client("n3").GetHistory(context.Background(), &dbv1.GetHistoryRequest{Limit: 2})
	if err != nil {
		t.Fatal(err)
	}
	if len(hist.GetHistory()) != 2 || hist.GetHistory()[0].GetTo() != "pg1" || hist.GetHistory()[1].GetTo() != "pg2" {
		t.Errorf("history (newest first, limit 2): %v", hist.GetHistory())
	}
}

func Test_DB_PauseFailureAborts(t *testing.T) {
	h := newDBHarness(t, fastDBSettings(), twoPG)
	h.waitSettled("pg1", 1)
	h.pg.mu.Lock()
	h.pg.bouncers["b3"].pauseErr = fmt.Errorf("PAUSE: server connections did not finish")
	h.pg.mu.Unlock()
	w := h.startWriter("b1", "b2", "b3")
	e := h.switchover("n2", "pg2")
	if e.GetOutcome() != dbv1.Outcome_OUTCOME_ABORTED || !strings.Contains(e.GetReason(), "pgbouncer b3 could not pause") {
		t.Fatalf("want an abort naming b3: %v", e)
	}
	h.waitSettled("pg1", 1) // every pgbouncer resumed, pointing at pg1
	committed, failed := w.finish()
	if len(failed) > 0 {
		t.Errorf("%d failed transactions, want none; first: %s", len(failed), failed[0])
	}
	if running, rec, _, _ := h.pg.snapshot("pg1"); !running || rec {
		t.Errorf("pg1 running %v in recovery %v after the abort", running, rec)
	}
	h.checkAllRows("pg1", committed)
	h.checkNoViolations()
}

func Test_DB_PromotionFailureRollsBack(t *testing.T) {
	h := newDBHarness(t, fastDBSettings(), twoPG)
	h.waitSettled("pg1", 1)
	h.pg.mu.Lock()
	h.pg.servers["pg2"].promoteErr = fmt.Errorf("pg_promote: timed out")
	h.pg.mu.Unlock()
	w := h.startWriter("b1", "b3")
	e := h.switchover("n1", "pg2")
	if e.GetOutcome() != dbv1.Outcome_OUTCOME_ABORTED || !strings.Contains(e.GetReason(), "pg2 could not be promoted") {
		t.Fatalf("want a rollback: %v", e)
	}
	h.waitSettled("pg1", 1)
	committed, failed := w.finish()
	if len(failed) > 0 {
		t.Errorf("%d failed transactions; first: %s", len(failed), failed[0])
	}
	h.checkAllRows("pg1", committed)
	h.checkNoViolations()
}

// transferLeader makes id the leader.
func (h *dbHarness) transferLeader(id string) {
	h.t.Helper()
	waitFor(h.t, id+" to lead", 20*time.Second, func() bool {
		l := h.c.waitLeader()
		if l.ID() == id {
			return true
		}
		l.raft.LeadershipTransferToServer(raft.ServerID(id), raft.ServerAddress(h.c.nodes[id].RaftAddr()))
		time.Sleep(100 * time.Millisecond)
		return false
	})
}

func Test_DB_LeaderKilledMidSwitchover(t *testing.T) {
	h := newDBHarness(t, fastDBSettings(), map[string]agentsOf{"n1": {"pg1", "b1"}, "n2": {"pg2", "b2"}, "n3": {"", ""}})
	h.waitSettled("pg1", 1)
	h.transferLeader("n3")
	gate := make(chan struct{})
	h.pg.mu.Lock()
	h.pg.servers["pg2"].promoteGate = gate
	h.pg.mu.Unlock()
	w := h.startWriter("b1", "b2")
	resp, err := h.client("n1").Switchover(context.Background(), &dbv1.SwitchoverRequest{To: "pg2"})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.GetOperation().GetId()
	waitFor(t, "the promoting phase", 10*time.Second, func() bool {
		return h.state().GetOperation().GetPhase() == dbv1.Phase_PHASE_PROMOTING
	})
	h.kill("n3") // the leader, mid-switchover
	close(gate)  // the promotion goes through; a new leader must carry on
	e := h.waitOp(id)
	if e.GetOutcome() != dbv1.Outcome_OUTCOME_DONE || e.GetGeneration() != 2 {
		t.Fatalf("after the leader died: %v", e)
	}
	h.waitSettled("pg2", 2)
	waitFor(t, "pg1 to follow pg2", 10*time.Second, func() bool {
		running, rec, up, _ := h.pg.snapshot("pg1")
		return running && rec && up == "pg2"
	})
	committed, failed := w.finish()
	if len(failed) > 0 {
		t.Errorf("%d failed transactions; first: %s", len(failed), failed[0])
	}
	h.checkAllRows("pg2", committed)
	h.checkNoViolations()
	h.restart("n3")
	h.c.waitConverged()
}

func Test_DB_LeaderKilledBeforePromotionRollsBack(t *testing.T) {
	// The leader dies while the old primary is stopping and the stop hangs
	// past the phase deadline: the new leader rolls back and starts pg1.
	set := fastDBSettings()
	set.SwitchoverTimeout = 2 * time.Second
	h := newDBHarness(t, set, map[string]agentsOf{"n1": {"pg1", "b1"}, "n2": {"pg2", "b2"}, "n3": {"", ""}})
	h.waitSettled("pg1", 1)
	h.transferLeader("n3")
	gate := make(chan struct{})
	h.pg.mu.Lock()
	h.pg.servers["pg1"].stopGate = gate
	h.pg.servers["pg1"].stopErr = fmt.Errorf("pg_ctl stop: timed out")
	h.pg.mu.Unlock()
	resp, err := h.client("n2").Switchover(context.Background(), &dbv1.SwitchoverRequest{To: "pg2"})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the stopping_old phase", 10*time.Second, func() bool {
		return h.state().GetOperation().GetPhase() == dbv1.Phase_PHASE_STOPPING_OLD
	})
	h.kill("n3")
	e := h.waitOp(resp.GetOperation().GetId())
	close(gate)
	if e.GetOutcome() != dbv1.Outcome_OUTCOME_ABORTED {
		t.Fatalf("want a rollback: %v", e)
	}
	h.waitSettled("pg1", 1)
	h.checkNoViolations()
}

func Test_DB_AutomaticFailover(t *testing.T) {
	set := fastDBSettings()
	set.AutomaticFailover = true
	h := newDBHarness(t, set, twoPG)
	h.waitSettled("pg1", 1)
	w := h.startWriter("b2", "b3")
	waitFor(t, "writes replicated to pg2", 5*time.Second, func() bool {
		_, _, _, rows := h.pg.snapshot("pg2")
		return len(rows) > 20
	})
	// The primary's postmaster is killed (no clean shutdown).
	h.pg.mu.Lock()
	h.pg.servers["pg1"].running = false
	h.pg.event("kill pg1")
	h.pg.mu.Unlock()
	h.waitSettled("pg2", 2)
	last := h.state().GetHistory()
	if e := last[len(last)-1]; e.GetKind() != dbv1.Kind_KIND_FAILOVER || !e.GetAutomatic() || e.GetOutcome() != dbv1.Outcome_OUTCOME_DONE {
		t.Fatalf("history %v", e)
	}
	waitFor(t, "writes on pg2", 10*time.Second, func() bool {
		_, _, _, rows := h.pg.snapshot("pg2")
		w.mu.Lock()
		defer w.mu.Unlock()
		return len(w.committed) > 0 && slices.Contains(rows, w.committed[len(w.committed)-1])
	})
	// The old primary comes back as a primary (pg_ctl start on its old data
	// directory): its agent demotes it; it is never reachable through
	// pgbouncer (the violation check would say so).
	h.pg.mu.Lock()
	h.pg.servers["pg1"].running = true
	h.pg.event("restart pg1 as a primary")
	h.pg.mu.Unlock()
	waitFor(t, "pg1 demoted to follow pg2", 10*time.Second, func() bool {
		running, rec, up, _ := h.pg.snapshot("pg1")
		return running && rec && up == "pg2"
	})
	w.finish()
	h.checkNoViolations()
	if st := h.state(); st.GetPrimary() != "pg2" || st.GetGeneration() != 2 {
		t.Errorf("primary %s generation %d", st.GetPrimary(), st.GetGeneration())
	}
}

func Test_DB_NoAutomaticFailoverWhilePaused(t *testing.T) {
	set := fastDBSettings()
	set.AutomaticFailover = true
	h := newDBHarness(t, set, twoPG)
	h.waitSettled("pg1", 1)
	c := h.client("n2")
	if _, err := c.Pause(context.Background(), &dbv1.PauseRequest{Reason: "kernel upgrade"}); err != nil {
		t.Fatal(err)
	}
	h.pg.mu.Lock()
	h.pg.servers["pg1"].running = false
	h.pg.mu.Unlock()
	var st *dbv1.GetStatusResponse
	waitFor(t, "status to say the failover is held back by the pause", 10*time.Second, func() bool {
		var err error
		st, err = c.GetStatus(context.Background(), &dbv1.GetStatusRequest{})
		return err == nil && st.GetFailover().GetVotes() >= st.GetFailover().GetNeeded() && strings.Contains(st.GetFailover().GetBlocked(), "paused")
	})
	// The leader had the votes and held back: nothing changed.
	if s := h.state(); s.GetGeneration() != 1 || s.GetOperation() != nil || s.GetPrimary() != "pg1" {
		t.Fatalf("changed while paused: %v", s)
	}
	if !strings.Contains(st.GetFailover().GetBlocked(), "kernel upgrade") {
		t.Errorf("blocked %q", st.GetFailover().GetBlocked())
	}
	wr, err := c.GetWritable(context.Background(), &dbv1.GetWritableRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if wr.GetWritable() || !strings.Contains(wr.GetReason(), "does not answer") {
		t.Errorf("writable %v (%s) with the primary down", wr.GetWritable(), wr.GetReason())
	}
	if _, err := c.Resume(context.Background(), &dbv1.ResumeRequest{}); err != nil {
		t.Fatal(err)
	}
	h.waitSettled("pg2", 2)
	h.checkNoViolations()
}

func Test_DB_OperatorFailover(t *testing.T) {
	h := newDBHarness(t, fastDBSettings(), twoPG)
	h.waitSettled("pg1", 1)
	// With the primary still running, a failover fences it first.
	resp, err := h.client("n3").Failover(context.Background(), &dbv1.FailoverRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetOperation().GetTarget() != "pg2" {
		t.Fatalf("picked %q", resp.GetOperation().GetTarget())
	}
	e := h.waitOp(resp.GetOperation().GetId())
	if e.GetOutcome() != dbv1.Outcome_OUTCOME_DONE {
		t.Fatalf("failover: %v", e)
	}
	h.waitSettled("pg2", 2)
	if running, rec, _, _ := h.pg.snapshot("pg1"); running && !rec {
		t.Error("the old primary still runs as a primary")
	}
	h.checkNoViolations()
}

func Test_DB_Refusals(t *testing.T) {
	h := newDBHarness(t, fastDBSettings(), map[string]agentsOf{"n1": {"pg1", "b1"}, "n2": {"pg2", ""}, "n3": {"pg3", ""}})
	h.waitSettled("pg1", 1)
	w := h.startWriter("b1")
	t.Cleanup(func() { w.finish() })
	c := h.client("n2")
	ctx := context.Background()
	waitFor(t, "every member reporting", 5*time.Second, func() bool {
		st, err := c.GetStatus(ctx, &dbv1.GetStatusRequest{})
		if err != nil {
			return false
		}
		for _, m := range st.GetMembers() {
			if m.GetRole() == "unknown" {
				return false
			}
		}
		return true
	})
	before := h.state()
	refused := func(err error, code codes.Code, words ...string) {
		t.Helper()
		st, _ := status.FromError(err)
		if err == nil || st.Code() != code {
			t.Fatalf("err %v, want code %v", err, code)
		}
		for _, w := range words {
			if !strings.Contains(st.Message(), w) {
				t.Errorf("message %q lacks %q", st.Message(), w)
			}
		}
	}
	_, err := c.Switchover(ctx, &dbv1.SwitchoverRequest{To: "pg9"})
	refused(err, codes.NotFound, `no member named "pg9"`, "pg1 (primary), pg2, pg3")

	h.pg.mu.Lock()
	h.pg.servers["pg2"].running = false
	h.pg.servers["pg3"].lagRows = 500
	h.pg.mu.Unlock()
	waitFor(t, "status: pg3 lagging beyond the bound, pg2 stopped", 10*time.Second, func() bool {
		st, err := c.GetStatus(ctx, &dbv1.GetStatusRequest{})
		if err != nil {
			return false
		}
		ok := 0
		for _, m := range st.GetMembers() {
			switch {
			case m.GetMember().GetName() == "pg3" && m.GetLagKnown() && m.GetLagBytes() > 200:
				ok++
			case m.GetMember().GetName() == "pg2" && m.GetRole() == "stopped":
				ok++
			}
		}
		return ok == 2
	})
	_, err = c.Switchover(ctx, &dbv1.SwitchoverRequest{To: "pg3"})
	refused(err, codes.FailedPrecondition, "target pg3 lags", "behind the primary", "the limit is 100 B (database.max_lag_bytes)")
	_, err = c.Switchover(ctx, &dbv1.SwitchoverRequest{To: "pg2"})
	refused(err, codes.FailedPrecondition, "target pg2 is down: not running: connection refused")
	if after := h.state(); after.GetGeneration() != before.GetGeneration() || len(after.GetHistory()) != len(before.GetHistory()) || after.GetOperation() != nil {
		t.Errorf("a refusal changed the state: %v", after)
	}

	// One operation at a time: a scheduled switchover holds the place.
	h.pg.mu.Lock()
	h.pg.servers["pg2"].running = true
	h.pg.mu.Unlock()
	sched, err := c.Switchover(ctx, &dbv1.SwitchoverRequest{To: "pg2", AtUnixNano: time.Now().Add(time.Hour).UnixNano()})
	if err != nil {
		t.Fatal(err)
	}
	if sched.GetOperation().GetPhase() != dbv1.Phase_PHASE_SCHEDULED {
		t.Fatalf("phase %v", sched.GetOperation().GetPhase())
	}
	_, err = c.Switchover(ctx, &dbv1.SwitchoverRequest{To: "pg2"})
	refused(err, codes.FailedPrecondition, "a switchover from pg1 to pg2 is under way", "scheduled")
	_, err = c.Failover(ctx, &dbv1.FailoverRequest{To: "pg2"})
	refused(err, codes.FailedPrecondition, "under way")
	if _, err := c.Abort(ctx, &dbv1.AbortRequest{Reason: "test"}); err != nil {
		t.Fatal(err)
	}
	_, err = c.Abort(ctx, &dbv1.AbortRequest{})
	refused(err, codes.NotFound, "no switchover or failover is under way")
	if st := h.state(); st.GetOperation() != nil || st.GetGeneration() != 1 {
		t.Errorf("after abort: %v", st)
	}
}

func Test_DB_WritableSignal(t *testing.T) {
	h := newDBHarness(t, fastDBSettings(), twoPG)
	h.waitSettled("pg1", 1)
	get := func(id string) (int, map[string]any) {
		resp, err := http.Get("http://" + h.c.nodes[id].HTTPAddr() + "/db/writable")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var body map[string]any
		if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, body
	}
	waitFor(t, "writable on n3", 5*time.Second, func() bool {
		code, body := get("n3")
		return code == 200 && body["writable"] == true && body["primary"] == "pg1"
	})
	gate := make(chan struct{})
	h.pg.mu.Lock()
	h.pg.servers["pg1"].stopGate = gate
	h.pg.mu.Unlock()
	resp, err := h.client("n1").Switchover(context.Background(), &dbv1.SwitchoverRequest{To: "pg2"})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "stopping_old", 5*time.Second, func() bool {
		return h.state().GetOperation().GetPhase() == dbv1.Phase_PHASE_STOPPING_OLD
	})
	for _, id := range []string{"n1", "n2", "n3"} {
		waitFor(t, "read-only on "+id, 5*time.Second, func() bool {
			code, body := get(id)
			return code == 503 && body["writable"] == false && body["phase"] == "stopping_old" && strings.Contains(fmt.Sprint(body["reason"]), "switchover from pg1 to pg2")
		})
	}
	close(gate)
	h.waitOp(resp.GetOperation().GetId())
	waitFor(t, "writable again", 5*time.Second, func() bool {
		code, body := get("n2")
		return code == 200 && body["primary"] == "pg2"
	})
}

func Test_DB_BouncerCatchesUp(t *testing.T) {
	// A pgbouncer whose node goes down mid-switchover (paused, with no
	// agent to resume it) catches up when the node comes back, from the
	// state alone; the switchover goes on without it after a deadline.
	h := newDBHarness(t, fastDBSettings(), twoPG)
	h.waitSettled("pg1", 1)
	gate := make(chan struct{})
	h.pg.mu.Lock()
	h.pg.servers["pg2"].promoteGate = gate
	h.pg.mu.Unlock()
	resp, err := h.client("n1").Switchover(context.Background(), &dbv1.SwitchoverRequest{To: "pg2"})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the promoting phase", 10*time.Second, func() bool {
		return h.state().GetOperation().GetPhase() == dbv1.Phase_PHASE_PROMOTING
	})
	h.kill("n3")
	close(gate)
	e := h.waitOp(resp.GetOperation().GetId())
	if e.GetOutcome() != dbv1.Outcome_OUTCOME_DONE || !strings.Contains(e.GetReason(), "pgbouncer b3 did not apply generation 2") {
		t.Fatalf("switchover without b3: %v", e)
	}
	h.pg.mu.Lock()
	b3 := *h.pg.bouncers["b3"]
	h.pg.mu.Unlock()
	if !b3.paused || b3.target != h.pg.servers["pg1"].ep {
		t.Fatalf("b3 paused %v target %v while its agent was down", b3.paused, b3.target)
	}
	h.restart("n3")
	h.waitSettled("pg2", 2)
	h.checkNoViolations()
}

func Test_DB_FailoverWithThreeMembers(t *testing.T) {
	// After a failover, the standby that followed the dead primary is
	// pointed at the new one by its agent.
	set := fastDBSettings()
	set.AutomaticFailover = true
	h := newDBHarness(t, set, map[string]agentsOf{"n1": {"pg1", "b1"}, "n2": {"pg2", "b2"}, "n3": {"pg3", ""}})
	h.waitSettled("pg1", 1)
	h.pg.mu.Lock()
	h.pg.servers["pg3"].lagRows = 1 // pg2 has the most WAL
	h.pg.mu.Unlock()
	w := h.startWriter("b1", "b2")
	waitFor(t, "writes", 5*time.Second, func() bool { _, _, _, rows := h.pg.snapshot("pg3"); return len(rows) > 10 })
	h.pg.mu.Lock()
	h.pg.servers["pg1"].running = false
	h.pg.mu.Unlock()
	h.waitSettled("pg2", 2)
	waitFor(t, "pg3 to follow pg2", 20*time.Second, func() bool {
		running, rec, up, _ := h.pg.snapshot("pg3")
		return running && rec && up == "pg2"
	})
	w.finish()
	h.checkNoViolations()
}

func Test_DB_ThirdMemberFollowsNewPrimaryAfterSwitchover(t *testing.T) {
	// pg3 streams from pg1. After a switchover to pg2 it would cascade
	// through pg1 (a standby of pg2 by then); its agent points it at pg2
	// as soon as pg2 is recorded, and status shows each standby's upstream.
	h := newDBHarness(t, fastDBSettings(), map[string]agentsOf{"n1": {"pg1", "b1"}, "n2": {"pg2", "b2"}, "n3": {"pg3", ""}})
	h.waitSettled("pg1", 1)
	w := h.startWriter("b1", "b2")
	e := h.switchover("n3", "pg2")
	if e.GetOutcome() != dbv1.Outcome_OUTCOME_DONE {
		t.Fatalf("switchover: %v", e)
	}
	done := time.Now()
	h.waitSettled("pg2", 2)
	waitFor(t, "pg3 to follow pg2", 5*time.Second, func() bool {
		running, rec, up, _ := h.pg.snapshot("pg3")
		return running && rec && up == "pg2"
	})
	t.Logf("pg3 follows pg2 %s after the switchover finished", time.Since(done).Round(time.Millisecond))
	waitFor(t, "status to show pg1 and pg3 streaming from pg2", 5*time.Second, func() bool {
		st, err := h.client("n1").GetStatus(context.Background(), &dbv1.GetStatusRequest{})
		if err != nil {
			return false
		}
		pg2 := h.pg.servers["pg2"].ep.String()
		ups := map[string]string{}
		for _, m := range st.GetMembers() {
			ups[m.GetMember().GetName()] = m.GetHealth().GetUpstream()
		}
		return ups["pg1"] == pg2 && ups["pg3"] == pg2 && ups["pg2"] == ""
	})
	committed, failed := w.finish()
	if len(failed) > 0 {
		t.Errorf("%d failed writes; first %s", len(failed), failed[0])
	}
	waitFor(t, "pg3 to hold every committed row", 5*time.Second, func() bool {
		_, _, _, rows := h.pg.snapshot("pg3")
		return len(rows) >= len(committed)
	})
	h.checkAllRows("pg3", committed)
	h.checkNoViolations()
}

func Test_DB_OldPrimaryAgentDiesWhileStopping(t *testing.T) {
	// The old primary's node dies while its server shuts down: the new
	// leader rolls back without word from it, and when the node comes back
	// its agent starts the primary the state still records.
	set := fastDBSettings()
	set.SwitchoverTimeout = 2 * time.Second
	h := newDBHarness(t, set, map[string]agentsOf{"n1": {"pg1", "b1"}, "n2": {"pg2", "b2"}, "n3": {"", ""}})
	h.waitSettled("pg1", 1)
	h.transferLeader("n3")
	gate := make(chan struct{})
	h.pg.mu.Lock()
	h.pg.servers["pg1"].stopGate = gate
	h.pg.mu.Unlock()
	resp, err := h.client("n2").Switchover(context.Background(), &dbv1.SwitchoverRequest{To: "pg2"})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the stopping_old phase", 10*time.Second, func() bool {
		return h.state().GetOperation().GetPhase() == dbv1.Phase_PHASE_STOPPING_OLD
	})
	h.kill("n1")
	close(gate)
	h.pg.mu.Lock() // pg_ctl went on without gitraft: the server is down
	h.pg.servers["pg1"].running, h.pg.servers["pg1"].cleanStop = false, true
	h.pg.mu.Unlock()
	e := h.waitOp(resp.GetOperation().GetId())
	if e.GetOutcome() != dbv1.Outcome_OUTCOME_ABORTED {
		t.Fatalf("want a rollback: %v", e)
	}
	h.restart("n1")
	h.waitSettled("pg1", 1)
	if running, rec, _, _ := h.pg.snapshot("pg1"); !running || rec {
		t.Errorf("pg1 running %v in recovery %v", running, rec)
	}
	h.checkNoViolations()
}

// cut cuts node id's agents off from the quorum (see cutCluster); heal ends
// it.
func (h *dbHarness) cut(id string)  { h.cuts[id].setCut(true) }
func (h *dbHarness) heal(id string) { h.cuts[id].setCut(false) }

// eventIndex is the position of the first event e, or -1.
func (h *dbHarness) eventIndex(e string) int {
	h.pg.mu.Lock()
	defer h.pg.mu.Unlock()
	return slices.Index(h.pg.events, e)
}

func Test_DB_FailoverWithPgbouncerCutOff(t *testing.T) {
	// A partition: the agents of n1, which runs the primary pg1 and
	// pgbouncer b1, are cut off from the quorum, and pg1 runs on there. An
	// operator fails over to pg2 on the majority side at once. b1's agent
	// hears nothing of it: it must fence b1 by itself, and the leader must
	// not promote pg2 before it surely has, or two writable primaries are
	// reachable through pgbouncer (the fakes record that).
	//
	// The isolation lease (3 s, plus 2 report intervals at the leader) is
	// longer than the time the leader takes to stop hearing pg1's agent
	// (2 s), so the leader's wait for b1 is what keeps pg2 back.
	set := fastDBSettings()
	set.FailoverAfter, set.IsolationFenceAfter, set.PauseTimeout = 5*time.Second, 3*time.Second, 5*time.Second
	h := newDBHarness(t, set, twoPG)
	h.waitSettled("pg1", 1)
	w := h.startWriter("b2", "b3")
	h.cut("n1")
	cutAt := time.Now()
	resp, err := h.client("n2").Failover(context.Background(), &dbv1.FailoverRequest{To: "pg2"})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "pg2 recorded as the primary", 20*time.Second, func() bool { return h.state().GetGeneration() == 2 })
	if running, rec, _, _ := h.pg.snapshot("pg1"); !running || rec {
		t.Fatalf("pg1 running %v in recovery %v: the cut-off side should still run it as a primary", running, rec)
	}
	fence, promote := h.eventIndex("fence b1"), h.eventIndex("promote pg2")
	if fence < 0 || promote < 0 || fence > promote {
		h.pg.mu.Lock()
		t.Errorf("b1 fenced at event %d, pg2 promoted at event %d: %v", fence, promote, h.pg.events)
		h.pg.mu.Unlock()
	}
	t.Logf("pg2 recorded %s after the cut", time.Since(cutAt).Round(time.Millisecond))
	h.checkNoViolations()

	// The partition heals: b1 points at pg2 and resumes, pg1's agent demotes
	// it, and the failover finishes.
	h.heal("n1")
	if e := h.waitOp(resp.GetOperation().GetId()); e.GetOutcome() != dbv1.Outcome_OUTCOME_DONE {
		t.Fatalf("failover: %v", e)
	}
	h.waitSettled("pg2", 2)
	waitFor(t, "pg1 to follow pg2", 10*time.Second, func() bool {
		running, rec, up, _ := h.pg.snapshot("pg1")
		return running && rec && up == "pg2"
	})
	w.finish()
	h.checkNoViolations()
}
