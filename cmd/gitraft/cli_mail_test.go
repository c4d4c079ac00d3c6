package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	mailv1 "github.com/gitraft/gitraft/proto/gitraft/mail/v1"
)

func Test_WriteMailHosts(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	ts := func(d time.Duration) *timestamppb.Timestamp { return timestamppb.New(now.Add(d)) }
	hosts := []*mailv1.Host{
		{Name: "mx1", Address: "mx1.example.org", Priority: 10, State: mailv1.HostState_HOST_STATE_ACTIVE, QueueSize: 4, QueueReportedAt: ts(-3 * time.Second), QueueReportedBy: "agent:n3"},
		{Name: "mx2", Address: "mx2.example.org", Priority: 20, State: mailv1.HostState_HOST_STATE_DRAINING, Deadline: ts(30 * time.Minute), Reason: "kernel update"},
		{Name: "mx3", Address: "mx3.example.org", Priority: 20, State: mailv1.HostState_HOST_STATE_DRAINING, Deadline: ts(-2 * time.Minute), Overdue: true, HandoffPeer: "mx1"},
		{Name: "mx4", Address: "mx4.example.org", Priority: 30, State: mailv1.HostState_HOST_STATE_DRAINED, StateChangedAt: ts(-time.Hour), QueueReportedAt: ts(-time.Minute), QueueReportedBy: "agent:n2", AgentReportInterval: durationpb.New(10 * time.Second)},
	}
	var b bytes.Buffer
	if err := writeMailHosts(&b, hosts, now); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 5 || !strings.HasPrefix(lines[0], "HOST") {
		t.Fatalf("table:\n%s", b.String())
	}
	for i, want := range [][]string{
		{"mx1", "active", "4 (3s ago)", " n3 "},
		{"mx2", "draining", "in 30m", "kernel update", "NONE"},
		{"mx3", "draining (overdue), handed to mx1", "overdue 2m"},
		{"mx4", "drained", "0 (1m ago)", "drained 1h ago", "SILENT 1m (n2)"},
	} {
		for _, w := range want {
			if !strings.Contains(lines[i+1], w) {
				t.Errorf("row %d %q lacks %q", i+1, lines[i+1], w)
			}
		}
	}
	b.Reset()
	writeMailHosts(&b, nil, now)
	if !strings.Contains(b.String(), "no mail hosts") {
		t.Fatalf("empty: %q", b.String())
	}
}

func Test_WriteMailHistory(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	var b bytes.Buffer
	err := writeMailHistory(&b, []*mailv1.HistoryEntry{
		{Index: 7, Time: timestamppb.New(now), Host: "mx2", Event: mailv1.Event_EVENT_DRAIN, From: mailv1.HostState_HOST_STATE_ACTIVE, To: mailv1.HostState_HOST_STATE_DRAINING, By: "admin:alice", Reason: "disk"},
		{Index: 9, Time: timestamppb.New(now), Host: "mx2", Event: mailv1.Event_EVENT_OVERDUE, From: mailv1.HostState_HOST_STATE_DRAINING, To: mailv1.HostState_HOST_STATE_DRAINING, By: "leader:n1"},
	})
	if err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"active -> draining", "admin:alice", "disk", "overdue", "leader:n1"} {
		if !strings.Contains(out, want) {
			t.Errorf("history lacks %q:\n%s", want, out)
		}
	}
}

// Mail settings that make no sense together stop the node at start, with
// the setting to fix.
func Test_MailSettingsRefused(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, tc := range []struct {
		m    mailSettings
		want string
	}{
		{mailSettings{OnChange: "true"}, "mail.on_change needs mail.mx_zone_file"},
		{mailSettings{Address: "mx2.example.org"}, "mail.address is set but mail.host is not"},
		{mailSettings{HandoffPeers: []string{"mx1"}}, "mail.handoff_peers is set but mail.host is not"},
		{mailSettings{MXZoneFile: "mx.zone"}, "absolute path"},
		{mailSettings{Host: "mx2", Priority: 70000}, "mail.priority"},
	} {
		err := startMailAgent(context.Background(), fileConfig{NodeID: "n1", DataDir: t.TempDir(), Mail: tc.m}, nil, log)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.m, err, tc.want)
		}
	}
}

func Test_AgentWarning(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	h := &mailv1.Host{Name: "mx2", QueueReportedAt: timestamppb.New(now.Add(-25 * time.Second)), AgentReportInterval: durationpb.New(10 * time.Second)}
	if w := agentWarning(h, now); w != "" {
		t.Fatalf("25s with a 10s interval is not silent yet: %q", w)
	}
	h.QueueReportedAt = timestamppb.New(now.Add(-40 * time.Second))
	if w := agentWarning(h, now); !strings.Contains(w, "recorded, but the agent on mx2 has not reported for 40s; Postfix there is unchanged until it comes back") {
		t.Fatalf("silent: %q", w)
	}
	if w := agentWarning(&mailv1.Host{Name: "mx2"}, now); !strings.Contains(w, "no agent has ever reported for mx2") {
		t.Fatalf("never reported: %q", w)
	}
}
