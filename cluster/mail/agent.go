package mail

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	mailv1 "github.com/gitraft/gitraft/proto/gitraft/mail/v1"
)

// Cluster is what the agent needs from the cluster: the replicated hosts
// and a way to commit commands (a refusal comes back as an error).
type Cluster interface {
	Hosts
	ProposeMail(ctx context.Context, c *mailv1.Command) (*mailv1.Result, error)
}

// AgentConfig configures the agent of one mail host.
type AgentConfig struct {
	// Host is this mail host's name in the replicated state.
	Host string
	// Address and Priority register the host (active) if it is missing;
	// with no Address the host must be added with `gitraft mail add`.
	Address  string
	Priority uint32
	// NodeID names the reporting gitraft node in the history.
	NodeID string
	// HandoffPeers are the mail hosts that take leftover mail at a drain's
	// deadline, in order of preference: "mx1" (its address, port 25) or
	// "mx1=[10.0.0.1]:2525" (a Postfix next hop). The first active one is
	// used. Empty: leftover mail stays queued.
	HandoffPeers []string

	// Poll is how often the replicated state is checked (default 250ms).
	Poll time.Duration
	// QueueInterval is how often the queue is counted (default 2s).
	QueueInterval time.Duration
	// FlushInterval is how often a draining host flushes its queue
	// (default 30s).
	FlushInterval time.Duration
	// ReportInterval is how often the queue is reported even when it did
	// not change, and the Postfix settings applied again (default 1m).
	ReportInterval time.Duration
	// Settle is how long new mail must have been refused before an empty
	// queue counts as drained (smtpd processes finish their sessions after
	// a reload; default 2s).
	Settle time.Duration
}

// handoffFlushTail is how long a handoff peer goes on flushing its queue
// after the host handing it mail is drained: the handed mail is all there
// by then, and some of it may wait for Postfix's own retry backoff.
const handoffFlushTail = 15 * time.Minute

// activeReportEvery limits queue reports of an active host, whose queue
// changes all the time, to one per this period.
const activeReportEvery = 15 * time.Second

type handoffPeer struct{ name, nexthop string }

// Agent drives the mail server of one mail host from the replicated state:
// while its host is draining it has the server answer new mail with 4xx,
// flushes the queue and reports its size, so that the host becomes drained
// once the queue is empty; at an overdue drain it hands leftover mail to an
// active peer; when the host is active again it takes mail again. It keeps
// no state that matters across restarts: each step applies the replicated
// state again, idempotently.
type Agent struct {
	cfg     AgentConfig
	cluster Cluster
	mta     MTA
	log     *slog.Logger
	now     func() time.Time
	peers   []handoffPeer

	registered  bool
	synced      bool      // a linearizable read happened
	deferOn     *bool     // what the MTA was last set to (nil: unknown)
	deferredAt  time.Time // when deferring started
	appliedAt   time.Time // when the MTA settings were last applied
	handoff     *string   // next hop the MTA was last set to (nil: unknown)
	handPeer    string    // the host behind handoff
	drainID     uint64    // the drain last seen
	lastFlush   time.Time // of drainID
	lastSample  time.Time // of the queue
	lastReport  time.Time // of the queue
	oldSessions int       // SMTP sessions from before the drain, last counted
	peerFlush   time.Time // last flush for hosts handing mail to this one
	givers      string    // the hosts handing mail to this one, last seen
	warned      map[string]warning
}

type warning struct {
	msg string
	at  time.Time
}

// NewAgent returns the agent of cfg.Host; Run starts it.
func NewAgent(cfg AgentConfig, cluster Cluster, mta MTA, log *slog.Logger) (*Agent, error) {
	if err := ValidateName(cfg.Host); err != nil {
		return nil, fmt.Errorf("mail agent: %w", err)
	}
	if cfg.Address != "" {
		if err := ValidateAddress(cfg.Address); err != nil {
			return nil, fmt.Errorf("mail agent: %w", err)
		}
	}
	if cfg.Priority > 65535 {
		return nil, fmt.Errorf("mail agent: MX priority %d: use 0 to 65535", cfg.Priority)
	}
	a := &Agent{cfg: cfg, cluster: cluster, mta: mta, log: log.With("mail_host", cfg.Host), now: time.Now, warned: map[string]warning{}}
	for _, p := range cfg.HandoffPeers {
		name, nexthop, _ := strings.Cut(p, "=")
		if err := ValidateName(name); err != nil {
			return nil, fmt.Errorf("mail agent: handoff peer %q: %w", p, err)
		}
		if name == cfg.Host {
			return nil, fmt.Errorf("mail agent: handoff peer %q is this host itself", p)
		}
		if strings.ContainsAny(nexthop, " \t\n,") {
			return nil, fmt.Errorf("mail agent: handoff peer %q: the next hop must be one Postfix next hop, such as [10.0.0.1]:25", p)
		}
		a.peers = append(a.peers, handoffPeer{name: name, nexthop: nexthop})
	}
	setDefault(&a.cfg.Poll, 250*time.Millisecond)
	setDefault(&a.cfg.QueueInterval, 2*time.Second)
	setDefault(&a.cfg.FlushInterval, 30*time.Second)
	setDefault(&a.cfg.ReportInterval, time.Minute)
	setDefault(&a.cfg.Settle, 2*time.Second)
	return a, nil
}

func setDefault(d *time.Duration, v time.Duration) {
	if *d <= 0 {
		*d = v
	}
}

// by is the agent's name in the history.
func (a *Agent) by() string { return "agent:" + a.cfg.NodeID }

// Run applies the replicated state every Poll until ctx ends.
func (a *Agent) Run(ctx context.Context) {
	a.log.Info("mail agent started", "handoff_peers", a.cfg.HandoffPeers)
	t := time.NewTicker(a.cfg.Poll)
	defer t.Stop()
	for {
		a.Step(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// warn logs a problem, the same one at most once a minute.
func (a *Agent) warn(kind string, err error, args ...any) {
	now := a.now()
	if w, ok := a.warned[kind]; ok && w.msg == err.Error() && now.Sub(w.at) < time.Minute {
		return
	}
	a.warned[kind] = warning{msg: err.Error(), at: now}
	a.log.Warn("mail agent: "+kind, append([]any{"err", err}, args...)...)
}

func find(hosts []*mailv1.Host, name string) *mailv1.Host {
	for _, h := range hosts {
		if h.GetName() == name {
			return h
		}
	}
	return nil
}

// Step applies the replicated state once. Run calls it every Poll.
func (a *Agent) Step(ctx context.Context) {
	now := a.now()
	if !a.registered && a.cfg.Address != "" {
		r, err := a.cluster.ProposeMail(ctx, &mailv1.Command{Command: &mailv1.Command_AddHost{AddHost: &mailv1.AddHost{
			Name: a.cfg.Host, Address: a.cfg.Address, Priority: a.cfg.Priority, By: a.by(), IfAbsent: true,
		}}})
		if err != nil {
			a.warn("registering the host failed; will retry", err)
			return
		}
		a.registered = true
		h := r.GetHost()
		switch {
		case r.GetChanged():
			a.log.Info("registered the mail host", "address", a.cfg.Address, "priority", a.cfg.Priority)
		case h.GetAddress() != a.cfg.Address || h.GetPriority() != a.cfg.Priority:
			// The cluster's state is the truth; the config only registers.
			a.log.Warn("the cluster has other settings for this mail host than mail.address and mail.priority; change them with gitraft mail add",
				"address", h.GetAddress(), "priority", h.GetPriority(), "config_address", a.cfg.Address, "config_priority", a.cfg.Priority)
		}
	}
	hosts, err := a.cluster.MailHosts(ctx, !a.synced)
	if err != nil {
		a.warn("reading the mail hosts failed; will retry", err)
		return
	}
	a.synced = true
	me := find(hosts, a.cfg.Host)
	if me == nil {
		a.warn("host not registered", fmt.Errorf("mail host %s is not in the cluster's state; add it (gitraft mail add %s --address NAME) or set mail.address", a.cfg.Host, a.cfg.Host))
		return
	}
	resync := now.Sub(a.appliedAt) >= a.cfg.ReportInterval
	if !a.applyDefer(ctx, me, now, resync) {
		return
	}
	if !a.applyHandoff(ctx, me, hosts, now, resync) {
		return
	}
	if resync {
		a.appliedAt = now
	}
	draining := me.GetState() == mailv1.HostState_HOST_STATE_DRAINING
	newDrain := draining && me.GetDrainId() != a.drainID
	if newDrain {
		a.drainID = me.GetDrainId()
		a.lastFlush = time.Time{}
	}
	if draining && now.Sub(a.lastFlush) >= a.cfg.FlushInterval {
		a.flush(ctx, now)
	} else if !draining {
		a.flushForGivers(ctx, hosts, now)
	}
	if !newDrain && now.Sub(a.lastSample) < a.cfg.QueueInterval {
		return
	}
	a.report(ctx, me, now)
}

// applyDefer has the MTA refuse new mail unless the host is active. Before
// taking mail again it confirms with a linearizable read. It reports
// whether the agent may go on.
func (a *Agent) applyDefer(ctx context.Context, me *mailv1.Host, now time.Time, resync bool) bool {
	want := me.GetState() != mailv1.HostState_HOST_STATE_ACTIVE
	if a.deferOn != nil && *a.deferOn == want && !resync {
		return true
	}
	if !want && (a.deferOn == nil || *a.deferOn) {
		hosts, err := a.cluster.MailHosts(ctx, true)
		if err != nil {
			a.warn("confirming the undrain failed; will retry", err)
			return false
		}
		if h := find(hosts, a.cfg.Host); h == nil || h.GetState() != mailv1.HostState_HOST_STATE_ACTIVE {
			return false // an old view; the next step sees the new one
		}
	}
	if err := a.mta.SetDefer(ctx, want); err != nil {
		a.warn("changing whether Postfix takes new mail failed; will retry", err, "defer", want)
		return false
	}
	if a.deferOn == nil || *a.deferOn != want {
		if want {
			a.deferredAt = now
			a.log.Info("new mail is refused with 4xx while the host is out of the MX set", "state", me.GetState().String(), "drain", me.GetDrainId())
		} else {
			a.log.Info("taking new mail again: the host is active")
		}
	}
	a.deferOn = &want
	return true
}

// applyHandoff routes leftover mail to a peer once a drain is overdue, and
// back to normal when the host is active again.
func (a *Agent) applyHandoff(ctx context.Context, me *mailv1.Host, hosts []*mailv1.Host, now time.Time, resync bool) bool {
	var nexthop, peer string
	switch me.GetState() {
	case mailv1.HostState_HOST_STATE_DRAINED:
		if a.handoff == nil {
			return true // whatever it was: the queue is empty
		}
		nexthop, peer = *a.handoff, a.handPeer
	case mailv1.HostState_HOST_STATE_DRAINING:
		if me.GetOverdue() {
			nexthop, peer = a.handoffTarget(me, hosts)
		}
	}
	if a.handoff == nil || *a.handoff != nexthop || resync {
		if err := a.mta.SetHandoff(ctx, nexthop); err != nil {
			a.warn("changing the handoff of leftover mail failed; will retry", err, "nexthop", nexthop)
			return false
		}
		if a.handoff == nil || *a.handoff != nexthop {
			if nexthop != "" {
				a.log.Warn("drain overdue: handing leftover mail to a peer", "peer", peer, "nexthop", nexthop, "drain", me.GetDrainId())
				a.flush(ctx, now)
			} else if a.handoff != nil {
				a.log.Info("normal routing of queued mail again")
			}
		}
		a.handoff, a.handPeer = &nexthop, peer
	}
	if peer != "" && me.GetState() == mailv1.HostState_HOST_STATE_DRAINING && me.GetHandoffPeer() != peer {
		_, err := a.cluster.ProposeMail(ctx, &mailv1.Command{Command: &mailv1.Command_ReportHandoff{ReportHandoff: &mailv1.ReportHandoff{
			Name: me.GetName(), DrainId: me.GetDrainId(), Peer: peer, By: a.by(),
		}}})
		if err != nil {
			a.warn("recording the handoff failed; will retry", err)
		}
	}
	return true
}

// handoffTarget picks the peer for leftover mail: the one already chosen
// while it is active, else the first configured active one.
func (a *Agent) handoffTarget(me *mailv1.Host, hosts []*mailv1.Host) (nexthop, peer string) {
	if len(a.peers) == 0 {
		return "", ""
	}
	order := a.peers
	if cur := me.GetHandoffPeer(); cur != "" {
		for i, p := range a.peers {
			if p.name == cur {
				order = append([]handoffPeer{p}, append(append([]handoffPeer{}, a.peers[:i]...), a.peers[i+1:]...)...)
			}
		}
	}
	for _, p := range order {
		h := find(hosts, p.name)
		if h == nil || h.GetState() != mailv1.HostState_HOST_STATE_ACTIVE {
			continue
		}
		if p.nexthop != "" {
			return p.nexthop, p.name
		}
		return "[" + strings.TrimSuffix(h.GetAddress(), ".") + "]:25", p.name
	}
	a.warn("no handoff peer", fmt.Errorf("the drain of %s is overdue, but none of the handoff peers (%s) is active; the leftover mail stays queued", me.GetName(), strings.Join(a.cfg.HandoffPeers, ", ")))
	return "", ""
}

// flushForGivers flushes this host's queue at once and every
// FlushInterval while another host hands its leftover mail to this one, and
// for handoffFlushTail after that host is drained: mail handed over while
// the next hop refused would otherwise wait for this Postfix's own retry
// backoff (minutes to over an hour) once the next hop takes mail again.
func (a *Agent) flushForGivers(ctx context.Context, hosts []*mailv1.Host, now time.Time) {
	var givers []string
	for _, h := range hosts {
		if h.GetHandoffPeer() != a.cfg.Host || h.GetName() == a.cfg.Host {
			continue
		}
		switch h.GetState() {
		case mailv1.HostState_HOST_STATE_DRAINING:
		case mailv1.HostState_HOST_STATE_DRAINED:
			if now.Sub(h.GetStateChangedAt().AsTime()) >= handoffFlushTail {
				continue
			}
		default:
			continue
		}
		givers = append(givers, h.GetName())
	}
	g := strings.Join(givers, ",")
	if g != a.givers {
		if g != "" {
			a.log.Info("flushing the queue regularly: other hosts hand their leftover mail to this one", "from", g, "every", a.cfg.FlushInterval)
			a.peerFlush = time.Time{}
		}
		a.givers = g
	}
	if g == "" || now.Sub(a.peerFlush) < a.cfg.FlushInterval {
		return
	}
	a.peerFlush = now
	if err := a.mta.Flush(ctx); err != nil {
		a.warn("flushing the queue for handed-off mail failed", err)
	}
}

func (a *Agent) flush(ctx context.Context, now time.Time) {
	a.lastFlush = now
	if err := a.mta.Flush(ctx); err != nil {
		a.warn("flushing the queue failed", err)
	}
}

// report counts the queue and reports it when it changed (an active host
// at most every activeReportEvery), or when the last report is older than
// ReportInterval. A count can end the drain (it carries the drain's id)
// only once new mail has been refused for Settle and no SMTP session that
// began before the refusal is open: such a session may still queue mail.
// The sessions are counted before the queue, so that a message such a
// session queued before it ended is in the count.
func (a *Agent) report(ctx context.Context, me *mailv1.Host, now time.Time) {
	var drainID uint64
	var old int
	if me.GetState() != mailv1.HostState_HOST_STATE_ACTIVE && a.deferOn != nil && *a.deferOn && now.Sub(a.deferredAt) >= a.cfg.Settle {
		n, err := a.mta.OldSessions(ctx)
		switch {
		case err != nil:
			a.warn("counting the SMTP sessions from before the drain failed; the host stays draining", err)
			old = int(me.GetOldSessions())
		case n > 0:
			old = n
			if n != a.oldSessions {
				a.log.Info("waiting for SMTP sessions from before the drain to end: they may still queue mail", "sessions", n, "drain", me.GetDrainId())
			}
		default:
			drainID = me.GetDrainId()
		}
		if err == nil {
			a.oldSessions = n
		}
	}
	size, err := a.mta.QueueSize(ctx)
	if err != nil {
		a.warn("counting the queue failed", err)
		return
	}
	a.lastSample = now
	stale := me.GetQueueReportedAt() == nil || now.Sub(me.GetQueueReportedAt().AsTime()) >= a.cfg.ReportInterval
	need := stale || uint64(size) != me.GetQueueSize() || me.GetQueueReportedBy() != a.by() ||
		uint32(old) != me.GetOldSessions() || me.GetAgentReportInterval().AsDuration() != a.cfg.ReportInterval
	if drainID != 0 && me.GetState() == mailv1.HostState_HOST_STATE_DRAINING && size == 0 {
		need = true
	}
	if me.GetState() == mailv1.HostState_HOST_STATE_ACTIVE && !stale && now.Sub(a.lastReport) < activeReportEvery {
		need = false
	}
	if !need {
		return
	}
	r, err := a.cluster.ProposeMail(ctx, &mailv1.Command{Command: &mailv1.Command_ReportQueue{ReportQueue: &mailv1.ReportQueue{
		Name: me.GetName(), DrainId: drainID, QueueSize: uint64(size), By: a.by(),
		OldSessions: uint32(old), ReportInterval: durationpb.New(a.cfg.ReportInterval),
	}}})
	if err != nil {
		a.warn("reporting the queue failed; will retry", err)
		return
	}
	a.lastReport = now
	if r.GetHost().GetState() != me.GetState() {
		a.log.Info("mail host changed state", "from", me.GetState().String(), "to", r.GetHost().GetState().String(), "queue", size, "drain", drainID)
	}
}
