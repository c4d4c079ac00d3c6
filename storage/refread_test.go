package storage

import (
	"context"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Refs reads the ref files itself; what it reads must be what git lists,
// with loose refs, packed refs, both for one ref, and deleted ones.
func Test_Refs_ReadsWhatGitLists(t *testing.T) {
	s, oids := newTestStoreWithCommits(t)
	ctx := context.Background()
	path, _ := s.Path("r")
	gitList := func() map[string]string {
		out, err := s.run(ctx, path, nil, nil, "for-each-ref", "--format=%(objectname) %(refname)", "refs/")
		if err != nil {
			t.Fatal(err)
		}
		refs := map[string]string{}
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if oid, ref, ok := strings.Cut(line, " "); ok {
				refs[ref] = oid
			}
		}
		return refs
	}
	check := func(step string) {
		t.Helper()
		got, ok, err := readRefs(path)
		if err != nil || !ok {
			t.Fatalf("%s: readRefs: ok %v, %v", step, ok, err)
		}
		if want := gitList(); !maps.Equal(got, want) {
			t.Fatalf("%s: read %v, git lists %v", step, got, want)
		}
	}
	check("empty")
	if err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": oids[0], "refs/tags/v1": oids[1], "refs/heads/a/b": oids[1]}, ""); err != nil {
		t.Fatal(err)
	}
	check("loose")
	if _, err := s.run(ctx, path, nil, nil, "pack-refs", "--all"); err != nil {
		t.Fatal(err)
	}
	check("packed")
	if err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": oids[1], "refs/heads/a/b": oids[1], "refs/heads/new": oids[0]}, ""); err != nil {
		t.Fatal(err)
	}
	check("loose over packed, one deleted")
	// A symbolic ref is left to git.
	os.WriteFile(filepath.Join(path, "refs", "heads", "sym"), []byte("ref: refs/heads/main\n"), 0o644)
	if _, ok, _ := readRefs(path); ok {
		t.Fatal("readRefs read a symbolic ref itself")
	}
	refs, err := s.Refs(ctx, "r")
	if err != nil || refs["refs/heads/sym"] != oids[1] {
		t.Fatalf("Refs with a symbolic ref: %v, %v", refs, err)
	}
}

// newTestStoreWithCommits is a store with repository "r" holding two
// commits (no refs yet).
func newTestStoreWithCommits(t *testing.T) (*Store, []string) {
	t.Helper()
	s := mustStore(t)
	ctx := context.Background()
	if err := s.Init(ctx, "r", 1); err != nil {
		t.Fatal(err)
	}
	dir, oids := scratch(t, 2)
	pack, idx := packOf(t, dir, oids[1])
	pf, _ := os.Open(pack)
	defer pf.Close()
	xf, _ := os.Open(idx)
	defer xf.Close()
	if _, err := s.InstallPack(ctx, "r", pf, xf); err != nil {
		t.Fatal(err)
	}
	return s, oids
}
