package main

import (
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
)

// newRepoRepairCmd is `gitraft repo repair NAME`: force refs of a damaged
// repository under its write lock, with a record of who did it and why.
func newRepoRepairCmd(g *globalOpts) *cobra.Command {
	var sets, deletes []string
	var auto, dryRun bool
	var reason string
	cmd := &cobra.Command{
		Use:   "repair NAME (--auto | --set REF=OID ... | --delete REF ...) --reason TEXT [--dry-run]",
		Short: "Force refs of a damaged repository back to values the cluster can serve",
		Long: `Force refs of a damaged repository to new values, whatever they are now,
under the repository's write lock, and record who did it, when and why
(gitraft repo show lists the repairs).

--auto finds the refs whose objects no voter holds any more, and resets
each to the newest value some node's copy has that a majority holds, or
deletes it when there is none: it accepts the loss of what is gone, as
Praefect's accept-dataloss does, and says so per ref. A ref whose objects
some voter still holds is left as it is. --dry-run says what it would do
and changes nothing.

Then (not for --dry-run, and also when no ref needed a change) it brings
every node's copy to the committed version: each catches up, and is
scrubbed, so a copy that lost objects heals from one that holds them. The
table says, per node, whether its copy is sound, healed, or why not (for
example which objects no peer could give it); the command exits 1 when a
copy could not be brought to the committed version.

--set REF=OID points a ref at an object a majority of voters holds;
--delete REF removes a ref (also one an older release let in).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &repov1.RepairRefsRequest{Repo: args[0], Auto: auto, DryRun: dryRun, Reason: reason}
			for _, s := range sets {
				ref, oid, ok := strings.Cut(s, "=")
				if !ok || ref == "" || oid == "" {
					return fmt.Errorf("--set %q: want REF=OID, e.g. refs/heads/main=3f2a...", s)
				}
				req.Updates = append(req.Updates, &repov1.RefUpdate{Ref: ref, NewOid: oid})
			}
			for _, ref := range deletes {
				req.Updates = append(req.Updates, &repov1.RefUpdate{Ref: ref})
			}
			if auto == (len(req.Updates) > 0) {
				return fmt.Errorf("say what to repair: --auto, or --set REF=OID / --delete REF")
			}
			if reason == "" && !dryRun {
				return fmt.Errorf("a repair needs --reason, for the record (or use --dry-run)")
			}
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := repov1.NewRepoServiceClient(conn).RepairRefs(ctx, req)
			if err != nil {
				return rpcError("repair repository "+strconv.Quote(args[0]), err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			w := cmd.OutOrStdout()
			if len(resp.GetChanges()) == 0 {
				fmt.Fprintf(w, "%s: no ref to repair (some voter holds every ref's objects)\n", resp.GetRepo())
				return printRepairCopies(w, resp)
			}
			t := newTable(w, "REF", "FROM", "TO", "WHY")
			for _, c := range resp.GetChanges() {
				to := c.GetNewOid()
				if to == "" {
					to = "(deleted)"
				}
				t.row(c.GetRef(), orDash(c.GetOldOid()), to, c.GetWhy())
			}
			if err := t.flush(); err != nil {
				return err
			}
			if dryRun {
				_, err = fmt.Fprintln(w, "\ndry run: nothing was changed")
				return err
			}
			fmt.Fprintf(w, "\nrepaired: %s is at version %d (raft index %d)\n", resp.GetRepo(), resp.GetVersion(), resp.GetIndex())
			return printRepairCopies(w, resp)
		},
	}
	cmd.Flags().BoolVar(&auto, "auto", false, "find the refs a majority cannot serve and reset or delete them")
	cmd.Flags().StringArrayVar(&sets, "set", nil, "REF=OID: point REF at OID (held by a majority)")
	cmd.Flags().StringArrayVar(&deletes, "delete", nil, "REF: delete REF")
	cmd.Flags().StringVar(&reason, "reason", "", "why, for the record")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "say what would change, change nothing")
	return cmd
}

// printRepairCopies says where each copy stands after a repair, and fails
// when one could not be brought to the committed version.
func printRepairCopies(w io.Writer, resp *repov1.RepairRefsResponse) error {
	if len(resp.GetCopies()) == 0 {
		return nil
	}
	fmt.Fprintf(w, "\ncopies at version %d:\n", resp.GetVersion())
	if err := printCopyChecks(w, resp.GetCopies()); err != nil {
		return err
	}
	if bad := unsoundCopies(resp.GetCopies()); bad > 0 {
		return fmt.Errorf("%d of %d copies could not be brought to version %d (see above; they keep trying)", bad, len(resp.GetCopies()), resp.GetVersion())
	}
	return nil
}
