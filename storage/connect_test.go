package storage

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// proofRepo is a bare repository whose main is a first commit of a small
// tree (files at the top and in dir/sub), and a work tree to make pushes
// from.
type proofRepo struct {
	t    *testing.T
	bare string
	work string
	base string // main's commit
}

func newProofRepo(t *testing.T) *proofRepo {
	t.Helper()
	r := &proofRepo{t: t, bare: filepath.Join(t.TempDir(), "r.git"), work: t.TempDir()}
	git(t, r.work, "init", "-q", "-b", "main")
	for i, name := range []string{"a.txt", "dir/b.txt", "dir/sub/c.txt", "dir/sub/d.txt"} {
		r.write(name, fmt.Sprintf("file %d\n%s", i, strings.Repeat("some shared text\n", 200)))
	}
	r.base = r.commit()
	git(t, filepath.Dir(r.bare), "init", "-q", "--bare", r.bare)
	git(t, r.work, "push", "-q", r.bare, "main")
	return r
}

func (r *proofRepo) write(name, content string) {
	p := filepath.Join(r.work, name)
	os.MkdirAll(filepath.Dir(p), 0o755)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		r.t.Fatal(err)
	}
}

func (r *proofRepo) commit() string {
	git(r.t, r.work, "add", "-A")
	git(r.t, r.work, "commit", "-q", "-m", "c")
	return git(r.t, r.work, "rev-parse", "HEAD")
}

// pack writes a pack of the objects the revs list (pack-objects --revs
// input) into a quarantine-like directory and returns the .pack path.
func (r *proofRepo) pack(revs string, args ...string) string {
	r.t.Helper()
	dir := filepath.Join(r.t.TempDir(), "pack")
	os.MkdirAll(dir, 0o755)
	c := exec.Command("git", append([]string{"pack-objects", "-q"}, append(args, filepath.Join(dir, "pack"))...)...)
	c.Dir, c.Stdin = r.work, strings.NewReader(revs)
	out, err := c.Output()
	if err != nil {
		r.t.Fatal(err)
	}
	return filepath.Join(dir, "pack-"+strings.TrimSpace(string(out))+".pack")
}

// gitConnected is git's own answer, with the pack's objects added.
func (r *proofRepo) gitConnected(pack string, tips ...string) bool {
	c := exec.Command("git", "rev-list", "--objects", "--stdin", "--not", "--all", "--quiet")
	c.Dir = r.bare
	c.Env = append(os.Environ(), "GIT_OBJECT_DIRECTORY="+filepath.Dir(filepath.Dir(pack)), "GIT_ALTERNATE_OBJECT_DIRECTORIES="+filepath.Join(r.bare, "objects"))
	c.Stdin = strings.NewReader(strings.Join(tips, "\n") + "\n")
	return c.Run() == nil
}

func (r *proofRepo) refs() map[string]string {
	refs, ok, err := readRefs(r.bare)
	if err != nil || !ok {
		r.t.Fatalf("readRefs: %v %v", ok, err)
	}
	return refs
}

// The usual pushes are proven in-process, with packs as git writes them
// (offset and ref deltas), and agree with git.
func Test_Prove_UsualPushes(t *testing.T) {
	r := newProofRepo(t)
	// Two commits: one changes a file deep down, the next adds a file and
	// a near copy of it (a delta against a pushed blob).
	r.write("dir/sub/c.txt", "changed\n"+strings.Repeat("some shared text\n", 200))
	r.commit()
	r.write("new.txt", strings.Repeat("some shared text\n", 300))
	r.write("dir/new2.txt", strings.Repeat("some shared text\n", 300)+"x\n")
	tip := r.commit()
	revs := tip + "\n^" + r.base + "\n"
	for _, args := range [][]string{{"--revs", "--delta-base-offset"}, {"--revs"}} {
		pack := r.pack(revs, args...)
		if !r.gitConnected(pack, tip) {
			t.Fatal("git finds the push incomplete")
		}
		deltas := 0
		for _, line := range strings.Split(git(t, r.work, "verify-pack", "-v", strings.TrimSuffix(pack, ".pack")+".idx"), "\n") {
			if len(strings.Fields(line)) == 7 {
				deltas++
			}
		}
		if deltas == 0 {
			t.Fatalf("pack-objects %v wrote no deltas: the test does not test them", args)
		}
		if !proveConnected(r.bare, []string{pack}, r.refs(), []string{tip}) {
			t.Fatalf("pack-objects %v: not proven", args)
		}
	}
	// An annotated tag of the new commit.
	git(t, r.work, "tag", "-a", "-m", "v1", "v1")
	tag := git(t, r.work, "rev-parse", "v1")
	pack := r.pack(tag+"\n^"+r.base+"\n", "--revs")
	if !proveConnected(r.bare, []string{pack}, r.refs(), []string{tag}) {
		t.Fatal("a tag of a pushed commit: not proven")
	}
}

// What is not whole is never proven: a pushed tree that holds a tree the
// repository has unreferenced (a leftover) whose blob is nowhere, and a
// commit whose parent is nowhere.
func Test_Prove_NeverAcceptsWhatIsNotWhole(t *testing.T) {
	r := newProofRepo(t)
	mktree := func(dir, entries string, missing bool) string {
		args := []string{"mktree"}
		if missing {
			args = append(args, "--missing")
		}
		c := exec.Command("git", args...)
		c.Dir, c.Stdin = dir, strings.NewReader(entries)
		out, err := c.Output()
		if err != nil {
			t.Fatalf("mktree: %v", err)
		}
		return strings.TrimSpace(string(out))
	}
	absent := strings.Repeat("ab", 20)
	broken := "100644 blob " + absent + "\tc.txt\n"
	leftover := mktree(r.bare, broken, true)
	if mktree(r.work, broken, true) != leftover {
		t.Fatal("the same tree has two ids")
	}
	b := git(t, r.work, "rev-parse", r.base+":dir/b.txt")
	a := git(t, r.work, "rev-parse", r.base+":a.txt")
	dir := mktree(r.work, "100644 blob "+b+"\tb.txt\n040000 tree "+leftover+"\tsub\n", false)
	root := mktree(r.work, "100644 blob "+a+"\ta.txt\n040000 tree "+dir+"\tdir\n", false)
	tip := git(t, r.work, "commit-tree", root, "-p", r.base, "-m", "points at a leftover")
	pack := r.pack(tip + "\n" + root + "\n" + dir + "\n")
	if r.gitConnected(pack, tip) {
		t.Fatal("git finds it whole: the test is wrong")
	}
	if proveConnected(r.bare, []string{pack}, r.refs(), []string{tip}) {
		t.Fatal("a tree holding a broken leftover tree was proven whole")
	}
	// A commit whose parent the repository does not have.
	r.write("a.txt", "one\n")
	mid := r.commit()
	r.write("a.txt", "two\n")
	top := r.commit()
	pack = r.pack(top+"\n^"+mid+"\n", "--revs")
	if r.gitConnected(pack, top) {
		t.Fatal("git finds it whole: the test is wrong")
	}
	if proveConnected(r.bare, []string{pack}, r.refs(), []string{top}) {
		t.Fatal("a commit without its parent was proven whole")
	}
}

// What the proof does not cover it leaves to git: a file moved (its blob
// at another path), and MissingInQuarantine still answers as git does.
func Test_Prove_LeavesTheRestToGit(t *testing.T) {
	r := newProofRepo(t)
	git(t, r.work, "mv", "a.txt", "moved.txt")
	tip := r.commit()
	pack := r.pack(tip+"\n^"+r.base+"\n", "--revs")
	if proveConnected(r.bare, []string{pack}, r.refs(), []string{tip}) {
		t.Fatal("a moved file was proven: the proof claims more than it checks")
	}
	if !r.gitConnected(pack, tip) {
		t.Fatal("git finds the move incomplete")
	}
	// Through the store: MissingInQuarantine asks git, which finds it whole.
	s := &Store{git: DefaultGit()}
	q := filepath.Join(r.bare, "objects", "tmp_objdir-incoming-x")
	os.MkdirAll(filepath.Join(q, "pack"), 0o755)
	for _, f := range []string{pack, strings.TrimSuffix(pack, ".pack") + ".idx"} {
		b, _ := os.ReadFile(f)
		os.WriteFile(filepath.Join(q, "pack", filepath.Base(f)), b, 0o644)
	}
	s.root = filepath.Dir(r.bare)
	missing, err := s.MissingInQuarantine(context.Background(), "r", q, []string{tip})
	if err != nil || len(missing) != 0 {
		t.Fatalf("MissingInQuarantine = %v, %v", missing, err)
	}
}
