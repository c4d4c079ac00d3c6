package cluster

import (
	"fmt"
	"testing"
	"time"
)

// A push of many refs is one large entry: the log must be snapshotted by
// its size too, long before it holds SnapshotThreshold entries.
func Test_Node_SnapshotByLogSize(t *testing.T) {
	c := mustNewCluster(t, 1, func(cfg *Config) {
		cfg.Raft.SnapshotThreshold = 1 << 20 // never, by count
		cfg.Raft.SnapshotInterval = time.Hour
		cfg.Raft.SnapshotBytes = 64 << 10
	})
	n := c.waitLeader()
	propose(t, n, create("big"))
	tok := propose(t, n, acquire("big", "n1/push", time.Minute)).GetLock().GetFencingToken()
	snapshots := func() int {
		list, err := n.snaps.List()
		if err != nil {
			t.Fatal(err)
		}
		return len(list)
	}
	if got := snapshots(); got != 0 {
		t.Fatalf("%d snapshots before any large entry", got)
	}
	// Two pushes of 500 refs each: about 100 KiB in a handful of entries.
	for p := range 2 {
		var triples []string
		for i := range 500 {
			triples = append(triples, fmt.Sprintf("refs/heads/p%d-branch-%04d", p, i), "", oidA)
		}
		propose(t, n, update("big", tok, true, triples...))
	}
	waitFor(t, "a snapshot taken by log size", 10*time.Second, func() bool { return snapshots() > 0 })
	list, _ := n.snaps.List()
	if list[0].Index < 4 {
		t.Errorf("snapshot at index %d does not cover the pushes", list[0].Index)
	}
	if got := n.fsm.BytesSinceSnapshot(); got >= 64<<10 {
		t.Errorf("bytes since the snapshot = %d, want them taken off", got)
	}
	t.Logf("snapshot at index %d after %d entries; %d bytes since", list[0].Index, n.AppliedIndex(), n.fsm.BytesSinceSnapshot())
}
