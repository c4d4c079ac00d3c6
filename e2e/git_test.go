package e2e

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// withPostReceive makes every node record each accepted push in dir.
func withPostReceive(dir string) clusterOpt {
	return func(n *node) {
		n.args = append(n.args, "--git-post-receive",
			fmt.Sprintf(`{ env | grep -E '^(GITRAFT_|GIT_PUSH_OPTION)' | sort; cat; } > %s/push-"$GITRAFT_PUSH_ID"`, dir))
	}
}

func Test_E2E_GitPushFetchClone(t *testing.T) {
	skipWithoutSSH(t)
	hooks := t.TempDir()
	c := startCluster(t, 3, withPostReceive(hooks))
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]
	c.must(n1, "repo", "create", "acme/site")
	alice := c.addGitUser("alice")
	c.must(n1, "repo", "grant", "acme/site", "alice", "write")

	// First push to an empty repository, through n1.
	wt := alice.workTree(url(n1, "acme/site"))
	c1 := alice.commit(wt, "README", "hello\n")
	out := alice.mustGit(wt, "push", "origin", "main")
	for _, want := range []string{"n1 took the push", "replicated to", "committed version 2"} {
		if !strings.Contains(out, want) {
			t.Errorf("push output lacks %q:\n%s", want, out)
		}
	}
	// Clones through every node are identical and sound.
	for _, n := range c.nodes {
		d := alice.cloneAndCheck(n, "acme/site")
		if b, _ := os.ReadFile(filepath.Join(d, "README")); string(b) != "hello\n" {
			t.Fatalf("clone through %s: README = %q", n.id, b)
		}
	}

	// A second push that edits files goes through n2 as a thin pack.
	wt2 := alice.cloneAndCheck(n2, "acme/site")
	for i := range 5 {
		alice.commit(wt2, fmt.Sprintf("src/f%d.txt", i), strings.Repeat(fmt.Sprintf("line %d\n", i), 500))
	}
	c2 := alice.commit(wt2, "README", "hello\nagain\n")
	alice.mustGit(wt2, "push", "origin", "main")

	// Tags, lightweight and annotated; fetch follows them.
	alice.mustGit(wt2, "tag", "v1", c1)
	alice.mustGit(wt2, "tag", "-a", "v2", "-m", "release 2")
	alice.mustGit(wt2, "push", "origin", "v1", "v2")
	alice.mustGit(wt, "fetch", "origin")
	if tags := alice.mustGit(wt, "tag", "-l"); !strings.Contains(tags, "v1") || !strings.Contains(tags, "v2") {
		t.Errorf("fetch did not follow tags: %q", tags)
	}

	// A branch, then its deletion.
	alice.mustGit(wt2, "push", "origin", "main:refs/heads/feature")
	alice.mustGit(wt2, "push", "origin", ":feature")
	if strings.Contains(alice.lsRemote(url(n3, "acme/site")), "feature") {
		t.Fatal("deleted branch still listed")
	}

	// Non-fast-forward refused; --force-with-lease honoured; a stale lease
	// refused; force push applies.
	alice.mustGit(wt, "reset", "-q", "--hard", c1)
	alice.commit(wt, "other.txt", "diverged\n")
	if s := alice.failGit(wt, "push", "origin", "main"); !strings.Contains(s, "rejected") {
		t.Errorf("non-fast-forward: %q", s)
	}
	if s := alice.failGit(wt, "push", "--force-with-lease=main:"+c1, "origin", "main"); !strings.Contains(s, "stale info") {
		t.Errorf("stale lease: %q", s)
	}
	before := alice.lsRemote(url(n1, "acme/site"))
	if !strings.Contains(before, c2) {
		t.Fatalf("refused pushes changed main: %s", before)
	}
	alice.mustGit(wt, "push", "--force-with-lease=main:"+c2, "origin", "main")
	forced := strings.TrimSpace(alice.mustGit(wt, "rev-parse", "HEAD"))
	alice.mustGit(wt2, "fetch", "-q", "origin")
	alice.mustGit(wt2, "reset", "-q", "--hard", "origin/main")
	alice.commit(wt2, "x.txt", "x\n")
	alice.mustGit(wt2, "push", "--force", "origin", "main")

	// --atomic with one failing ref changes nothing.
	refsBefore := alice.sameEverywhere("acme/site")
	alice.mustGit(wt, "branch", "-f", "side", forced)
	if s := alice.failGit(wt, "push", "--atomic", "origin", "side", "main"); !strings.Contains(s, "atomic") && !strings.Contains(s, "rejected") {
		t.Errorf("atomic push: %q", s)
	}
	if got := alice.sameEverywhere("acme/site"); got != refsBefore {
		t.Fatalf("a failed atomic push changed refs:\n%s\nwas\n%s", got, refsBefore)
	}

	// Push options reach the post-receive command.
	alice.mustGit(wt2, "push", "-o", "ci.skip", "-o", "reviewer=bob", "origin", "main:refs/heads/opts")
	found := false
	waitFor(t, "the post-receive record", 10*time.Second, func() bool {
		files, _ := filepath.Glob(filepath.Join(hooks, "push-*"))
		for _, f := range files {
			b, _ := os.ReadFile(f)
			if bytes.Contains(b, []byte("GIT_PUSH_OPTION_1=reviewer=bob")) && bytes.Contains(b, []byte("refs/heads/opts")) && bytes.Contains(b, []byte("GITRAFT_USER=alice")) {
				found = true
			}
		}
		return found
	})

	// Protocol v0 and v2, shallow and deepen, partial clone, archive.
	for _, v := range []string{"0", "2"} {
		d := alice.cloneAndCheck(n3, "acme/site", "-c", "protocol.version="+v)
		if got := strings.TrimSpace(alice.mustGit(d, "rev-parse", "HEAD")); got == "" {
			t.Fatalf("protocol v%s clone has no HEAD", v)
		}
	}
	shallow := filepath.Join(c.dir, "shallow")
	alice.mustGit(c.dir, "clone", "-q", "--depth", "1", url(n2, "acme/site"), shallow)
	if n := strings.TrimSpace(alice.mustGit(shallow, "rev-list", "--count", "HEAD")); n != "1" {
		t.Fatalf("--depth 1 clone has %s commits", n)
	}
	alice.mustGit(shallow, "fetch", "-q", "--deepen", "1")
	if n := strings.TrimSpace(alice.mustGit(shallow, "rev-list", "--count", "HEAD")); n != "2" {
		t.Fatalf("after --deepen 1: %s commits, want 2", n)
	}
	partial := filepath.Join(c.dir, "partial")
	alice.mustGit(c.dir, "clone", "-q", "--filter=blob:none", "--no-checkout", url(n1, "acme/site"), partial)
	if objs := alice.mustGit(partial, "rev-list", "--objects", "--missing=print", "--all"); !strings.Contains(objs, "\n?") {
		t.Fatalf("a blob:none clone holds every blob:\n%s", objs)
	}
	alice.mustGit(partial, "checkout", "-q", "main")
	if b, _ := os.ReadFile(filepath.Join(partial, "x.txt")); string(b) != "x\n" {
		t.Fatalf("partial clone did not fetch blobs on checkout: x.txt = %q", b)
	}
	archive := runCmd(t, c.dir, alice.env(), time.Minute, "sh", "-c", fmt.Sprintf("git archive --remote=%s --format=tar main README | tar -xO", url(n2, "acme/site")))
	if archive.code != 0 || !strings.Contains(archive.stdout, "hello") {
		t.Fatalf("git archive --remote: %s", archive)
	}

	// Every node ends with the same refs, and verify says so.
	alice.sameEverywhere("acme/site")
	waitFor(t, "repo verify to pass", 30*time.Second, func() bool { return c.run(n1, "repo", "verify", "acme/site").code == 0 })
	for _, n := range c.nodes {
		alice.cloneAndCheck(n, "acme/site")
	}
}

func Test_E2E_GitManyRefsAndBigPush(t *testing.T) {
	skipWithoutSSH(t)
	c := startCluster(t, 3)
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]
	c.must(n1, "repo", "create", "big")
	alice := c.addGitUser("alice")
	c.must(n1, "repo", "grant", "big", "alice", "write")
	wt := alice.workTree(url(n1, "big"))
	base := alice.commit(wt, "README", "many refs\n")
	// Thousands of refs in one push.
	var in bytes.Buffer
	for i := range 3000 {
		fmt.Fprintf(&in, "create refs/tags/t%04d %s\n", i, base)
	}
	cmd := exec.Command("git", "update-ref", "--stdin")
	cmd.Dir, cmd.Stdin = wt, &in
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("update-ref: %v %s", err, out)
	}
	alice.mustGit(wt, "push", "-q", "origin", "main", "--tags")
	refs := alice.sameEverywhere("big")
	if n := strings.Count(refs, "refs/tags/t"); n != 3000 {
		t.Fatalf("%d tags listed, want 3000", n)
	}
	// A push of 100 MB of incompressible data, through n2.
	wt2 := alice.cloneAndCheck(n2, "big")
	data := make([]byte, 100<<20)
	rand.Read(data)
	if err := os.WriteFile(filepath.Join(wt2, "blob.bin"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	alice.mustGit(wt2, "add", "blob.bin")
	alice.mustGit(wt2, "commit", "-q", "-m", "100 MB")
	start := time.Now()
	alice.mustGit(wt2, "push", "-q", "origin", "main")
	t.Logf("100 MB push took %s", time.Since(start).Round(time.Millisecond))
	d := alice.cloneAndCheck(n3, "big")
	got, err := os.ReadFile(filepath.Join(d, "blob.bin"))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the 100 MB file cloned through n3 differs (err %v)", err)
	}
	alice.sameEverywhere("big")
}

func Test_E2E_GitBadInput(t *testing.T) {
	skipWithoutSSH(t)
	c := startCluster(t, 3)
	n1, n2 := c.nodes[0], c.nodes[1]
	c.must(n1, "repo", "create", "acme/private")
	alice := c.addGitUser("alice")
	bob := c.addGitUser("bob")
	c.must(n1, "repo", "grant", "acme/private", "alice", "write")
	c.must(n1, "repo", "grant", "acme/private", "bob", "read")
	wt := alice.workTree(url(n1, "acme/private"))
	alice.commit(wt, "a", "a\n")
	alice.mustGit(wt, "push", "-q", "origin", "main")
	refs := alice.sameEverywhere("acme/private")

	checks := []struct {
		name string
		u    *gitUser
		args []string
		want string
	}{
		{"unknown repo", alice, []string{"ls-remote", url(n2, "nope")}, `repository "nope" not found`},
		{"bad name", alice, []string{"ls-remote", url(n2, "../etc/passwd")}, "invalid repository name"},
		{"read-only push", bob, []string{"-C", wt, "push", url(n2, "acme/private"), "main:refs/heads/bob"}, "may read but not push"},
	}
	for _, ck := range checks {
		s := ck.u.failGit(c.dir, ck.args...)
		if !strings.Contains(s, ck.want) {
			t.Errorf("%s: stderr %q, want %q", ck.name, s, ck.want)
		}
	}
	// A user with no grant is told the repo does not exist.
	carol := c.addGitUser("carol")
	if s := carol.failGit(c.dir, "ls-remote", url(n2, "acme/private")); !strings.Contains(s, "not found") {
		t.Errorf("no access: %q", s)
	}
	// An unknown key is refused by SSH itself.
	stranger := &gitUser{c: c, name: "stranger", key: filepath.Join(c.dir, "key-stranger"), knownHosts: alice.knownHosts}
	runCmd(t, c.dir, nil, 30*time.Second, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", stranger.key)
	if s := stranger.failGit(c.dir, "ls-remote", url(n1, "acme/private")); !strings.Contains(s, "Permission denied") {
		t.Errorf("unknown key: %q", s)
	}
	// Other commands and garbage instead of pkt-lines get one-line refusals.
	sshArgs := func(n *node, cmd ...string) []string {
		host, port, _ := strings.Cut(n.sshAdr, ":")
		return append([]string{"-i", alice.key, "-o", "IdentitiesOnly=yes", "-o", "UserKnownHostsFile=" + alice.knownHosts, "-o", "BatchMode=yes", "-p", port, "git@" + host}, cmd...)
	}
	r := runCmd(t, c.dir, nil, 30*time.Second, "ssh", sshArgs(n1, "ls", "/")...)
	if r.code == 0 || !strings.Contains(r.stderr, "only git-upload-pack") {
		t.Errorf("ssh ls: %s", r)
	}
	r = runCmd(t, c.dir, nil, 30*time.Second, "ssh", sshArgs(n1)...)
	if r.code == 0 || !strings.Contains(r.stderr, "shells are not offered") {
		t.Errorf("ssh shell: %s", r)
	}
	garbage := exec.Command("ssh", sshArgs(n2, "git-receive-pack", "'acme/private'")...)
	garbage.Stdin = strings.NewReader("this is not a pkt-line stream at all\n")
	out, err := garbage.CombinedOutput()
	if err == nil {
		t.Errorf("garbage push succeeded: %s", out)
	}
	// A truncated pack: a real push whose pack is cut short.
	alice.commit(wt, "b", strings.Repeat("b", 100000))
	pack := exec.Command("git", "pack-objects", "--stdout", "--revs")
	pack.Dir = wt
	pack.Stdin = strings.NewReader("HEAD\n^HEAD~1\n")
	packBytes, err := pack.Output()
	if err != nil {
		t.Fatal(err)
	}
	head := strings.TrimSpace(alice.mustGit(wt, "rev-parse", "HEAD"))
	old := strings.TrimSpace(alice.mustGit(wt, "rev-parse", "HEAD~1"))
	cmdLine := fmt.Sprintf("%s %s refs/heads/main\x00report-status\n", old, head)
	var stream bytes.Buffer
	fmt.Fprintf(&stream, "%04x%s0000", len(cmdLine)+4, cmdLine)
	stream.Write(packBytes[:len(packBytes)/2])
	trunc := exec.Command("ssh", sshArgs(n2, "git-receive-pack", "'acme/private'")...)
	trunc.Stdin = &stream
	out, _ = trunc.CombinedOutput()
	t.Logf("truncated pack: %s", bytes.TrimSpace(out))
	// Nothing changed anywhere, and the nodes keep serving.
	if got := alice.sameEverywhere("acme/private"); got != refs {
		t.Fatalf("bad input changed refs:\n%s\nwas\n%s", got, refs)
	}
	var ls struct {
		Locks []struct{ Repo string } `json:"locks"`
	}
	waitFor(t, "no write lock left behind", 40*time.Second, func() bool {
		c.jsonOf(n1, &ls, "lock", "ls")
		return len(ls.Locks) == 0
	})
	alice.mustGit(wt, "push", "-q", "origin", "main")
}

// The first branch pushed to an empty repository becomes HEAD on every
// node, the one that took the push included.
func Test_E2E_GitHeadFollowsFirstBranch(t *testing.T) {
	c, u := gitSetup(t, "r")
	n1 := c.nodes[0]
	wt := u.workTree(url(n1, "r"))
	u.mustGit(wt, "checkout", "-q", "-b", "trunk")
	u.commit(wt, "a", "a\n")
	u.mustGit(wt, "push", "-q", "origin", "trunk")
	for _, n := range c.nodes {
		d := u.cloneAndCheck(n, "r")
		if b := strings.TrimSpace(u.mustGit(d, "rev-parse", "--abbrev-ref", "HEAD")); b != "trunk" {
			t.Errorf("clone through %s checked out %q, want trunk", n.id, b)
		}
	}
	waitFor(t, "repo verify to pass", 30*time.Second, func() bool { return c.run(n1, "repo", "verify", "r").code == 0 })
}
