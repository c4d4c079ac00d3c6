package main

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gitraft/gitraft/cluster"
	"github.com/gitraft/gitraft/cluster/mail"
	mailv1 "github.com/gitraft/gitraft/proto/gitraft/mail/v1"
)

// newMailCmd is `gitraft mail`: the forge's MX hosts and their drain state.
func newMailCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "mail",
		Short: "Drain, flush and return MX hosts",
		Long: `Mail hosts (MX) and their drain state, held by the cluster.

A draining host is out of the MX set at once (mail.mx_zone_file on every node
that sets it, and gitraft mail mx). Its agent (gitraft serve with mail.host)
has Postfix answer new mail with 4xx, flushes the queue, and reports its
size; the host is drained once the queue is empty and no SMTP session from
before the drain is open. gitraft mail undrain puts it back. A host whose
agent has not reported for 3 of its report intervals is shown as SILENT:
its Postfix does not follow drains and undrains until the agent is back.`,
	}
	cmd.AddCommand(newMailListCmd(g), newMailAddCmd(g), newMailRemoveCmd(g), newMailDrainCmd(g),
		newMailUndrainCmd(g), newMailHistoryCmd(g), newMailMXCmd(g))
	return cmd
}

func newMailListCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use: "ls", Aliases: []string{"list"}, Short: "List the mail hosts with their state and queue", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := mailv1.NewMailServiceClient(conn).ListHosts(ctx, &mailv1.ListHostsRequest{})
			if err != nil {
				return rpcError("list mail hosts", err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			return writeMailHosts(cmd.OutOrStdout(), resp.GetHosts(), time.Now())
		},
	}
}

// stateWord names a host state for people: active, draining, drained.
func stateWord(s mailv1.HostState) string {
	return strings.ToLower(strings.TrimPrefix(s.String(), "HOST_STATE_"))
}

// writeMailHosts prints hosts as a table, or "no mail hosts".
func writeMailHosts(w io.Writer, hosts []*mailv1.Host, now time.Time) error {
	if len(hosts) == 0 {
		_, err := fmt.Fprintln(w, "no mail hosts (add one: gitraft mail add NAME --address mx1.example.org)")
		return err
	}
	t := newTable(w, "HOST", "ADDRESS", "PRIORITY", "STATE", "QUEUE", "AGENT", "DEADLINE", "REASON")
	for _, h := range hosts {
		state := stateWord(h.GetState())
		deadline := ""
		switch h.GetState() {
		case mailv1.HostState_HOST_STATE_DRAINING:
			deadline = expiresIn(now, h.GetDeadline())
			if h.GetOverdue() || deadline == "expired" {
				state += " (overdue)"
				deadline = "overdue " + humanDuration(now.Sub(h.GetDeadline().AsTime()))
			}
			if h.GetHandoffPeer() != "" {
				state += ", handed to " + h.GetHandoffPeer()
			}
			if n := h.GetOldSessions(); n > 0 {
				state += fmt.Sprintf(", %d SMTP %s from before the drain open", n, plural(int(n), "session", "sessions"))
			}
		case mailv1.HostState_HOST_STATE_DRAINED:
			deadline = "drained " + ago(now, h.GetStateChangedAt())
		}
		queue := ""
		if validTime(h.GetQueueReportedAt()) {
			queue = fmt.Sprintf("%d (%s)", h.GetQueueSize(), ago(now, h.GetQueueReportedAt()))
		}
		t.row(h.GetName(), h.GetAddress(), strconv.Itoa(int(h.GetPriority())), state, queue, agentWord(h, now), deadline, h.GetReason())
	}
	return t.flush()
}

// agentWord says how the host's agent is doing: "n3", or "SILENT 5m (n3)"
// when it has not reported for mail.SilentAfter of its report intervals,
// or "NONE" when no agent ever reported.
func agentWord(h *mailv1.Host, now time.Time) string {
	since, silent := mail.AgentSilence(h, now)
	by := strings.TrimPrefix(h.GetQueueReportedBy(), "agent:")
	switch {
	case !validTime(h.GetQueueReportedAt()):
		return "NONE"
	case silent:
		return "SILENT " + humanDuration(since) + " (" + by + ")"
	}
	return by
}

// agentWarning is what a drain or undrain of h must add when the host's
// agent is silent: the change is recorded, but Postfix does not follow it
// yet. "" when the agent reports.
func agentWarning(h *mailv1.Host, now time.Time) string {
	since, silent := mail.AgentSilence(h, now)
	switch {
	case !silent:
		return ""
	case !validTime(h.GetQueueReportedAt()):
		return fmt.Sprintf("recorded, but no agent has ever reported for %s (does a node run gitraft serve with mail.host: %s?); Postfix there is unchanged until one does", h.GetName(), h.GetName())
	}
	return fmt.Sprintf("recorded, but the agent on %s has not reported for %s; Postfix there is unchanged until it comes back", h.GetName(), humanDuration(since))
}

func newMailAddCmd(g *globalOpts) *cobra.Command {
	var address string
	var priority uint32
	cmd := &cobra.Command{
		Use:   "add NAME --address DNSNAME [--priority N]",
		Short: "Add a mail host (active), or change a host's address or priority",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if address == "" {
				return fmt.Errorf("mail add %s: --address is required (the MX target, such as mx1.example.org)", args[0])
			}
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := mailv1.NewMailServiceClient(conn).AddHost(ctx, &mailv1.AddHostRequest{Name: args[0], Address: address, Priority: priority})
			if err != nil {
				return rpcError("add mail host "+strconv.Quote(args[0]), err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			out := cmd.OutOrStdout()
			h := resp.GetHost()
			if !resp.GetChanged() {
				fmt.Fprintln(out, resp.GetNote())
				return nil
			}
			fmt.Fprintf(out, "mail host %s: address %s, priority %d, %s (index %d)\n", h.GetName(), h.GetAddress(), h.GetPriority(), stateWord(h.GetState()), resp.GetIndex())
			return nil
		},
	}
	cmd.Flags().StringVar(&address, "address", "", "the MX target: the host's DNS name")
	cmd.Flags().Uint32Var(&priority, "priority", 10, "the MX priority (lower is preferred)")
	return cmd
}

func newMailRemoveCmd(g *globalOpts) *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use: "rm NAME [--force]", Aliases: []string{"remove"}, Short: "Remove a mail host (drain it first)", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := mailv1.NewMailServiceClient(conn).RemoveHost(ctx, &mailv1.RemoveHostRequest{Name: args[0], Force: force})
			if err != nil {
				return rpcError("remove mail host "+strconv.Quote(args[0]), err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed mail host %s (it was %s) at index %d\n", args[0], stateWord(resp.GetRemoved().GetState()), resp.GetIndex())
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "remove even the last active host")
	return cmd
}

func newMailDrainCmd(g *globalOpts) *cobra.Command {
	var deadline, waitTimeout time.Duration
	var reason string
	var force, wait bool
	cmd := &cobra.Command{
		Use:   "drain HOST [--deadline D] [--reason R] [--force] [--wait]",
		Short: "Take a mail host out of the MX set and flush its queue",
		Long: `Take a mail host out of the MX set at once. Its agent has Postfix answer new
mail with 4xx (senders try the next MX), flushes the queue and reports its
size. The host is drained once its queue is empty and every SMTP session
opened before the drain has ended: then it is safe to work on. --wait blocks
until then, printing the queue as the agent reports it.

A drain past its deadline (default 1h) is reported (gitraft mail ls, the
history, the leader's log) and goes on; if the host's agent has
mail.handoff_peers, it hands the leftover mail to an active peer.
--deadline on a host that is already draining moves its deadline to now
plus D (an overdue drain is then no longer overdue nor handed off).

The last active host cannot be drained without --force; with --force the MX
set is empty, and senders fall back to the domain's A record (RFC 5321),
which is rarely a mail server. Draining a host that is draining (without
--deadline) or drained changes nothing.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &mailv1.DrainRequest{Name: args[0], Reason: reason, Force: force}
			if cmd.Flags().Changed("deadline") {
				if deadline <= 0 {
					return fmt.Errorf("mail drain %s: --deadline %s: must be positive, such as 30m or 2h", args[0], deadline)
				}
				req.Deadline = durationpb.New(deadline)
			}
			var ctx context.Context
			var conn *grpc.ClientConn
			var done func()
			var err error
			if wait {
				limit := waitTimeout
				if limit <= 0 {
					limit = mail.MaxDeadline + 24*time.Hour
				}
				ctx, conn, done, err = g.longConn(cmd, limit)
			} else {
				ctx, conn, done, err = g.connect(cmd)
			}
			if err != nil {
				return err
			}
			defer done()
			c := mailv1.NewMailServiceClient(conn)
			rctx, cancel := ctx, context.CancelFunc(func() {})
			if wait {
				rctx, cancel = g.rpcCtx(ctx)
			}
			resp, err := c.Drain(rctx, req)
			cancel()
			if err != nil {
				return rpcError("drain mail host "+strconv.Quote(args[0]), err)
			}
			if g.JSON {
				if err := printProtoJSON(cmd.OutOrStdout(), resp); err != nil || !wait {
					return err
				}
				return waitDrained(ctx, g, io.Discard, c, resp.GetHost())
			}
			out := cmd.OutOrStdout()
			h := resp.GetHost()
			now := time.Now()
			switch {
			case !resp.GetChanged():
				fmt.Fprintln(out, resp.GetNote())
			case resp.GetNote() != "":
				fmt.Fprintf(out, "%s (index %d)\n", resp.GetNote(), resp.GetIndex())
			default:
				queue := "no queue reported yet"
				if validTime(h.GetQueueReportedAt()) {
					queue = fmt.Sprintf("%d messages as reported %s", h.GetQueueSize(), ago(now, h.GetQueueReportedAt()))
				}
				fmt.Fprintf(out, "mail host %s is draining (index %d): out of the MX set now; its agent refuses new mail with 4xx and flushes the queue (%s)\n", h.GetName(), resp.GetIndex(), queue)
				fmt.Fprintf(out, "deadline %s (%s); it is drained once its queue is empty: gitraft mail ls, or --wait\n",
					h.GetDeadline().AsTime().Local().Format("2006-01-02 15:04:05 MST"), expiresIn(now, h.GetDeadline()))
			}
			if w := agentWarning(h, now); w != "" && h.GetState() == mailv1.HostState_HOST_STATE_DRAINING {
				fmt.Fprintln(cmd.ErrOrStderr(), "warning: "+w)
			}
			if !wait {
				return nil
			}
			return waitDrained(ctx, g, out, c, h)
		},
	}
	cmd.Flags().DurationVar(&deadline, "deadline", cluster.DefaultDrainDeadline, "how long the queue may take to flush; on a draining host, moves its deadline to now plus this")
	cmd.Flags().StringVar(&reason, "reason", "", "why, for the history")
	cmd.Flags().BoolVar(&force, "force", false, "drain even the last active host (the MX set becomes empty: mail falls back to the domain's A record)")
	cmd.Flags().BoolVar(&wait, "wait", false, "block until the host is drained, printing the queue as it is reported")
	cmd.Flags().DurationVar(&waitTimeout, "wait-timeout", 0, "with --wait, give up waiting after this long (0: no limit); the drain goes on")
	return cmd
}

// waitDrained polls the host until it is drained, printing its queue and
// open sessions from before the drain whenever the agent reports them. It
// fails when the drain ends otherwise (undrained, removed, another drain).
func waitDrained(ctx context.Context, g *globalOpts, w io.Writer, c mailv1.MailServiceClient, h *mailv1.Host) error {
	start := time.Now()
	id := h.GetDrainId()
	last := ""
	var lastErr error
	for {
		if h != nil {
			switch {
			case h.GetState() == mailv1.HostState_HOST_STATE_DRAINED && h.GetDrainId() == id:
				fmt.Fprintf(w, "  %6.1fs  mail host %s is drained: its queue is empty and no session from before the drain is open\n", time.Since(start).Seconds(), h.GetName())
				return nil
			case h.GetState() != mailv1.HostState_HOST_STATE_DRAINING || h.GetDrainId() != id:
				return fmt.Errorf("mail host %s is %s now (drain %d ended without draining): see gitraft mail history %s", h.GetName(), stateWord(h.GetState()), id, h.GetName())
			}
			line := "no queue reported yet"
			if validTime(h.GetQueueReportedAt()) {
				line = fmt.Sprintf("queue %d", h.GetQueueSize())
			}
			if n := h.GetOldSessions(); n > 0 {
				line += fmt.Sprintf(", %d SMTP %s from before the drain open", n, plural(int(n), "session", "sessions"))
			}
			if h.GetOverdue() {
				line += ", overdue"
			}
			if h.GetHandoffPeer() != "" {
				line += ", handed to " + h.GetHandoffPeer()
			}
			if since, silent := mail.AgentSilence(h, time.Now()); silent && validTime(h.GetQueueReportedAt()) {
				line += ", agent silent for " + humanDuration(since)
			}
			if line != last {
				fmt.Fprintf(w, "  %6.1fs  %s\n", time.Since(start).Seconds(), line)
				last = line
			}
		}
		select {
		case <-ctx.Done():
			if lastErr != nil {
				return rpcError("waiting for the drain (it goes on; see gitraft mail ls)", lastErr)
			}
			return fmt.Errorf("gave up waiting after %s; the drain goes on: gitraft mail ls", time.Since(start).Round(time.Second))
		case <-time.After(500 * time.Millisecond):
		}
		rctx, cancel := g.rpcCtx(ctx)
		resp, err := c.ListHosts(rctx, &mailv1.ListHostsRequest{})
		cancel()
		if err != nil {
			lastErr = err // a leader change answers Unavailable for a moment
			continue
		}
		name := h.GetName()
		h = nil
		for _, x := range resp.GetHosts() {
			if x.GetName() == name {
				h = x
			}
		}
		if h == nil {
			return fmt.Errorf("mail host %s was removed while draining", name)
		}
	}
}

func newMailUndrainCmd(g *globalOpts) *cobra.Command {
	var reason string
	cmd := &cobra.Command{
		Use: "undrain HOST [--reason R]", Short: "Put a mail host back into the MX set", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := mailv1.NewMailServiceClient(conn).Undrain(ctx, &mailv1.UndrainRequest{Name: args[0], Reason: reason})
			if err != nil {
				return rpcError("undrain mail host "+strconv.Quote(args[0]), err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			if !resp.GetChanged() {
				fmt.Fprintln(cmd.OutOrStdout(), resp.GetNote())
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "mail host %s is active (index %d): back in the MX set; its agent takes new mail again\n", args[0], resp.GetIndex())
			if w := agentWarning(resp.GetHost(), time.Now()); w != "" {
				fmt.Fprintln(cmd.ErrOrStderr(), "warning: "+w)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&reason, "reason", "", "why, for the history")
	return cmd
}

func newMailHistoryCmd(g *globalOpts) *cobra.Command {
	var limit uint32
	cmd := &cobra.Command{
		Use: "history [HOST] [--limit N]", Short: "Show the changes of the mail hosts, oldest first", Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			req := &mailv1.GetHistoryRequest{Limit: limit}
			if len(args) == 1 {
				req.Host = args[0]
			}
			resp, err := mailv1.NewMailServiceClient(conn).GetHistory(ctx, req)
			if err != nil {
				return rpcError("mail history", err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			return writeMailHistory(cmd.OutOrStdout(), resp.GetEntries())
		},
	}
	cmd.Flags().Uint32Var(&limit, "limit", 50, "show at most the newest N changes (0: all kept, up to 1000)")
	return cmd
}

func writeMailHistory(w io.Writer, entries []*mailv1.HistoryEntry) error {
	if len(entries) == 0 {
		_, err := fmt.Fprintln(w, "no mail host changes")
		return err
	}
	t := newTable(w, "TIME", "INDEX", "HOST", "EVENT", "STATE", "BY", "REASON")
	for _, e := range entries {
		change := stateWord(e.GetTo())
		if e.GetFrom() != e.GetTo() && e.GetFrom() != mailv1.HostState_HOST_STATE_UNSPECIFIED {
			change = stateWord(e.GetFrom()) + " -> " + stateWord(e.GetTo())
		}
		if e.GetTo() == mailv1.HostState_HOST_STATE_UNSPECIFIED {
			change = "" // removed
		}
		t.row(e.GetTime().AsTime().Local().Format("2006-01-02 15:04:05"), strconv.FormatUint(e.GetIndex(), 10), e.GetHost(),
			strings.ToLower(strings.TrimPrefix(e.GetEvent().String(), "EVENT_")), change, e.GetBy(), e.GetReason())
	}
	return t.flush()
}

func newMailMXCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use: "mx", Short: "Print the MX set as the zone-file fragment the nodes write", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := mailv1.NewMailServiceClient(conn).GetMXSet(ctx, &mailv1.GetMXSetRequest{})
			if err != nil {
				return rpcError("MX set", err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			_, err = io.WriteString(cmd.OutOrStdout(), resp.GetZoneFragment())
			return err
		},
	}
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
