package storage

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// packRevs writes a pack of what revs (pack-objects --revs input, one per
// line, ^ for excluded) reach and returns its .pack path and checksum.
func packRevs(t *testing.T, dir string, revs ...string) (string, string) {
	t.Helper()
	base := filepath.Join(t.TempDir(), "p")
	c := exec.Command("git", "pack-objects", "--revs", "-q", base)
	c.Dir, c.Stdin = dir, strings.NewReader(strings.Join(revs, "\n")+"\n")
	out, err := c.Output()
	if err != nil {
		t.Fatal(err)
	}
	h := strings.TrimSpace(string(out))
	return base + "-" + h + ".pack", h
}

// damageable is a copy with three packs: the first two commits of main
// (old), the two after them (main's tip), and an unrelated history (solo).
type damageable struct {
	s                    *Store
	repo                 string
	old, tip, solo       string
	oldPack, tipPack     string
	oldPath, tipPackPath string
}

func newDamageable(t *testing.T) *damageable {
	t.Helper()
	s := mustStore(t)
	ctx := context.Background()
	work, oids := scratch(t, 4)
	git(t, work, "checkout", "-q", "--orphan", "solo")
	os.WriteFile(filepath.Join(work, "g"), []byte("solo\n"), 0o644)
	git(t, work, "add", "g")
	git(t, work, "commit", "-q", "-m", "solo")
	solo := git(t, work, "rev-parse", "HEAD")
	d := &damageable{s: s, repo: "r", old: oids[1], tip: oids[3], solo: solo}
	if err := s.Init(ctx, "r", 1); err != nil {
		t.Fatal(err)
	}
	for i, revs := range [][]string{{oids[1]}, {oids[3], "^" + oids[1]}, {solo}} {
		pp, sum := packRevs(t, work, revs...)
		pf, _ := os.Open(pp)
		xf, _ := os.Open(strings.TrimSuffix(pp, ".pack") + ".idx")
		if _, err := s.InstallPack(ctx, "r", pf, xf); err != nil {
			t.Fatal(err)
		}
		pf.Close()
		xf.Close()
		switch i {
		case 0:
			d.oldPack = "pack-" + sum
		case 1:
			d.tipPack = "pack-" + sum
		}
	}
	p, _ := s.Path("r")
	d.oldPath = filepath.Join(p, "objects", "pack", d.oldPack)
	d.tipPackPath = filepath.Join(p, "objects", "pack", d.tipPack)
	refs := map[string]string{"refs/heads/main": d.tip, "refs/heads/old": d.old, "refs/heads/solo": solo}
	if err := s.SetRefs(ctx, "r", refs, "refs/heads/main"); err != nil {
		t.Fatal(err)
	}
	return d
}

func Test_Scrub_SoundCopy(t *testing.T) {
	d := newDamageable(t)
	ctx := context.Background()
	bad, n, err := d.s.VerifyPacks(ctx, d.repo, nil)
	if err != nil || len(bad) != 0 {
		t.Fatalf("VerifyPacks on a sound copy = %v, %v", bad, err)
	}
	if want, _ := d.s.PackBytes(d.repo); n != want || n == 0 {
		t.Errorf("VerifyPacks read %d bytes, the packs and indexes hold %d", n, want)
	}
	if err := d.s.CheckConnectivity(ctx, d.repo); err != nil {
		t.Fatalf("CheckConnectivity on a sound copy: %v", err)
	}
	if dropped, err := d.s.DropRefsNotWhole(ctx, d.repo); err != nil || len(dropped) != 0 {
		t.Fatalf("DropRefsNotWhole on a sound copy = %v, %v", dropped, err)
	}
}

// A byte flipped on disk in one pack: its checksum says so, and only its.
func Test_Scrub_VerifyPacksFindsAFlippedByte(t *testing.T) {
	d := newDamageable(t)
	path := d.tipPackPath + ".pack"
	os.Chmod(path, 0o644)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0x40
	if err := os.WriteFile(path, b, 0o444); err != nil {
		t.Fatal(err)
	}
	var paced int
	bad, _, err := d.s.VerifyPacks(context.Background(), d.repo, func(_ context.Context, n int) error { paced += n; return nil })
	if err != nil {
		t.Fatal(err)
	}
	if len(bad) != 1 || bad[0].Pack != d.tipPack || !strings.Contains(bad[0].Why, "checksum") {
		t.Fatalf("VerifyPacks = %+v, want %s with a checksum mismatch", bad, d.tipPack)
	}
	if paced == 0 {
		t.Error("VerifyPacks never let the caller pace it")
	}
	// Set aside, git no longer sees it, and the copy lacks its objects.
	dir, err := d.s.SetAsidePacks(d.repo, []string{d.tipPack})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, d.tipPack+".pack")); err != nil {
		t.Errorf("the damaged pack is not in %s: %v", dir, err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the damaged pack is still in objects/pack: %v", err)
	}
	if err := d.s.CheckConnectivity(context.Background(), d.repo); !errors.Is(err, ErrDamaged) {
		t.Fatalf("CheckConnectivity after setting the pack aside = %v, want ErrDamaged", err)
	}
	if _, err := d.s.SetAsidePacks(d.repo, []string{"../../x"}); err == nil {
		t.Error("SetAsidePacks took a path for a pack name")
	}
}

// A lost pack under a tip that is still there: the ref-trusting check
// (Missing) cannot see it, git fsck --connectivity-only does, and
// DropRefsNotWhole drops exactly the refs whose history is gone.
func Test_Scrub_LostHistoryPack(t *testing.T) {
	d := newDamageable(t)
	ctx := context.Background()
	for _, ext := range []string{".pack", ".idx"} {
		if err := os.Remove(d.oldPath + ext); err != nil {
			t.Fatal(err)
		}
	}
	if bad, _, err := d.s.VerifyPacks(ctx, d.repo, nil); err != nil || len(bad) != 0 {
		t.Fatalf("VerifyPacks = %v, %v: the remaining packs are sound", bad, err)
	}
	err := d.s.CheckConnectivity(ctx, d.repo)
	if !errors.Is(err, ErrDamaged) {
		t.Fatalf("CheckConnectivity = %v, want ErrDamaged", err)
	}
	dropped, err := d.s.DropRefsNotWhole(ctx, d.repo)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"refs/heads/main", "refs/heads/old"}; !slices.Equal(dropped, want) {
		t.Fatalf("DropRefsNotWhole = %v, want %v", dropped, want)
	}
	refs, _ := d.s.Refs(ctx, d.repo)
	if len(refs) != 1 || refs["refs/heads/solo"] != d.solo {
		t.Fatalf("refs left = %v, want only solo", refs)
	}
	// With the broken refs gone, Missing names the gap.
	if m, err := d.s.Missing(ctx, d.repo, []string{d.tip}); err != nil || len(m) != 1 {
		t.Fatalf("Missing(tip) = %v, %v; want the tip, whose history is gone", m, err)
	}
}

// The damage is recorded in the marker, survives a List, and a version
// recorded after healing clears it.
func Test_Scrub_MarkDamagedSurvivesUntilSetVersion(t *testing.T) {
	d := newDamageable(t)
	if err := d.s.MarkDamaged(d.repo, "pack-x: bad"); err != nil {
		t.Fatal(err)
	}
	l, err := d.s.Local(d.repo)
	if err != nil || l.Damaged != "pack-x: bad" || l.Version != 1 || l.ID != 1 {
		t.Fatalf("Local = %+v, %v", l, err)
	}
	list, _ := d.s.List()
	if len(list) != 1 || list[0].Damaged == "" {
		t.Fatalf("List = %+v", list)
	}
	if err := d.s.SetVersion(d.repo, 1, 2); err != nil {
		t.Fatal(err)
	}
	if l, _ := d.s.Local(d.repo); l.Damaged != "" || l.Version != 2 {
		t.Fatalf("after SetVersion: %+v", l)
	}
}
