package cluster

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc/status"

	clusterv1 "github.com/gitraft/gitraft/proto/gitraft/cluster/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
)

// A node joins as a non-voter: it gets the log and fills its disk without
// counting toward the quorum, and cannot become leader while it holds
// nothing. The leader promotes it once it holds every repository at the
// version its state has and has applied the log near the leader's commit
// index (what Consul's autopilot does for servers).

// promoteMaxLag is how many entries a non-voter's applied index may trail
// the leader's commit index and still be promoted: replication to it is
// asynchronous, and under a steady stream of writes it is always a little
// behind.
const promoteMaxLag = 256

// fill is what a member's disk holds of the replicated state, as it reports
// it (ReplicaService.GetReplicas): how many of the repositories in its state
// are at their version, judged at its applied index.
type fill struct {
	current, total int
	index          uint64
}

func fillOf(resp *replicav1.GetReplicasResponse) fill {
	f := fill{total: len(resp.GetReplicas()), index: resp.GetIndex()}
	for _, r := range resp.GetReplicas() {
		if r.GetState() == replicav1.ReplicaState_REPLICA_STATE_CURRENT {
			f.current++
		}
	}
	return f
}

// waitingFor says what keeps a non-voter from being promoted, or "" when
// nothing does. commit is the leader's commit index; mark an index the
// member must have applied: one at or past the entry that added it, so that
// it knows every repository created before it joined.
func (f fill) waitingFor(commit, mark uint64) string {
	var why []string
	if f.current < f.total {
		why = append(why, fmt.Sprintf("%d of %d repos", f.total-f.current, f.total))
	}
	if f.index < mark || f.index+promoteMaxLag < commit {
		why = append(why, fmt.Sprintf("the log (applied index %d of %d)", f.index, max(commit, mark)))
	}
	return strings.Join(why, "; ")
}

func (f fill) toAPI(why string) *clusterv1.Fill {
	return &clusterv1.Fill{ReposCurrent: uint64(f.current), ReposTotal: uint64(f.total), AppliedIndex: f.index, WaitingFor: why}
}

// replicasOf asks a member which repositories its disk holds at which
// version. Tests may stand in for the member's disk (Config.replicasOf):
// in-process nodes keep no repositories.
func (n *Node) replicasOf(ctx context.Context, m *fsmv1.Member) (*replicav1.GetReplicasResponse, error) {
	if n.cfg.replicasOf != nil {
		return n.cfg.replicasOf(ctx, m.GetId(), func(ctx context.Context) (*replicav1.GetReplicasResponse, error) {
			return n.askReplicas(ctx, m)
		})
	}
	return n.askReplicas(ctx, m)
}

func (n *Node) askReplicas(ctx context.Context, m *fsmv1.Member) (*replicav1.GetReplicasResponse, error) {
	if m.GetId() == n.cfg.NodeID {
		return n.replicaReport(""), nil
	}
	if m.GetGrpcAddr() == "" {
		return nil, fmt.Errorf("%s has not registered its addresses yet", m.GetId())
	}
	conn, err := n.peers.conn(m.GetGrpcAddr())
	if err != nil {
		return nil, err
	}
	c := replicav1.NewReplicaServiceClient(conn)
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := c.GetReplicas(cctx, &replicav1.GetReplicasRequest{})
	if err != nil {
		return nil, fmt.Errorf("asking %s for its replicas: %s", m.GetId(), status.Convert(err).Message())
	}
	return resp, nil
}

// promoteNonvoters runs while this node leads: every PromoteInterval it
// asks each non-voter how much it holds and promotes those that hold
// everything.
func (n *Node) promoteNonvoters(ctx context.Context) {
	t := time.NewTicker(n.cfg.PromoteInterval)
	defer t.Stop()
	marks := map[string]uint64{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-n.stop:
			return
		case <-t.C:
		}
		n.promoteReady(ctx, marks)
	}
}

// promoteReady promotes the first non-voter that holds everything. marks
// holds, per non-voter, this leader's last log index when it first saw it:
// at or past the entry that added it (GetConfiguration does not say which
// that is), so a member that has applied it knows every earlier repository.
func (n *Node) promoteReady(ctx context.Context, marks map[string]uint64) {
	if n.fsm.Halted() != nil {
		return // a halted leader takes no writes; handOffWhileHalted acts
	}
	nonvoters := n.nonvoters()
	for id := range marks {
		if _, ok := nonvoters[id]; !ok {
			delete(marks, id) // promoted or removed
		}
	}
	for id, addr := range nonvoters {
		mark, seen := marks[id]
		if !seen {
			mark = n.raft.LastIndex()
			marks[id] = mark
		}
		m := &fsmv1.Member{Id: id}
		n.fsm.Read(func(s *State) {
			if meta, ok := s.Member(id); ok {
				m = meta
			}
		})
		commit := n.raft.CommitIndex()
		resp, err := n.replicasOf(ctx, m)
		if err != nil {
			n.log.Debug("non-voter not promoted: cannot ask it what it holds", "member", id, "err", err)
			continue
		}
		fl := fillOf(resp)
		if why := fl.waitingFor(commit, mark); why != "" {
			if !seen {
				n.log.Info("non-voter fills its disk; it becomes a voter once it holds every repository", "member", id, "repos_current", fl.current, "repos_total", fl.total, "waiting_for", why)
			}
			continue
		}
		// Asking took a while: promote only what is still the same
		// non-voter, and fail if the configuration changed meanwhile (a
		// member removed in between must not come back as a voter).
		prev := n.fsm.configIndex.Load()
		if n.nonvoters()[id] != addr {
			continue
		}
		af := n.raft.AddVoter(raft.ServerID(id), addr, prev, applyTimeout)
		if err := af.Error(); err != nil {
			n.log.Warn("promoting a non-voter failed; will retry", "member", id, "err", err)
			return
		}
		n.metrics.promotions.Inc()
		n.log.Info("promoted member to voter: it holds every repository", "member", id, "repos", fl.total, "applied_index", fl.index, "index", af.Index())
		return // the configuration changed: the next round reads it again
	}
}

// nonvoters are the members without a vote, with their Raft addresses.
func (n *Node) nonvoters() map[string]raft.ServerAddress {
	out := map[string]raft.ServerAddress{}
	f := n.raft.GetConfiguration()
	if f.Error() != nil {
		return out
	}
	for _, srv := range f.Configuration().Servers {
		if srv.Suffrage == raft.Nonvoter {
			out[string(srv.ID)] = srv.Address
		}
	}
	return out
}

// memberFill asks a member for its copies: it counts the damaged ones
// and, for a non-voter, sets its fill in cluster status, judged as the
// leader would against this node's commit index.
func (n *Node) memberFill(ctx context.Context, m *clusterv1.Member, nonvoter bool) {
	commit := n.raft.CommitIndex()
	resp, err := n.replicasOf(ctx, &fsmv1.Member{Id: m.GetId(), GrpcAddr: m.GetGrpcAddr()})
	if err != nil {
		if m.Error == "" && nonvoter {
			m.Error = err.Error()
		}
		return
	}
	for _, r := range resp.GetReplicas() {
		if r.GetState() == replicav1.ReplicaState_REPLICA_STATE_DAMAGED {
			m.ReposDamaged++
		}
	}
	if nonvoter {
		fl := fillOf(resp)
		m.Fill = fl.toAPI(fl.waitingFor(commit, commit))
	}
}
