package main

import (
	"fmt"
	"io"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	clusterv1 "github.com/gitraft/gitraft/proto/gitraft/cluster/v1"
)

// newClusterCmd is `gitraft cluster`: status and membership of the Raft group.
func newClusterCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cluster",
		Short: "Show and change the cluster's members",
	}
	cmd.AddCommand(newClusterStatusCmd(g), newClusterJoinCmd(g), newClusterRemoveCmd(g), newClusterTransferCmd(g), newClusterKnownHostsCmd(g), newClusterHostKeyCmd(g))
	return cmd
}

func newClusterStatusCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show the members, the leader and each member's view of Raft",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := clusterv1.NewClusterServiceClient(conn).GetStatus(ctx, &clusterv1.GetStatusRequest{})
			if err != nil {
				return rpcError("get cluster status", err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			return writeClusterStatus(cmd.OutOrStdout(), resp, time.Now())
		},
	}
}

// writeClusterStatus prints a GetStatusResponse for people.
func writeClusterStatus(w io.Writer, resp *clusterv1.GetStatusResponse, now time.Time) error {
	leader := "none (no leader known: is a majority of nodes up?)"
	if resp.GetLeaderId() != "" || resp.GetLeaderAddr() != "" {
		leader = resp.GetLeaderId()
		if resp.GetLeaderAddr() != "" {
			leader += " (raft " + resp.GetLeaderAddr() + ")"
		}
	}
	fmt.Fprintf(w, "answered by %s (%s); leader %s; term %d, commit index %d, applied index %d\n",
		resp.GetNodeId(), orDash(resp.GetState()), leader, resp.GetTerm(), resp.GetCommitIndex(), resp.GetAppliedIndex())
	if resp.GetLeaderId() != resp.GetNodeId() && validTime(resp.GetLastLeaderContact()) {
		fmt.Fprintf(w, "last heard from the leader %s\n", ago(now, resp.GetLastLeaderContact()))
	}
	if resp.GetHalted() != "" {
		fmt.Fprintf(w, "%s is HALTED: %s\n", resp.GetNodeId(), resp.GetHalted())
	}
	fmt.Fprintln(w)
	t := newTable(w, "ID", "ADDRESS", "GRPC", "STATE", "VOTER", "APPLIED", "VERSION", "LAST CONTACT", "ERROR")
	var halted, filling []*clusterv1.Member
	for _, m := range resp.GetMembers() {
		state, applied := "unreachable", "-"
		if m.GetReachable() {
			state, applied = orDash(m.GetState()), strconv.FormatUint(m.GetAppliedIndex(), 10)
		}
		if m.GetHalted() != "" {
			state += " HALTED"
			halted = append(halted, m)
		}
		contact := "-"
		if !m.GetLeader() {
			contact = ago(now, m.GetLastContact())
		}
		errText := m.GetError()
		if isTransportMessage(errText) {
			errText = transportDetail(errText)
		}
		if errText == "" && m.GetHalted() != "" {
			errText = fmt.Sprintf("upgrade this node (halted at index %d)", m.GetHaltedIndex())
		}
		voter := suffrageText(m.GetSuffrage())
		if f := m.GetFill(); f != nil {
			voter += fmt.Sprintf(" (filling: %d/%d repos)", f.GetReposCurrent(), f.GetReposTotal())
			filling = append(filling, m)
		}
		t.row(m.GetId(), m.GetRaftAddr(), m.GetGrpcAddr(), state, voter, applied, orDash(m.GetVersion()), contact, errText)
	}
	if err := t.flush(); err != nil {
		return err
	}
	if len(filling) > 0 {
		fmt.Fprintln(w)
	}
	for _, m := range filling {
		why := "nothing: the leader promotes it at its next check"
		if f := m.GetFill(); f.GetWaitingFor() != "" {
			why = f.GetWaitingFor()
		}
		fmt.Fprintf(w, "%s is not a voter yet: it becomes one once it holds every repository at its committed version; waiting for %s\n", m.GetId(), why)
	}
	for _, m := range resp.GetMembers() {
		if d := m.GetReposDamaged(); d > 0 {
			fmt.Fprintf(w, "\n%s: %d repository copies damaged, healing from a peer (they serve no reads meanwhile; gitraft repo show NAME)\n", m.GetId(), d)
		}
	}
	if len(halted) > 0 {
		fmt.Fprintln(w)
	}
	for _, m := range halted {
		v := ""
		if m.GetVersion() != "" {
			v = " (gitraft " + m.GetVersion() + ")"
		}
		fmt.Fprintf(w, "%s%s applies nothing from index %d on: %s\n", m.GetId(), v, m.GetHaltedIndex(), m.GetHalted())
	}
	if msg := resp.GetSshHostKeyMismatch(); msg != "" {
		fmt.Fprintf(w, "\nWARNING: %s. Give every node the same git.host_key_files.\n", msg)
	}
	return nil
}

func suffrageText(s clusterv1.Suffrage) string {
	switch s {
	case clusterv1.Suffrage_SUFFRAGE_VOTER:
		return "yes"
	case clusterv1.Suffrage_SUFFRAGE_NONVOTER:
		return "no"
	case clusterv1.Suffrage_SUFFRAGE_STAGING:
		return "staging"
	}
	return "-"
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func newClusterJoinCmd(g *globalOpts) *cobra.Command {
	var req clusterv1.AddMemberRequest
	cmd := &cobra.Command{
		Use:   "join --id ID --raft-addr HOST:PORT --grpc-addr HOST:PORT",
		Short: "Add a node to the cluster (as a non-voter until it holds every repository)",
		Long: `Add a node to the cluster. The request goes to the node at --addr and runs
on the leader. Start the new node first (without bootstrapping), then join it
with the addresses other nodes reach it at.

The node joins as a non-voter: it receives the log and fills its disk from
its peers without counting toward the quorum, and cannot become leader. The
leader promotes it to voter once it holds every repository at its committed
version; gitraft cluster status shows its progress ("filling: 120/10001
repos"). Joining a member again with the same ID and address changes nothing.`,
		Example: "  gitraft cluster join --id n4 --raft-addr 10.0.0.4:7101 --grpc-addr 10.0.0.4:7102",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := clusterv1.NewClusterServiceClient(conn).AddMember(ctx, &req)
			if err != nil {
				return rpcError("add member "+req.GetId(), err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "added %s (raft %s) at index %d; it becomes a voter once it holds every repository (see gitraft cluster status)\n", req.GetId(), req.GetRaftAddr(), resp.GetIndex())
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&req.Id, "id", "", "the new node's ID (its node_id)")
	f.StringVar(&req.RaftAddr, "raft-addr", "", "address (host:port) other nodes reach its Raft transport at")
	f.StringVar(&req.GrpcAddr, "grpc-addr", "", "address (host:port) of its gRPC API")
	f.StringVar(&req.HttpAddr, "http-addr", "", "address (host:port) of its HTTP server (optional)")
	f.StringVar(&req.SshAddr, "ssh-addr", "", "address (host:port) of its SSH server (optional)")
	for _, name := range []string{"id", "raft-addr", "grpc-addr"} {
		_ = cmd.MarkFlagRequired(name)
	}
	return cmd
}

func newClusterRemoveCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "remove ID",
		Short: "Remove a node from the cluster",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := clusterv1.NewClusterServiceClient(conn).RemoveMember(ctx, &clusterv1.RemoveMemberRequest{Id: args[0]})
			if err != nil {
				return rpcError("remove member "+args[0], err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed %s at index %d\n", args[0], resp.GetIndex())
			return nil
		},
	}
}

func newClusterTransferCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "transfer-leader [ID]",
		Short: "Hand leadership to another voter (to ID, or the most up-to-date one)",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			req := &clusterv1.TransferLeadershipRequest{}
			what := "transfer leadership"
			if len(args) == 1 {
				req.Id = args[0]
				what += " to " + args[0]
			}
			resp, err := clusterv1.NewClusterServiceClient(conn).TransferLeadership(ctx, req)
			if err != nil {
				return rpcError(what, err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "leader is now %s\n", resp.GetLeaderId())
			return nil
		},
	}
}
