package storage

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// A push's ref change on a copy whose new values were just checked
// (Missing) is recorded without starting git: the store's git is broken
// here, and SetRefs and Missing still succeed, leaving what git would.
func Test_SetRefs_FewLooseRefsWithoutGit(t *testing.T) {
	s, oids := installed(t, 3)
	ctx := context.Background()
	p, _ := s.Path("r")
	if err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": oids[0], "refs/heads/old": oids[0], "refs/tags/v1": oids[0]}, ""); err != nil {
		t.Fatal(err)
	}
	git(t, p, "pack-refs", "--all") // refs/tags/v1 and the others packed
	if err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": oids[0], "refs/heads/old": oids[0], "refs/tags/v1": oids[0], "refs/heads/gone": oids[0]}, ""); err != nil {
		t.Fatal(err)
	}
	if missing, err := s.Missing(ctx, "r", []string{oids[2], oids[1]}); err != nil || len(missing) > 0 {
		t.Fatalf("Missing = %v, %v", missing, err)
	}
	working := s.git
	s.git = &Git{path: filepath.Join(t.TempDir(), "no-git-here")}
	want := map[string]string{"refs/heads/main": oids[2], "refs/heads/old": oids[0], "refs/heads/a/new": oids[1], "refs/tags/v1": oids[0]}
	if missing, err := s.Missing(ctx, "r", []string{oids[2], oids[1]}); err != nil || len(missing) > 0 {
		t.Fatalf("Missing again = %v, %v (it should not walk again)", missing, err)
	}
	// main updated (packed, now loose), a/new created, gone (loose) deleted.
	if err := s.SetRefs(ctx, "r", want, ""); err != nil {
		t.Fatalf("SetRefs without git: %v", err)
	}
	s.git = working
	got, err := s.Refs(ctx, "r")
	if err != nil || len(got) != len(want) {
		t.Fatalf("refs = %v, %v; want %v", got, err, want)
	}
	for r, o := range want {
		if got[r] != o {
			t.Fatalf("%s = %s, want %s", r, got[r], o)
		}
	}
	if _, err := os.Stat(filepath.Join(p, "refs", "heads", "gone")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the deleted ref's file: %v", err)
	}
	if m, _ := filepath.Glob(filepath.Join(p, "refs", "heads", "*.lock")); len(m) > 0 {
		t.Fatalf("lock files left: %v", m)
	}
	if out := git(t, p, "for-each-ref", "--format=%(objectname) %(refname)", "refs/heads/main"); out != oids[2]+" refs/heads/main" {
		t.Fatalf("git reads main as %q", out)
	}
	git(t, p, "fsck", "--strict", "--no-progress", "--no-dangling")
}

// What the loose path leaves to git, git does: deleting a packed ref,
// and a directory/file conflict, which git refuses with nothing changed.
func Test_SetRefs_LeavesPackedDeletesAndConflictsToGit(t *testing.T) {
	s, oids := installed(t, 2)
	ctx := context.Background()
	p, _ := s.Path("r")
	if err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": oids[0], "refs/tags/v1": oids[0]}, ""); err != nil {
		t.Fatal(err)
	}
	git(t, p, "pack-refs", "--all")
	if err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": oids[1]}, ""); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.Refs(ctx, "r"); len(got) != 1 || got["refs/heads/main"] != oids[1] {
		t.Fatalf("after deleting a packed tag: %v", got)
	}
	if out := git(t, p, "for-each-ref", "--format=%(refname)", "refs/tags"); out != "" {
		t.Fatalf("git still lists %q", out)
	}
	err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": oids[1], "refs/heads/main/x": oids[0]}, "")
	if err == nil {
		t.Fatal("a ref under another ref's name was created")
	}
	if got, _ := s.Refs(ctx, "r"); len(got) != 1 || got["refs/heads/main"] != oids[1] {
		t.Fatalf("a refused change changed refs: %v", got)
	}
}

// SyncRefs fsyncs the directories of refs git changed, those of deleted
// refs (whose directories git may have removed) included, and refuses
// what is not a ref name.
func Test_SyncRefs(t *testing.T) {
	s, oids := installed(t, 1)
	ctx := context.Background()
	if err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": oids[0]}, ""); err != nil {
		t.Fatal(err)
	}
	if err := s.SyncRefs("r", []string{"refs/heads/main", "refs/heads/gone/deep/er"}); err != nil {
		t.Fatal(err)
	}
	if err := s.SyncRefs("r", []string{"HEAD/../../x"}); err == nil {
		t.Fatal("a name outside refs/ was accepted")
	}
	if err := s.SyncRefs("nope", []string{"refs/heads/main"}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a repository that is not there: %v", err)
	}
}
