package replica

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/gitraft/gitraft/gitproto"
	"github.com/gitraft/gitraft/storage"
)

// A copy behind the version a backup needs catches up before its packs are
// opened; a version it cannot reach in time, or another incarnation, is
// refused with an error that says which.
func Test_Backup_OpenForBackup(t *testing.T) {
	c := newFakeCluster(t, 3)
	d := c.newPush("refs/heads/main")
	p := c.begin(context.Background(), 0)
	if _, err := p.Commit(context.Background(), d.quarantine, []gitproto.RefUpdate{d.update}, false, noProgress); err != nil {
		t.Fatal(err)
	}
	c.migrate(0, d)
	p.Finish(true)
	waitFor(t, "node 2 to hold the pack", func() bool { return c.holds(2, d.update.New) })
	n2 := c.nodes[2].r
	if at := n2.copyOf("r").pos(); at.version != 1 {
		t.Fatalf("node 2's copy is at version %d before the backup, want 1 (behind)", at.version)
	}
	ctx := context.Background()
	packs, version, err := n2.OpenForBackup(ctx, "r", 7, 2, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	storage.ClosePacks(packs)
	if version != 2 || len(packs) != 1 {
		t.Fatalf("opened %d packs at version %d, want the push's at 2", len(packs), version)
	}
	if _, _, err := n2.OpenForBackup(ctx, "r", 7, 5, 300*time.Millisecond); !errors.Is(err, ErrBehind) {
		t.Errorf("a version the state never reached: %v", err)
	}
	if _, _, err := n2.OpenForBackup(ctx, "r", 6, 1, time.Second); !errors.Is(err, ErrReplaced) {
		t.Errorf("another incarnation: %v", err)
	}
	if _, _, err := n2.OpenForBackup(ctx, "nope", 1, 1, time.Second); !errors.Is(err, ErrReplaced) {
		t.Errorf("a repository the state does not have: %v", err)
	}
}
