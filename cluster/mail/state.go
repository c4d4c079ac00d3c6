package mail

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	mailv1 "github.com/gitraft/gitraft/proto/gitraft/mail/v1"
)

// MaxHistory is how many changes the state keeps; older ones are dropped.
const MaxHistory = 1000

// MaxDeadline bounds a drain's deadline.
const MaxDeadline = 30 * 24 * time.Hour

// Sentinel errors of the package.
var (
	// ErrInvalidName is wrapped by host-name and address rule violations.
	ErrInvalidName = errors.New("invalid mail host")
)

// State is the mail-drain part of the replicated state: the forge's MX
// hosts, each one's drain state, and a bounded history of changes. Apply is
// deterministic: time comes from the entry, never the local clock.
//
// Host values are never changed in place (a change stores a new one), so
// snapshots and readers may share them; callers must not modify them.
// State is not safe for concurrent use; the cluster's FSM serialises access.
type State struct {
	hosts   map[string]*mailv1.Host
	history []*mailv1.HistoryEntry
}

// NewState returns an empty state.
func NewState() *State { return &State{hosts: map[string]*mailv1.Host{}} }

// Apply applies one committed mail command at a Raft index, with the
// leader's time from the entry. A refusal goes in the result's Refusal.
func (s *State) Apply(index uint64, now time.Time, c *mailv1.Command) *fsmv1.Result {
	switch x := c.GetCommand().(type) {
	case *mailv1.Command_AddHost:
		return s.addHost(index, now, x.AddHost)
	case *mailv1.Command_RemoveHost:
		return s.removeHost(index, now, x.RemoveHost)
	case *mailv1.Command_Drain:
		return s.drain(index, now, x.Drain)
	case *mailv1.Command_Undrain:
		return s.undrain(index, now, x.Undrain)
	case *mailv1.Command_ReportQueue:
		return s.reportQueue(index, now, x.ReportQueue)
	case *mailv1.Command_MarkOverdue:
		return s.markOverdue(index, now, x.MarkOverdue)
	case *mailv1.Command_ReportHandoff:
		return s.reportHandoff(index, now, x.ReportHandoff)
	default:
		// Decoded, but a command this binary does not know: applying
		// nothing would let this node diverge.
		panic(fmt.Sprintf("gitraft: mail command at index %d is one this binary does not know (%T); upgrade gitraft on this node", index, c.GetCommand()))
	}
}

func refuse(reason fsmv1.Reason, format string, args ...any) *fsmv1.Result {
	return &fsmv1.Result{Refusal: &fsmv1.Refusal{Reason: reason, Message: fmt.Sprintf(format, args...)}}
}

// refusePrecondition refuses for the state of things (the last active host,
// a drain under way). It maps to gRPC FailedPrecondition.
func refusePrecondition(format string, args ...any) *fsmv1.Result {
	return refuse(fsmv1.Reason_REASON_PRECONDITION, format, args...)
}

func changed(h *mailv1.Host) *fsmv1.Result {
	return &fsmv1.Result{Mail: &mailv1.Result{Host: h, Changed: true}}
}

func unchanged(h *mailv1.Host, format string, args ...any) *fsmv1.Result {
	return &fsmv1.Result{Mail: &mailv1.Result{Host: h, Note: fmt.Sprintf(format, args...)}}
}

// notFound refuses for an unknown host, naming the known ones when there
// are few.
func (s *State) notFound(name string) *fsmv1.Result {
	names := slices.Sorted(maps.Keys(s.hosts))
	switch {
	case len(names) == 0:
		return refuse(fsmv1.Reason_REASON_NOT_FOUND, "mail host %q not found: no mail hosts are registered (gitraft mail add NAME --address A)", name)
	case len(names) <= 10:
		return refuse(fsmv1.Reason_REASON_NOT_FOUND, "mail host %q not found; known hosts: %s", name, strings.Join(names, ", "))
	}
	return refuse(fsmv1.Reason_REASON_NOT_FOUND, "mail host %q not found (%d hosts are registered: gitraft mail ls)", name, len(names))
}

func (s *State) record(index uint64, now time.Time, host string, ev mailv1.Event, from, to mailv1.HostState, by, reason string) {
	s.history = append(s.history, &mailv1.HistoryEntry{
		Index: index, Time: timestamppb.New(now), Host: host, Event: ev, From: from, To: to, By: by, Reason: reason,
	})
	if n := len(s.history) - MaxHistory; n > 0 {
		s.history = slices.Delete(s.history, 0, n)
	}
}

// ValidateName checks a mail host's name: 1-63 lowercase letters, digits,
// '-', '_' or '.', starting with a letter or digit.
func ValidateName(name string) error {
	if name == "" || len(name) > 63 {
		return fmt.Errorf("%w name %q: use 1 to 63 characters", ErrInvalidName, name)
	}
	for i, r := range name {
		ok := r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || (i > 0 && (r == '-' || r == '_' || r == '.'))
		if !ok {
			return fmt.Errorf("%w name %q: use lowercase letters, digits, '-', '_' and '.', starting with a letter or digit", ErrInvalidName, name)
		}
	}
	return nil
}

// ValidateAddress checks an MX target: a DNS name (letters, digits, '-' and
// '_' in dot-separated labels of at most 63, an optional final dot), at
// most 253 characters.
func ValidateAddress(addr string) error {
	bad := func(rule string) error {
		return fmt.Errorf("%w address %q: %s (the MX target, a DNS name such as mx1.example.org)", ErrInvalidName, addr, rule)
	}
	a := strings.TrimSuffix(addr, ".")
	if a == "" {
		return bad("empty")
	}
	if len(a) > 253 {
		return bad("longer than 253 characters")
	}
	for _, label := range strings.Split(a, ".") {
		if label == "" || len(label) > 63 {
			return bad("each dot-separated label must have 1 to 63 characters")
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return bad("a label starts or ends with '-'")
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return bad(fmt.Sprintf("contains %q", r))
			}
		}
	}
	return nil
}

func (s *State) addHost(index uint64, now time.Time, c *mailv1.AddHost) *fsmv1.Result {
	if err := ValidateName(c.GetName()); err != nil {
		return refuse(fsmv1.Reason_REASON_INVALID, "%s", err.Error())
	}
	if err := ValidateAddress(c.GetAddress()); err != nil {
		return refuse(fsmv1.Reason_REASON_INVALID, "%s", err.Error())
	}
	if c.GetPriority() > 65535 {
		return refuse(fsmv1.Reason_REASON_INVALID, "MX priority %d: use 0 to 65535", c.GetPriority())
	}
	old, ok := s.hosts[c.GetName()]
	switch {
	case ok && c.GetIfAbsent():
		return unchanged(old, "mail host %s is already registered (address %s, priority %d)", old.GetName(), old.GetAddress(), old.GetPriority())
	case ok && old.GetAddress() == c.GetAddress() && old.GetPriority() == c.GetPriority():
		return unchanged(old, "mail host %s already has address %s and priority %d", old.GetName(), old.GetAddress(), old.GetPriority())
	case ok:
		h := proto.CloneOf(old)
		h.Address, h.Priority = c.GetAddress(), c.GetPriority()
		s.hosts[h.GetName()] = h
		s.record(index, now, h.GetName(), mailv1.Event_EVENT_UPDATED, h.GetState(), h.GetState(), c.GetBy(),
			fmt.Sprintf("address %s, priority %d (was %s, %d)", h.GetAddress(), h.GetPriority(), old.GetAddress(), old.GetPriority()))
		return changed(h)
	}
	h := &mailv1.Host{
		Name: c.GetName(), Address: c.GetAddress(), Priority: c.GetPriority(),
		State: mailv1.HostState_HOST_STATE_ACTIVE, AddedAt: timestamppb.New(now), StateChangedAt: timestamppb.New(now),
	}
	s.hosts[h.GetName()] = h
	s.record(index, now, h.GetName(), mailv1.Event_EVENT_ADDED, mailv1.HostState_HOST_STATE_UNSPECIFIED, h.GetState(), c.GetBy(),
		fmt.Sprintf("address %s, priority %d", h.GetAddress(), h.GetPriority()))
	return changed(h)
}

// otherActive counts the active hosts other than name.
func (s *State) otherActive(name string) int {
	n := 0
	for _, h := range s.hosts {
		if h.GetName() != name && h.GetState() == mailv1.HostState_HOST_STATE_ACTIVE {
			n++
		}
	}
	return n
}

func (s *State) lastActive(name string) *fsmv1.Result {
	return refusePrecondition("mail host %s is the last active mail host: without it the MX set would be empty and senders would have nowhere to deliver; add or undrain another host first, or use --force", name)
}

func (s *State) removeHost(index uint64, now time.Time, c *mailv1.RemoveHost) *fsmv1.Result {
	h, ok := s.hosts[c.GetName()]
	if !ok {
		return s.notFound(c.GetName())
	}
	switch h.GetState() {
	case mailv1.HostState_HOST_STATE_DRAINING:
		return refusePrecondition("mail host %s is draining (%d messages queued as last reported): let the drain finish (the host becomes drained) or undrain it before removing it", h.GetName(), h.GetQueueSize())
	case mailv1.HostState_HOST_STATE_ACTIVE:
		if s.otherActive(h.GetName()) == 0 && !c.GetForce() {
			return s.lastActive(h.GetName())
		}
	}
	delete(s.hosts, h.GetName())
	s.record(index, now, h.GetName(), mailv1.Event_EVENT_REMOVED, h.GetState(), mailv1.HostState_HOST_STATE_UNSPECIFIED, c.GetBy(), "")
	return changed(h)
}

func (s *State) drain(index uint64, now time.Time, c *mailv1.Drain) *fsmv1.Result {
	h, ok := s.hosts[c.GetName()]
	if !ok {
		return s.notFound(c.GetName())
	}
	d := c.GetDeadline().AsDuration()
	if d <= 0 || d > MaxDeadline {
		return refuse(fsmv1.Reason_REASON_INVALID, "drain deadline %s: must be positive and at most %s", d, MaxDeadline)
	}
	switch h.GetState() {
	case mailv1.HostState_HOST_STATE_DRAINING:
		if c.GetUpdateDeadline() {
			return s.moveDeadline(index, now, h, d, c)
		}
		return unchanged(h, "mail host %s is already draining since %s (deadline %s, reason %q); nothing changed (give --deadline to move the deadline)",
			h.GetName(), stamp(h.GetDrainStartedAt()), stamp(h.GetDeadline()), h.GetReason())
	case mailv1.HostState_HOST_STATE_DRAINED:
		return unchanged(h, "mail host %s is already drained (since %s); nothing changed", h.GetName(), stamp(h.GetStateChangedAt()))
	}
	reason := c.GetReason()
	if s.otherActive(h.GetName()) == 0 {
		if !c.GetForce() {
			return s.lastActive(h.GetName())
		}
		reason = strings.TrimSpace(reason + " (forced: the last active host; the MX set is now empty)")
	}
	n := proto.CloneOf(h)
	n.State = mailv1.HostState_HOST_STATE_DRAINING
	n.StateChangedAt = timestamppb.New(now)
	n.DrainId = index
	n.DrainStartedAt = timestamppb.New(now)
	n.Deadline = timestamppb.New(now.Add(d))
	n.Reason = c.GetReason()
	n.DrainedBy = c.GetBy()
	n.Overdue = false
	n.HandoffPeer = ""
	s.hosts[n.GetName()] = n
	s.record(index, now, n.GetName(), mailv1.Event_EVENT_DRAIN, h.GetState(), n.GetState(), c.GetBy(), reason)
	return changed(n)
}

// moveDeadline sets a draining host's deadline to now+d. A deadline moved
// past now ends an overdue drain's handoff: the leftover mail is retried
// by the host itself again.
func (s *State) moveDeadline(index uint64, now time.Time, h *mailv1.Host, d time.Duration, c *mailv1.Drain) *fsmv1.Result {
	deadline := now.Add(d)
	n := proto.CloneOf(h)
	n.Deadline = timestamppb.New(deadline)
	note := fmt.Sprintf("the deadline of the drain of %s moved to %s (was %s)", h.GetName(), stamp(n.GetDeadline()), stamp(h.GetDeadline()))
	if h.GetOverdue() {
		n.Overdue, n.HandoffPeer = false, ""
		note += "; it is no longer overdue"
		if h.GetHandoffPeer() != "" {
			note += ", and its leftover mail is no longer handed to " + h.GetHandoffPeer()
		}
	}
	s.hosts[n.GetName()] = n
	s.record(index, now, n.GetName(), mailv1.Event_EVENT_UPDATED, h.GetState(), n.GetState(), c.GetBy(), strings.TrimSpace(note+" "+c.GetReason()))
	return &fsmv1.Result{Mail: &mailv1.Result{Host: n, Changed: true, Note: note}}
}

func (s *State) undrain(index uint64, now time.Time, c *mailv1.Undrain) *fsmv1.Result {
	h, ok := s.hosts[c.GetName()]
	if !ok {
		return s.notFound(c.GetName())
	}
	if h.GetState() == mailv1.HostState_HOST_STATE_ACTIVE {
		return unchanged(h, "mail host %s is already active; nothing changed", h.GetName())
	}
	n := proto.CloneOf(h)
	n.State = mailv1.HostState_HOST_STATE_ACTIVE
	n.StateChangedAt = timestamppb.New(now)
	n.DrainId, n.DrainStartedAt, n.Deadline, n.Reason, n.DrainedBy = 0, nil, nil, "", ""
	n.Overdue, n.HandoffPeer = false, ""
	s.hosts[n.GetName()] = n
	s.record(index, now, n.GetName(), mailv1.Event_EVENT_UNDRAIN, h.GetState(), n.GetState(), c.GetBy(), c.GetReason())
	return changed(n)
}

func (s *State) reportQueue(index uint64, now time.Time, c *mailv1.ReportQueue) *fsmv1.Result {
	h, ok := s.hosts[c.GetName()]
	if !ok {
		return s.notFound(c.GetName())
	}
	n := proto.CloneOf(h)
	n.QueueSize = c.GetQueueSize()
	n.QueueReportedAt = timestamppb.New(now)
	n.QueueReportedBy = c.GetBy()
	n.OldSessions = c.GetOldSessions()
	if c.GetReportInterval() != nil {
		n.AgentReportInterval = c.GetReportInterval()
	}
	s.hosts[n.GetName()] = n
	current := c.GetDrainId() != 0 && c.GetDrainId() == h.GetDrainId()
	switch {
	case current && h.GetState() == mailv1.HostState_HOST_STATE_DRAINING && c.GetQueueSize() == 0 && c.GetOldSessions() == 0:
		n.State = mailv1.HostState_HOST_STATE_DRAINED
		n.StateChangedAt = timestamppb.New(now)
		s.record(index, now, n.GetName(), mailv1.Event_EVENT_DRAINED, h.GetState(), n.GetState(), c.GetBy(), "queue empty")
	case current && h.GetState() == mailv1.HostState_HOST_STATE_DRAINED && c.GetQueueSize() > 0:
		n.State = mailv1.HostState_HOST_STATE_DRAINING
		n.StateChangedAt = timestamppb.New(now)
		s.record(index, now, n.GetName(), mailv1.Event_EVENT_REFILLED, h.GetState(), n.GetState(), c.GetBy(),
			fmt.Sprintf("%d messages queued again", c.GetQueueSize()))
	}
	return changed(n)
}

func (s *State) markOverdue(index uint64, now time.Time, c *mailv1.MarkOverdue) *fsmv1.Result {
	h, ok := s.hosts[c.GetName()]
	if !ok {
		return s.notFound(c.GetName())
	}
	switch {
	case h.GetState() != mailv1.HostState_HOST_STATE_DRAINING || h.GetDrainId() != c.GetDrainId():
		return unchanged(h, "mail host %s is not in drain %d any more", h.GetName(), c.GetDrainId())
	case h.GetOverdue():
		return unchanged(h, "drain %d of %s is already overdue", h.GetDrainId(), h.GetName())
	case now.Before(h.GetDeadline().AsTime()):
		return unchanged(h, "drain %d of %s is not overdue before %s", h.GetDrainId(), h.GetName(), stamp(h.GetDeadline()))
	}
	n := proto.CloneOf(h)
	n.Overdue = true
	s.hosts[n.GetName()] = n
	s.record(index, now, n.GetName(), mailv1.Event_EVENT_OVERDUE, h.GetState(), n.GetState(), c.GetBy(),
		fmt.Sprintf("deadline %s passed with %d messages queued (as last reported)", stamp(h.GetDeadline()), h.GetQueueSize()))
	return changed(n)
}

func (s *State) reportHandoff(index uint64, now time.Time, c *mailv1.ReportHandoff) *fsmv1.Result {
	h, ok := s.hosts[c.GetName()]
	if !ok {
		return s.notFound(c.GetName())
	}
	if h.GetState() != mailv1.HostState_HOST_STATE_DRAINING || h.GetDrainId() != c.GetDrainId() {
		return unchanged(h, "mail host %s is not in drain %d any more", h.GetName(), c.GetDrainId())
	}
	if h.GetHandoffPeer() == c.GetPeer() {
		return unchanged(h, "drain %d of %s already hands its mail to %s", h.GetDrainId(), h.GetName(), c.GetPeer())
	}
	n := proto.CloneOf(h)
	n.HandoffPeer = c.GetPeer()
	s.hosts[n.GetName()] = n
	s.record(index, now, n.GetName(), mailv1.Event_EVENT_HANDOFF, h.GetState(), n.GetState(), c.GetBy(),
		fmt.Sprintf("leftover mail (%d messages as last reported) handed to %s", h.GetQueueSize(), c.GetPeer()))
	return changed(n)
}

// stamp formats a replicated time for messages (UTC, so every node says the
// same).
func stamp(ts *timestamppb.Timestamp) string {
	if ts == nil {
		return "-"
	}
	return ts.AsTime().UTC().Format("2006-01-02 15:04:05 UTC")
}

// ----- reads -----

// Hosts lists the hosts by name.
func (s *State) Hosts() []*mailv1.Host {
	out := make([]*mailv1.Host, 0, len(s.hosts))
	for _, name := range slices.Sorted(maps.Keys(s.hosts)) {
		out = append(out, s.hosts[name])
	}
	return out
}

// Host returns one host.
func (s *State) Host(name string) (*mailv1.Host, bool) {
	h, ok := s.hosts[name]
	return h, ok
}

// History returns the newest limit changes (all when limit is 0) of one
// host, or of all when host is "", oldest first.
func (s *State) History(host string, limit int) []*mailv1.HistoryEntry {
	var out []*mailv1.HistoryEntry
	for _, e := range s.history {
		if host == "" || e.GetHost() == host {
			out = append(out, e)
		}
	}
	if limit > 0 && len(out) > limit {
		out = out[len(out)-limit:]
	}
	return out
}

// MXSet is the MX set: the active hosts, by priority, then name.
func (s *State) MXSet() []*mailv1.MXRecord {
	return MXSet(s.Hosts())
}

// MXSet returns the MX records of the active hosts among hosts, by
// priority, then name.
func MXSet(hosts []*mailv1.Host) []*mailv1.MXRecord {
	var out []*mailv1.MXRecord
	for _, h := range hosts {
		if h.GetState() == mailv1.HostState_HOST_STATE_ACTIVE {
			out = append(out, &mailv1.MXRecord{Host: h.GetName(), Priority: h.GetPriority(), Address: h.GetAddress()})
		}
	}
	slices.SortFunc(out, func(a, b *mailv1.MXRecord) int {
		if a.GetPriority() != b.GetPriority() {
			return int(a.GetPriority()) - int(b.GetPriority())
		}
		return strings.Compare(a.GetHost(), b.GetHost())
	})
	return out
}

// Overdue lists the draining hosts whose deadline passed by now and which
// are not marked overdue yet.
func (s *State) Overdue(now time.Time) []*mailv1.Host {
	var out []*mailv1.Host
	for _, h := range s.Hosts() {
		if h.GetState() == mailv1.HostState_HOST_STATE_DRAINING && !h.GetOverdue() && !now.Before(h.GetDeadline().AsTime()) {
			out = append(out, h)
		}
	}
	return out
}

// ----- snapshots -----

// Snapshot returns a copy of the state for a Raft snapshot; later applies
// do not change what it returns.
func (s *State) Snapshot() *mailv1.Snapshot {
	return &mailv1.Snapshot{Hosts: s.Hosts(), History: slices.Clone(s.history)}
}

// Restore builds a state from a snapshot.
func Restore(snap *mailv1.Snapshot) (*State, error) {
	s := NewState()
	for _, h := range snap.GetHosts() {
		if err := ValidateName(h.GetName()); err != nil {
			return nil, fmt.Errorf("mail snapshot: %w", err)
		}
		if _, dup := s.hosts[h.GetName()]; dup {
			return nil, fmt.Errorf("mail snapshot: host %q appears twice", h.GetName())
		}
		s.hosts[h.GetName()] = h
	}
	s.history = slices.Clone(snap.GetHistory())
	if n := len(s.history) - MaxHistory; n > 0 {
		s.history = s.history[n:]
	}
	return s, nil
}

// SilentAfter is how many of its report intervals an agent may go without
// reporting before its host is flagged: its Postfix may no longer follow
// the state.
const SilentAfter = 3

// DefaultReportInterval is the agent's report interval when it did not
// announce one.
const DefaultReportInterval = time.Minute

// AgentSilence says whether the agent of h has gone silent by now: no
// report for SilentAfter of its report intervals, or none ever (since is
// then 0). A silent agent's Postfix is unchanged by drains and undrains
// until it reports again.
func AgentSilence(h *mailv1.Host, now time.Time) (since time.Duration, silent bool) {
	if h.GetQueueReportedAt() == nil {
		return 0, true
	}
	every := h.GetAgentReportInterval().AsDuration()
	if every <= 0 {
		every = DefaultReportInterval
	}
	since = now.Sub(h.GetQueueReportedAt().AsTime())
	return since, since > SilentAfter*every
}
