package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Test_E2E_GitPushRightAfterCreate creates repositories in a burst and uses
// each through every node as soon as its create returned: a node that has
// not yet built the repository on disk must not make the client wait or
// fail.
func Test_E2E_GitPushRightAfterCreate(t *testing.T) {
	skipWithoutSSH(t)
	c := startCluster(t, 3)
	u := c.addGitUser("alice")
	const repos = 12
	for i := range repos {
		name := fmt.Sprintf("burst/r%d", i)
		c.must(c.nodes[i%3], "repo", "create", name)
		c.must(c.nodes[(i+1)%3], "repo", "grant", name, "alice", "write")
	}
	for i := range repos {
		name := fmt.Sprintf("burst/r%d", i)
		wt := u.workTree(url(c.nodes[(i+2)%3], name))
		oid := u.commit(wt, "f", name)
		u.mustGit(wt, "push", "-q", "origin", "main")
		for _, n := range c.nodes {
			if got := u.lsRemote(url(n, name)); !strings.Contains(got, oid+"\trefs/heads/main") {
				t.Fatalf("%s through %s right after the push: %q", name, n.id, got)
			}
		}
	}
}

// Test_E2E_GitBehindNodeServesThroughPeer makes one node unable to catch up
// on a repository and reads through it: the read is served at once through
// a current peer (before, it waited 10 s on its own catch-up first), and the
// node catches up by itself once it can.
func Test_E2E_GitBehindNodeServesThroughPeer(t *testing.T) {
	c, u := gitSetup(t, "r")
	n1, n3 := c.nodes[0], c.nodes[2]
	wt := u.workTree(url(n1, "r"))
	u.commit(wt, "a", "a\n")
	u.mustGit(wt, "push", "-q", "origin", "main")
	waitFor(t, "every replica current", 30*time.Second, func() bool { return c.run(n1, "repo", "verify", "r").code == 0 })
	n3.kill()
	last := u.commit(wt, "b", "b\n")
	u.mustGit(wt, "push", "-q", "origin", "main")
	// Break n3's copy so that it cannot catch up: git refuses a config it
	// cannot parse.
	cfg := filepath.Join(n3.dir, "repos", "r.git", "config")
	good, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfg, append(append([]byte{}, good...), "[[[broken\n"...), 0o644); err != nil {
		t.Fatal(err)
	}
	n3.start()
	n3.waitReady(60 * time.Second)
	r := u.git(c.dir, "ls-remote", url(n3, "r"))
	if r.code != 0 || !strings.Contains(r.stdout, last) {
		t.Fatalf("ls-remote through the behind node: %s", r)
	}
	if !strings.Contains(r.stderr, "serving it through") || strings.Contains(r.stderr, "catching up") {
		t.Errorf("the behind node did not hand the read to a current peer at once: %q", r.stderr)
	}
	// Mended, the copy catches up by itself.
	if err := os.WriteFile(cfg, good, 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "n3 current again", 60*time.Second, func() bool { return c.run(n1, "repo", "verify", "r").code == 0 })
}

// Test_E2E_GitCatchUpAfterKilledGit leaves what a git killed mid-catch-up
// leaves (ref lock files) in a copy that is behind, and checks that the copy
// still catches up: before, every later catch-up failed with "File exists"
// and the copy stayed behind for good.
func Test_E2E_GitCatchUpAfterKilledGit(t *testing.T) {
	c, u := gitSetup(t, "r")
	n1, n3 := c.nodes[0], c.nodes[2]
	wt := u.workTree(url(n1, "r"))
	u.commit(wt, "a", "a\n")
	u.mustGit(wt, "push", "-q", "origin", "main", "main:refs/heads/dev")
	waitFor(t, "every replica current", 30*time.Second, func() bool { return c.run(n1, "repo", "verify", "r").code == 0 })
	n3.kill()
	last := u.commit(wt, "b", "b\n")
	u.mustGit(wt, "push", "-q", "origin", "main", "main:refs/heads/dev")
	repo := filepath.Join(n3.dir, "repos", "r.git")
	for _, f := range []string{"refs/heads/main.lock", "refs/heads/dev.lock", "packed-refs.lock"} {
		if err := os.WriteFile(filepath.Join(repo, f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	n3.start()
	n3.waitReady(60 * time.Second)
	waitFor(t, "n3 to catch up", 60*time.Second, func() bool { return c.run(n1, "repo", "verify", "r").code == 0 })
	if !u.hasCommit(n3, "r", last) {
		t.Fatal("n3 does not serve the last push")
	}
}
