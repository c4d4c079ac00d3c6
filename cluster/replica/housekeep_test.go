package replica

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gitraft/gitraft/storage"
)

func Test_HousekeepDue(t *testing.T) {
	cfg := HousekeepConfig{}
	cfg.setDefaults()
	now := time.Now()
	pruned := now.Add(-time.Hour)
	for _, c := range []struct {
		what string
		h    storage.Health
		due  bool
	}{
		{"empty", storage.Health{}, false},
		{"one pack", storage.Health{Packs: 1, Since: pruned}, false},
		{"a few packs, pruned lately", storage.Health{Packs: 5, CommitGraph: true, LastPrune: pruned}, false},
		{"pack threshold", storage.Health{Packs: 16, CommitGraph: true, LastPrune: pruned}, true},
		{"loose threshold", storage.Health{Packs: 1, LooseObjects: 1024, CommitGraph: true, LastPrune: pruned}, true},
		{"a few packs, prune due", storage.Health{Packs: 2, CommitGraph: true, LastPrune: now.Add(-25 * time.Hour)}, true},
		{"a few packs, first seen lately", storage.Health{Packs: 2, Since: pruned}, false},
		{"a few packs, first seen a day ago", storage.Health{Packs: 2, Since: now.Add(-25 * time.Hour)}, true},
		{"leftovers, first seen a day ago", storage.Health{Packs: 1, Leftovers: 1, Since: now.Add(-25 * time.Hour)}, true},
		{"one pack, never pruned, nothing to prune", storage.Health{Packs: 1, CommitGraph: true, Since: now.Add(-25 * time.Hour)}, false},
	} {
		if got := housekeepDue(c.h, cfg, now); got != c.due {
			t.Errorf("%s: due = %v, want %v", c.what, got, c.due)
		}
	}
}

// A copy behind the committed version holds the pack of a committed push
// that its refs do not reach yet: housekeeping must not prune it, however
// old the pack. Once the copy has caught up, it prunes, and the push's
// objects stay (reachable now).
func Test_Housekeep_PrunesOnlyCurrentCopy(t *testing.T) {
	c := newFakeCluster(t, 3)
	ctx := context.Background()
	n := c.nodes[1]
	d := c.newPush("refs/heads/main")
	// The pack reached node 1 (PutPack) two hours ago; the push committed,
	// and node 1 has not applied it to its copy yet.
	path, _ := n.store.Path(c.repo)
	for _, ext := range []string{".pack", ".idx"} {
		b, err := os.ReadFile(d.pack + ext)
		if err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(path, "objects", "pack", filepath.Base(d.pack)+ext)
		if err := os.WriteFile(dst, b, 0o444); err != nil {
			t.Fatal(err)
		}
		old := time.Now().Add(-2 * time.Hour)
		os.Chtimes(dst, old, old)
	}
	c.s.setRef(c.repo, "refs/heads/main", d.update.New)

	rep, err := n.r.Housekeep(ctx, c.repo)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Pruned || !strings.Contains(rep.PruneSkipped, "behind") {
		t.Fatalf("a copy behind was pruned, or not told why not: %+v", rep)
	}
	if !c.holds(1, d.update.New) {
		t.Fatal("housekeeping of a copy behind dropped a committed push's objects")
	}

	// Caught up, the copy is pruned; the push's objects are reachable.
	cp := n.r.copyOf(c.repo)
	if err := cp.guard.Lock(ctx); err != nil {
		t.Fatal(err)
	}
	err = n.r.catchUpLocked(ctx, cp, c.repo)
	cp.guard.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	rep, err = n.r.Housekeep(ctx, c.repo)
	if err != nil || !rep.Pruned || rep.PruneSkipped != "" {
		t.Fatalf("a current copy: %+v, %v", rep, err)
	}
	if !c.holds(1, d.update.New) {
		t.Fatal("the prune dropped a reachable commit")
	}
	fsck := exec.Command("git", "fsck", "--strict", "--no-dangling")
	fsck.Dir, fsck.Env = path, append(os.Environ(), "GIT_DIR=.")
	if out, err := fsck.CombinedOutput(); err != nil {
		t.Fatalf("git fsck: %v\n%s", err, out)
	}
	st := n.r.HousekeepStats()
	if st.Runs != 2 || st.Failures != 0 || st.PacksSum != rep.After.Packs || st.PacksMax != rep.After.Packs {
		t.Fatalf("stats = %+v after %+v", st, rep)
	}
}

// A push holding the copy's guard keeps its quarantine, however old; the
// leftovers of a failed push go once no push holds the guard.
func Test_Housekeep_LeftoversWaitForThePush(t *testing.T) {
	c := newFakeCluster(t, 1)
	ctx := context.Background()
	n := c.nodes[0]
	d := c.newPush("refs/heads/main")
	old := time.Now().Add(-2 * time.Hour)
	filepath.Walk(d.quarantine, func(p string, _ os.FileInfo, _ error) error { return os.Chtimes(p, old, old) })
	cp := n.r.copyOf(c.repo)
	if err := cp.guard.Lock(ctx); err != nil {
		t.Fatal(err)
	}
	rep, err := n.r.Housekeep(ctx, c.repo)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(d.quarantine); err != nil || rep.LeftoversRemoved != 0 {
		t.Fatalf("a push's quarantine went while the push held the guard (%v, %+v)", err, rep)
	}
	cp.guard.Unlock()
	rep, err = n.r.Housekeep(ctx, c.repo)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(d.quarantine); !os.IsNotExist(err) || rep.LeftoversRemoved != 1 {
		t.Fatalf("a failed push's old quarantine stayed (%v, %+v)", err, rep)
	}
}
