package cluster

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/gitraft/gitraft/cluster/replica"
	"github.com/gitraft/gitraft/lockd"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
)

// The git side of a node (the push pipeline, the copies on disk, the
// reconciler and gitraft.replica.v1) lives in package replica; this file
// gives it the node it runs on (replicaNode).

// ErrNoGit says a node keeps no repositories.
var ErrNoGit = errors.New("this node serves no repositories")

// pushLease is the write lock's lease during a push; it is renewed every
// third of it while the push runs.
const pushLease = 15 * time.Second

// RefRulesGit is UpdateRefs.ref_rules for git's full ref-name rules and no
// directory/file conflicts between refs.
const RefRulesGit = replica.RefRulesGit

// GitConfig switches on the git side of a node: its repositories on disk.
type GitConfig = replica.Config

// HousekeepConfig schedules a node's housekeeping of its copies.
type HousekeepConfig = replica.HousekeepConfig

// enableGit attaches the repository store, before Raft starts applying.
func (n *Node) enableGit(cfg GitConfig) {
	cfg.Lease = pushLease
	cfg.FetchEnv = n.nodeGitEnv()
	n.git = replica.New(cfg, replicaNode{n}, n.log)
	n.fsm.onRepoChange = n.git.Poke
}

// Replicas is the node's git side, nil unless Config.Git: the SSH front
// end's backend.
func (n *Node) Replicas() *replica.Replicas { return n.git }

// nodeGitEnv gives `gitraft node-git` this node's credentials.
func (n *Node) nodeGitEnv() []string {
	if n.cfg.Insecure {
		return []string{"GITRAFT_INSECURE=true"}
	}
	return []string{
		"GITRAFT_TLS_CA_FILE=" + n.cfg.TLS.CAFile,
		"GITRAFT_TLS_CERT_FILE=" + n.cfg.TLS.CertFile,
		"GITRAFT_TLS_KEY_FILE=" + n.cfg.TLS.KeyFile,
	}
}

// gitTarget is what the state says a repository must look like.
func (n *Node) gitTarget(name string) (replica.Target, bool) {
	var t replica.Target
	var ok bool
	n.fsm.Read(func(s *State) {
		if rs, found := s.repos[name]; found {
			t, ok = replica.Target{Name: name, ID: rs.id, Version: rs.version, Refs: rs.refs, Head: rs.head}, true
		}
	})
	return t, ok
}

// voters returns the Raft voters' member records.
func (n *Node) voters() ([]*fsmv1.Member, error) {
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, err
	}
	var out []*fsmv1.Member
	n.fsm.Read(func(s *State) {
		for _, srv := range f.Configuration().Servers {
			if srv.Suffrage != raft.Voter {
				continue
			}
			m, ok := s.Member(string(srv.ID))
			if !ok {
				m = &fsmv1.Member{Id: string(srv.ID)}
			}
			out = append(out, m)
		}
	})
	return out, nil
}

// replicaNode is the Node the git side runs on.
type replicaNode struct{ n *Node }

var _ replica.Node = replicaNode{}

func (r replicaNode) ID() string           { return r.n.cfg.NodeID }
func (r replicaNode) AppliedIndex() uint64 { return r.n.fsm.Index() }
func (r replicaNode) Ready() bool          { return r.n.ready.Load() }

func (r replicaNode) Propose(ctx context.Context, e *fsmv1.Entry) (*fsmv1.Result, error) {
	res, err := r.n.Propose(ctx, e)
	return res, noLeaderAs(err)
}

func (r replicaNode) ReadBarrier(ctx context.Context) (uint64, error) {
	i, err := r.n.ReadBarrier(ctx)
	return i, noLeaderAs(err)
}

func (r replicaNode) WaitApplied(ctx context.Context, index uint64) error {
	return noLeaderAs(r.n.fsm.WaitApplied(ctx, index))
}

func (r replicaNode) Repo(name string) (replica.Target, bool) { return r.n.gitTarget(name) }

func (r replicaNode) Repos() map[string]replica.Target {
	out := map[string]replica.Target{}
	r.n.fsm.Read(func(s *State) {
		for name, rs := range s.repos {
			out[name] = replica.Target{Name: name, ID: rs.id, Version: rs.version, Refs: rs.refs, Head: rs.head}
		}
	})
	return out
}

func (r replicaNode) Members() []*fsmv1.Member {
	var out []*fsmv1.Member
	r.n.fsm.Read(func(s *State) { out = s.Members() })
	return out
}

func (r replicaNode) Voters() ([]*fsmv1.Member, error) { return r.n.voters() }

func (r replicaNode) Leader() (id, addr string) {
	addr, id = r.n.leaderGRPC()
	return id, addr
}

func (r replicaNode) KeyOwner(fingerprint string) string {
	var user string
	r.n.fsm.Read(func(s *State) {
		if k, ok := s.KeyByFingerprint(fingerprint); ok {
			user = k.GetUser()
		}
	})
	return user
}

func (r replicaNode) Access(repo, user string) (a fsmv1.Access, found bool) {
	r.n.fsm.Read(func(s *State) {
		_, found = s.repos[repo]
		a = s.Access(repo, user)
	})
	return a, found
}

func (r replicaNode) Lock(ctx context.Context, repo, holder string, onWait func(string)) (replica.Lock, error) {
	held, err := r.n.locks.Acquire(ctx, repo, holder, func(l lockd.WriteLock) {
		if onWait != nil {
			onWait(l.Holder)
		}
	})
	if err != nil {
		var re *RefusalError
		if errors.As(err, &re) && re.Reason == fsmv1.Reason_REASON_NOT_FOUND {
			return nil, fmt.Errorf("%w: %v", replica.ErrRepoNotFound, err)
		}
		return nil, noLeaderAs(err)
	}
	return held, nil
}

func (r replicaNode) Locked(repo string) (held bool) {
	r.n.fsm.Read(func(s *State) { _, held = s.RepoLock(repo) })
	return held
}

func (r replicaNode) Conn(addr string) (grpc.ClientConnInterface, error) { return r.n.peers.conn(addr) }

// ReleaseWithRefs: UpdateRefs.release_lock is feature level 2; while a
// member runs an older gitraft, a push releases its lock in an entry of
// its own, as before.
func (r replicaNode) ReleaseWithRefs() bool {
	level, _ := r.n.FeatureLevel()
	return level >= 2
}

// noLeaderAs makes an error that wraps ErrNoLeader wrap replica's too,
// message unchanged.
func noLeaderAs(err error) error {
	if err != nil && errors.Is(err, ErrNoLeader) {
		return noLeaderError{err}
	}
	return err
}

type noLeaderError struct{ err error }

func (e noLeaderError) Error() string { return e.err.Error() }
func (e noLeaderError) Unwrap() error { return e.err }
func (e noLeaderError) Is(target error) bool {
	return target == replica.ErrNoLeader || target == lockd.ErrUnavailable
}

// noReplicas is gitraft.replica.v1 on a node without repositories: it
// reports that it holds nothing (the leader asks before promoting it).
type noReplicas struct {
	replicav1.UnimplementedReplicaServiceServer
	n *Node
}

func (s noReplicas) GetReplicas(context.Context, *replicav1.GetReplicasRequest) (*replicav1.GetReplicasResponse, error) {
	return &replicav1.GetReplicasResponse{NodeId: s.n.cfg.NodeID, Index: s.n.fsm.Index()}, nil
}

func (s noReplicas) PutPack(replicav1.ReplicaService_PutPackServer) error {
	return status.Error(codes.FailedPrecondition, ErrNoGit.Error())
}

func (s noReplicas) GitSession(replicav1.ReplicaService_GitSessionServer) error {
	return status.Error(codes.FailedPrecondition, ErrNoGit.Error())
}

func (s noReplicas) GetLocalRefs(context.Context, *replicav1.GetLocalRefsRequest) (*replicav1.GetLocalRefsResponse, error) {
	return nil, status.Error(codes.FailedPrecondition, ErrNoGit.Error())
}

func (s noReplicas) Scrub(context.Context, *replicav1.ScrubRequest) (*replicav1.ScrubResponse, error) {
	return nil, status.Error(codes.FailedPrecondition, ErrNoGit.Error())
}

func (s noReplicas) MissingObjects(context.Context, *replicav1.MissingObjectsRequest) (*replicav1.MissingObjectsResponse, error) {
	return nil, status.Error(codes.FailedPrecondition, ErrNoGit.Error())
}

// replicaReport is this node's report of its copies (none without git).
func (n *Node) replicaReport(repo string) *replicav1.GetReplicasResponse {
	if n.git == nil {
		return &replicav1.GetReplicasResponse{NodeId: n.cfg.NodeID, Index: n.fsm.Index()}
	}
	return n.git.Report(repo)
}

// objectsOnQuorum checks that a majority of voters hold every object, so a
// ref may point at them without a push having shipped them (nothing to
// check on a node without repositories).
func (n *Node) objectsOnQuorum(ctx context.Context, repo string, oids []string) error {
	if n.git == nil {
		return nil
	}
	return n.git.ObjectsOnQuorum(ctx, repo, oids)
}
