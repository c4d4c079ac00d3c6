package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Test_E2E_GitFetchOnlyReachable: a deleted branch's objects cannot be
// fetched by id, with protocol v2 or v0, while reachable commits that are
// not tips, partial clones and their lazy fetches, and shallow clones still
// work; git.allow_any_sha1_in_want lets them be fetched again.
func Test_E2E_GitFetchOnlyReachable(t *testing.T) {
	skipWithoutSSH(t)
	c, n1 := startGitNode(t)
	c.must(n1, "repo", "create", "acme/site")
	alice := c.addGitUser("alice")
	c.must(n1, "repo", "grant", "acme/site", "alice", "write")
	remote := url(n1, "acme/site")

	wt := alice.workTree(remote)
	c1 := alice.commit(wt, "README", "first\n")
	alice.commit(wt, "README", "second\n")
	alice.mustGit(wt, "push", "-q", "origin", "main")
	// A branch with a secret in it, pushed, then deleted.
	alice.mustGit(wt, "checkout", "-q", "-b", "oops")
	s1 := alice.commit(wt, "secret.txt", "hunter2\n")
	secretBlob := strings.TrimSpace(alice.mustGit(wt, "rev-parse", s1+":secret.txt"))
	alice.mustGit(wt, "push", "-q", "origin", "oops")
	alice.mustGit(wt, "push", "-q", "origin", ":oops")
	if refs := alice.lsRemote(remote); strings.Contains(refs, "oops") {
		t.Fatalf("deleted branch still listed:\n%s", refs)
	}

	fetcher := func() string {
		d, err := os.MkdirTemp(c.dir, "fetch-")
		if err != nil {
			t.Fatal(err)
		}
		alice.mustGit(d, "init", "-q")
		return d
	}
	for _, v := range []string{"2", "0"} {
		d := fetcher()
		s := alice.failGit(d, "-c", "protocol.version="+v, "fetch", remote, s1)
		// git's own words, which the client shows as a remote error.
		if !strings.Contains(s, "remote error: upload-pack: not our ref "+s1) {
			t.Errorf("protocol v%s: fetching the deleted branch's commit: %q", v, s)
		}
		if r := alice.git(d, "cat-file", "-e", s1); r.code == 0 {
			t.Errorf("protocol v%s: the deleted branch's commit arrived anyway", v)
		}
		// A commit that main reaches but that is not a tip is fine.
		alice.mustGit(d, "-c", "protocol.version="+v, "fetch", remote, c1)
		if got := alice.mustGit(d, "show", c1+":README"); got != "first\n" {
			t.Errorf("protocol v%s: fetched %s has README %q", v, c1, got)
		}
	}
	// Not a commit either: the secret's blob, asked for as a partial
	// clone's lazy fetch would.
	d := fetcher()
	if s := alice.failGit(d, "-c", "protocol.version=2", "fetch", "--filter=blob:none", remote, secretBlob); !strings.Contains(s, "remote error: upload-pack: not our ref "+secretBlob) {
		t.Errorf("fetching the secret's blob: %q", s)
	}

	// A partial clone fetches reachable blobs lazily, by id.
	pc := filepath.Join(c.dir, "partial")
	alice.mustGit(c.dir, "clone", "-q", "--filter=blob:none", remote, pc)
	alice.mustGit(pc, "checkout", "-q", c1)
	if b, _ := os.ReadFile(filepath.Join(pc, "README")); string(b) != "first\n" {
		t.Errorf("partial clone, checkout of %s: README = %q", c1, b)
	}
	// A shallow clone, deepened, then made whole.
	sc := filepath.Join(c.dir, "shallow")
	alice.mustGit(c.dir, "clone", "-q", "--depth", "1", remote, sc)
	alice.mustGit(sc, "fetch", "-q", "--deepen", "1")
	alice.mustGit(sc, "fetch", "-q", "--unshallow")
	alice.mustGit(sc, "fsck", "--strict", "--no-progress")

	// The operator's opt-in: anything the node has, by id.
	n1.stop()
	n1.args = append(n1.args, "--git-allow-any-sha1-in-want")
	n1.start()
	n1.waitReady(60 * time.Second)
	for _, v := range []string{"2", "0"} {
		d := fetcher()
		alice.mustGit(d, "-c", "protocol.version="+v, "fetch", remote, s1)
		if got := alice.mustGit(d, "show", s1+":secret.txt"); got != "hunter2\n" {
			t.Errorf("protocol v%s with git.allow_any_sha1_in_want: secret.txt = %q", v, got)
		}
	}
}
