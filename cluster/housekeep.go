package cluster

import (
	"context"
	"strings"
	"sync"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
	"github.com/gitraft/gitraft/storage"
)

// HousekeepRepo runs housekeeping of a repository now on one member or on
// every member (each node housekeeps its own copy: ReplicaService.Housekeep),
// and reports each one's packs and loose objects before and after. A member
// that fails or cannot be reached is reported with its error; the others
// still run.
func (s *repoService) HousekeepRepo(ctx context.Context, req *repov1.HousekeepRepoRequest) (*repov1.HousekeepRepoResponse, error) {
	n := s.n
	name, err := storage.CanonicalName(req.GetName())
	if err != nil {
		return nil, err
	}
	var found bool
	var members []*fsmv1.Member
	n.fsm.Read(func(st *State) {
		_, found = st.Repo(name)
		members = st.Members()
	})
	if !found {
		return nil, status.Errorf(codes.NotFound, "repository %q not found", name)
	}
	if id := req.GetNodeId(); id != "" {
		var ids []string
		var only []*fsmv1.Member
		for _, m := range members {
			ids = append(ids, m.GetId())
			if m.GetId() == id {
				only = append(only, m)
			}
		}
		if len(only) == 0 {
			return nil, status.Errorf(codes.InvalidArgument, "no member %q; the members are %s", id, strings.Join(ids, ", "))
		}
		members = only
	}
	out := make([]*repov1.NodeHousekeeping, len(members))
	var wg sync.WaitGroup
	for i, m := range members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v := &repov1.NodeHousekeeping{NodeId: m.GetId()}
			out[i] = v
			conn, err := n.peers.conn(m.GetGrpcAddr())
			if err != nil {
				v.Error = err.Error()
				return
			}
			r, err := replicav1.NewReplicaServiceClient(conn).Housekeep(ctx, &replicav1.HousekeepRequest{Repo: name})
			if err != nil {
				v.Error = status.Convert(err).Message()
				return
			}
			b, a := r.GetBefore(), r.GetAfter()
			v.PacksBefore, v.PacksAfter = b.GetPacks(), a.GetPacks()
			v.LooseObjectsBefore, v.LooseObjectsAfter = b.GetLooseObjects(), a.GetLooseObjects()
			v.BytesBefore, v.BytesAfter = b.GetPackBytes()+b.GetLooseBytes(), a.GetPackBytes()+a.GetLooseBytes()
			v.Pruned, v.PruneSkipped = r.GetPruned(), r.GetPruneSkipped()
			v.LeftoversRemoved, v.Seconds = r.GetLeftoversRemoved(), r.GetSeconds()
		}()
	}
	wg.Wait()
	return &repov1.HousekeepRepoResponse{Name: name, Nodes: out}, nil
}

// Housekeep on a node without repositories: nothing to do.
func (s noReplicas) Housekeep(context.Context, *replicav1.HousekeepRequest) (*replicav1.HousekeepResponse, error) {
	return nil, status.Error(codes.FailedPrecondition, ErrNoGit.Error())
}
