package storage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func mustStore(t testing.TB) *Store {
	t.Helper()
	s, err := Open(Config{Root: filepath.Join(t.TempDir(), "repos")}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func git(t testing.TB, dir string, args ...string) string {
	t.Helper()
	c := exec.Command("git", args...)
	c.Dir = dir
	c.Env = append(os.Environ(), "GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@x", "GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@x", "GIT_CONFIG_GLOBAL=/dev/null")
	out, err := c.CombinedOutput()
	if err != nil {
		t.Fatalf("git %v: %v\n%s", args, err, out)
	}
	return strings.TrimSpace(string(out))
}

// scratch makes a work tree with n commits and returns it and the commits.
func scratch(t testing.TB, n int) (string, []string) {
	t.Helper()
	dir := t.TempDir()
	git(t, dir, "init", "-q", "-b", "main")
	var oids []string
	for i := range n {
		os.WriteFile(filepath.Join(dir, "f"), []byte(strings.Repeat("x", i*1000+1)), 0o644)
		git(t, dir, "add", "f")
		git(t, dir, "commit", "-q", "-m", "c")
		oids = append(oids, git(t, dir, "rev-parse", "HEAD"))
	}
	return dir, oids
}

// packOf writes a pack of every object reachable from rev and returns the
// .pack and .idx paths.
func packOf(t testing.TB, dir, rev string) (string, string) {
	t.Helper()
	base := filepath.Join(t.TempDir(), "p")
	c := exec.Command("git", "pack-objects", "--revs", "-q", base)
	c.Dir, c.Stdin = dir, strings.NewReader(rev+"\n")
	out, err := c.Output()
	if err != nil {
		t.Fatal(err)
	}
	h := strings.TrimSpace(string(out))
	return base + "-" + h + ".pack", base + "-" + h + ".idx"
}

func Test_Store_InitLocalList(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	if _, err := s.Local("a/b"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Local before Init: %v", err)
	}
	if err := s.Init(ctx, "a/b", 7); err != nil {
		t.Fatal(err)
	}
	if err := s.Init(ctx, "a/b", 7); err != nil {
		t.Fatalf("second Init with the same id: %v", err)
	}
	r, err := s.Local("a/b")
	if err != nil || r.ID != 7 || r.Version != 1 {
		t.Fatalf("Local = %+v, %v", r, err)
	}
	p, _ := s.Path("a/b")
	if got := git(t, p, "config", "receive.unpackLimit"); got != "1" {
		t.Errorf("receive.unpackLimit = %q", got)
	}
	if h, err := s.Head(ctx, "a/b"); err != nil || h != "refs/heads/main" {
		t.Errorf("HEAD = %q, %v", h, err)
	}
	if err := s.SetVersion("a/b", 7, 5); err != nil {
		t.Fatal(err)
	}
	if err := s.Init(ctx, "c", 9); err != nil {
		t.Fatal(err)
	}
	list, err := s.List()
	if err != nil || len(list) != 2 || list[0] != (Replica{Name: "a/b", ID: 7, Version: 5}) || list[1].Name != "c" {
		t.Fatalf("List = %+v, %v", list, err)
	}
	// Another incarnation of the same name replaces the old copy.
	if err := s.Init(ctx, "a/b", 8); err != nil {
		t.Fatal(err)
	}
	if r, _ := s.Local("a/b"); r.ID != 8 || r.Version != 1 {
		t.Fatalf("after re-Init: %+v", r)
	}
	os.WriteFile(filepath.Join(p, MarkerFile), []byte("{garbage"), 0o600)
	if _, err := s.Local("a/b"); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("corrupt marker: %v", err)
	}
	if err := s.Delete("c"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Local("c"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Local after Delete: %v", err)
	}
}

func Test_Store_InstallPackThenSetRefs(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	s.Init(ctx, "r", 1)
	work, oids := scratch(t, 3)
	missing, err := s.Missing(ctx, "r", oids)
	if err != nil || len(missing) != 3 {
		t.Fatalf("Missing before = %v, %v", missing, err)
	}
	if err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": oids[2]}, ""); !errors.Is(err, ErrMissingObjects) {
		t.Fatalf("SetRefs without the objects: %v", err)
	}
	if refs, _ := s.Refs(ctx, "r"); len(refs) != 0 {
		t.Fatalf("a failed SetRefs left refs: %v", refs)
	}
	pack, idx := packOf(t, work, oids[2])
	pf, _ := os.Open(pack)
	xf, _ := os.Open(idx)
	sum, err := s.InstallPack(ctx, "r", pf, xf)
	pf.Close()
	xf.Close()
	if err != nil || !strings.Contains(pack, sum) {
		t.Fatalf("InstallPack = %q, %v", sum, err)
	}
	if missing, _ := s.Missing(ctx, "r", oids); len(missing) != 0 {
		t.Fatalf("still missing %v", missing)
	}
	want := map[string]string{"refs/heads/main": oids[2], "refs/heads/old": oids[0], "refs/tags/v1": oids[1]}
	if err := s.SetRefs(ctx, "r", want, "refs/heads/old"); err != nil {
		t.Fatal(err)
	}
	want2 := map[string]string{"refs/heads/main": oids[1], "refs/tags/v1": oids[1]}
	if err := s.SetRefs(ctx, "r", want2, "refs/heads/main"); err != nil {
		t.Fatal(err)
	}
	refs, _ := s.Refs(ctx, "r")
	if len(refs) != 2 || refs["refs/heads/main"] != oids[1] {
		t.Fatalf("refs = %v, want %v", refs, want2)
	}
	p, _ := s.Path("r")
	git(t, p, "fsck", "--strict", "--no-progress")
	if h, _ := s.Head(ctx, "r"); h != "refs/heads/main" {
		t.Fatalf("HEAD = %q", h)
	}
}

func Test_Store_InstallPackRefusesCorruption(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	s.Init(ctx, "r", 1)
	work, oids := scratch(t, 2)
	pack, idx := packOf(t, work, oids[1])
	pb, _ := os.ReadFile(pack)
	ib, _ := os.ReadFile(idx)
	flipped := bytes.Clone(pb)
	flipped[len(flipped)/2] ^= 0xff
	if _, err := s.InstallPack(ctx, "r", bytes.NewReader(flipped), bytes.NewReader(ib)); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("flipped byte: %v", err)
	}
	work2, oids2 := scratch(t, 1)
	_, idx2 := packOf(t, work2, oids2[0])
	ib2, _ := os.ReadFile(idx2)
	if _, err := s.InstallPack(ctx, "r", bytes.NewReader(pb), bytes.NewReader(ib2)); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("another pack's index: %v", err)
	}
	if _, err := s.InstallPack(ctx, "r", bytes.NewReader(pb[:10]), bytes.NewReader(ib)); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("truncated pack: %v", err)
	}
	p, _ := s.Path("r")
	left, _ := filepath.Glob(filepath.Join(p, "objects", "pack", "*"))
	if len(left) != 0 {
		t.Fatalf("refused packs left files behind: %v", left)
	}
	// IndexPack takes a bare pack stream.
	if _, err := s.IndexPack(ctx, "r", bytes.NewReader(pb)); err != nil {
		t.Fatal(err)
	}
	if missing, _ := s.Missing(ctx, "r", oids); len(missing) != 0 {
		t.Fatalf("missing after IndexPack: %v", missing)
	}
}

func Test_Store_FetchFromPeer(t *testing.T) {
	ctx := context.Background()
	src, dst := mustStore(t), mustStore(t)
	src.Init(ctx, "r", 1)
	dst.Init(ctx, "r", 1)
	work, oids := scratch(t, 2)
	pack, idx := packOf(t, work, oids[1])
	pf, _ := os.Open(pack)
	xf, _ := os.Open(idx)
	src.InstallPack(ctx, "r", pf, xf)
	pf.Close()
	xf.Close()
	// Objects no ref points at, fetched by id (allowAnySHA1InWant).
	srcPath, _ := src.Path("r")
	if err := dst.Fetch(ctx, "r", srcPath, nil, []string{oids[1]}); err != nil {
		t.Fatal(err)
	}
	if missing, _ := dst.Missing(ctx, "r", oids); len(missing) != 0 {
		t.Fatalf("missing after Fetch: %v", missing)
	}
	if refs, _ := dst.Refs(ctx, "r"); len(refs) != 0 {
		t.Fatalf("Fetch touched refs: %v", refs)
	}
	if err := dst.Fetch(ctx, "r", srcPath, nil, []string{strings.Repeat("1", 40)}); err == nil {
		t.Fatal("fetching an object nobody has succeeded")
	}
}

func Test_Store_DiskFull(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("mounting a tiny tmpfs needs root; CI runs as root")
	}
	root := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", root).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs here (%v: %s)", err, out)
	}
	defer exec.Command("umount", "-l", root).Run()
	s, err := Open(Config{Root: filepath.Join(root, "repos")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := s.Init(ctx, "r", 1); err != nil {
		t.Fatal(err)
	}
	big := make([]byte, 4<<20)
	for i := range big {
		big[i] = byte(i * 7919)
	}
	_, err = s.InstallPack(ctx, "r", bytes.NewReader(big), bytes.NewReader(nil))
	if !errors.Is(err, ErrDiskFull) {
		t.Fatalf("InstallPack on a full disk: %v, want ErrDiskFull", err)
	}
	p, _ := s.Path("r")
	if left, _ := filepath.Glob(filepath.Join(p, "objects", "pack", "*")); len(left) != 0 {
		t.Fatalf("left behind: %v", left)
	}
}

// A git killed mid-update leaves ref lock files; with them every later
// update of those refs fails ("File exists") until they are removed.
func Test_Store_StaleRefLocksRemoved(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	s.Init(ctx, "r", 1)
	work, oids := scratch(t, 2)
	pack, idx := packOf(t, work, oids[1])
	pf, _ := os.Open(pack)
	xf, _ := os.Open(idx)
	if _, err := s.InstallPack(ctx, "r", pf, xf); err != nil {
		t.Fatal(err)
	}
	pf.Close()
	xf.Close()
	p, _ := s.Path("r")
	os.MkdirAll(filepath.Join(p, "refs", "heads", "team"), 0o755)
	for _, f := range []string{"refs/heads/main.lock", "refs/heads/team/x.lock", "packed-refs.lock"} {
		os.WriteFile(filepath.Join(p, f), nil, 0o644)
	}
	want := map[string]string{"refs/heads/main": oids[1], "refs/heads/team/x": oids[0]}
	if err := s.SetRefs(ctx, "r", want, ""); err == nil {
		t.Fatal("SetRefs succeeded with lock files in the way; the test does not test anything")
	}
	k, err := s.RemoveStaleLocks("r")
	if err != nil || k != 3 {
		t.Fatalf("RemoveStaleLocks = %d, %v; want 3", k, err)
	}
	if err := s.SetRefs(ctx, "r", want, ""); err != nil {
		t.Fatalf("SetRefs after removing the locks: %v", err)
	}
}

// MissingInQuarantine judges new values against the repository plus a
// push's quarantine, as receive-pack does before its hook.
func Test_Store_MissingInQuarantine(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	s.Init(ctx, "r", 1)
	work, oids := scratch(t, 2)
	p, _ := s.Path("r")
	q := filepath.Join(p, "objects", "tmp_objdir-incoming-test")
	os.MkdirAll(filepath.Join(q, "pack"), 0o755)
	pack, idx := packOf(t, work, oids[1])
	for _, f := range []string{pack, idx} {
		b, _ := os.ReadFile(f)
		os.WriteFile(filepath.Join(q, "pack", filepath.Base(f)), b, 0o644)
	}
	bogus := strings.Repeat("1", 40)
	missing, err := s.MissingInQuarantine(ctx, "r", q, []string{oids[1], bogus})
	if err != nil || len(missing) != 1 || missing[0] != bogus {
		t.Fatalf("MissingInQuarantine = %v, %v; want just %s", missing, err, bogus)
	}
	if m, _ := s.Missing(ctx, "r", []string{oids[1]}); len(m) != 1 {
		t.Fatalf("without the quarantine the object is missing: %v", m)
	}
	if _, err := s.MissingInQuarantine(ctx, "r", "/tmp", oids); err == nil {
		t.Fatal("a quarantine outside the repository was accepted")
	}
}

// Large ref changes are written as one packed-refs file; small ones after
// that still go through update-ref, and git reads the result as the refs.
func Test_Store_SetRefsManyPacked(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	s.Init(ctx, "r", 1)
	work, oids := scratch(t, 2)
	pack, idx := packOf(t, work, oids[1])
	pf, _ := os.Open(pack)
	xf, _ := os.Open(idx)
	if _, err := s.InstallPack(ctx, "r", pf, xf); err != nil {
		t.Fatal(err)
	}
	pf.Close()
	xf.Close()
	p, _ := s.Path("r")
	// A loose ref from before, which the packed write must not leave behind.
	if err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/team/old": oids[0]}, ""); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{}
	for i := range packedRefsThreshold + 10 {
		want[fmt.Sprintf("refs/heads/team/b%04d", i)] = oids[i%2]
	}
	want["refs/tags/v1"] = oids[0]
	if err := s.SetRefs(ctx, "r", want, "refs/heads/team/b0001"); err != nil {
		t.Fatal(err)
	}
	got, err := s.Refs(ctx, "r")
	if err != nil || !maps.Equal(got, want) {
		t.Fatalf("refs after the packed write: %d refs, %v; want %d", len(got), err, len(want))
	}
	if _, err := os.Stat(filepath.Join(p, "refs", "heads", "team", "old")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the old loose ref is still there: %v", err)
	}
	// A small change after it: update-ref on top of packed refs.
	want["refs/heads/team/b0000"] = oids[1]
	delete(want, "refs/tags/v1")
	if err := s.SetRefs(ctx, "r", want, ""); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.Refs(ctx, "r"); !maps.Equal(got, want) {
		t.Fatal("refs after a small change on top of packed refs differ")
	}
	git(t, p, "fsck", "--strict", "--no-progress")
	if _, err := os.Stat(filepath.Join(p, "packed-refs.lock")); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("packed-refs.lock left behind")
	}
}
