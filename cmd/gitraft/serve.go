package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

func newServeCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run one gitraft node",
		Long: `Run one gitraft node. Settings come from the YAML file given with --config,
then GITRAFT_* environment variables, then flags.

A new cluster starts from one node with --bootstrap; the others start with
--join pointing at any member's gRPC address (or are added with
gitraft cluster join). A node restarted on its data dir rejoins by itself.`,
		Args: cobra.NoArgs,
	}
	load := configFlags(cmd.Flags())
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		cfg, err := load()
		if err != nil {
			return err
		}
		logger, err := newLogger(cfg.LogFormat, cfg.LogLevel, os.Stderr)
		if err != nil {
			return err
		}
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		r, err := startNode(cfg, logger)
		if err != nil {
			return err
		}
		n := r.node
		logger.Info("gitraft node running", "node", n.ID(), "raft_addr", n.RaftAddr(), "grpc_addr", n.GRPCAddr(), "http_addr", n.HTTPAddr(), "ssh_addr", r.SSHAddr(), "version", version)
		<-ctx.Done()
		logger.Info("shutting down", "node", n.ID())
		if err := r.Close(); err != nil {
			return fmt.Errorf("shutdown: %w", err)
		}
		return nil
	}
	return cmd
}
