package cluster

import (
	"context"
	"net/http"

	"google.golang.org/grpc"
)

// leadDatabase is the leader-only loop that drives switchovers and
// failovers. It runs while this node leads, after the leader's barrier.
func (n *Node) leadDatabase(ctx context.Context) {}

// registerDatabase adds the DatabaseService to the node's gRPC server.
func (n *Node) registerDatabase(s *grpc.Server) {}

// databaseHTTP adds the database's HTTP endpoints (the read-only signal).
func (n *Node) databaseHTTP(mux *http.ServeMux) {}
