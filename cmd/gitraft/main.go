package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	if err := newRootCmd().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "gitraft:", err)
		var ec *exitCodeError
		if errors.As(err, &ec) {
			os.Exit(ec.code)
		}
		os.Exit(1)
	}
}

// exitCodeError is a command's verdict that is not a failure of the
// command itself (gitraft repo dataloss found loss: 2).
type exitCodeError struct {
	code int
	msg  string
}

func (e *exitCodeError) Error() string { return e.msg }

func newRootCmd() *cobra.Command {
	g := &globalOpts{}
	root := &cobra.Command{
		Use:   "gitraft",
		Short: "Raft-based multi-master git storage",
		Long: `gitraft keeps git repositories on a Raft group of nodes: any node takes
pushes and clones, and a push is acknowledged only once it is on a quorum.

Run a local cluster:   gitraft dev
Run one node:          gitraft serve --config gitraft.yaml
Inspect a cluster:     gitraft cluster status`,
		Version:       version,
		SilenceErrors: true,
		SilenceUsage:  true,
	}
	clients := []*cobra.Command{newClusterCmd(g), newRepoCmd(g), newLockCmd(g), newUserCmd(g), newKeyCmd(g), newDBCmd(g), newMailCmd(g)}
	for _, c := range clients {
		g.register(c.PersistentFlags())
	}
	root.AddCommand(newServeCmd(), newDevCmd(), newCACmd(), newNodeGitCmd(), newBackupCmd())
	root.AddCommand(clients...)
	return root
}
