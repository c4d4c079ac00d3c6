package cluster

import (
	"errors"
	"time"

	"github.com/hashicorp/raft"
)

// snapshotRetry is how long snapshotBySize waits after a snapshot that
// failed before it tries again.
const snapshotRetry = 10 * time.Second

// snapshotBySize takes a snapshot whenever the entries applied since the
// last one reach Raft.SnapshotBytes. Raft snapshots by entry count
// (SnapshotThreshold) only; a push of 10,000 refs is one entry of about a
// megabyte, so a log of large entries could grow without bound and be
// replayed whole at every restart. Apply only counts and pokes: the
// snapshot itself runs here, on a goroutine that lives as long as the node.
func (n *Node) snapshotBySize() {
	limit := n.cfg.Raft.SnapshotBytes
	for {
		select {
		case <-n.stop:
			return
		case <-n.fsm.logGrown:
		}
		grown := n.fsm.BytesSinceSnapshot()
		if grown < limit || n.fsm.Halted() != nil {
			continue // a snapshot meanwhile covered them; or halted (no snapshots)
		}
		start := time.Now()
		err := n.raft.Snapshot().Error()
		switch {
		case err == nil:
			n.metrics.sizeSnapshots.Inc()
			n.log.Info("took a snapshot: the log since the last one passed its size limit", "index", n.fsm.Index(), "bytes", grown, "limit", limit, "took", time.Since(start).Round(time.Millisecond))
		case errors.Is(err, raft.ErrNothingNewToSnapshot), errors.Is(err, raft.ErrRaftShutdown):
		default:
			n.log.Warn("snapshot by log size failed; will retry", "bytes", grown, "err", err)
			select {
			case <-n.stop:
				return
			case <-time.After(snapshotRetry):
			}
		}
	}
}
