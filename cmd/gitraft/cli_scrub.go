package main

import (
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
)

// newRepoScrubCmd is `gitraft repo scrub NAME [--node N]`: the background
// scrub's check of one repository, now.
func newRepoScrubCmd(g *globalOpts) *cobra.Command {
	var node string
	cmd := &cobra.Command{
		Use:   "scrub NAME [--node ID]",
		Short: "Check a repository's copies now, and heal the damaged ones",
		Long: `Check every node's copy of a repository now (or only --node's), as the
background scrub does (git.scrub.interval): every pack and index is read
and checked against its checksums, git fsck --connectivity-only checks that
every object the refs reach is there, and the refs and HEAD are compared
with the replicated state at the copy's version. A damaged copy serves no
reads from then on and is healed at once from a current peer: damaged
packs are set aside (in the repository's gitraft-damaged/), the missing
objects fetched, the refs reset to the committed values.

Exits 0 when every copy checked is sound or was healed, 1 otherwise.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := repov1.NewRepoServiceClient(conn).ScrubRepo(ctx, &repov1.ScrubRepoRequest{Name: args[0], NodeId: node})
			if err != nil {
				return rpcError("scrub repository "+strconv.Quote(args[0]), err)
			}
			if g.JSON {
				if err := printProtoJSON(cmd.OutOrStdout(), resp); err != nil {
					return err
				}
			} else {
				w := cmd.OutOrStdout()
				fmt.Fprintf(w, "%s at version %d\n\n", resp.GetName(), resp.GetVersion())
				if err := printCopyChecks(w, resp.GetCopies()); err != nil {
					return err
				}
			}
			if bad := unsoundCopies(resp.GetCopies()); bad > 0 {
				return fmt.Errorf("%d of %d copies are not sound", bad, len(resp.GetCopies()))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&node, "node", "", "check only this node's copy")
	return cmd
}

// unsoundCopies counts copies that could not be checked or stay damaged.
func unsoundCopies(cs []*repov1.CopyCheck) int {
	bad := 0
	for _, c := range cs {
		if c.GetError() != "" || (len(c.GetFindings()) > 0 && !c.GetHealed()) {
			bad++
		}
	}
	return bad
}

func printCopyChecks(w io.Writer, cs []*repov1.CopyCheck) error {
	t := newTable(w, "NODE", "VERSION", "STATE", "CHECKED", "RESULT")
	for _, c := range cs {
		result := "sound"
		switch {
		case c.GetError() != "":
			result = c.GetError()
		case c.GetHealed():
			result = fmt.Sprintf("damaged, healed (%d findings)", len(c.GetFindings()))
		case len(c.GetFindings()) > 0:
			result = fmt.Sprintf("damaged (%d findings)", len(c.GetFindings()))
		}
		t.row(c.GetNodeId(), strconv.FormatUint(c.GetVersion(), 10), replicaStateText(c.GetState()), byteSize(c.GetBytesChecked()), result)
	}
	if err := t.flush(); err != nil {
		return err
	}
	for _, c := range cs {
		for _, f := range c.GetFindings() {
			fmt.Fprintf(w, "  %s: %s\n", c.GetNodeId(), f)
		}
	}
	return nil
}

// newRepoDataLossCmd is `gitraft repo dataloss`, after Praefect's: which
// repositories fewer than a majority of voters hold.
func newRepoDataLossCmd(g *globalOpts) *cobra.Command {
	var all bool
	cmd := &cobra.Command{
		Use:   "dataloss [NAME] [--all]",
		Short: "List repositories whose committed version fewer than a majority of voters hold",
		Long: `List the repositories whose committed version fewer than a majority of
voters hold whole (every committed ref's object present with its whole
history), with each node's part: "below majority" when some node still
holds it (one more lost disk away from losing acknowledged pushes; the
copies that lack it heal from that node by themselves, see gitraft repo
scrub), "lost" when no node does (the refs name objects that are gone: see
gitraft repo repair NAME --auto). A node that does not answer counts as not
holding. --all lists the healthy repositories too.

Every node's copy of every repository is walked (git rev-list per ref tip),
so on a large forge give a NAME or run it off-peak.

Exits 0 when every repository checked is held by a majority, 2 when some
are below majority or lost (so a cron job or a monitoring check can alarm
on it), 1 when the check itself failed.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &repov1.DataLossRequest{All: all}
			if len(args) == 1 {
				req.Name = args[0]
			}
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := repov1.NewRepoServiceClient(conn).DataLoss(ctx, req)
			if err != nil {
				return rpcError("check for data loss", err)
			}
			var below, lost int
			for _, r := range resp.GetRepos() {
				switch r.GetStatus() {
				case repov1.DataLossStatus_DATA_LOSS_STATUS_BELOW_MAJORITY:
					below++
				case repov1.DataLossStatus_DATA_LOSS_STATUS_LOST:
					lost++
				}
			}
			if g.JSON {
				if err := printProtoJSON(cmd.OutOrStdout(), resp); err != nil {
					return err
				}
			} else if err := printDataLoss(cmd.OutOrStdout(), resp, below, lost); err != nil {
				return err
			}
			if below+lost > 0 {
				return &exitCodeError{code: 2, msg: fmt.Sprintf("%d repositories below a majority of voters, %d lost", below, lost)}
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "list healthy repositories too")
	return cmd
}

func dataLossText(s repov1.DataLossStatus) string {
	switch s {
	case repov1.DataLossStatus_DATA_LOSS_STATUS_HEALTHY:
		return "healthy"
	case repov1.DataLossStatus_DATA_LOSS_STATUS_BELOW_MAJORITY:
		return "below majority"
	case repov1.DataLossStatus_DATA_LOSS_STATUS_LOST:
		return "lost"
	}
	return "-"
}

func printDataLoss(w io.Writer, resp *repov1.DataLossResponse, below, lost int) error {
	if len(resp.GetRepos()) == 0 {
		_, err := fmt.Fprintf(w, "no data loss: a majority of voters hold every one of the %d repositories checked (raft index %d)\n", resp.GetChecked(), resp.GetIndex())
		return err
	}
	t := newTable(w, "REPO", "VERSION", "STATUS", "HELD BY", "NODES")
	for _, r := range resp.GetRepos() {
		var nodes []string
		for _, n := range r.GetNodes() {
			part := "holds"
			switch {
			case n.GetError() != "":
				part = "unreachable"
			case !n.GetHolds():
				part = "lacks " + strings.Join(n.GetMissingRefs(), ",")
			}
			if !n.GetVoter() {
				part += " (non-voter)"
			}
			nodes = append(nodes, n.GetNodeId()+": "+part)
		}
		t.row(r.GetName(), strconv.FormatUint(r.GetVersion(), 10), dataLossText(r.GetStatus()),
			fmt.Sprintf("%d of %d voters", r.GetHeldBy(), r.GetVoters()), strings.Join(nodes, "; "))
	}
	if err := t.flush(); err != nil {
		return err
	}
	for _, r := range resp.GetRepos() {
		if len(r.GetLostRefs()) > 0 {
			fmt.Fprintf(w, "  %s: no node holds %s; gitraft repo repair %s --auto resets or deletes them\n", r.GetName(), strings.Join(r.GetLostRefs(), ", "), r.GetName())
		}
	}
	_, err := fmt.Fprintf(w, "\n%d of %d repositories below a majority of voters, %d lost (raft index %d)\n", below, resp.GetChecked(), lost, resp.GetIndex())
	return err
}
