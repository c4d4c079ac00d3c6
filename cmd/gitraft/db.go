package main

import (
	"context"
	"log/slog"

	"github.com/gitraft/gitraft/cluster"
)

// dbSettings configure the database agents of `gitraft serve`.
type dbSettings struct{}

// startDatabaseAgents starts the PostgreSQL and pgbouncer agents this node's
// configuration switches on; they stop when ctx ends.
func startDatabaseAgents(ctx context.Context, cfg fileConfig, n *cluster.Node, log *slog.Logger) error {
	return nil
}
