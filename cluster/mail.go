package cluster

import (
	"context"

	"google.golang.org/grpc"
)

// leadMail is the leader-only loop of the mail drain state (deadlines).
func (n *Node) leadMail(ctx context.Context) {}

// registerMail adds the MailService to the node's gRPC server.
func (n *Node) registerMail(s *grpc.Server) {}
