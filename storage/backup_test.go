package storage

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// OpenPacks opens every pack with its index, skips a pack still being
// installed, and packs loose objects into a pack of their own, the same
// one each time, outside the repository; removing a pack once it is open
// takes nothing from the reader.
func Test_OpenPacks_LooseAndRemoved(t *testing.T) {
	s, _ := installed(t, 3)
	ctx := context.Background()
	path, _ := s.Path("r")
	packs, err := s.OpenPacks(ctx, "r")
	if err != nil {
		t.Fatal(err)
	}
	if len(packs) != 1 || packs[0].Loose || packs[0].PackSize == 0 || packs[0].IdxSize == 0 {
		t.Fatalf("packs %+v", packs)
	}
	ClosePacks(packs)

	// A pack without its index (being installed) is not offered.
	os.WriteFile(filepath.Join(path, "objects", "pack", "pack-"+strings.Repeat("c", 40)+".pack"), []byte("PACK"), 0o644)
	// A loose object.
	f := filepath.Join(t.TempDir(), "blob")
	os.WriteFile(f, []byte("loose blob\n"), 0o644)
	blob := git(t, path, "hash-object", "-w", f)
	loose, err := s.LooseObjects("r")
	if err != nil || len(loose) != 1 || loose[0] != blob {
		t.Fatalf("loose objects %v, %v; want %s", loose, err, blob)
	}
	packs, err = s.OpenPacks(ctx, "r")
	if err != nil {
		t.Fatal(err)
	}
	defer ClosePacks(packs)
	if len(packs) != 2 || !packs[1].Loose {
		t.Fatalf("packs %+v, want the pushed one and one of loose objects", packs)
	}
	again, err := s.OpenPacks(ctx, "r")
	if err != nil {
		t.Fatal(err)
	}
	ClosePacks(again)
	if again[1].Name != packs[1].Name {
		t.Errorf("the same loose objects packed as %s, then %s", packs[1].Name, again[1].Name)
	}
	if entries, _ := os.ReadDir(filepath.Join(path, "objects", "pack")); len(entries) != 3 {
		t.Errorf("OpenPacks left files in the repository: %d entries", len(entries))
	}
	if stray, _ := filepath.Glob(filepath.Join(s.Root(), ".backup-*")); len(stray) != 0 {
		t.Errorf("temporary files left: %v", stray)
	}
	// A repack that removes the pack now takes nothing from the reader.
	os.Remove(filepath.Join(path, "objects", "pack", "pack-"+packs[0].Name+".pack"))
	b, err := io.ReadAll(io.NewSectionReader(packs[0].Pack, 0, packs[0].PackSize))
	if err != nil || int64(len(b)) != packs[0].PackSize || string(b[:4]) != "PACK" {
		t.Fatalf("reading a removed pack: %d bytes, %v", len(b), err)
	}
}
