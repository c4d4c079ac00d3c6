package cluster

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	mailv1 "github.com/gitraft/gitraft/proto/gitraft/mail/v1"
)

func mailHost(t *testing.T, n *Node, name string) *mailv1.Host {
	t.Helper()
	hosts, err := n.MailHosts(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hosts {
		if h.GetName() == name {
			return h
		}
	}
	t.Fatalf("%s: no mail host %s", n.ID(), name)
	return nil
}

// The MailService through a follower: writes reach the leader, refusals
// become status codes with reasons, and the MX set follows the drain.
func Test_Mail_ServiceThroughFollower(t *testing.T) {
	c := mustNewCluster(t, 3)
	s := &mailService{n: c.follower()}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, h := range []struct {
		name string
		prio uint32
	}{{"mx1", 10}, {"mx2", 20}} {
		if _, err := s.AddHost(ctx, &mailv1.AddHostRequest{Name: h.name, Address: h.name + ".example.org", Priority: h.prio}); err != nil {
			t.Fatal(err)
		}
	}
	code := func(err error) codes.Code { return status.Code(toStatus(err)) }
	if _, err := s.AddHost(ctx, &mailv1.AddHostRequest{Name: "mx3", Address: "bad address"}); code(err) != codes.InvalidArgument {
		t.Fatalf("bad address: %v", err)
	}
	_, err := s.Drain(ctx, &mailv1.DrainRequest{Name: "mx9"})
	if code(err) != codes.NotFound || !strings.Contains(err.Error(), "known hosts: mx1, mx2") {
		t.Fatalf("unknown host: %v", err)
	}
	if _, err := s.Drain(ctx, &mailv1.DrainRequest{Name: "mx1", Deadline: durationpb.New(-time.Second)}); code(err) != codes.InvalidArgument {
		t.Fatalf("negative deadline: %v", err)
	}
	d, err := s.Drain(ctx, &mailv1.DrainRequest{Name: "mx2", Reason: "disk swap"})
	if err != nil || !d.GetChanged() || d.GetHost().GetState() != mailv1.HostState_HOST_STATE_DRAINING {
		t.Fatalf("drain: %v %v", d, err)
	}
	if got := d.GetHost().GetDeadline().AsTime().Sub(d.GetHost().GetDrainStartedAt().AsTime()); got != DefaultDrainDeadline {
		t.Fatalf("default deadline %s", got)
	}
	// Without a deadline, draining again changes nothing; with one, it
	// moves the deadline.
	if again, err := s.Drain(ctx, &mailv1.DrainRequest{Name: "mx2"}); err != nil || again.GetChanged() {
		t.Fatalf("drain again: %v %v", again, err)
	}
	moved, err := s.Drain(ctx, &mailv1.DrainRequest{Name: "mx2", Deadline: durationpb.New(3 * time.Hour)})
	if err != nil || !moved.GetChanged() || moved.GetHost().GetDrainId() != d.GetHost().GetDrainId() ||
		moved.GetHost().GetDeadline().AsTime().Sub(d.GetHost().GetDeadline().AsTime()) < 2*time.Hour {
		t.Fatalf("move the deadline: %v %v", moved, err)
	}
	_, err = s.Drain(ctx, &mailv1.DrainRequest{Name: "mx1"})
	if code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "last active mail host") {
		t.Fatalf("last active host: %v", err)
	}
	mxs, err := s.GetMXSet(ctx, &mailv1.GetMXSetRequest{})
	if err != nil || len(mxs.GetRecords()) != 1 || mxs.GetRecords()[0].GetHost() != "mx1" || strings.Contains(mxs.GetZoneFragment(), "mx2") {
		t.Fatalf("MX set while mx2 drains: %v %v", mxs, err)
	}
	hist, err := s.GetHistory(ctx, &mailv1.GetHistoryRequest{Host: "mx2"})
	if err != nil || len(hist.GetEntries()) != 3 || hist.GetEntries()[1].GetBy() != "client" || hist.GetEntries()[1].GetReason() != "disk swap" {
		t.Fatalf("history: %v %v", hist, err)
	}
	if _, err := s.GetHistory(ctx, &mailv1.GetHistoryRequest{Host: "nope"}); code(err) != codes.NotFound {
		t.Fatalf("history of an unknown host: %v", err)
	}
	if u, err := s.Undrain(ctx, &mailv1.UndrainRequest{Name: "mx2"}); err != nil || u.GetHost().GetState() != mailv1.HostState_HOST_STATE_ACTIVE {
		t.Fatalf("undrain: %v %v", u, err)
	}
	l, err := s.ListHosts(ctx, &mailv1.ListHostsRequest{})
	if err != nil || len(l.GetHosts()) != 2 {
		t.Fatalf("list: %v %v", l, err)
	}
	c.waitSameState()
}

// waitSameState waits until every node holds the same state.
func (c *testCluster) waitSameState() {
	c.t.Helper()
	waitFor(c.t, "the same state on every node", 10*time.Second, func() bool {
		var first []byte
		for _, n := range c.nodes {
			b := stateOf(c.t, n)
			if first == nil {
				first = b
			} else if string(b) != string(first) {
				return false
			}
		}
		return true
	})
}

// The leader marks a drain past its deadline overdue, once, and a new
// leader does not mark it again.
func Test_Mail_OverdueMarkedOnce(t *testing.T) {
	c := mustNewCluster(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s := &mailService{n: c.any()}
	for _, name := range []string{"mx1", "mx2", "mx3"} {
		if _, err := s.AddHost(ctx, &mailv1.AddHostRequest{Name: name, Address: name + ".example.org", Priority: 10}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Drain(ctx, &mailv1.DrainRequest{Name: "mx2", Deadline: durationpb.New(200 * time.Millisecond)}); err != nil {
		t.Fatal(err)
	}
	for _, n := range c.nodes {
		waitFor(t, n.ID()+" sees the overdue drain", 10*time.Second, func() bool { return mailHost(t, n, "mx2").GetOverdue() })
	}
	old := c.waitLeader()
	c.stop(old.ID())
	next := c.waitLeader()
	// Once the new leader marked another drain overdue, its loop has
	// passed over mx2's drain too.
	s = &mailService{n: next}
	if _, err := s.Drain(ctx, &mailv1.DrainRequest{Name: "mx3", Deadline: durationpb.New(100 * time.Millisecond)}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the new leader to mark mx3 overdue", 10*time.Second, func() bool { return mailHost(t, next, "mx3").GetOverdue() })
	hist, err := s.GetHistory(ctx, &mailv1.GetHistoryRequest{Host: "mx2"})
	if err != nil {
		t.Fatal(err)
	}
	overdue := 0
	for _, e := range hist.GetEntries() {
		if e.GetEvent() == mailv1.Event_EVENT_OVERDUE {
			overdue++
			if !strings.HasPrefix(e.GetBy(), "leader:") {
				t.Errorf("overdue recorded by %q", e.GetBy())
			}
		}
	}
	if overdue != 1 {
		t.Fatalf("%d overdue entries, want 1: %v", overdue, hist.GetEntries())
	}
	if h := mailHost(t, next, "mx2"); h.GetState() != mailv1.HostState_HOST_STATE_DRAINING {
		t.Fatalf("an overdue drain must go on, not be dropped: %v", h)
	}
}
