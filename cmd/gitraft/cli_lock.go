package main

import (
	"fmt"
	"io"
	"strconv"
	"time"

	"github.com/spf13/cobra"

	lockv1 "github.com/gitraft/gitraft/proto/gitraft/lock/v1"
)

// newLockCmd is `gitraft lock`: list and release repositories' write locks.
func newLockCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "lock",
		Short: "List and release repositories' write locks",
	}
	cmd.AddCommand(newLockListCmd(g), newLockReleaseCmd(g))
	return cmd
}

func newLockListCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List the write locks held, and the writers waiting for them",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := lockv1.NewLockServiceClient(conn).ListLocks(ctx, &lockv1.ListLocksRequest{})
			if err != nil {
				return rpcError("list locks", err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			return writeLockList(cmd.OutOrStdout(), resp, time.Now())
		},
	}
}

// writeLockList prints a ListLocksResponse as a table, or "no locks",
// then the writers waiting, in the order they are served.
func writeLockList(w io.Writer, resp *lockv1.ListLocksResponse, now time.Time) error {
	waiting := 0
	for _, q := range resp.GetQueues() {
		waiting += len(q.GetWaiters())
	}
	if len(resp.GetLocks()) == 0 && waiting == 0 {
		_, err := fmt.Fprintln(w, "no locks")
		return err
	}
	t := newTable(w, "REPO", "HOLDER", "TOKEN", "EXPIRES")
	for _, l := range resp.GetLocks() {
		t.row(l.GetRepo(), l.GetHolder(), strconv.FormatUint(l.GetFencingToken(), 10), expiresIn(now, l.GetExpiresAt()))
	}
	if err := t.flush(); err != nil || waiting == 0 {
		return err
	}
	if _, err := fmt.Fprintln(w, "\nwaiting, first served first:"); err != nil {
		return err
	}
	t = newTable(w, "REPO", "#", "WAITER", "WAITING")
	for _, q := range resp.GetQueues() {
		for i, wt := range q.GetWaiters() {
			t.row(q.GetRepo(), strconv.Itoa(i+1), wt.GetHolder(), now.Sub(wt.GetSince().AsTime()).Round(100*time.Millisecond).String())
		}
	}
	return t.flush()
}

func newLockReleaseCmd(g *globalOpts) *cobra.Command {
	var token uint64
	cmd := &cobra.Command{
		Use:   "release REPO [--token N]",
		Short: "Release a repository's write lock",
		Long: `Release a repository's write lock. With --token, release it only if that is
still the lock's fencing token. Without, force-release the lock whoever holds
it: an operator's action for a holder that is gone; a writer still holding it
will have its next ref update refused.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			repo := args[0]
			c := lockv1.NewLockServiceClient(conn)
			out := cmd.OutOrStdout()
			if cmd.Flags().Changed("token") {
				resp, err := c.ReleaseLock(ctx, &lockv1.ReleaseLockRequest{Repo: repo, FencingToken: token})
				if err != nil {
					return rpcError(fmt.Sprintf("release the lock on %q (token %d)", repo, token), err)
				}
				if g.JSON {
					return printProtoJSON(out, resp)
				}
				fmt.Fprintf(out, "released the lock on %s (token %d) at index %d\n", repo, token, resp.GetIndex())
				return nil
			}
			resp, err := c.ForceReleaseLock(ctx, &lockv1.ForceReleaseLockRequest{Repo: repo})
			if err != nil {
				return rpcError(fmt.Sprintf("force-release the lock on %q", repo), err)
			}
			if g.JSON {
				return printProtoJSON(out, resp)
			}
			if l := resp.GetReleased(); l != nil {
				fmt.Fprintf(out, "force-released the lock on %s held by %s (token %d) at index %d\n", repo, orDash(l.GetHolder()), l.GetFencingToken(), resp.GetIndex())
			} else {
				fmt.Fprintf(out, "%s was not locked (index %d)\n", repo, resp.GetIndex())
			}
			return nil
		},
	}
	cmd.Flags().Uint64Var(&token, "token", 0, "release only if the lock's fencing token is N (without it: force-release)")
	return cmd
}
