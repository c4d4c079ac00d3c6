package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/gitraft/gitraft/cluster/pki"
	clusterv1 "github.com/gitraft/gitraft/proto/gitraft/cluster/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	lockv1 "github.com/gitraft/gitraft/proto/gitraft/lock/v1"
	nodev1 "github.com/gitraft/gitraft/proto/gitraft/node/v1"
	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
	userv1 "github.com/gitraft/gitraft/proto/gitraft/user/v1"
	"github.com/gitraft/gitraft/storage"
)

func (n *Node) serveGRPC() error {
	ln, err := net.Listen("tcp", n.cfg.GRPCAddr)
	if err != nil {
		return fmt.Errorf("grpc listen: %w", err)
	}
	n.grpcLn = ln
	if _, port, _ := net.SplitHostPort(n.cfg.GRPCAdvertise); port == "0" {
		n.cfg.GRPCAdvertise = ln.Addr().String()
	}
	opts := []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(n.authUnary, n.errorsUnary),
		grpc.ChainStreamInterceptor(n.authStream),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
	}
	if st := n.serverTLS(); st != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(st)))
	}
	s := grpc.NewServer(opts...)
	clusterv1.RegisterClusterServiceServer(s, &clusterService{n: n})
	repov1.RegisterRepoServiceServer(s, &repoService{n: n})
	lockv1.RegisterLockServiceServer(s, &lockService{n: n})
	nodev1.RegisterNodeServiceServer(s, &nodeService{n: n})
	if n.git != nil {
		replicav1.RegisterReplicaServiceServer(s, n.git.Service())
	} else {
		replicav1.RegisterReplicaServiceServer(s, noReplicas{n: n})
	}
	userv1.RegisterUserServiceServer(s, &userService{n: n})
	n.registerDatabase(s)
	n.registerMail(s)
	n.registerBackup(s)
	n.registerHealth(s) // last: it serves the health of every service above
	n.grpcServer = s
	n.goRun(func() {
		if err := s.Serve(ln); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			n.log.Error("grpc server stopped", "err", err)
		}
	})
	return nil
}

// Register adds more services to the node's gRPC server; call before
// traffic arrives (right after New).
func (n *Node) Register(fn func(s *grpc.Server)) { fn(n.grpcServer) }

// authorize checks the caller's certificate role for a method: node-to-node
// methods need a node certificate; the admin API takes admin or node.
func (n *Node) authorize(ctx context.Context, method string) error {
	if n.bundle == nil {
		return nil // insecure, loopback only
	}
	p, ok := peer.FromContext(ctx)
	if !ok {
		return status.Error(codes.Unauthenticated, "no peer information")
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return status.Error(codes.Unauthenticated, "not a TLS connection")
	}
	role, name, err := pki.PeerRole(ti.State)
	if err != nil {
		return status.Errorf(codes.Unauthenticated, "client certificate: %v", err)
	}
	if nodeOnlyMethod(method) && role != pki.RoleNode {
		return status.Errorf(codes.PermissionDenied, "%q has a %s certificate; %s is for cluster nodes only", name, role, method)
	}
	return nil
}

// nodeOnlyMethod reports whether a gRPC method is for cluster nodes only:
// the node-to-node APIs (gitraft.node.* and the push pipeline's
// gitraft.replica.*) and every agent service (a service named
// ...AgentService, which agents on nodes use to report to the leader).
func nodeOnlyMethod(method string) bool {
	if strings.HasPrefix(method, "/gitraft.node.") || strings.HasPrefix(method, "/gitraft.replica.") {
		return true
	}
	svc, _, _ := strings.Cut(strings.TrimPrefix(method, "/"), "/")
	return strings.HasSuffix(svc, "AgentService")
}

func (n *Node) authUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if err := n.authorize(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	return h(ctx, req)
}

func (n *Node) authStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	if err := n.authorize(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	return h(srv, ss)
}

// errorsUnary turns the package's errors into gRPC status codes: the only
// place where that happens.
func (n *Node) errorsUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	resp, err := h(ctx, req)
	if err != nil {
		err = toStatus(err)
	}
	return resp, err
}

// RefusalError is a state machine refusal: the entry committed and changed
// nothing, for the reason given.
type RefusalError struct {
	Reason  fsmv1.Reason
	Message string
	Result  *fsmv1.Result
}

func (e *RefusalError) Error() string { return e.Message }

// refusal returns the result's refusal as an error, or nil.
func refusal(r *fsmv1.Result) error {
	if r.GetRefusal() == nil {
		return nil
	}
	return &RefusalError{Reason: r.GetRefusal().GetReason(), Message: r.GetRefusal().GetMessage(), Result: r}
}

func toStatus(err error) error {
	if _, ok := status.FromError(err); ok {
		return err
	}
	var re *RefusalError
	var ne *storage.NameError
	switch {
	case errors.As(err, &re):
		code := codes.FailedPrecondition
		switch re.Reason {
		case fsmv1.Reason_REASON_INVALID:
			code = codes.InvalidArgument
		case fsmv1.Reason_REASON_NOT_FOUND:
			code = codes.NotFound
		case fsmv1.Reason_REASON_ALREADY_EXISTS:
			code = codes.AlreadyExists
		}
		return status.Error(code, re.Message)
	case errors.As(err, &ne):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, ErrInvalidRef), errors.Is(err, ErrInvalidEntry), errors.Is(err, ErrNotAKey), errors.Is(err, ErrKeyOptions):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, ErrHalted):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, ErrNoLeader):
		return status.Error(codes.Unavailable, err.Error())
	case errors.Is(err, raft.ErrLeadershipLost):
		return status.Error(codes.Unavailable, "leadership was lost while the change was being committed; it may or may not have been applied: check before retrying")
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrEnqueueTimeout), errors.Is(err, raft.ErrRaftShutdown):
		return status.Error(codes.Unavailable, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, err.Error())
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

// forward sends a call to the leader's gRPC server when this node does not
// lead. It reports whether it forwarded.
func (n *Node) forward(ctx context.Context, call func(conn grpc.ClientConnInterface) error) (bool, error) {
	if n.raft.State() == raft.Leader {
		return false, nil
	}
	deadline := time.Now().Add(n.cfg.LeaderWait)
	for {
		addr, _ := n.leaderGRPC()
		if addr != "" {
			c, err := n.peers.conn(addr)
			if err != nil {
				return true, err
			}
			return true, call(c)
		}
		if n.raft.State() == raft.Leader {
			return false, nil
		}
		if time.Now().After(deadline) {
			return true, fmt.Errorf("%w after %s; is a majority of nodes up?", ErrNoLeader, n.cfg.LeaderWait)
		}
		select {
		case <-ctx.Done():
			return true, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// ----- node-to-node -----

type nodeService struct {
	nodev1.UnimplementedNodeServiceServer
	n *Node
}

func (s *nodeService) Propose(ctx context.Context, req *nodev1.ProposeRequest) (*nodev1.ProposeResponse, error) {
	// Checked before leadership, so that whichever node a malformed entry is
	// sent to refuses it (applyLocal checks again).
	who := "node " + s.n.cfg.NodeID
	if s.n.raft.State() == raft.Leader {
		who = "leader " + s.n.cfg.NodeID
	}
	if err := validateEntry(req.GetEntry(), who, s.n.cfg.Version); err != nil {
		return nil, err
	}
	if s.n.raft.State() != raft.Leader {
		return nil, status.Errorf(codes.FailedPrecondition, "%s is not the leader", s.n.cfg.NodeID)
	}
	r, err := s.n.applyLocal(req.GetEntry())
	if err != nil {
		if errors.Is(err, raft.ErrNotLeader) {
			return nil, status.Errorf(codes.FailedPrecondition, "%s is not the leader", s.n.cfg.NodeID)
		}
		return nil, err
	}
	return &nodev1.ProposeResponse{Result: r}, nil
}

func (s *nodeService) ReadIndex(ctx context.Context, _ *nodev1.ReadIndexRequest) (*nodev1.ReadIndexResponse, error) {
	if s.n.raft.State() != raft.Leader {
		return nil, status.Errorf(codes.FailedPrecondition, "%s is not the leader", s.n.cfg.NodeID)
	}
	idx, err := s.n.leaderReadIndex()
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "read index: %v", err)
	}
	return &nodev1.ReadIndexResponse{Index: idx}, nil
}

func (s *nodeService) GetLocalStatus(ctx context.Context, _ *nodev1.GetLocalStatusRequest) (*nodev1.GetLocalStatusResponse, error) {
	return s.n.localStatus(), nil
}

func (n *Node) localStatus() *nodev1.GetLocalStatusResponse {
	r := &nodev1.GetLocalStatusResponse{
		NodeId:       n.cfg.NodeID,
		State:        n.raft.State().String(),
		Term:         n.raft.CurrentTerm(),
		CommitIndex:  n.raft.CommitIndex(),
		AppliedIndex: n.fsm.Index(),
		Version:      n.cfg.Version,
	}
	if h := n.fsm.Halted(); h != nil {
		r.Halted, r.HaltedIndex = h.Message(), h.Index
	}
	if n.raft.State() != raft.Leader {
		if lc := n.raft.LastContact(); !lc.IsZero() {
			r.LastContactUnixNano = lc.UnixNano()
		}
	}
	return r
}
