package main

import (
	"context"
	"log/slog"

	"github.com/spf13/cobra"

	"github.com/gitraft/gitraft/cluster"
)

// mailSettings configure the mail drain agent of `gitraft serve`.
type mailSettings struct{}

// startMailAgent starts the Postfix drain agent if this node's configuration
// switches it on; it stops when ctx ends.
func startMailAgent(ctx context.Context, cfg fileConfig, n *cluster.Node, log *slog.Logger) error {
	return nil
}

func newMailCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{Use: "mail", Short: "mail hosts and their drain state", Hidden: true}
}
