package cluster

import (
	"context"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gitraft/gitraft/cluster/mail"
	"github.com/gitraft/gitraft/cluster/pki"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	mailv1 "github.com/gitraft/gitraft/proto/gitraft/mail/v1"
)

// DefaultDrainDeadline is a drain's deadline when the request names none.
const DefaultDrainDeadline = time.Hour

// leadMail is the leader-only loop of the mail drain state: it marks drains
// whose deadline passed as overdue, once each, and logs them.
func (n *Node) leadMail(ctx context.Context) {
	t := time.NewTicker(n.cfg.LockExpiryInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-n.stop:
			return
		case <-t.C:
			n.markOverdueDrains(ctx)
		}
	}
}

func (n *Node) markOverdueDrains(ctx context.Context) {
	var overdue []*mailv1.Host
	now := time.Now()
	n.fsm.Read(func(s *State) { overdue = s.Mail().Overdue(now) })
	for _, h := range overdue {
		r, err := n.commit(ctx, mailEntry(&mailv1.Command{Command: &mailv1.Command_MarkOverdue{MarkOverdue: &mailv1.MarkOverdue{
			Name: h.GetName(), DrainId: h.GetDrainId(), By: "leader:" + n.cfg.NodeID,
		}}}))
		if err != nil {
			n.log.Warn("marking a mail drain overdue failed; will retry", "mail_host", h.GetName(), "err", err)
			continue
		}
		if r.GetMail().GetChanged() {
			n.log.Warn("mail drain overdue: its deadline passed and the queue is not empty",
				"mail_host", h.GetName(), "drain", h.GetDrainId(), "deadline", h.GetDeadline().AsTime(),
				"queue", h.GetQueueSize(), "index", r.GetIndex())
		}
	}
}

func mailEntry(c *mailv1.Command) *fsmv1.Entry {
	return &fsmv1.Entry{Command: &fsmv1.Entry_Mail{Mail: c}}
}

// MailHosts returns the mail hosts by name (copies). With fresh it first
// runs a read barrier, so the answer is linearizable; without, it is what
// this node last applied. It implements mail.Hosts.
func (n *Node) MailHosts(ctx context.Context, fresh bool) ([]*mailv1.Host, error) {
	if fresh {
		if _, err := n.ReadBarrier(ctx); err != nil {
			return nil, err
		}
	}
	var out []*mailv1.Host
	n.fsm.Read(func(s *State) {
		for _, h := range s.Mail().Hosts() {
			out = append(out, proto.CloneOf(h))
		}
	})
	return out, nil
}

// ProposeMail commits a mail command through the leader. A refusal is a
// *RefusalError. It implements mail.Cluster.
func (n *Node) ProposeMail(ctx context.Context, c *mailv1.Command) (*mailv1.Result, error) {
	r, err := n.commit(ctx, mailEntry(c))
	if err != nil {
		return nil, err
	}
	return r.GetMail(), nil
}

// registerMail adds the MailService to the node's gRPC server, and the
// mail metrics.
func (n *Node) registerMail(s *grpc.Server) {
	mailv1.RegisterMailServiceServer(s, &mailService{n: n})
	n.metrics.reg.MustRegister(&mailCollector{n: n})
}

// mailCollector exports each mail host's state, queue and agent as this
// node last applied them, with this node's clock for the ages.
type mailCollector struct{ n *Node }

var (
	mailStateDesc = prometheus.NewDesc("gitraft_mail_host_state",
		"State of each mail host (1 for its current state).", []string{"host", "state"}, nil)
	mailQueueDesc = prometheus.NewDesc("gitraft_mail_queue_messages",
		"Messages in the mail host's queue, as its agent last reported.", []string{"host"}, nil)
	mailReportAgeDesc = prometheus.NewDesc("gitraft_mail_agent_report_age_seconds",
		"Seconds since the mail host's agent last reported (absent when it never did).", []string{"host"}, nil)
	mailSilentDesc = prometheus.NewDesc("gitraft_mail_agent_silent",
		"1 when the mail host's agent has not reported for 3 of its report intervals, or never: its Postfix does not follow drains and undrains.", []string{"host"}, nil)
	mailOldSessionsDesc = prometheus.NewDesc("gitraft_mail_old_sessions",
		"SMTP sessions from before the drain still open on the mail host, as its agent last reported.", []string{"host"}, nil)
	mailOverdueDesc = prometheus.NewDesc("gitraft_mail_drain_overdue",
		"1 when the mail host's drain passed its deadline with mail still queued (the leader marked it overdue), 0 otherwise.", []string{"host"}, nil)
)

func (c *mailCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{mailStateDesc, mailQueueDesc, mailReportAgeDesc, mailSilentDesc, mailOldSessionsDesc, mailOverdueDesc} {
		ch <- d
	}
}

func (c *mailCollector) Collect(ch chan<- prometheus.Metric) {
	var hosts []*mailv1.Host
	c.n.fsm.Read(func(s *State) { hosts = s.Mail().Hosts() })
	now := time.Now()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for _, h := range hosts {
		for _, st := range []mailv1.HostState{mailv1.HostState_HOST_STATE_ACTIVE, mailv1.HostState_HOST_STATE_DRAINING, mailv1.HostState_HOST_STATE_DRAINED} {
			v := 0.0
			if h.GetState() == st {
				v = 1
			}
			gauge(mailStateDesc, v, h.GetName(), strings.ToLower(strings.TrimPrefix(st.String(), "HOST_STATE_")))
		}
		gauge(mailQueueDesc, float64(h.GetQueueSize()), h.GetName())
		gauge(mailOldSessionsDesc, float64(h.GetOldSessions()), h.GetName())
		since, silent := mail.AgentSilence(h, now)
		if h.GetQueueReportedAt() != nil {
			gauge(mailReportAgeDesc, since.Seconds(), h.GetName())
		}
		v := 0.0
		if silent {
			v = 1
		}
		gauge(mailSilentDesc, v, h.GetName())
		v = 0
		if h.GetOverdue() && h.GetState() == mailv1.HostState_HOST_STATE_DRAINING {
			v = 1
		}
		gauge(mailOverdueDesc, v, h.GetName())
	}
}

type mailService struct {
	mailv1.UnimplementedMailServiceServer
	n *Node
}

// caller names who made a request, for the history: "admin:alice",
// "node:n2", or "client" without TLS.
func caller(ctx context.Context) string {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "client"
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return "client"
	}
	role, name, err := pki.PeerRole(ti.State)
	if err != nil {
		return "client"
	}
	return string(role) + ":" + name
}

func (s *mailService) ListHosts(ctx context.Context, _ *mailv1.ListHostsRequest) (*mailv1.ListHostsResponse, error) {
	if _, err := s.n.ReadBarrier(ctx); err != nil {
		return nil, err
	}
	resp := &mailv1.ListHostsResponse{}
	s.n.fsm.Read(func(st *State) {
		resp.Hosts = st.Mail().Hosts()
		resp.Index = st.Index()
	})
	return resp, nil
}

func validName(name string) error {
	if err := mail.ValidateName(name); err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	return nil
}

func (s *mailService) AddHost(ctx context.Context, req *mailv1.AddHostRequest) (*mailv1.AddHostResponse, error) {
	if err := validName(req.GetName()); err != nil {
		return nil, err
	}
	if err := mail.ValidateAddress(req.GetAddress()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	r, err := s.n.commit(ctx, mailEntry(&mailv1.Command{Command: &mailv1.Command_AddHost{AddHost: &mailv1.AddHost{
		Name: req.GetName(), Address: req.GetAddress(), Priority: req.GetPriority(), By: caller(ctx),
	}}}))
	if err != nil {
		return nil, err
	}
	m := r.GetMail()
	return &mailv1.AddHostResponse{Host: m.GetHost(), Changed: m.GetChanged(), Note: m.GetNote(), Index: r.GetIndex()}, nil
}

func (s *mailService) RemoveHost(ctx context.Context, req *mailv1.RemoveHostRequest) (*mailv1.RemoveHostResponse, error) {
	r, err := s.n.commit(ctx, mailEntry(&mailv1.Command{Command: &mailv1.Command_RemoveHost{RemoveHost: &mailv1.RemoveHost{
		Name: req.GetName(), Force: req.GetForce(), By: caller(ctx),
	}}}))
	if err != nil {
		return nil, err
	}
	s.n.log.Info("mail host removed", "mail_host", req.GetName(), "by", caller(ctx), "index", r.GetIndex())
	return &mailv1.RemoveHostResponse{Removed: r.GetMail().GetHost(), Index: r.GetIndex()}, nil
}

func (s *mailService) Drain(ctx context.Context, req *mailv1.DrainRequest) (*mailv1.DrainResponse, error) {
	d := DefaultDrainDeadline
	if req.GetDeadline() != nil {
		d = req.GetDeadline().AsDuration()
		if d <= 0 || d > mail.MaxDeadline {
			return nil, status.Errorf(codes.InvalidArgument, "drain deadline %s: must be positive and at most %s", d, mail.MaxDeadline)
		}
	}
	by := caller(ctx)
	r, err := s.n.commit(ctx, mailEntry(&mailv1.Command{Command: &mailv1.Command_Drain{Drain: &mailv1.Drain{
		Name: req.GetName(), Deadline: durationpb.New(d), Reason: req.GetReason(), By: by, Force: req.GetForce(),
		UpdateDeadline: req.GetDeadline() != nil,
	}}}))
	if err != nil {
		return nil, err
	}
	m := r.GetMail()
	if m.GetChanged() {
		s.n.log.Info("mail host draining", "mail_host", req.GetName(), "by", by, "deadline", m.GetHost().GetDeadline().AsTime(), "reason", req.GetReason(), "force", req.GetForce(), "index", r.GetIndex())
	}
	return &mailv1.DrainResponse{Host: m.GetHost(), Changed: m.GetChanged(), Note: m.GetNote(), Index: r.GetIndex()}, nil
}

func (s *mailService) Undrain(ctx context.Context, req *mailv1.UndrainRequest) (*mailv1.UndrainResponse, error) {
	by := caller(ctx)
	r, err := s.n.commit(ctx, mailEntry(&mailv1.Command{Command: &mailv1.Command_Undrain{Undrain: &mailv1.Undrain{
		Name: req.GetName(), By: by, Reason: req.GetReason(),
	}}}))
	if err != nil {
		return nil, err
	}
	m := r.GetMail()
	if m.GetChanged() {
		s.n.log.Info("mail host active again", "mail_host", req.GetName(), "by", by, "index", r.GetIndex())
	}
	return &mailv1.UndrainResponse{Host: m.GetHost(), Changed: m.GetChanged(), Note: m.GetNote(), Index: r.GetIndex()}, nil
}

func (s *mailService) GetHistory(ctx context.Context, req *mailv1.GetHistoryRequest) (*mailv1.GetHistoryResponse, error) {
	if _, err := s.n.ReadBarrier(ctx); err != nil {
		return nil, err
	}
	resp := &mailv1.GetHistoryResponse{}
	var known bool
	s.n.fsm.Read(func(st *State) {
		resp.Entries = st.Mail().History(req.GetHost(), int(req.GetLimit()))
		resp.Index = st.Index()
		_, known = st.Mail().Host(req.GetHost())
	})
	if req.GetHost() != "" && !known && len(resp.Entries) == 0 {
		return nil, status.Errorf(codes.NotFound, "mail host %q not found and not in the history", req.GetHost())
	}
	return resp, nil
}

func (s *mailService) GetMXSet(ctx context.Context, _ *mailv1.GetMXSetRequest) (*mailv1.GetMXSetResponse, error) {
	if _, err := s.n.ReadBarrier(ctx); err != nil {
		return nil, err
	}
	resp := &mailv1.GetMXSetResponse{}
	s.n.fsm.Read(func(st *State) {
		resp.Records = st.Mail().MXSet()
		resp.Index = st.Index()
	})
	resp.ZoneFragment = mail.ZoneFragment(resp.Records)
	return resp, nil
}
