package storage

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// installed makes a store with repository "r" holding every object of a
// scratch history of n commits (no refs yet) and returns the commits.
func installed(t *testing.T, n int) (*Store, []string) {
	t.Helper()
	s := mustStore(t)
	ctx := context.Background()
	if err := s.Init(ctx, "r", 1); err != nil {
		t.Fatal(err)
	}
	work, oids := scratch(t, n)
	pack, idx := packOf(t, work, oids[n-1])
	pf, _ := os.Open(pack)
	xf, _ := os.Open(idx)
	defer pf.Close()
	defer xf.Close()
	if _, err := s.InstallPack(ctx, "r", pf, xf); err != nil {
		t.Fatal(err)
	}
	return s, oids
}

// eventually polls cond for up to five seconds.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting until %s", what)
}

func Test_Open_NeedsGit236(t *testing.T) {
	_, err := Open(Config{Root: t.TempDir(), Git: "/nonexistent/git"}, nil)
	if err == nil || !strings.Contains(err.Error(), "not installed") {
		t.Fatalf("Open with no git: %v", err)
	}
	old := filepath.Join(t.TempDir(), "git")
	os.WriteFile(old, []byte("#!/bin/sh\necho git version 2.30.2\n"), 0o755)
	_, err = Open(Config{Root: t.TempDir(), Git: old}, nil)
	if err == nil || !strings.Contains(err.Error(), "2.36") || !strings.Contains(err.Error(), "2.30.2") {
		t.Fatalf("Open with git 2.30: %v", err)
	}
	if _, err := Open(Config{}, nil); err == nil {
		t.Fatal("Open without a root succeeded")
	}
	root := filepath.Join(t.TempDir(), "a", "repos")
	s, err := Open(Config{Root: root}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(root); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("root: %v, %v", fi.Mode(), err)
	}
	if s.Root() != root {
		t.Fatalf("Root() = %q", s.Root())
	}
	if p, err := s.Path("a/b"); err != nil || p != filepath.Join(root, "a", "b.git") {
		t.Fatalf("Path = %q, %v", p, err)
	}
	if _, err := s.Path("../x"); !errors.Is(err, ErrInvalidName) {
		t.Fatalf("Path(../x) = %v", err)
	}
	if free, err := s.FreeBytes(); err != nil || free == 0 {
		t.Fatalf("FreeBytes = %d, %v", free, err)
	}
}

func Test_Init_ConfigHeadMarker(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	if err := s.Init(ctx, "team/site", 42); err != nil {
		t.Fatal(err)
	}
	p, _ := s.Path("team/site")
	for _, kv := range repoConfig {
		if got := git(t, p, "config", "--get", kv[0]); got != kv[1] {
			t.Errorf("%s = %q, want %q", kv[0], got, kv[1])
		}
	}
	if got := git(t, p, "rev-parse", "--is-bare-repository"); got != "true" {
		t.Errorf("bare = %q", got)
	}
	if h, err := s.Head(ctx, "team/site"); err != nil || h != "refs/heads/main" {
		t.Errorf("Head = %q, %v", h, err)
	}
	if refs, err := s.Refs(ctx, "team/site"); err != nil || len(refs) != 0 {
		t.Errorf("Refs = %v, %v", refs, err)
	}
	b, err := os.ReadFile(filepath.Join(p, MarkerFile))
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil || m["name"] != "team/site" || m["id"] != 42.0 || m["version"] != 1.0 {
		t.Fatalf("marker = %s, %v", b, err)
	}
	if left, _ := filepath.Glob(filepath.Join(s.Root(), "team", "*.init-*")); len(left) != 0 {
		t.Fatalf("Init left %v", left)
	}
	if err := s.Init(ctx, "team/site", 0); err == nil {
		t.Fatal("Init with id 0 succeeded")
	}
	if err := s.Init(ctx, "../x", 1); !errors.Is(err, ErrInvalidName) {
		t.Fatalf("Init(../x) = %v", err)
	}
}

func Test_Init_OtherIncarnationMovedAway(t *testing.T) {
	s, oids := installed(t, 1)
	ctx := context.Background()
	if err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": oids[0]}, ""); err != nil {
		t.Fatal(err)
	}
	// The same id again changes nothing.
	if err := s.Init(ctx, "r", 1); err != nil {
		t.Fatal(err)
	}
	if refs, _ := s.Refs(ctx, "r"); len(refs) != 1 {
		t.Fatalf("Init with the same id touched the refs: %v", refs)
	}
	if err := s.Init(ctx, "r", 2); err != nil {
		t.Fatal(err)
	}
	if r, err := s.Local("r"); err != nil || r != (Replica{Name: "r", ID: 2, Version: 1}) {
		t.Fatalf("Local = %+v, %v", r, err)
	}
	if refs, _ := s.Refs(ctx, "r"); len(refs) != 0 {
		t.Fatalf("the new incarnation has the old refs: %v", refs)
	}
	if missing, _ := s.Missing(ctx, "r", oids); len(missing) != 1 {
		t.Fatalf("the new incarnation has the old objects")
	}
	trash := filepath.Join(s.Root(), trashDir)
	eventually(t, "the trash is empty", func() bool {
		e, err := os.ReadDir(trash)
		return err == nil && len(e) == 0
	})

	// A directory without a marker (say, copied in by hand) is replaced too.
	p, _ := s.Path("junk")
	os.MkdirAll(filepath.Join(p, "stuff"), 0o700)
	if _, err := s.Local("junk"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Local(junk) = %v", err)
	}
	if err := s.Init(ctx, "junk", 3); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(p, "stuff")); !os.IsNotExist(err) {
		t.Fatalf("the old directory is still there: %v", err)
	}
	// Half-made repositories of a crashed Init go on the next one.
	os.MkdirAll(p+".init-tmp/objects", 0o700)
	if err := s.Init(ctx, "junk", 4); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p + ".init-tmp"); !os.IsNotExist(err) {
		t.Fatalf("a crashed Init's directory is still there: %v", err)
	}
}

func Test_Replica_LocalListSetVersion(t *testing.T) {
	s := mustStore(t)
	ctx := context.Background()
	for i, n := range []string{"zed", "a/b", "a/b/c/d", "a.b"} {
		if err := s.Init(ctx, n, uint64(i+1)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.SetVersion("a/b", 2, 17); err != nil {
		t.Fatal(err)
	}
	if r, err := s.Local("a/b"); err != nil || r != (Replica{Name: "a/b", ID: 2, Version: 17}) {
		t.Fatalf("Local = %+v, %v", r, err)
	}
	p, _ := s.Path("a/b")
	if _, err := os.Stat(filepath.Join(p, MarkerFile+".tmp")); !os.IsNotExist(err) {
		t.Fatalf("SetVersion left its temporary file: %v", err)
	}
	// Things List must skip: the trash, a dir without a marker, a crashed
	// Init, a marker naming another repository, an unreadable marker.
	os.MkdirAll(filepath.Join(s.Root(), trashDir, "old-1-1.git"), 0o700)
	os.WriteFile(filepath.Join(s.Root(), trashDir, "old-1-1.git", MarkerFile), []byte(`{"name":"old","id":1,"version":1}`), 0o600)
	os.MkdirAll(filepath.Join(s.Root(), "nomarker.git", "objects"), 0o700)
	os.MkdirAll(filepath.Join(s.Root(), "q.git.init-1234"), 0o700)
	os.WriteFile(filepath.Join(s.Root(), "q.git.init-1234", MarkerFile), []byte(`{"name":"q","id":1,"version":1}`), 0o600)
	os.MkdirAll(filepath.Join(s.Root(), "other.git"), 0o700)
	os.WriteFile(filepath.Join(s.Root(), "other.git", MarkerFile), []byte(`{"name":"zed","id":1,"version":1}`), 0o600)
	os.MkdirAll(filepath.Join(s.Root(), "bad.git"), 0o700)
	os.WriteFile(filepath.Join(s.Root(), "bad.git", MarkerFile), []byte(`{garbage`), 0o600)

	list, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	want := []Replica{{Name: "a.b", ID: 4, Version: 1}, {Name: "a/b", ID: 2, Version: 17}, {Name: "a/b/c/d", ID: 3, Version: 1}, {Name: "zed", ID: 1, Version: 1}}
	if !slices.Equal(list, want) {
		t.Fatalf("List = %+v\nwant %+v", list, want)
	}

	if _, err := s.Local("bad"); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Local(bad) = %v, want ErrCorrupt", err)
	}
	if _, err := s.Local("other"); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Local(other) = %v, want ErrCorrupt (marker names zed)", err)
	}
	os.WriteFile(filepath.Join(p, MarkerFile), []byte(`{"name":"a/b","id":2}`), 0o600)
	if _, err := s.Local("a/b"); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("marker without a version: %v", err)
	}
	if err := s.SetVersion("nothere", 1, 2); !errors.Is(err, ErrNotFound) {
		t.Fatalf("SetVersion of an absent repo: %v", err)
	}
	if _, err := os.Stat(filepath.Join(s.Root(), "nothere.git")); !os.IsNotExist(err) {
		t.Fatal("SetVersion created a directory")
	}
	if err := s.SetVersion("zed", 1, 0); err == nil {
		t.Fatal("SetVersion to version 0 succeeded")
	}
}

func Test_SetRefs_CreateUpdateDeleteHead(t *testing.T) {
	s, oids := installed(t, 3)
	ctx := context.Background()
	p, _ := s.Path("r")
	steps := []struct {
		refs map[string]string
		head string
	}{
		{map[string]string{"refs/heads/main": oids[2], "refs/heads/a/b": oids[0], "refs/tags/v1": oids[1], "refs/notes/x": oids[1]}, ""},
		{map[string]string{"refs/heads/main": oids[1], "refs/heads/dev": oids[2], "refs/tags/v1": oids[1]}, "refs/heads/dev"},
		{map[string]string{"refs/heads/main": oids[1], "refs/heads/dev": oids[2], "refs/tags/v1": oids[1]}, "refs/heads/dev"}, // no change
		{map[string]string{}, "refs/heads/main"},
		{map[string]string{"refs/heads/main": oids[0]}, ""},
	}
	wantHead := "refs/heads/main"
	for i, st := range steps {
		if err := s.SetRefs(ctx, "r", st.refs, st.head); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		if st.head != "" {
			wantHead = st.head
		}
		refs, err := s.Refs(ctx, "r")
		if err != nil {
			t.Fatal(err)
		}
		if len(refs) != len(st.refs) {
			t.Fatalf("step %d: refs = %v, want %v", i, refs, st.refs)
		}
		for r, o := range st.refs {
			if refs[r] != o {
				t.Fatalf("step %d: %s = %s, want %s", i, r, refs[r], o)
			}
		}
		if h, err := s.Head(ctx, "r"); err != nil || h != wantHead {
			t.Fatalf("step %d: HEAD = %q, %v; want %q", i, h, err, wantHead)
		}
		git(t, p, "fsck", "--strict", "--no-progress", "--no-dangling")
	}
}

func Test_SetRefs_MissingObjectChangesNothing(t *testing.T) {
	s, oids := installed(t, 2)
	ctx := context.Background()
	before := map[string]string{"refs/heads/main": oids[0], "refs/tags/t": oids[0]}
	if err := s.SetRefs(ctx, "r", before, ""); err != nil {
		t.Fatal(err)
	}
	absent := strings.Repeat("ab", 20)
	err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": oids[1], "refs/heads/new": absent}, "refs/heads/new")
	if !errors.Is(err, ErrMissingObjects) || !errors.Is(err, ErrGit) || !strings.Contains(err.Error(), absent) {
		t.Fatalf("SetRefs with a missing object: %v", err)
	}
	refs, _ := s.Refs(ctx, "r")
	if len(refs) != 2 || refs["refs/heads/main"] != oids[0] || refs["refs/tags/t"] != oids[0] {
		t.Fatalf("refs changed: %v", refs)
	}
	if h, _ := s.Head(ctx, "r"); h != "refs/heads/main" {
		t.Fatalf("HEAD changed to %q", h)
	}
}

func Test_SetRefs_RefusesBadInput(t *testing.T) {
	s, oids := installed(t, 1)
	ctx := context.Background()
	for _, want := range []map[string]string{
		{"HEAD": oids[0]},
		{"refs/heads/x\ndelete refs/heads/main": oids[0]},
		{"refs/heads/a b": oids[0]},
		{"refs/": oids[0]},
		{"refs/heads/x": "main"},
		{"refs/heads/x": strings.ToUpper(oids[0])},
		{"refs/heads/x": strings.Repeat("0", 40)},
	} {
		if err := s.SetRefs(ctx, "r", want, ""); err == nil {
			t.Errorf("SetRefs(%q) succeeded", want)
		}
	}
	if err := s.SetRefs(ctx, "r", nil, "main"); err == nil {
		t.Error("HEAD outside refs/ accepted")
	}
	if err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/bad..name": oids[0]}, ""); !errors.Is(err, ErrGit) {
		t.Errorf("a ref name git refuses: %v", err)
	}
	if refs, _ := s.Refs(ctx, "r"); len(refs) != 0 {
		t.Fatalf("refs = %v", refs)
	}
	if err := s.SetRefs(ctx, "nothere", nil, ""); !errors.Is(err, ErrNotFound) {
		t.Fatalf("SetRefs on an absent repo: %v", err)
	}
}

func Test_Missing_OrderDuplicatesValidation(t *testing.T) {
	s, oids := installed(t, 1)
	ctx := context.Background()
	m1, m2 := strings.Repeat("1", 40), strings.Repeat("2", 40)
	got, err := s.Missing(ctx, "r", []string{m2, oids[0], m1, m2, "", m1})
	if err != nil || !slices.Equal(got, []string{m2, m1}) {
		t.Fatalf("Missing = %v, %v", got, err)
	}
	if got, err := s.Missing(ctx, "r", nil); err != nil || len(got) != 0 {
		t.Fatalf("Missing(nil) = %v, %v", got, err)
	}
	for _, bad := range []string{"HEAD", oids[0][:12], m1 + "\n" + m2, strings.ToUpper(oids[0])} {
		if _, err := s.Missing(ctx, "r", []string{bad}); err == nil {
			t.Errorf("Missing(%q) accepted", bad)
		}
	}
	if _, err := s.Missing(ctx, "nothere", []string{m1}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Missing on an absent repo: %v", err)
	}
}

func Test_Git_NeverUsesAParentRepository(t *testing.T) {
	// The store lives inside a work tree; a damaged repository must fail,
	// not have git find the work tree's repository above it.
	work, _ := scratch(t, 1)
	s, err := Open(Config{Root: filepath.Join(work, "repos")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := s.Init(ctx, "r", 1); err != nil {
		t.Fatal(err)
	}
	p, _ := s.Path("r")
	os.Remove(filepath.Join(p, "HEAD"))
	refs, err := s.Refs(ctx, "r")
	if !errors.Is(err, ErrGit) || !strings.Contains(err.Error(), "for-each-ref") || !strings.Contains(err.Error(), "not a git repository") {
		t.Fatalf("Refs of a damaged repo = %v, %v", refs, err)
	}
}

func Test_Git_ContextCancelled(t *testing.T) {
	s, _ := installed(t, 1)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.Refs(ctx, "r"); !errors.Is(err, context.Canceled) || !errors.Is(err, ErrGit) {
		t.Fatalf("Refs with a cancelled ctx: %v", err)
	}
}

func Test_Delete(t *testing.T) {
	s, _ := installed(t, 1)
	if err := s.Delete("nothere"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Delete(nothere) = %v", err)
	}
	if err := s.Delete("r"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Local("r"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Local after Delete = %v", err)
	}
	if list, _ := s.List(); len(list) != 0 {
		t.Fatalf("List after Delete = %v", list)
	}
	if err := s.Delete("r"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second Delete = %v", err)
	}
	eventually(t, "the trash is empty", func() bool {
		e, err := os.ReadDir(filepath.Join(s.Root(), trashDir))
		return err == nil && len(e) == 0
	})
	// What a crash left in the trash goes when the store opens.
	left := filepath.Join(s.Root(), trashDir, "r-1-1", "objects")
	os.MkdirAll(left, 0o700)
	if _, err := Open(Config{Root: s.Root()}, nil); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the trash is emptied on Open", func() bool {
		e, err := os.ReadDir(filepath.Join(s.Root(), trashDir))
		return err == nil && len(e) == 0
	})
}

func Test_Fetch(t *testing.T) {
	ctx := context.Background()
	src, oids := installed(t, 3)
	dst := mustStore(t)
	dst.Init(ctx, "r", 1)
	srcPath, _ := src.Path("r")

	// Nothing missing: git does not run, so even a bad url is fine.
	if err := dst.Fetch(ctx, "r", "/nonexistent", nil, nil); err != nil {
		t.Fatal(err)
	}
	// Through git's ext:: transport, as nodes fetch from each other. The
	// source has no refs, so only protocol v2 can ask for objects by id;
	// the env given reaches the ext:: command, which speaks v2 only when
	// told so by GIT_PROTOCOL (as `gitraft node-git` is).
	url := "ext::git %s " + strings.ReplaceAll(srcPath, " ", "% ")
	if err := dst.Fetch(ctx, "r", url, nil, []string{oids[0]}); !errors.Is(err, ErrGit) {
		t.Fatalf("ext:: fetch with protocol v0: %v", err)
	}
	if err := dst.Fetch(ctx, "r", url, []string{"GIT_PROTOCOL=version=2"}, []string{oids[0]}); err != nil {
		t.Fatal(err)
	}
	if m, _ := dst.Missing(ctx, "r", oids); !slices.Equal(m, oids[1:]) {
		t.Fatalf("missing after fetching the first commit: %v", m)
	}
	// By path, fetching what is missing among several.
	if err := dst.Fetch(ctx, "r", srcPath, nil, oids); err != nil {
		t.Fatal(err)
	}
	if m, _ := dst.Missing(ctx, "r", oids); len(m) != 0 {
		t.Fatalf("missing after Fetch: %v", m)
	}
	p, _ := dst.Path("r")
	if refs, _ := dst.Refs(ctx, "r"); len(refs) != 0 {
		t.Fatalf("Fetch set refs: %v", refs)
	}
	if _, err := os.Stat(filepath.Join(p, "FETCH_HEAD")); !os.IsNotExist(err) {
		t.Fatalf("Fetch wrote FETCH_HEAD: %v", err)
	}
	if loose, _ := filepath.Glob(filepath.Join(p, "objects", "??")); len(loose) != 0 {
		t.Fatalf("Fetch left loose objects: %v", loose)
	}
	if err := dst.SetRefs(ctx, "r", map[string]string{"refs/heads/main": oids[2]}, ""); err != nil {
		t.Fatal(err)
	}
	git(t, p, "fsck", "--strict", "--no-progress")

	absent := strings.Repeat("1", 40)
	err := dst.Fetch(ctx, "r", srcPath, nil, []string{absent})
	if !errors.Is(err, ErrGit) {
		t.Fatalf("fetching an object nobody has: %v", err)
	}
	if left, _ := filepath.Glob(filepath.Join(p, "objects", "pack", "tmp_*")); len(left) != 0 {
		t.Fatalf("a failed Fetch left %v", left)
	}
	if err := dst.Fetch(ctx, "r", "--upload-pack=touch /tmp/x", nil, []string{absent}); !errors.Is(err, ErrGit) {
		t.Fatalf("an url that looks like an option: %v", err)
	}
}

// A node may hold a later push's pack without an earlier one's: the tip is
// there, its history is not. Such a tip counts as missing, no ref may point
// at it, and fetching it brings the rest.
func Test_Missing_IncompleteHistory(t *testing.T) {
	ctx := context.Background()
	src, _ := installed(t, 1)
	work, all := scratch(t, 4)
	s := mustStore(t)
	s.Init(ctx, "r", 1)
	install := func(revs string) {
		t.Helper()
		pp, ip := packOf(t, work, revs)
		pf, _ := os.Open(pp)
		xf, _ := os.Open(ip)
		defer pf.Close()
		defer xf.Close()
		if _, err := s.InstallPack(ctx, "r", pf, xf); err != nil {
			t.Fatal(err)
		}
	}
	// Versions 1 and 2 arrived and are set; 3 never did; 4 did.
	install(all[1])
	if err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": all[1]}, ""); err != nil {
		t.Fatal(err)
	}
	install(all[3] + "\n^" + all[2])
	if m, err := s.Missing(ctx, "r", []string{all[3]}); err != nil || !slices.Equal(m, []string{all[3]}) {
		t.Fatalf("Missing(tip without its parent) = %v, %v", m, err)
	}
	absent := strings.Repeat("3", 40)
	got, err := s.Missing(ctx, "r", []string{absent, all[0], all[3], all[1]})
	if err != nil || !slices.Equal(got, []string{absent, all[3]}) {
		t.Fatalf("Missing = %v, %v", got, err)
	}
	err = s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": all[3]}, "")
	if !errors.Is(err, ErrMissingObjects) || !strings.Contains(err.Error(), all[3]) {
		t.Fatalf("SetRefs to an incomplete history: %v", err)
	}
	if refs, _ := s.Refs(ctx, "r"); refs["refs/heads/main"] != all[1] {
		t.Fatalf("refs changed: %v", refs)
	}
	// A tag or branch elsewhere does not hide the gap either.
	err = s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": all[1], "refs/tags/v4": all[3]}, "")
	if !errors.Is(err, ErrMissingObjects) {
		t.Fatalf("SetRefs adding a tag to an incomplete history: %v", err)
	}

	// A peer with the whole history: Fetch asks for the present-but-
	// incomplete tip, and git brings what it lacks.
	srcPath, _ := src.Path("r")
	pp, ip := packOf(t, work, all[3])
	pf, _ := os.Open(pp)
	xf, _ := os.Open(ip)
	if _, err := src.InstallPack(ctx, "r", pf, xf); err != nil {
		t.Fatal(err)
	}
	pf.Close()
	xf.Close()
	if err := s.Fetch(ctx, "r", srcPath, nil, []string{all[3]}); err != nil {
		t.Fatal(err)
	}
	if m, err := s.Missing(ctx, "r", all); err != nil || len(m) != 0 {
		t.Fatalf("Missing after Fetch = %v, %v", m, err)
	}
	if err := s.SetRefs(ctx, "r", map[string]string{"refs/heads/main": all[3]}, ""); err != nil {
		t.Fatal(err)
	}
	p, _ := s.Path("r")
	git(t, p, "fsck", "--strict", "--no-progress", "--no-dangling")
}

// Many refs, a few of them incomplete: Missing names exactly those.
func Test_Missing_ManyTips(t *testing.T) {
	ctx := context.Background()
	s := mustStore(t)
	s.Init(ctx, "r", 1)
	work, all := scratch(t, 6)
	pp, ip := packOf(t, work, all[5]+"\n^"+all[2])
	pf, _ := os.Open(pp)
	xf, _ := os.Open(ip)
	defer pf.Close()
	defer xf.Close()
	if _, err := s.InstallPack(ctx, "r", pf, xf); err != nil {
		t.Fatal(err)
	}
	pp, ip = packOf(t, work, all[1])
	pf2, _ := os.Open(pp)
	xf2, _ := os.Open(ip)
	defer pf2.Close()
	defer xf2.Close()
	if _, err := s.InstallPack(ctx, "r", pf2, xf2); err != nil {
		t.Fatal(err)
	}
	// all[0], all[1] complete; all[2] absent; all[3..5] present but cut off.
	got, err := s.Missing(ctx, "r", []string{all[5], all[0], all[4], all[1], all[2], all[3]})
	if err != nil || !slices.Equal(got, []string{all[5], all[4], all[2], all[3]}) {
		t.Fatalf("Missing = %v, %v", got, err)
	}
}

// BenchmarkInit is how fast a node materialises created repositories
// (the scale issue's first point: about 5 per second with a git process
// per setting).
func BenchmarkInit(b *testing.B) {
	s := mustStore(b)
	ctx := context.Background()
	b.ResetTimer()
	for i := range b.N {
		if err := s.Init(ctx, fmt.Sprintf("team/r%d", i), 1); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "repos/s")
}

// BenchmarkSetRefs10k sets 10,000 new refs in one call, as a peer does
// after a push of that many branches.
func BenchmarkSetRefs10k(b *testing.B) {
	s := mustStore(b)
	ctx := context.Background()
	work, oids := scratch(b, 1)
	for i := range b.N {
		name := fmt.Sprintf("r%d", i)
		s.Init(ctx, name, 1)
		pack, idx := packOf(b, work, oids[0])
		pf, _ := os.Open(pack)
		xf, _ := os.Open(idx)
		if _, err := s.InstallPack(ctx, name, pf, xf); err != nil {
			b.Fatal(err)
		}
		pf.Close()
		xf.Close()
		want := map[string]string{}
		for j := range 10000 {
			want[fmt.Sprintf("refs/heads/b%05d", j)] = oids[0]
		}
		b.StartTimer()
		if err := s.SetRefs(ctx, name, want, ""); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
	}
}
