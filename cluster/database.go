package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/gitraft/gitraft/cluster/dbtarget"
	"github.com/gitraft/gitraft/cluster/pki"
	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

// dbRuntime is a node's share of the database target outside the log: the
// settings the leader applies, and (while leading) what agents reported.
type dbRuntime struct {
	mu       sync.Mutex
	settings dbtarget.Settings
	set      bool
	since    time.Time // leader since
	leading  uint64    // counts leaderships, so an old loop's cleanup spares a new one's memory
	postgres map[string]dbtarget.Heard[*dbv1.PostgresReport]
	bouncers map[string]dbtarget.Heard[*dbv1.BouncerReport]
	probes   map[string]dbtarget.Heard[*dbv1.ProbeReport]
	// settingsOf are the cluster-wide settings each node reported
	// (Settings.Canonical), by node.
	settingsOf map[string]dbtarget.Heard[string]
	// localProbe is this node's own probe of the primary (the read-only
	// signal uses it on every node).
	localProbe dbtarget.Heard[*dbv1.ProbeReport]
	wake       chan struct{}

	operations *prometheus.CounterVec
}

func (d *dbRuntime) init() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.wake == nil {
		d.wake = make(chan struct{}, 1)
	}
	if !d.set {
		d.settings = dbtarget.Settings{}.WithDefaults()
	}
}

func (d *dbRuntime) poke() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// reset forgets every report: a new leader hears afresh. It returns the
// leadership's number for stop.
func (d *dbRuntime) reset(now time.Time) uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.leading++
	d.since = now
	d.postgres = map[string]dbtarget.Heard[*dbv1.PostgresReport]{}
	d.bouncers = map[string]dbtarget.Heard[*dbv1.BouncerReport]{}
	d.probes = map[string]dbtarget.Heard[*dbv1.ProbeReport]{}
	d.settingsOf = map[string]dbtarget.Heard[string]{}
	return d.leading
}

// stop drops the reports when leadership number l ends.
func (d *dbRuntime) stop(l uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.leading == l {
		d.postgres, d.bouncers, d.probes, d.settingsOf = nil, nil, nil, nil
	}
}

func (d *dbRuntime) record(r *dbv1.ReportRequest, now time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.postgres == nil {
		return // not leading
	}
	if p := r.GetPostgres(); p != nil {
		d.postgres[p.GetMember()] = dbtarget.Heard[*dbv1.PostgresReport]{Report: p, At: now}
	}
	if b := r.GetBouncer(); b != nil {
		d.bouncers[b.GetName()] = dbtarget.Heard[*dbv1.BouncerReport]{Report: b, At: now}
	}
	if p := r.GetProbe(); p != nil {
		d.probes[r.GetNode()] = dbtarget.Heard[*dbv1.ProbeReport]{Report: p, At: now}
	}
	if cs := r.GetClusterSettings(); cs != "" && r.GetNode() != "" {
		d.settingsOf[r.GetNode()] = dbtarget.Heard[string]{Report: cs, At: now}
	}
}

// mismatch lists the nodes whose fresh reports carry cluster-wide settings
// other than this leader's, each with what differs.
func (d *dbRuntime) mismatch(now time.Time) []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	mine := d.settings.Canonical()
	var out []string
	for node, h := range d.settingsOf {
		if now.Sub(h.At) > d.settings.Fresh() || h.Report == mine {
			continue
		}
		out = append(out, fmt.Sprintf("node %s: %s", node, strings.Join(dbtarget.DiffSettings(mine, h.Report), ", ")))
	}
	slices.Sort(out)
	return out
}

func (d *dbRuntime) observed(voters []string) (dbtarget.Observed, dbtarget.Settings) {
	d.mu.Lock()
	defer d.mu.Unlock()
	o := dbtarget.Observed{
		Postgres: make(map[string]dbtarget.Heard[*dbv1.PostgresReport], len(d.postgres)),
		Bouncers: make(map[string]dbtarget.Heard[*dbv1.BouncerReport], len(d.bouncers)),
		Probes:   make(map[string]dbtarget.Heard[*dbv1.ProbeReport], len(d.probes)),
		Voters:   voters,
		Since:    d.since,
	}
	for k, v := range d.postgres {
		o.Postgres[k] = v
	}
	for k, v := range d.bouncers {
		o.Bouncers[k] = v
	}
	for k, v := range d.probes {
		o.Probes[k] = v
	}
	return o, d.settings
}

// SetDatabaseSettings sets the cluster-wide database settings this node
// applies when it leads (database.* in the configuration). Give every node
// the same.
func (n *Node) SetDatabaseSettings(s dbtarget.Settings) {
	n.db.init()
	n.db.mu.Lock()
	n.db.settings, n.db.set = s.WithDefaults(), true
	n.db.mu.Unlock()
}

// DatabaseSettings returns the database settings in force on this node.
func (n *Node) DatabaseSettings() dbtarget.Settings {
	n.db.init()
	n.db.mu.Lock()
	defer n.db.mu.Unlock()
	return n.db.settings
}

// DatabaseState returns a copy of the database state this node applied;
// with consistent, after a read barrier (linearizable).
func (n *Node) DatabaseState(ctx context.Context, consistent bool) (*dbv1.State, error) {
	if consistent {
		if _, err := n.ReadBarrier(ctx); err != nil {
			return nil, err
		}
	}
	var st *dbv1.State
	n.fsm.Read(func(s *State) { st = s.Database().View() })
	return st, nil
}

// WaitDatabaseChange blocks until the database state changed after the
// index after (its UpdatedIndex is greater), or ctx ends.
func (n *Node) WaitDatabaseChange(ctx context.Context, after uint64) error {
	for {
		n.fsm.mu.RLock()
		idx, ch := n.fsm.state.Database().UpdatedIndex(), n.fsm.applied
		n.fsm.mu.RUnlock()
		if idx > after {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		case <-n.stop:
			return ErrNoLeader
		}
	}
}

// ProposeDatabase commits a database command; a refusal is a *RefusalError.
func (n *Node) ProposeDatabase(ctx context.Context, c *dbv1.Command) (*dbv1.Result, error) {
	r, err := n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_Database{Database: c}})
	if err != nil {
		return nil, err
	}
	return r.GetDatabase(), nil
}

// ReportDatabase hands an agent's report to the leader: kept here when this
// node leads, otherwise sent to the leader's DatabaseAgentService.
func (n *Node) ReportDatabase(ctx context.Context, r *dbv1.ReportRequest) error {
	n.db.init()
	now := time.Now()
	if r.GetClusterSettings() == "" {
		r = proto.CloneOf(r)
		r.ClusterSettings = n.DatabaseSettings().Canonical()
	}
	if p := r.GetProbe(); p != nil && r.GetNode() == n.cfg.NodeID {
		n.db.mu.Lock()
		n.db.localProbe = dbtarget.Heard[*dbv1.ProbeReport]{Report: p, At: now}
		n.db.mu.Unlock()
	}
	if n.raft.State() == raft.Leader {
		n.db.record(r, now)
		n.db.poke()
		return nil
	}
	addr, _ := n.leaderGRPC()
	if addr == "" {
		return ErrNoLeader
	}
	c, err := n.peers.conn(addr)
	if err != nil {
		return err
	}
	_, err = dbv1.NewDatabaseAgentServiceClient(c).Report(ctx, r)
	return err
}

// dbVoters lists the Raft voters' IDs.
func (n *Node) dbVoters() []string {
	f := n.raft.GetConfiguration()
	if f.Error() != nil {
		return nil
	}
	var out []string
	for _, s := range f.Configuration().Servers {
		if s.Suffrage == raft.Voter {
			out = append(out, string(s.ID))
		}
	}
	slices.Sort(out)
	return out
}

// leadDatabase is the leader-only loop that drives switchovers and
// failovers. It runs while this node leads, after the leader's barrier. It
// decides from the replicated state and the agents' fresh reports
// (dbtarget.Next) and proposes one checked step at a time, so a new leader
// picks up where its predecessor stopped.
func (n *Node) leadDatabase(ctx context.Context) {
	n.db.init()
	defer n.db.stop(n.db.reset(time.Now()))
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	var voters []string
	var votersAt time.Time
	var lastWhy string
	for {
		if time.Since(votersAt) > time.Second {
			voters, votersAt = n.dbVoters(), time.Now()
		}
		var st *dbv1.State
		n.fsm.Read(func(s *State) { st = s.Database().View() })
		obs, set := n.db.observed(voters)
		d := dbtarget.Next(st, obs, set, time.Now())
		if d.Command != nil && n.raft.State() != raft.Leader {
			return // deposed: the new leader decides (ctx ends soon)
		}
		if d.Command != nil {
			res, err := n.ProposeDatabase(ctx, d.Command)
			args := []any{"generation", st.GetGeneration()}
			if op := st.GetOperation(); op != nil {
				args = append(args, "op", op.GetId(), "phase", dbtarget.PhaseName(op.GetPhase()))
			}
			var re *RefusalError
			switch {
			case errors.As(err, &re):
				n.log.Info("database step refused (the state moved on)", append(args, "step", d.Why, "reason", re.Message)...)
			case err != nil:
				if ctx.Err() != nil {
					return
				}
				n.log.Warn("database step failed", append(args, "step", d.Why, "err", err)...)
			default:
				n.log.Info("database: "+d.Why, append(args, "new_generation", res.GetGeneration())...)
				if f := d.Command.GetFinish(); f != nil {
					kind := "unknown"
					for _, h := range slices.Backward(n.dbHistory()) {
						if h.GetOpId() == f.GetOpId() {
							kind = dbtarget.KindName(h.GetKind())
							break
						}
					}
					n.db.operations.WithLabelValues(kind, dbtarget.OutcomeName(f.GetOutcome())).Inc()
				}
				lastWhy = ""
				continue
			}
		} else if d.Why != lastWhy && d.Why != "" {
			n.log.Debug("database: waiting for "+d.Why, "generation", st.GetGeneration())
		}
		lastWhy = d.Why
		select {
		case <-ctx.Done():
			return
		case <-n.stop:
			return
		case <-n.db.wake:
		case <-t.C:
		}
	}
}

func (n *Node) dbHistory() []*dbv1.HistoryEntry {
	var h []*dbv1.HistoryEntry
	n.fsm.Read(func(s *State) { h = s.Database().View().GetHistory() })
	return h
}

// registerDatabase adds the DatabaseService and DatabaseAgentService to the
// node's gRPC server, and the database metrics.
func (n *Node) registerDatabase(s *grpc.Server) {
	n.db.init()
	dbv1.RegisterDatabaseServiceServer(s, &dbService{n: n})
	dbv1.RegisterDatabaseAgentServiceServer(s, &dbAgentService{n: n})
	n.db.operations = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "gitraft_db_switchovers_total", Help: "Switchovers and failovers finished while this node led, by kind and result (done, aborted, failed).",
	}, []string{"kind", "result"})
	n.metrics.reg.MustRegister(n.db.operations)
	n.metrics.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "gitraft_db_generation", Help: "Generation of the PostgreSQL primary in the replicated state (goes up with every change of primary).",
	}, func() float64 {
		var g uint64
		n.fsm.Read(func(s *State) { g = s.Database().Generation() })
		return float64(g)
	}))
	n.metrics.reg.MustRegister(&dbStandbyCollector{n: n})
}

var dbPromotableDesc = prometheus.NewDesc("gitraft_db_promotable_standby",
	"1 when a standby could be promoted now (reporting, running in recovery, allowed to fail over, within database.max_lag_bytes), 0 when none could. Only the leader exports it, once a primary is recorded: it judges from the agents' reports, which only the leader hears.", nil, nil)

// dbStandbyCollector exports gitraft_db_promotable_standby while this node
// leads and the database target has a primary.
type dbStandbyCollector struct{ n *Node }

func (c *dbStandbyCollector) Describe(ch chan<- *prometheus.Desc) { ch <- dbPromotableDesc }

func (c *dbStandbyCollector) Collect(ch chan<- prometheus.Metric) {
	if c.n.raft == nil || c.n.raft.State() != raft.Leader {
		return
	}
	var st *dbv1.State
	c.n.fsm.Read(func(s *State) { st = s.Database().View() })
	if st.GetPrimary() == "" {
		return
	}
	obs, set := c.n.db.observed(nil)
	v := 0.0
	if _, err := dbtarget.PickCandidate(st, obs, set, time.Now()); err == nil {
		v = 1
	}
	ch <- prometheus.MustNewConstMetric(dbPromotableDesc, prometheus.GaugeValue, v)
}

// Writable is the read-only signal on this node: whether the database takes
// writes now, from the replicated state this node applied and its own probe
// of the primary.
func (n *Node) Writable() *dbv1.GetWritableResponse {
	n.db.init()
	var st *dbv1.State
	n.fsm.Read(func(s *State) { st = s.Database().View() })
	r := &dbv1.GetWritableResponse{Node: n.cfg.NodeID, Primary: st.GetPrimary(), Generation: st.GetGeneration(), Phase: st.GetOperation().GetPhase()}
	ok, why := dbtarget.Writable(st)
	if ok {
		if _, lid := n.raft.LeaderWithID(); lid == "" {
			ok, why = false, fmt.Sprintf("node %s knows no cluster leader, so its view may be stale", n.cfg.NodeID)
		}
	}
	if ok {
		n.db.mu.Lock()
		lp, fresh := n.db.localProbe, time.Since(n.db.localProbe.At) <= n.db.settings.Fresh()
		n.db.mu.Unlock()
		if p := lp.Report; fresh && p.GetPrimary() == st.GetPrimary() && p.GetGeneration() == st.GetGeneration() && !p.GetReachable() {
			ok, why = false, fmt.Sprintf("the primary %s does not answer node %s (%s)", st.GetPrimary(), n.cfg.NodeID, p.GetError())
		}
	}
	r.Writable, r.Reason = ok, why
	return r
}

// databaseHTTP adds the database's HTTP endpoints (the read-only signal).
func (n *Node) databaseHTTP(mux *http.ServeMux) {
	mux.HandleFunc("GET /db/writable", func(w http.ResponseWriter, r *http.Request) {
		wr := n.Writable()
		body := map[string]any{
			"writable": wr.GetWritable(), "node": wr.GetNode(), "primary": wr.GetPrimary(),
			"generation": wr.GetGeneration(), "phase": dbtarget.PhaseName(wr.GetPhase()),
		}
		if !wr.GetWritable() {
			body["reason"] = wr.GetReason()
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		if !wr.GetWritable() {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		json.NewEncoder(w).Encode(body)
	})
}

// ----- DatabaseAgentService -----

type dbAgentService struct {
	dbv1.UnimplementedDatabaseAgentServiceServer
	n *Node
}

func (s *dbAgentService) Report(ctx context.Context, req *dbv1.ReportRequest) (*dbv1.ReportResponse, error) {
	n := s.n
	if n.raft.State() != raft.Leader {
		// One hop only: the sender forwards to whom it thinks leads.
		return nil, status.Errorf(codes.FailedPrecondition, "%s is not the leader", n.cfg.NodeID)
	}
	n.db.init()
	n.db.record(req, time.Now())
	n.db.poke()
	return &dbv1.ReportResponse{Leader: n.cfg.NodeID}, nil
}

// ----- DatabaseService -----

type dbService struct {
	dbv1.UnimplementedDatabaseServiceServer
	n *Node
}

const requesterKey = "gitraft-requested-by"

// requester names the caller for the history: the certificate's name, or
// the name a forwarding node passed on.
func requester(ctx context.Context) string {
	name := ""
	if p, ok := peer.FromContext(ctx); ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok {
			if role, cn, err := pki.PeerRole(ti.State); err == nil {
				name = cn
				if role == pki.RoleNode {
					if md, ok := metadata.FromIncomingContext(ctx); ok && len(md.Get(requesterKey)) > 0 {
						name = md.Get(requesterKey)[0]
					}
				}
			}
		}
	}
	if name == "" {
		if md, ok := metadata.FromIncomingContext(ctx); ok && len(md.Get(requesterKey)) > 0 {
			name = md.Get(requesterKey)[0]
		}
	}
	return name
}

// forwardDB sends a call to the leader, passing on who asked.
func (n *Node) forwardDB(ctx context.Context, call func(ctx context.Context, c dbv1.DatabaseServiceClient) error) (bool, error) {
	who := requester(ctx)
	return n.forward(ctx, func(conn grpc.ClientConnInterface) error {
		fctx := ctx
		if who != "" {
			fctx = metadata.AppendToOutgoingContext(ctx, requesterKey, who)
		}
		return call(fctx, dbv1.NewDatabaseServiceClient(conn))
	})
}

// dbRefusal turns a leader-side refusal into the error the gRPC edge maps.
func dbRefusal(err error) error {
	var r *dbtarget.Refusal
	if errors.As(err, &r) {
		return &RefusalError{Reason: r.Reason, Message: r.Message}
	}
	return err
}

// leaderView is the state after a read barrier and what the leader heard.
func (n *Node) leaderView(ctx context.Context) (*dbv1.State, dbtarget.Observed, dbtarget.Settings, uint64, error) {
	idx, err := n.ReadBarrier(ctx)
	if err != nil {
		return nil, dbtarget.Observed{}, dbtarget.Settings{}, 0, err
	}
	n.db.init()
	// A new leader has not heard the agents yet: agents find it only after
	// the election, and under load that takes more than a report interval.
	// Wait until every registered agent has reported to this leader, or
	// until the freshness window has passed since it took over (after which
	// silence means what it says), before judging anyone down.
	for {
		var st *dbv1.State
		n.fsm.Read(func(s *State) { st = s.Database().View() })
		obs, set := n.db.observed(n.dbVoters())
		settled := time.Since(obs.Since) >= set.Fresh()
		if !settled && time.Since(obs.Since) >= 2*set.ReportInterval {
			settled = heardFromAll(st, obs)
		}
		if settled {
			return st, obs, set, idx, nil
		}
		select {
		case <-time.After(50 * time.Millisecond):
		case <-ctx.Done():
			return nil, dbtarget.Observed{}, dbtarget.Settings{}, 0, ctx.Err()
		}
	}
}

// heardFromAll reports whether this leader has a report from the agent of
// every registered member and pgbouncer.
func heardFromAll(st *dbv1.State, obs dbtarget.Observed) bool {
	for _, m := range st.GetMembers() {
		if _, ok := obs.Postgres[m.GetName()]; !ok {
			return false
		}
	}
	for _, b := range st.GetBouncers() {
		if _, ok := obs.Bouncers[b.GetName()]; !ok {
			return false
		}
	}
	return true
}

func (s *dbService) GetStatus(ctx context.Context, req *dbv1.GetStatusRequest) (*dbv1.GetStatusResponse, error) {
	var resp *dbv1.GetStatusResponse
	if fwd, err := s.n.forwardDB(ctx, func(ctx context.Context, c dbv1.DatabaseServiceClient) (err error) {
		resp, err = c.GetStatus(ctx, req)
		return err
	}); fwd {
		return resp, err
	}
	n := s.n
	st, obs, set, idx, err := n.leaderView(ctx)
	if err != nil {
		return nil, err
	}
	resp = statusOf(st, obs, set, time.Now(), n.cfg.NodeID, idx, n.Writable())
	resp.SettingsMismatch = n.db.mismatch(time.Now())
	return resp, nil
}

func statusOf(st *dbv1.State, obs dbtarget.Observed, set dbtarget.Settings, now time.Time, leader string, idx uint64, wr *dbv1.GetWritableResponse) *dbv1.GetStatusResponse {
	resp := &dbv1.GetStatusResponse{State: st, Leader: leader, Index: idx, Writable: wr.GetWritable(), WritableReason: wr.GetReason()}
	var primaryLSN uint64
	primaryKnown := false
	if h, ok := obs.Postgres[st.GetPrimary()]; ok && now.Sub(h.At) <= set.Fresh() && h.Report.GetRunning() && !h.Report.GetInRecovery() {
		primaryLSN, primaryKnown = h.Report.GetWriteLsn(), true
	}
	for _, m := range st.GetMembers() {
		ms := &dbv1.MemberStatus{Member: m, Role: "unknown"}
		if h, ok := obs.Postgres[m.GetName()]; ok {
			r := h.Report
			ms.Health, ms.ReportAgeNanos = r, int64(now.Sub(h.At))
			if now.Sub(h.At) <= set.Fresh() {
				switch {
				case !r.GetRunning():
					ms.Role = "stopped"
				case r.GetInRecovery():
					ms.Role = "standby"
					if primaryKnown {
						ms.LagBytes, ms.LagKnown = max(primaryLSN, r.GetReplayLsn())-r.GetReplayLsn(), true
					}
				case m.GetName() == st.GetPrimary():
					ms.Role = "primary"
				default:
					ms.Role = "primary (not recorded)"
				}
			}
		}
		resp.Members = append(resp.Members, ms)
	}
	for _, b := range st.GetBouncers() {
		bs := &dbv1.BouncerStatus{Bouncer: b}
		if h, ok := obs.Bouncers[b.GetName()]; ok {
			bs.Report, bs.ReportAgeNanos = h.Report, int64(now.Sub(h.At))
		}
		resp.Bouncers = append(resp.Bouncers, bs)
	}
	for _, v := range obs.Voters {
		ps := &dbv1.ProbeStatus{Node: v}
		if h, ok := obs.Probes[v]; ok {
			ps.Probe, ps.ReportAgeNanos = h.Report, int64(now.Sub(h.At))
		}
		resp.Probes = append(resp.Probes, ps)
	}
	resp.Failover = dbtarget.AutomaticFailover(st, obs, set, now)
	return resp
}

func (s *dbService) Switchover(ctx context.Context, req *dbv1.SwitchoverRequest) (*dbv1.SwitchoverResponse, error) {
	var resp *dbv1.SwitchoverResponse
	if fwd, err := s.n.forwardDB(ctx, func(ctx context.Context, c dbv1.DatabaseServiceClient) (err error) {
		resp, err = c.Switchover(ctx, req)
		return err
	}); fwd {
		return resp, err
	}
	n := s.n
	st, obs, set, _, err := n.leaderView(ctx)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	if mm := n.db.mismatch(now); len(mm) > 0 {
		return nil, &RefusalError{Reason: fsmv1.Reason_REASON_PRECONDITION, Message: fmt.Sprintf(
			"nodes are configured with other cluster-wide database settings than the leader %s (%s); give every node the same database.* settings and restart them, then switch over",
			n.cfg.NodeID, strings.Join(mm, "; "))}
	}
	if req.GetAtUnixNano() <= now.UnixNano() {
		if err := dbtarget.CheckSwitchover(st, obs, set, req.GetTo(), now); err != nil {
			return nil, dbRefusal(err)
		}
	}
	res, err := n.ProposeDatabase(ctx, &dbv1.Command{Command: &dbv1.Command_Begin{Begin: &dbv1.BeginOperation{
		Kind: dbv1.Kind_KIND_SWITCHOVER, Target: req.GetTo(), ExpectedGeneration: st.GetGeneration(),
		AtUnixNano: req.GetAtUnixNano(), RequestedBy: requester(ctx), TimeoutNanos: int64(set.SwitchoverTimeout), Checkpoint: true,
	}}})
	if err != nil {
		return nil, err
	}
	n.db.poke()
	n.log.Info("switchover requested", "target", req.GetTo(), "op", res.GetOperation().GetId(), "by", requester(ctx))
	return &dbv1.SwitchoverResponse{Operation: res.GetOperation(), Index: res.GetOperation().GetId()}, nil
}

func (s *dbService) Failover(ctx context.Context, req *dbv1.FailoverRequest) (*dbv1.FailoverResponse, error) {
	var resp *dbv1.FailoverResponse
	if fwd, err := s.n.forwardDB(ctx, func(ctx context.Context, c dbv1.DatabaseServiceClient) (err error) {
		resp, err = c.Failover(ctx, req)
		return err
	}); fwd {
		return resp, err
	}
	n := s.n
	st, obs, set, _, err := n.leaderView(ctx)
	if err != nil {
		return nil, err
	}
	target, err := dbtarget.CheckFailover(st, obs, set, req.GetTo(), req.GetForce(), time.Now())
	if err != nil {
		return nil, dbRefusal(err)
	}
	res, err := n.ProposeDatabase(ctx, &dbv1.Command{Command: &dbv1.Command_Begin{Begin: &dbv1.BeginOperation{
		Kind: dbv1.Kind_KIND_FAILOVER, Target: target, ExpectedGeneration: st.GetGeneration(),
		RequestedBy: requester(ctx), TimeoutNanos: int64(set.PauseTimeout),
	}}})
	if err != nil {
		return nil, err
	}
	n.db.poke()
	n.log.Warn("failover requested", "target", target, "op", res.GetOperation().GetId(), "by", requester(ctx), "force", req.GetForce())
	return &dbv1.FailoverResponse{Operation: res.GetOperation(), Index: res.GetOperation().GetId()}, nil
}

func (s *dbService) Abort(ctx context.Context, req *dbv1.AbortRequest) (*dbv1.AbortResponse, error) {
	n := s.n
	res, err := n.ProposeDatabase(ctx, &dbv1.Command{Command: &dbv1.Command_Abort{Abort: &dbv1.AbortOperation{
		Reason: req.GetReason(), RequestedBy: requester(ctx), TimeoutNanos: int64(n.DatabaseSettings().SwitchoverTimeout),
	}}})
	if err != nil {
		return nil, err
	}
	return &dbv1.AbortResponse{Operation: res.GetOperation()}, nil
}

func (s *dbService) Pause(ctx context.Context, req *dbv1.PauseRequest) (*dbv1.PauseResponse, error) {
	r, err := s.n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_Database{Database: &dbv1.Command{Command: &dbv1.Command_SetPaused{SetPaused: &dbv1.SetPaused{
		Paused: true, Reason: req.GetReason(), RequestedBy: requester(ctx),
	}}}}})
	if err != nil {
		return nil, err
	}
	return &dbv1.PauseResponse{Index: r.GetIndex()}, nil
}

func (s *dbService) Resume(ctx context.Context, req *dbv1.ResumeRequest) (*dbv1.ResumeResponse, error) {
	r, err := s.n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_Database{Database: &dbv1.Command{Command: &dbv1.Command_SetPaused{SetPaused: &dbv1.SetPaused{
		Paused: false, RequestedBy: requester(ctx),
	}}}}})
	if err != nil {
		return nil, err
	}
	return &dbv1.ResumeResponse{Index: r.GetIndex()}, nil
}

func (s *dbService) GetHistory(ctx context.Context, req *dbv1.GetHistoryRequest) (*dbv1.GetHistoryResponse, error) {
	idx, err := s.n.ReadBarrier(ctx)
	if err != nil {
		return nil, err
	}
	h := slices.Clone(s.n.dbHistory())
	slices.Reverse(h)
	if l := int(req.GetLimit()); l > 0 && len(h) > l {
		h = h[:l]
	}
	return &dbv1.GetHistoryResponse{History: h, Index: idx}, nil
}

func (s *dbService) GetWritable(ctx context.Context, req *dbv1.GetWritableRequest) (*dbv1.GetWritableResponse, error) {
	return s.n.Writable(), nil
}

func (s *dbService) Forget(ctx context.Context, req *dbv1.ForgetRequest) (*dbv1.ForgetResponse, error) {
	r, err := s.n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_Database{Database: &dbv1.Command{Command: &dbv1.Command_Forget{Forget: &dbv1.Forget{Name: req.GetName()}}}}})
	if err != nil {
		return nil, err
	}
	return &dbv1.ForgetResponse{Index: r.GetIndex()}, nil
}
