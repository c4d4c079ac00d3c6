package storage

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// commitIn commits content to file f in a work tree and returns the commit.
func commitIn(t *testing.T, dir, f, content string) string {
	t.Helper()
	os.WriteFile(filepath.Join(dir, f), []byte(content), 0o644)
	git(t, dir, "add", f)
	git(t, dir, "commit", "-q", "-m", f+" "+content)
	return git(t, dir, "rev-parse", "HEAD")
}

// installRange installs, as one pack, the objects of rev (and, with not,
// not those of not) from a work tree, and returns the pack's path in the
// repository.
func installRange(t *testing.T, s *Store, name, work, rev, not string) string {
	t.Helper()
	revs := rev
	if not != "" {
		revs += "\n^" + not
	}
	pack, idx := packOf(t, work, revs)
	pf, _ := os.Open(pack)
	xf, _ := os.Open(idx)
	defer pf.Close()
	defer xf.Close()
	sum, err := s.InstallPack(context.Background(), name, pf, xf)
	if err != nil {
		t.Fatal(err)
	}
	p, _ := s.Path(name)
	return filepath.Join(p, "objects", "pack", "pack-"+sum+".pack")
}

func hasObject(s *Store, name, oid string) bool {
	p, _ := s.Path(name)
	c := exec.Command("git", "cat-file", "-e", oid)
	c.Dir, c.Env = p, append(os.Environ(), "GIT_DIR=.")
	return c.Run() == nil
}

func age(t *testing.T, path string, d time.Duration) {
	t.Helper()
	old := time.Now().Add(-d)
	if err := os.Chtimes(path, old, old); err != nil {
		t.Fatal(err)
	}
}

// A thousand small pushes make a thousand packs; Housekeep rolls them up
// (geometric, then full with a prune), every ref still resolves to its
// commit, git fsck is clean, and the derived indexes are there.
func Test_Housekeep_RepackReducesPacks(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	s.Init(ctx, "r", 1)
	work := t.TempDir()
	git(t, work, "init", "-q", "-b", "main")
	want := map[string]string{}
	prev := ""
	for i := range 20 {
		oid := commitIn(t, work, "f", strings.Repeat("y", i+1))
		installRange(t, s, "r", work, oid, prev)
		want["refs/heads/b"+string(rune('a'+i))] = oid
		if err := s.SetRefs(ctx, "r", want, ""); err != nil {
			t.Fatal(err)
		}
		prev = oid
	}
	// And a few loose objects (an older git, or a hand's `hash-object`).
	p, _ := s.Path("r")
	for i := range 3 {
		c := exec.Command("git", "hash-object", "-w", "--stdin")
		c.Dir, c.Env, c.Stdin = p, append(os.Environ(), "GIT_DIR=."), strings.NewReader(strings.Repeat("loose", i+1))
		if out, err := c.CombinedOutput(); err != nil {
			t.Fatalf("hash-object: %v: %s", err, out)
		}
	}
	h, err := s.Health("r")
	if err != nil || h.Packs != 20 || h.LooseObjects != 3 || h.LooseBytes == 0 || h.CommitGraph || h.MultiPackIndex || !h.LastRun.IsZero() {
		t.Fatalf("Health before = %+v, %v", h, err)
	}
	check := func(what string) {
		t.Helper()
		p, _ := s.Path("r")
		for ref, oid := range want {
			if got := git(t, p, "rev-parse", ref); got != oid {
				t.Fatalf("%s: %s = %s, want %s", what, ref, got, oid)
			}
		}
		git(t, p, "fsck", "--strict", "--no-progress", "--no-dangling")
	}
	res, err := s.Housekeep(ctx, "r", HousekeepOptions{})
	if err != nil {
		t.Fatal(err)
	}
	check("geometric")
	if res.Before.Packs != 20 || res.After.Packs >= 20 || res.After.LooseObjects != 0 || res.Pruned || !res.After.CommitGraph || !res.After.MultiPackIndex || res.After.LastRun.IsZero() {
		t.Fatalf("geometric: %+v", res)
	}
	res, err = s.Housekeep(ctx, "r", HousekeepOptions{Prune: true, Grace: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	check("full")
	// The loose objects are unreachable and young: they wait in a cruft
	// pack for the grace period.
	if res.After.Packs != 2 || res.After.CruftPacks != 1 || !res.Pruned || res.After.LastPrune.IsZero() || !res.After.Bitmap || !res.After.CommitGraph {
		t.Fatalf("full: %+v", res)
	}
	res, err = s.Housekeep(ctx, "r", HousekeepOptions{Prune: true})
	if err != nil {
		t.Fatal(err)
	}
	check("full, no grace")
	if res.After.Packs != 1 || res.After.CruftPacks != 0 {
		t.Fatalf("full, no grace: %+v", res)
	}
	// An empty repository is no error.
	s.Init(ctx, "empty", 1)
	if _, err := s.Housekeep(ctx, "empty", HousekeepOptions{Prune: true}); err != nil {
		t.Fatalf("empty repository: %v", err)
	}
}

// A prune drops what no ref reaches and nothing wrote for the grace
// period (a failed push's pack), and keeps the objects a push in flight
// still needs: a peer's pack that no ref reaches yet (young), and a push's
// quarantine (which repack never looks into). The in-flight push then
// commits.
func Test_Housekeep_PruneKeepsInFlightDropsOld(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	s.Init(ctx, "r", 1)
	p, _ := s.Path("r")
	work := t.TempDir()
	git(t, work, "init", "-q", "-b", "main")
	base := commitIn(t, work, "f", "base")
	installRange(t, s, "r", work, base, "")
	if err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": base}, ""); err != nil {
		t.Fatal(err)
	}
	// A push that failed two hours ago left its pack.
	git(t, work, "checkout", "-q", "-b", "failed", base)
	failed := commitIn(t, work, "g", "failed push")
	age(t, installRange(t, s, "r", work, failed, base), 2*time.Hour)
	// A peer's pack of a push whose ref change is not committed yet.
	git(t, work, "checkout", "-q", "-b", "inflight", base)
	inflight := commitIn(t, work, "h", "in flight")
	installRange(t, s, "r", work, inflight, base)
	// A push this node takes, still in quarantine (old files: a slow
	// client; the repack must not touch it at all).
	git(t, work, "checkout", "-q", "-b", "quarantined", base)
	quarantined := commitIn(t, work, "i", "quarantined")
	q := filepath.Join(p, "objects", "tmp_objdir-incoming-test")
	os.MkdirAll(filepath.Join(q, "pack"), 0o755)
	pack, idx := packOf(t, work, quarantined+"\n^"+base)
	for _, f := range []string{pack, idx} {
		b, _ := os.ReadFile(f)
		os.WriteFile(filepath.Join(q, "pack", filepath.Base(f)), b, 0o444)
		age(t, filepath.Join(q, "pack", filepath.Base(f)), 3*time.Hour)
	}

	res, err := s.Housekeep(ctx, "r", HousekeepOptions{Prune: true, Grace: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Pruned {
		t.Fatalf("not pruned: %+v", res)
	}
	if hasObject(s, "r", failed) {
		t.Error("the failed push's commit, unreachable and two hours old, survived a prune with an hour's grace")
	}
	if !hasObject(s, "r", inflight) {
		t.Fatal("the prune dropped the pack of a push in flight")
	}
	if missing, err := s.MissingInQuarantine(ctx, "r", q, []string{quarantined}); err != nil || len(missing) != 0 {
		t.Fatalf("the quarantined push lost objects: %v, %v", missing, err)
	}
	// Both pushes commit.
	if err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": base, "refs/heads/inflight": inflight}, ""); err != nil {
		t.Fatal(err)
	}
	git(t, p, "fsck", "--strict", "--no-progress", "--no-dangling")
	// A second prune with no grace keeps what the refs reach.
	if _, err := s.Housekeep(ctx, "r", HousekeepOptions{Prune: true}); err != nil {
		t.Fatal(err)
	}
	if !hasObject(s, "r", inflight) || !hasObject(s, "r", base) {
		t.Fatal("a prune dropped reachable objects")
	}
	git(t, p, "fsck", "--strict", "--no-progress", "--no-dangling")
}

// What failed pushes and killed git commands leave goes once it is older
// than the grace period; what is younger (a push still running) and an
// operator's own .keep stay.
func Test_RemoveLeftovers_AfterGrace(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	s.Init(ctx, "r", 1)
	p, _ := s.Path("r")
	work := t.TempDir()
	git(t, work, "init", "-q", "-b", "main")
	oid := commitIn(t, work, "f", "x")
	packPath := installRange(t, s, "r", work, oid, "")
	keep := strings.TrimSuffix(packPath, ".pack") + ".keep"
	objects := filepath.Join(p, "objects")
	write := func(rel, content string, old bool) string {
		f := filepath.Join(objects, rel)
		os.MkdirAll(filepath.Dir(f), 0o755)
		if err := os.WriteFile(f, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if old {
			for d := f; d != objects && d != filepath.Join(objects, "pack"); d = filepath.Dir(d) {
				age(t, d, 2*time.Hour)
			}
		}
		return f
	}
	gone := []string{
		write("pack/tmp_pack_old", "x", true),
		write("pack/tmp_idx_old", "x", true),
		write("pack/tmp_gitraft_old_pack", "x", true),
		write("pack/.tmp-123-pack-old.pack", "x", true),
		write("tmp_objdir-incoming-old/pack/tmp_pack_x", "x", true),
		write("ab/tmp_obj_old", "x", true),
		write(strings.TrimPrefix(keep, objects+"/"), "receive-pack 4242 on host\n", true),
	}
	stay := []string{
		write("pack/tmp_pack_young", "x", false),
		write("tmp_objdir-incoming-young/pack/tmp_pack_x", "x", false),
		// An old quarantine with one file still being written.
		write("tmp_objdir-incoming-busy/pack/pack-a.idx", "x", true),
		write("tmp_objdir-incoming-busy/pack/tmp_pack_growing", "x", false),
	}
	h, _ := s.Health("r")
	if h.Leftovers != 10 || h.KeptPacks != 1 || h.LooseObjects != 0 {
		t.Fatalf("Health before = %+v", h)
	}
	n, err := s.RemoveLeftovers("r", time.Hour)
	if err != nil || n != 7 {
		t.Fatalf("RemoveLeftovers = %d, %v; want 7", n, err)
	}
	for _, f := range gone {
		if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s is still there", f)
		}
	}
	if _, err := os.Stat(filepath.Join(objects, "tmp_objdir-incoming-old")); err == nil {
		t.Error("the old quarantine directory is still there")
	}
	for _, f := range stay {
		if _, err := os.Stat(f); err != nil {
			t.Errorf("%s was removed: %v", f, err)
		}
	}
	// An operator's .keep is not ours to remove.
	write(strings.TrimPrefix(keep, objects+"/"), "kept by hand\n", true)
	if n, err := s.RemoveLeftovers("r", time.Hour); err != nil || n != 0 {
		t.Fatalf("RemoveLeftovers again = %d, %v", n, err)
	}
	if _, err := os.Stat(keep); err != nil {
		t.Fatal("an operator's .keep was removed")
	}
	if !hasObject(s, "r", oid) {
		t.Fatal("an object went")
	}
}

// A pack installed again (a push sent the same pack as an earlier, failed
// one) is freshened, so a later prune keeps it; if a prune is under way it
// waits for it, and installs the pack again if the prune took it.
func Test_InstallPack_AgainDuringPrune(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	s.Init(ctx, "r", 1)
	p, _ := s.Path("r")
	work := t.TempDir()
	git(t, work, "init", "-q", "-b", "main")
	oid := commitIn(t, work, "f", "x")
	packPath := installRange(t, s, "r", work, oid, "")
	age(t, packPath, 3*time.Hour)
	installRange(t, s, "r", work, oid, "")
	if fi, _ := os.Stat(packPath); time.Since(fi.ModTime()) > time.Minute {
		t.Fatalf("a pack installed again kept its old mtime %v", fi.ModTime())
	}
	if _, err := s.Housekeep(ctx, "r", HousekeepOptions{Prune: true, Grace: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if !hasObject(s, "r", oid) {
		t.Fatal("the prune dropped a pack a push had just sent again")
	}

	// Now the pack is old again and a prune is under way.
	for _, f := range []string{packPath, strings.TrimSuffix(packPath, ".pack") + ".idx"} {
		os.Remove(f)
	}
	packPath = installRange(t, s, "r", work, oid, "")
	age(t, packPath, 3*time.Hour)
	done, err := s.startPrune(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() {
		pack, idx := packOf(t, work, oid)
		pf, _ := os.Open(pack)
		xf, _ := os.Open(idx)
		defer pf.Close()
		defer xf.Close()
		_, err := s.InstallPack(ctx, "r", pf, xf)
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("InstallPack of a pack already there returned during a prune: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	// The prune takes the old, unreachable pack.
	os.Remove(strings.TrimSuffix(packPath, ".pack") + ".idx")
	os.Remove(packPath)
	done()
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if !hasObject(s, "r", oid) {
		t.Fatal("InstallPack did not put back the pack the prune took")
	}
}

// Housekeeping runs beside a peer's packs arriving (InstallPack, which
// needs no guard): no repack fails on a pack half installed, and no
// arriving pack loses an object.
func Test_Housekeep_BesideInstallPack(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	s.Init(ctx, "r", 1)
	work := t.TempDir()
	git(t, work, "init", "-q", "-b", "main")
	type packFiles struct{ pack, idx, oid string }
	var packs []packFiles
	prev := ""
	for i := range 25 {
		oid := commitIn(t, work, "f", strings.Repeat("z", i+1))
		revs := oid
		if prev != "" {
			revs += "\n^" + prev
		}
		p, x := packOf(t, work, revs)
		packs = append(packs, packFiles{p, x, oid})
		prev = oid
	}
	done := make(chan error, 1)
	go func() {
		for _, p := range packs {
			pf, _ := os.Open(p.pack)
			xf, _ := os.Open(p.idx)
			_, err := s.InstallPack(ctx, "r", pf, xf)
			pf.Close()
			xf.Close()
			if err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	for i := 0; ; i++ {
		if _, err := s.Housekeep(ctx, "r", HousekeepOptions{Prune: i%2 == 0, Grace: time.Hour}); err != nil {
			t.Fatalf("housekeeping beside InstallPack: %v", err)
		}
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			if missing, err := s.Missing(ctx, "r", []string{prev}); err != nil || len(missing) > 0 {
				t.Fatalf("after %d runs: missing %v, %v", i+1, missing, err)
			}
			return
		default:
		}
	}
}

// A catch-up finds the commits a ref must name in an old pack that no ref
// reaches (an earlier push of them failed), while a prune runs: its ref
// change waits for the prune, and then refuses, since the objects are
// gone, instead of naming them. (Missing's answer from before the prune is
// not trusted after it.)
func Test_SetRefs_WaitsForPrune(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	s.Init(ctx, "r", 1)
	p, _ := s.Path("r")
	work := t.TempDir()
	git(t, work, "init", "-q", "-b", "main")
	oid := commitIn(t, work, "f", "x")
	packPath := installRange(t, s, "r", work, oid, "")
	if missing, err := s.Missing(ctx, "r", []string{oid}); err != nil || len(missing) != 0 {
		t.Fatalf("Missing = %v, %v", missing, err)
	}
	done, err := s.startPrune(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() { got <- s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": oid}, "") }()
	select {
	case err := <-got:
		t.Fatalf("SetRefs ran during a prune: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	// The prune takes the old, unreachable pack.
	os.Remove(strings.TrimSuffix(packPath, ".pack") + ".idx")
	os.Remove(packPath)
	s.conn.pruneEnded(p)
	done()
	if err := <-got; !errors.Is(err, ErrMissingObjects) {
		t.Fatalf("SetRefs after the prune took its objects = %v, want ErrMissingObjects", err)
	}
	if refs, _ := s.Refs(ctx, "r"); len(refs) != 0 {
		t.Fatalf("refs = %v", refs)
	}
	// And a prune waits for a ref change under way.
	end, err := s.beginRefChange(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan struct{})
	go func() {
		d, _ := s.startPrune(ctx, p)
		close(started)
		d()
	}()
	select {
	case <-started:
		t.Fatal("a prune started during a ref change")
	case <-time.After(100 * time.Millisecond):
	}
	end()
	<-started
}
