package cluster

import (
	"fmt"
	"sort"

	"google.golang.org/protobuf/reflect/protoreflect"

	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

// FeatureLevel is the level of log entries this binary can apply. A release
// that adds a command or a field to the log entries (proto/gitraft/fsm/v1,
// and the database and mail commands inside them) raises it by one and
// names what it added in featureSince. Each node records its level in its
// member record; the leader refuses to log an entry that needs a level
// some member of the Raft configuration has not reported, so that, during
// a rolling upgrade, no node meets an entry it cannot apply (it would halt).
// Code that has an older way to do the same thing asks Node.FeatureLevel
// first and falls back to it.
const FeatureLevel uint32 = 2

// featureSince names the commands and fields that need more than level 1,
// by their full protobuf name, with the level that introduced them.
// Everything not listed is level 1. Member.feature_level itself is level 1:
// an older leader refuses it (it does not know the field), and a node then
// registers without it.
var featureSince = map[protoreflect.FullName]uint32{
	// Level 2: backups recorded, write locks that know their holder's node.
	"gitraft.fsm.v1.Entry.record_backup":          2,
	"gitraft.fsm.v1.Entry.free_node_locks":        2,
	"gitraft.fsm.v1.Entry.leave_lock_queue":       2,
	"gitraft.fsm.v1.Member.incarnation":           2,
	"gitraft.fsm.v1.AcquireLock.node":             2,
	"gitraft.fsm.v1.AcquireLock.incarnation":      2,
	"gitraft.fsm.v1.AcquireLock.wait_lease_nanos": 2,
	"gitraft.fsm.v1.UpdateRefs.release_lock":      2,
}

// entryLevel is the feature level an entry needs: the highest level of any
// command or field set in it.
func entryLevel(e *fsmv1.Entry) uint32 {
	level := uint32(1)
	var walk func(m protoreflect.Message)
	walk = func(m protoreflect.Message) {
		m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
			if l := featureSince[fd.FullName()]; l > level {
				level = l
			}
			switch {
			case fd.IsList() && fd.Message() != nil:
				for i := 0; i < v.List().Len(); i++ {
					walk(v.List().Get(i).Message())
				}
			case fd.IsMap():
				if fd.MapValue().Message() != nil {
					v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
						walk(mv.Message())
						return true
					})
				}
			case fd.Message() != nil:
				walk(v.Message())
			}
			return true
		})
	}
	walk(e.ProtoReflect())
	return level
}

// levelOf is the feature level a member record reports (0: an older
// gitraft, level 1).
func levelOf(m *fsmv1.Member) uint32 { return max(m.GetFeatureLevel(), 1) }

// FeatureLevel is the cluster's feature level: the lowest level reported by
// the members of the Raft configuration (voters and non-voters), never more
// than this binary's. lowest names the members at that level when it is
// below this binary's ("n3 (gitraft 1.3.2? level 1)"), for messages.
func (n *Node) FeatureLevel() (level uint32, lowest []string) {
	level = n.ownFeatureLevel()
	f := n.raft.GetConfiguration()
	if f.Error() != nil {
		return 1, nil
	}
	levels := map[string]uint32{}
	n.fsm.Read(func(s *State) {
		for _, srv := range f.Configuration().Servers {
			m, _ := s.Member(string(srv.ID))
			levels[string(srv.ID)] = levelOf(m)
		}
	})
	for _, l := range levels {
		level = min(level, l)
	}
	if level < n.ownFeatureLevel() {
		for id, l := range levels {
			if l == level {
				lowest = append(lowest, id)
			}
		}
		sort.Strings(lowest)
	}
	return level, lowest
}

func (n *Node) ownFeatureLevel() uint32 {
	if n.cfg.featureLevel != 0 {
		return n.cfg.featureLevel
	}
	return FeatureLevel
}

// checkFeatureLevel refuses an entry that needs a feature level the cluster
// has not reached (ErrInvalidEntry: nothing is logged).
func (n *Node) checkFeatureLevel(e *fsmv1.Entry) error {
	need := entryLevel(e)
	if need <= 1 {
		return nil
	}
	have, lowest := n.FeatureLevel()
	if need <= have {
		return nil
	}
	return fmt.Errorf("%w: %s needs feature level %d, and the cluster is at level %d: %v run an older gitraft (see `gitraft cluster status`); upgrade every node first",
		ErrInvalidEntry, commandName(e), need, have, lowest)
}
