package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
)

// newRepoCmd is `gitraft repo`: create, list, show and delete repositories.
func newRepoCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "repo",
		Short: "Create, list, show and delete repositories",
	}
	cmd.AddCommand(newRepoCreateCmd(g), newRepoListCmd(g), newRepoShowCmd(g), newRepoRemoveCmd(g), newRepoGrantCmd(g), newRepoRevokeCmd(g), newRepoVerifyCmd(g), newRepoRepairCmd(g), newRepoScrubCmd(g), newRepoDataLossCmd(g), newRepoHousekeepCmd(g))
	return cmd
}

func newRepoCreateCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "create NAME",
		Short: "Create an empty repository",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := repov1.NewRepoServiceClient(conn).CreateRepo(ctx, &repov1.CreateRepoRequest{Name: args[0]})
			if err != nil {
				return rpcError("create repository "+strconv.Quote(args[0]), err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			name := resp.GetRepo().GetName()
			if name == "" {
				name = args[0]
			}
			fmt.Fprintf(cmd.OutOrStdout(), "created %s at index %d\n", name, resp.GetIndex())
			return nil
		},
	}
}

func newRepoListCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List repositories",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := repov1.NewRepoServiceClient(conn).ListRepos(ctx, &repov1.ListReposRequest{})
			if err != nil {
				return rpcError("list repositories", err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			return writeRepoList(cmd.OutOrStdout(), resp, time.Now())
		},
	}
}

// writeRepoList prints a ListReposResponse as a table, or "no repositories".
func writeRepoList(w io.Writer, resp *repov1.ListReposResponse, now time.Time) error {
	if len(resp.GetRepos()) == 0 {
		_, err := fmt.Fprintln(w, "no repositories")
		return err
	}
	t := newTable(w, "NAME", "VERSION", "REFS", "UPDATED")
	for _, r := range resp.GetRepos() {
		refs := r.GetRefCount()
		if refs == 0 && len(r.GetRefs()) > 0 {
			refs = int32(len(r.GetRefs()))
		}
		t.row(r.GetName(), strconv.FormatUint(r.GetVersion(), 10), strconv.Itoa(int(refs)), ago(now, r.GetUpdatedAt()))
	}
	return t.flush()
}

func newRepoShowCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "show NAME",
		Short: "Show a repository: its version, refs and replicas",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := repov1.NewRepoServiceClient(conn).GetRepo(ctx, &repov1.GetRepoRequest{Name: args[0]})
			if err != nil {
				return rpcError("show repository "+strconv.Quote(args[0]), err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			return writeRepo(cmd.OutOrStdout(), resp, time.Now())
		},
	}
}

// writeRepo prints a GetRepoResponse for people.
func writeRepo(w io.Writer, resp *repov1.GetRepoResponse, now time.Time) error {
	r := resp.GetRepo()
	kv := newKV(w)
	kv.row("name:", r.GetName())
	kv.row("version:", strconv.FormatUint(r.GetVersion(), 10))
	if r.GetHead() != "" {
		kv.row("HEAD:", r.GetHead())
	}
	kv.row("created:", when(now, r.GetCreatedAt()))
	kv.row("updated:", when(now, r.GetUpdatedAt()))
	kv.row("updated index:", strconv.FormatUint(r.GetUpdatedIndex(), 10))
	if err := kv.flush(); err != nil {
		return err
	}
	fmt.Fprintln(w)
	if len(r.GetRefs()) == 0 {
		fmt.Fprintln(w, "no refs")
	} else {
		t := newTable(w, "REF", "OID")
		for _, ref := range r.GetRefs() {
			t.row(ref.GetName(), ref.GetOid())
		}
		if err := t.flush(); err != nil {
			return err
		}
	}
	if len(r.GetReplicas()) > 0 {
		fmt.Fprintln(w)
		t := newTable(w, "NODE", "VERSION", "STATE")
		for _, rep := range r.GetReplicas() {
			t.row(rep.GetNodeId(), strconv.FormatUint(rep.GetVersion(), 10), replicaStateText(rep.GetState()))
		}
		if err := t.flush(); err != nil {
			return err
		}
	}
	if len(r.GetRepairs()) > 0 {
		fmt.Fprintln(w, "\nrepairs:")
		for _, rp := range r.GetRepairs() {
			fmt.Fprintf(w, "  version %d (raft index %d), %s by %s: %s\n", rp.GetVersion(), rp.GetIndex(), when(now, rp.GetAt()), rp.GetActor(), rp.GetReason())
			for _, c := range rp.GetChanges() {
				to := c.GetNewOid()
				if to == "" {
					to = "(deleted)"
				}
				fmt.Fprintf(w, "    %s: %s -> %s\n", c.GetRef(), orDash(c.GetOldOid()), to)
			}
		}
	}
	_, err := fmt.Fprintf(w, "\nas of raft index %d\n", resp.GetIndex())
	return err
}

func replicaStateText(s repov1.ReplicaState) string {
	switch s {
	case repov1.ReplicaState_REPLICA_STATE_CURRENT:
		return "current"
	case repov1.ReplicaState_REPLICA_STATE_BEHIND:
		return "behind"
	case repov1.ReplicaState_REPLICA_STATE_SYNCING:
		return "syncing"
	case repov1.ReplicaState_REPLICA_STATE_UNREACHABLE:
		return "unreachable"
	case repov1.ReplicaState_REPLICA_STATE_DAMAGED:
		return "damaged (healing)"
	}
	return "-"
}

func newRepoRemoveCmd(g *globalOpts) *cobra.Command {
	var yes bool
	cmd := &cobra.Command{
		Use:     "rm NAME",
		Aliases: []string{"remove", "delete"},
		Short:   "Delete a repository and its data on every node",
		Long: `Delete a repository and its data on every node. This cannot be undone.
Asks to type the repository's name to confirm, unless --yes is given.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cmd.SilenceUsage = true
			name := args[0]
			if !yes {
				if err := confirmName(cmd.InOrStdin(), cmd.ErrOrStderr(), name); err != nil {
					return err
				}
			}
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := repov1.NewRepoServiceClient(conn).DeleteRepo(ctx, &repov1.DeleteRepoRequest{Name: name})
			if err != nil {
				return rpcError("delete repository "+strconv.Quote(name), err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "deleted %s at index %d\n", name, resp.GetIndex())
			return nil
		},
	}
	cmd.Flags().BoolVarP(&yes, "yes", "y", false, "do not ask for confirmation")
	return cmd
}

// confirmName asks the person at the terminal to type name. It refuses when
// stdin is not a terminal (a script must pass --yes) or is closed.
func confirmName(in io.Reader, prompt io.Writer, name string) error {
	refuse := fmt.Errorf("not deleting %q without confirmation: pass --yes to delete it non-interactively", name)
	if f, ok := in.(*os.File); ok {
		fi, err := f.Stat()
		if err != nil || fi.Mode()&os.ModeCharDevice == 0 {
			return refuse
		}
	}
	fmt.Fprintf(prompt, "This deletes repository %q and its data on every node; it cannot be undone.\nType the repo name to confirm: ", name)
	line, err := bufio.NewReader(in).ReadString('\n')
	if err != nil && (!errors.Is(err, io.EOF) || line == "") {
		fmt.Fprintln(prompt)
		return refuse
	}
	if strings.TrimSpace(line) != name {
		return fmt.Errorf("not deleting %q: the name typed (%q) does not match", name, strings.TrimSpace(line))
	}
	return nil
}

func newRepoVerifyCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "verify NAME",
		Short: "Compare every node's refs on disk with the replicated state",
		Long: `Compare every node's refs on disk with the replicated state. Exits 0 when
every node is current and identical, 1 otherwise (a node that is behind is
reported, and catches up by itself).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := repov1.NewRepoServiceClient(conn).VerifyRepo(ctx, &repov1.VerifyRepoRequest{Name: args[0]})
			if err != nil {
				return rpcError("verify repository "+strconv.Quote(args[0]), err)
			}
			bad := 0
			for _, n := range resp.GetNodes() {
				if !n.GetOk() {
					bad++
				}
			}
			if g.JSON {
				if err := printProtoJSON(cmd.OutOrStdout(), resp); err != nil {
					return err
				}
			} else {
				w := cmd.OutOrStdout()
				fmt.Fprintf(w, "%s at version %d (raft index %d)\n\n", resp.GetName(), resp.GetVersion(), resp.GetIndex())
				t := newTable(w, "NODE", "VERSION", "STATE", "RESULT")
				for _, n := range resp.GetNodes() {
					result := "identical"
					switch {
					case n.GetError() != "":
						result = n.GetError()
					case len(n.GetDifferences()) > 0:
						result = fmt.Sprintf("%d differences", len(n.GetDifferences()))
					case !n.GetOk():
						result = "behind (catching up)"
					}
					t.row(n.GetNodeId(), strconv.FormatUint(n.GetVersion(), 10), replicaStateText(n.GetState()), result)
				}
				if err := t.flush(); err != nil {
					return err
				}
				for _, n := range resp.GetNodes() {
					for _, d := range n.GetDifferences() {
						fmt.Fprintf(w, "  %s: %s\n", n.GetNodeId(), d)
					}
				}
			}
			if bad > 0 {
				return fmt.Errorf("%d of %d nodes do not match the replicated state", bad, len(resp.GetNodes()))
			}
			return nil
		},
	}
}

// housekeepTimeout is `repo housekeep`'s --timeout unless one is given: a
// repack of a large repository takes minutes.
const housekeepTimeout = 30 * time.Minute

func newRepoHousekeepCmd(g *globalOpts) *cobra.Command {
	var node string
	cmd := &cobra.Command{
		Use:   "housekeep NAME",
		Short: "Repack and prune a repository now, on every node or one",
		Long: `Run housekeeping of a repository now, on every node (or only --node): remove
what failed pushes left, repack (pruning objects no ref reaches once they
are older than git.housekeeping.prune_grace, when the node's copy is at the
committed version) and write the commit-graph. Prints each node's packs and
loose objects before and after. Exits 1 if any node failed. The scheduler on
each node does the same on its own (README: Housekeeping). Without
--timeout, waits up to 30m.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if f := cmd.Flag("timeout"); f == nil || !f.Changed {
				g.Timeout = housekeepTimeout
			}
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := repov1.NewRepoServiceClient(conn).HousekeepRepo(ctx, &repov1.HousekeepRepoRequest{Name: args[0], NodeId: node})
			if err != nil {
				return rpcError("housekeep repository "+strconv.Quote(args[0]), err)
			}
			if g.JSON {
				if err := printProtoJSON(cmd.OutOrStdout(), resp); err != nil {
					return err
				}
			} else if err := writeHousekeep(cmd.OutOrStdout(), resp); err != nil {
				return err
			}
			failed := 0
			for _, n := range resp.GetNodes() {
				if n.GetError() != "" {
					failed++
				}
			}
			if failed > 0 {
				return fmt.Errorf("housekeeping failed on %d of %d nodes", failed, len(resp.GetNodes()))
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&node, "node", "", "run on this node only (default: every node)")
	return cmd
}

// writeHousekeep prints a HousekeepRepoResponse as a table.
func writeHousekeep(w io.Writer, resp *repov1.HousekeepRepoResponse) error {
	t := newTable(w, "NODE", "PACKS", "LOOSE", "SIZE", "PRUNED", "TOOK", "NOTE")
	for _, n := range resp.GetNodes() {
		if n.GetError() != "" {
			t.row(n.GetNodeId(), "-", "-", "-", "-", "-", "failed: "+n.GetError())
			continue
		}
		pruned, note := "no", n.GetPruneSkipped()
		if n.GetPruned() {
			pruned = "yes"
		}
		if k := n.GetLeftoversRemoved(); k > 0 {
			if note != "" {
				note += "; "
			}
			note += fmt.Sprintf("removed %d leftovers of failed pushes", k)
		}
		t.row(n.GetNodeId(),
			fmt.Sprintf("%d -> %d", n.GetPacksBefore(), n.GetPacksAfter()),
			fmt.Sprintf("%d -> %d", n.GetLooseObjectsBefore(), n.GetLooseObjectsAfter()),
			fmt.Sprintf("%s -> %s", byteSize(n.GetBytesBefore()), byteSize(n.GetBytesAfter())),
			pruned, (time.Duration(n.GetSeconds() * float64(time.Second))).Round(time.Millisecond).String(), note)
	}
	return t.flush()
}

// byteSize is n bytes for people: 512 B, 4.1 KiB, 12.0 MiB.
func byteSize(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
