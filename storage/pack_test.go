package storage

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// packFiles returns the names in a repository's objects/pack.
func packFiles(t *testing.T, s *Store, name string) []string {
	t.Helper()
	p, _ := s.Path(name)
	entries, err := os.ReadDir(filepath.Join(p, "objects", "pack"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// readPack makes a pack of a scratch history and returns its bytes, its
// index's bytes, its checksum and the commits.
func readPack(t *testing.T, n int) (pack, idx []byte, sum string, oids []string) {
	t.Helper()
	work, oids := scratch(t, n)
	pp, ip := packOf(t, work, oids[n-1])
	pack, _ = os.ReadFile(pp)
	idx, _ = os.ReadFile(ip)
	sum = strings.TrimSuffix(strings.TrimPrefix(filepath.Base(pp), "p-"), ".pack")
	return pack, idx, sum, oids
}

func Test_InstallPack_IdempotentAndDurable(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	s.Init(ctx, "r", 1)
	pack, idx, sum, oids := readPack(t, 3)
	for range 2 {
		// A reader that hands out a few bytes at a time exercises the
		// checksum of the trailer across reads.
		got, err := s.InstallPack(ctx, "r", &trickle{r: bytes.NewReader(pack)}, &trickle{r: bytes.NewReader(idx)})
		if err != nil || got != sum {
			t.Fatalf("InstallPack = %q, %v; want %q", got, err, sum)
		}
	}
	files := packFiles(t, s, "r")
	if len(files) != 2 || files[0] != "pack-"+sum+".idx" || files[1] != "pack-"+sum+".pack" {
		t.Fatalf("objects/pack = %v", files)
	}
	if m, err := s.Missing(ctx, "r", oids); err != nil || len(m) != 0 {
		t.Fatalf("Missing = %v, %v", m, err)
	}
	if err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": oids[2]}, ""); err != nil {
		t.Fatal(err)
	}
	p, _ := s.Path("r")
	git(t, p, "fsck", "--strict", "--no-progress", "--no-dangling")
	if got := git(t, p, "verify-pack", filepath.Join("objects", "pack", "pack-"+sum+".idx")); got != "" {
		t.Fatalf("verify-pack: %s", got)
	}
	if _, err := s.InstallPack(ctx, "nothere", bytes.NewReader(pack), bytes.NewReader(idx)); !errors.Is(err, ErrNotFound) {
		t.Fatalf("InstallPack into an absent repo: %v", err)
	}
}

// trickle reads at most 7 bytes at a time.
type trickle struct{ r io.Reader }

func (t *trickle) Read(p []byte) (int, error) { return t.r.Read(p[:min(len(p), 7)]) }

func Test_InstallPack_RefusesBadData(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	s.Init(ctx, "r", 1)
	pack, idx, _, _ := readPack(t, 2)
	otherPack, otherIdx, _, _ := readPack(t, 1)
	flip := func(b []byte, at int) []byte {
		c := bytes.Clone(b)
		c[at] ^= 0x40
		return c
	}
	cases := map[string][2][]byte{
		"byte flipped in the pack":       {flip(pack, len(pack)/2), idx},
		"pack checksum flipped":          {flip(pack, len(pack)-1), idx},
		"pack header flipped":            {flip(pack, 0), idx},
		"truncated pack":                 {pack[:len(pack)-1], idx},
		"empty pack":                     {nil, idx},
		"byte flipped in the index":      {pack, flip(idx, 100)},
		"index checksum flipped":         {pack, flip(idx, len(idx)-1)},
		"pack checksum in index flipped": {pack, flip(idx, len(idx)-30)},
		"truncated index":                {pack, idx[:len(idx)-1]},
		"index too short":                {pack, idx[len(idx)-40:]},
		"empty index":                    {pack, nil},
		"another pack's index":           {pack, otherIdx},
		"index of another pack":          {otherPack, idx},
	}
	for what, c := range cases {
		if _, err := s.InstallPack(ctx, "r", bytes.NewReader(c[0]), bytes.NewReader(c[1])); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v, want ErrCorrupt", what, err)
		}
		if left := packFiles(t, s, "r"); len(left) != 0 {
			t.Fatalf("%s: left %v", what, left)
		}
	}
}

// failingReader returns err after n bytes.
type failingReader struct {
	r   io.Reader
	n   int
	err error
}

func (f *failingReader) Read(p []byte) (int, error) {
	if f.n <= 0 {
		return 0, f.err
	}
	n, err := f.r.Read(p[:min(len(p), f.n)])
	f.n -= n
	return n, err
}

func Test_InstallPack_BrokenStream(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	s.Init(ctx, "r", 1)
	pack, idx, _, _ := readPack(t, 2)
	cut := errors.New("peer went away")
	_, err := s.InstallPack(ctx, "r", &failingReader{r: bytes.NewReader(pack), n: 50, err: cut}, bytes.NewReader(idx))
	if !errors.Is(err, cut) || errors.Is(err, ErrCorrupt) || errors.Is(err, ErrDiskFull) {
		t.Fatalf("a broken pack stream: %v", err)
	}
	_, err = s.InstallPack(ctx, "r", bytes.NewReader(pack), &failingReader{r: bytes.NewReader(idx), n: 50, err: cut})
	if !errors.Is(err, cut) {
		t.Fatalf("a broken index stream: %v", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := s.InstallPack(cctx, "r", bytes.NewReader(pack), bytes.NewReader(idx)); !errors.Is(err, context.Canceled) {
		t.Fatalf("a cancelled install: %v", err)
	}
	if left := packFiles(t, s, "r"); len(left) != 0 {
		t.Fatalf("left %v", left)
	}
}

func Test_IndexPack(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	s.Init(ctx, "r", 1)
	pack, _, sum, oids := readPack(t, 3)

	bad := bytes.Clone(pack)
	bad[len(bad)/2] ^= 0x40
	for what, b := range map[string][]byte{"flipped byte": bad, "truncated": pack[:len(pack)-10], "garbage": []byte("not a pack at all")} {
		_, err := s.IndexPack(ctx, "r", bytes.NewReader(b))
		if !errors.Is(err, ErrCorrupt) || !errors.Is(err, ErrGit) {
			t.Errorf("%s: %v, want ErrCorrupt and ErrGit", what, err)
		}
		if left := packFiles(t, s, "r"); len(left) != 0 {
			t.Fatalf("%s: left %v", what, left)
		}
	}
	cut := errors.New("peer went away")
	if _, err := s.IndexPack(ctx, "r", &failingReader{r: bytes.NewReader(pack), n: 40, err: cut}); !errors.Is(err, cut) {
		t.Fatalf("a broken stream: %v", err)
	}

	got, err := s.IndexPack(ctx, "r", bytes.NewReader(pack))
	if err != nil || got != sum {
		t.Fatalf("IndexPack = %q, %v; want %q", got, err, sum)
	}
	if m, _ := s.Missing(ctx, "r", oids); len(m) != 0 {
		t.Fatalf("missing after IndexPack: %v", m)
	}
	if files := packFiles(t, s, "r"); len(files) != 2 {
		t.Fatalf("objects/pack = %v", files)
	}
	if err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": oids[2]}, ""); err != nil {
		t.Fatal(err)
	}
}

func Test_IndexPack_ThinPack(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	s.Init(ctx, "r", 1)
	work, oids := scratch(t, 2)
	pp, ip := packOf(t, work, oids[0])
	pf, _ := os.Open(pp)
	xf, _ := os.Open(ip)
	defer pf.Close()
	defer xf.Close()
	if _, err := s.InstallPack(ctx, "r", pf, xf); err != nil {
		t.Fatal(err)
	}
	// Commit 2 rewrites a big file a little, so its blob is a delta
	// against commit 1's; a thin pack leaves the base out.
	big := bytes.Repeat([]byte("line of text that repeats\n"), 4000)
	os.WriteFile(filepath.Join(work, "big"), big, 0o644)
	git(t, work, "add", "big")
	git(t, work, "commit", "-q", "-m", "big")
	base := git(t, work, "rev-parse", "HEAD")
	pf2, xf2 := packOf(t, work, base)
	p2, _ := os.ReadFile(pf2)
	x2, _ := os.ReadFile(xf2)
	if _, err := s.InstallPack(ctx, "r", bytes.NewReader(p2), bytes.NewReader(x2)); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(work, "big"), append(big, "one more\n"...), 0o644)
	git(t, work, "commit", "-q", "-a", "-m", "more")
	tip := git(t, work, "rev-parse", "HEAD")
	c := exec.Command("git", "pack-objects", "--revs", "--thin", "--stdout", "-q")
	c.Dir, c.Stdin = work, strings.NewReader(tip+"\n^"+base+"\n")
	thin, err := c.Output()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.IndexPack(ctx, "r", bytes.NewReader(thin)); err != nil {
		t.Fatal(err)
	}
	if err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": tip}, ""); err != nil {
		t.Fatal(err)
	}
	p, _ := s.Path("r")
	git(t, p, "fsck", "--strict", "--no-progress", "--no-dangling")
}

func Test_DiskFull_RealPack(t *testing.T) {
	root := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", root).CombinedOutput(); err != nil {
		if os.Getuid() != 0 {
			t.Skipf("mounting a 1 MiB tmpfs needs root (running as uid %d): %v: %s", os.Getuid(), err, out)
		}
		t.Fatalf("mount tmpfs as root: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", root).Run() })
	s, err := Open(Config{Root: filepath.Join(root, "repos")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := s.Init(ctx, "r", 1); err != nil {
		t.Fatal(err)
	}
	// A pack of 2 MiB of random bytes, which no compression makes fit.
	work := t.TempDir()
	git(t, work, "init", "-q", "-b", "main")
	noise := make([]byte, 2<<20)
	rand.Read(noise)
	os.WriteFile(filepath.Join(work, "noise"), noise, 0o644)
	git(t, work, "add", "noise")
	git(t, work, "commit", "-q", "-m", "noise")
	pp, ip := packOf(t, work, "HEAD")
	pf, _ := os.Open(pp)
	xf, _ := os.Open(ip)
	defer pf.Close()
	defer xf.Close()
	if _, err := s.InstallPack(ctx, "r", pf, xf); !errors.Is(err, ErrDiskFull) {
		t.Fatalf("InstallPack on a full disk: %v, want ErrDiskFull", err)
	}
	if left := packFiles(t, s, "r"); len(left) != 0 {
		t.Fatalf("InstallPack left %v", left)
	}
	pf.Seek(0, io.SeekStart)
	if _, err := s.IndexPack(ctx, "r", pf); !errors.Is(err, ErrDiskFull) {
		t.Fatalf("IndexPack on a full disk: %v, want ErrDiskFull", err)
	}
	if left := packFiles(t, s, "r"); len(left) != 0 {
		t.Fatalf("IndexPack left %v", left)
	}
	// Still usable once there is room.
	if err := s.SetVersion("r", 1, 1); err != nil {
		t.Fatal(err)
	}
}
