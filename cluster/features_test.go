package cluster

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/reflect/protoreflect"

	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

// newFeature pretends, for one test, that a field came with feature level 2.
func newFeature(t *testing.T, field protoreflect.FullName) {
	t.Helper()
	featureSince[field] = 2
	t.Cleanup(func() { delete(featureSince, field) })
}

func Test_EntryLevel(t *testing.T) {
	newFeature(t, "gitraft.fsm.v1.RefUpdate.old_oid")
	plain := &fsmv1.Entry{Command: &fsmv1.Entry_UpdateRefs{UpdateRefs: &fsmv1.UpdateRefs{Repo: "r",
		Updates: []*fsmv1.RefUpdate{{Ref: "refs/heads/a", NewOid: strings.Repeat("1", 40)}}}}}
	if l := entryLevel(plain); l != 1 {
		t.Fatalf("entry without the new field: level %d, want 1", l)
	}
	nested := &fsmv1.Entry{Command: &fsmv1.Entry_UpdateRefs{UpdateRefs: &fsmv1.UpdateRefs{Repo: "r",
		Updates: []*fsmv1.RefUpdate{{Ref: "refs/heads/a", NewOid: strings.Repeat("1", 40)}, {Ref: "refs/heads/b", OldOid: strings.Repeat("2", 40)}}}}}
	if l := entryLevel(nested); l != 2 {
		t.Fatalf("entry with the new field in its second update: level %d, want 2", l)
	}
}

// A rolling upgrade: while one member runs an older gitraft (it reports
// feature level 1), the leader refuses entries that need level 2, with a
// message that names that member, and takes everything else; once the
// member is upgraded and has re-registered, the entry goes in.
func Test_MultiNode_FeatureLevelGatesNewEntries(t *testing.T) {
	newFeature(t, "gitraft.fsm.v1.DeleteRepo.name")
	c := mustNewCluster(t, 3, func(cfg *Config) {
		if cfg.NodeID == "n3" {
			cfg.featureLevel = 1
		}
	})
	waitFor(t, "every member registered with its level", 10*time.Second, func() bool {
		for _, id := range []string{"n1", "n2"} {
			l, lowest := c.nodes[id].FeatureLevel()
			if l != 1 || !slices.Equal(lowest, []string{"n3"}) {
				return false
			}
		}
		return true
	})
	propose(t, c.any(), create("r")) // level 1 entries go on
	for _, n := range []*Node{c.waitLeader(), c.follower()} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := n.Propose(ctx, del("r"))
		cancel()
		if err == nil || !strings.Contains(err.Error(), "needs feature level 2") || !strings.Contains(err.Error(), "n3") {
			t.Fatalf("propose through %s while n3 is older: %v, want a refusal naming n3", n.ID(), err)
		}
		if n == c.waitLeader() && !errors.Is(err, ErrInvalidEntry) {
			t.Fatalf("refusal on the leader is not ErrInvalidEntry: %v", err)
		}
	}
	c.waitConverged()
	for _, n := range c.nodes {
		n.fsm.Read(func(s *State) {
			if _, ok := s.Repo("r"); !ok {
				t.Fatalf("%s lost repo r to a refused delete", n.ID())
			}
		})
	}

	c.stop("n3")
	cfg := c.cfgs["n3"]
	cfg.featureLevel = 0
	c.cfgs["n3"] = cfg
	c.restart("n3")
	waitFor(t, "the cluster at level 2", 15*time.Second, func() bool {
		l, _ := c.waitLeader().FeatureLevel()
		return l == FeatureLevel
	})
	propose(t, c.any(), del("r"))
}
