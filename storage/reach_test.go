package storage

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func Test_Unreachable(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	if err := s.Init(ctx, "r", 1); err != nil {
		t.Fatal(err)
	}
	work, oids := scratch(t, 2) // main: A, B
	a, b := oids[0], oids[1]
	aTree := git(t, work, "rev-parse", a+"^{tree}")
	aBlob := git(t, work, "rev-parse", a+":f")
	git(t, work, "tag", "-a", "v1", "-m", "release", a)
	tag := git(t, work, "rev-parse", "v1")
	// A branch with its own commits, tree and blob, deleted later.
	git(t, work, "checkout", "-q", "-b", "gone")
	os.WriteFile(filepath.Join(work, "secret"), []byte("hunter2\n"), 0o644)
	git(t, work, "add", "secret")
	git(t, work, "commit", "-q", "-m", "x1")
	x1 := git(t, work, "rev-parse", "HEAD")
	x1Tree := git(t, work, "rev-parse", "HEAD^{tree}")
	secret := git(t, work, "rev-parse", "HEAD:secret")
	git(t, work, "commit", "-q", "--allow-empty", "-m", "x2")
	x2 := git(t, work, "rev-parse", "HEAD")
	for _, tip := range []string{b, x2, tag} {
		pack, idx := packOf(t, work, tip)
		pf, _ := os.Open(pack)
		xf, _ := os.Open(idx)
		_, err := s.InstallPack(ctx, "r", pf, xf)
		pf.Close()
		xf.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	refs := map[string]string{"refs/heads/main": b, "refs/heads/gone": x2, "refs/tags/v1": tag}
	if err := s.SetRefs(ctx, "r", refs, "refs/heads/main"); err != nil {
		t.Fatal(err)
	}
	all := []string{b, a, aTree, aBlob, tag, x2, x1, x1Tree, secret}
	if got, err := s.Unreachable(ctx, "r", all); err != nil || len(got) != 0 {
		t.Fatalf("with the branch: Unreachable = %v, %v; want none", got, err)
	}

	delete(refs, "refs/heads/gone")
	if err := s.SetRefs(ctx, "r", refs, "refs/heads/main"); err != nil {
		t.Fatal(err)
	}
	absent := strings.Repeat("ab", 20)
	query := append(append([]string{}, all...), absent, x1, b)
	got, err := s.Unreachable(ctx, "r", query)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{x2, x1, x1Tree, secret, absent}; !slices.Equal(got, want) {
		t.Fatalf("after deleting the branch: Unreachable = %v, want %v", got, want)
	}
	// Each kind alone, so that no one check answers for another.
	for _, o := range []string{a, aTree, aBlob, tag, b} {
		if got, err := s.Unreachable(ctx, "r", []string{o}); err != nil || len(got) != 0 {
			t.Errorf("Unreachable(%s) = %v, %v; want reachable", o, got, err)
		}
	}
	for _, o := range []string{x1, x1Tree, secret} {
		if got, err := s.Unreachable(ctx, "r", []string{o}); err != nil || !slices.Equal(got, []string{o}) {
			t.Errorf("Unreachable(%s) = %v, %v; want unreachable", o, got, err)
		}
	}
	if _, err := s.Unreachable(ctx, "r", []string{"HEAD"}); err == nil {
		t.Error("Unreachable took a name that is not an object id")
	}
	if _, err := s.Unreachable(ctx, "r", []string{strings.ToUpper(b)}); err == nil {
		t.Error("Unreachable took an upper-case object id")
	}
	if got, err := s.Unreachable(ctx, "r", nil); err != nil || got != nil {
		t.Errorf("Unreachable(nil) = %v, %v", got, err)
	}
}
