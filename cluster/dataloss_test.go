package cluster

import (
	"errors"
	"slices"
	"testing"

	"github.com/gitraft/gitraft/cluster/replica"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
)

func Test_DataLossOf(t *testing.T) {
	refs := map[string]string{"refs/heads/main": "aa", "refs/tags/v1": "bb"}
	voters := map[string]bool{"n1": true, "n2": true, "n3": true}
	h := func(id string, lacks ...string) replica.Holding {
		return replica.Holding{Member: &fsmv1.Member{Id: id}, Lacks: lacks}
	}
	down := replica.Holding{Member: &fsmv1.Member{Id: "n3"}, Err: errors.New("unreachable")}
	for _, tc := range []struct {
		name    string
		hs      []replica.Holding
		status  repov1.DataLossStatus
		heldBy  int32
		lost    []string
		missing map[string][]string
	}{
		{"every voter", []replica.Holding{h("n1"), h("n2"), h("n3")}, repov1.DataLossStatus_DATA_LOSS_STATUS_HEALTHY, 3, nil, nil},
		{"a majority, one down", []replica.Holding{h("n1"), h("n2"), down}, repov1.DataLossStatus_DATA_LOSS_STATUS_HEALTHY, 2, nil, nil},
		{"one of three", []replica.Holding{h("n1", "aa", "bb"), h("n2", "aa"), h("n3")}, repov1.DataLossStatus_DATA_LOSS_STATUS_BELOW_MAJORITY, 1, nil,
			map[string][]string{"n1": {"refs/heads/main", "refs/tags/v1"}, "n2": {"refs/heads/main"}}},
		// Each ref is somewhere, but no copy holds both: below majority, nothing lost.
		{"split", []replica.Holding{h("n1", "aa"), h("n2", "bb"), down}, repov1.DataLossStatus_DATA_LOSS_STATUS_BELOW_MAJORITY, 0, nil, nil},
		{"none", []replica.Holding{h("n1", "aa"), h("n2", "aa"), h("n3", "aa")}, repov1.DataLossStatus_DATA_LOSS_STATUS_LOST, 0, []string{"refs/heads/main"}, nil},
		// Only a non-voter holds it: still below a majority of voters.
		{"non-voter only", []replica.Holding{h("n1", "aa"), h("n2", "aa"), h("n3", "aa"), h("n4")}, repov1.DataLossStatus_DATA_LOSS_STATUS_BELOW_MAJORITY, 0, nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rl := dataLossOf(refs, voters, tc.hs)
			if rl.GetStatus() != tc.status || rl.GetHeldBy() != tc.heldBy || rl.GetVoters() != 3 || !slices.Equal(rl.GetLostRefs(), tc.lost) {
				t.Fatalf("got %v held by %d of %d, lost %v; want %v held by %d, lost %v", rl.GetStatus(), rl.GetHeldBy(), rl.GetVoters(), rl.GetLostRefs(), tc.status, tc.heldBy, tc.lost)
			}
			for _, n := range rl.GetNodes() {
				if want, ok := tc.missing[n.GetNodeId()]; ok && !slices.Equal(n.GetMissingRefs(), want) {
					t.Errorf("%s misses %v, want %v", n.GetNodeId(), n.GetMissingRefs(), want)
				}
			}
		})
	}
	if rl := dataLossOf(map[string]string{}, voters, []replica.Holding{h("n1")}); rl.GetStatus() != repov1.DataLossStatus_DATA_LOSS_STATUS_HEALTHY {
		t.Errorf("an empty repository is %v, want healthy", rl.GetStatus())
	}
}
