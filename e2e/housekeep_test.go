package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
)

// repoDir is a node's copy of a repository on its disk.
func repoDir(n *node, repo string) string {
	return filepath.Join(n.dir, "repos", filepath.FromSlash(repo)+".git")
}

// gitIn runs the stock git in a node's copy (read-only commands).
func gitIn(t *testing.T, dir string, args ...string) result {
	t.Helper()
	return runCmd(t, dir, []string{"GIT_DIR=.", "GIT_CONFIG_NOSYSTEM=1", "GIT_CONFIG_GLOBAL=/dev/null"}, 5*time.Minute, "git", args...)
}

// Housekeeping runs while many small pushes go through every node: `repo
// housekeep` again and again, and each node's scheduler with a low
// threshold. Afterwards nothing is lost (every acknowledged ref through
// every node, `repo verify` clean, git fsck clean on every node's copy),
// each node holds far fewer packs than the pushes made, and what a failed
// push left on a node's disk (a quarantine and an unreachable pack, both
// older than the grace period) is gone.
func Test_E2E_HousekeepUnderPushes(t *testing.T) {
	skipWithoutSSH(t)
	c := startCluster(t, 3, withArgs("--git-housekeeping-interval", "2s", "--git-housekeeping-pack-threshold", "6"))
	n1 := c.nodes[0]
	const repo = "acme/hk"
	c.must(n1, "repo", "create", repo)
	alice := c.addGitUser("alice")
	c.must(n1, "repo", "grant", repo, "alice", "write")
	wt := alice.workTree(url(n1, repo))
	alice.commit(wt, "README", "base\n")
	alice.mustGit(wt, "push", "-q", "origin", "main")

	// Bad input: a node that is not a member, a repository that does not
	// exist.
	if out := c.fails(n1, "repo", "housekeep", repo, "--node", "n9"); !strings.Contains(out, `no member "n9"`) {
		t.Errorf("housekeep --node n9: %s", out)
	}
	if out := c.fails(n1, "repo", "housekeep", "acme/nope"); !strings.Contains(out, "not found") {
		t.Errorf("housekeep of a missing repository: %s", out)
	}

	// What a failed push left on n3, two hours ago: a quarantine directory
	// and a pack no ref reaches.
	n3 := c.nodes[2]
	copy3 := repoDir(n3, repo)
	stray := t.TempDir()
	alice.mustGit(stray, "init", "-q", "-b", "main")
	strayCommit := alice.commit(stray, "lost", "a push that failed\n")
	pack := runCmd(t, stray, nil, time.Minute, "sh", "-c", "echo "+strayCommit+" | git pack-objects --revs -q "+filepath.Join(copy3, "objects", "pack", "pack"))
	if pack.code != 0 {
		t.Fatalf("pack-objects: %s", pack)
	}
	quarantine := filepath.Join(copy3, "objects", "tmp_objdir-incoming-e2e")
	os.MkdirAll(filepath.Join(quarantine, "pack"), 0o755)
	os.WriteFile(filepath.Join(quarantine, "pack", "tmp_pack_e2e"), []byte("half a pack"), 0o644)
	old := time.Now().Add(-2 * time.Hour)
	for _, p := range []string{filepath.Join(copy3, "objects", "pack", "pack-"+strings.TrimSpace(pack.stdout)+".pack"),
		filepath.Join(quarantine, "pack", "tmp_pack_e2e"), filepath.Join(quarantine, "pack"), quarantine} {
		if err := os.Chtimes(p, old, old); err != nil {
			t.Fatal(err)
		}
	}
	if r := gitIn(t, copy3, "cat-file", "-e", strayCommit); r.code != 0 {
		t.Fatalf("the planted pack is not readable: %s", r)
	}

	// Pushers, one branch each, through each node in turn; `repo
	// housekeep` on all nodes meanwhile, again and again.
	const pushers, pushes = 3, 12
	acked := make([]string, pushers)
	var mu sync.Mutex
	attempted := make([][]string, pushers) // after the last ack
	done := make(chan struct{})
	var wg sync.WaitGroup
	for p := range pushers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dir := alice.workTree(url(c.nodes[p], repo))
			alice.mustGit(dir, "fetch", "-q", "origin", "main")
			alice.mustGit(dir, "reset", "-q", "--hard", "FETCH_HEAD")
			branch := fmt.Sprintf("p%d", p)
			for i := range pushes {
				oid := alice.commit(dir, fmt.Sprintf("%s/%d", branch, i), fmt.Sprintf("push %d of %s\n", i, branch))
				remote := url(c.nodes[(p+i)%len(c.nodes)], repo)
				r := alice.git(dir, "push", "-q", remote, "HEAD:refs/heads/"+branch)
				mu.Lock()
				if r.code == 0 {
					acked[p], attempted[p] = oid, nil
				} else {
					attempted[p] = append(attempted[p], oid)
					t.Logf("push %d of %s failed (allowed, not acknowledged): %s", i, branch, r)
				}
				mu.Unlock()
			}
		}()
	}
	var hkRuns int
	hkDone := make(chan struct{})
	go func() {
		defer close(hkDone)
		// At least twice, however fast the pushes go.
		for i := 0; ; i++ {
			if i >= 2 {
				select {
				case <-done:
					return
				default:
				}
			}
			n := c.nodes[i%len(c.nodes)]
			r := c.run(n, "repo", "housekeep", repo)
			hkRuns++
			if r.code != 0 {
				t.Errorf("repo housekeep during pushes failed: %s", r)
			}
			// Clones stay whole while packs come and go.
			d, err := os.MkdirTemp(c.dir, "clone-")
			if err != nil {
				t.Error(err)
				return
			}
			if r := alice.git(c.dir, "clone", "-q", url(n, repo), d); r.code != 0 {
				t.Errorf("clone through %s during pushes and housekeeping: %s", n.id, r)
			} else if r := alice.git(d, "fsck", "--strict", "--no-progress"); r.code != 0 {
				t.Errorf("fsck of a clone through %s: %s", n.id, r)
			}
			os.RemoveAll(d)
		}
	}()
	wg.Wait()
	close(done)
	<-hkDone
	t.Logf("repo housekeep ran %d times during the pushes", hkRuns)
	for p := range pushers {
		if acked[p] == "" {
			t.Fatalf("no push of p%d was acknowledged", p)
		}
	}

	// Nothing lost: every acknowledged ref through every node (or a later
	// push of the same branch that failed but may have committed).
	var refs string
	waitFor(t, "every node to serve the same refs", 60*time.Second, func() bool {
		for _, n := range c.nodes {
			got := alice.lsRemote(url(n, repo))
			if refs != "" && got != refs {
				refs = ""
				return false
			}
			refs = got
		}
		return true
	})
	for p := range pushers {
		line := func(oid string) string { return fmt.Sprintf("%s\trefs/heads/p%d", oid, p) }
		ok := strings.Contains(refs, line(acked[p]))
		for _, o := range attempted[p] {
			ok = ok || strings.Contains(refs, line(o))
		}
		if !ok {
			t.Errorf("p%d: acknowledged %s, refs are\n%s", p, acked[p], refs)
		}
	}
	waitFor(t, "repo verify to be clean", 60*time.Second, func() bool { return c.run(n1, "repo", "verify", repo).code == 0 })
	for _, n := range c.nodes {
		alice.cloneAndCheck(n, repo)
	}

	// A last run everywhere prunes (every copy is current) and leaves far
	// fewer packs than the pushes made.
	var resp repov1.HousekeepRepoResponse
	c.protoOf(n1, &resp, "repo", "housekeep", repo)
	if len(resp.GetNodes()) != 3 {
		t.Fatalf("housekeep answered for %d nodes: %v", len(resp.GetNodes()), &resp)
	}
	for _, nh := range resp.GetNodes() {
		if nh.GetError() != "" || !nh.GetPruned() {
			t.Errorf("%s: not pruned: %v", nh.GetNodeId(), nh)
		}
		if nh.GetPacksAfter() > 2 || nh.GetPacksAfter() < 1 {
			t.Errorf("%s: %d packs after housekeeping, want 1 or 2 (after %d pushes)", nh.GetNodeId(), nh.GetPacksAfter(), pushers*pushes)
		}
	}
	for _, n := range c.nodes {
		dir := repoDir(n, repo)
		if r := gitIn(t, dir, "fsck", "--strict", "--no-progress", "--no-dangling"); r.code != 0 {
			t.Errorf("git fsck of %s's copy: %s", n.id, r)
		}
		if r := gitIn(t, dir, "count-objects", "-v"); !strings.Contains(r.stdout, "count: 0\n") {
			t.Errorf("%s: loose objects left: %s", n.id, r.stdout)
		}
		// A bitmap that misses objects makes clones fail; each ref's
		// objects are the same with and without the bitmaps.
		for _, ref := range []string{"refs/heads/main", "refs/heads/p0", "refs/heads/p1", "refs/heads/p2"} {
			walk := gitIn(t, dir, "rev-list", "--objects", ref)
			bitmap := gitIn(t, dir, "rev-list", "--objects", "--use-bitmap-index", ref)
			if walk.code != 0 || bitmap.code != 0 || sortedOIDs(walk.stdout) != sortedOIDs(bitmap.stdout) {
				t.Errorf("%s: %s's objects differ with the bitmap (%d lines walked, %d with the bitmap)", n.id, ref, strings.Count(walk.stdout, "\n"), strings.Count(bitmap.stdout, "\n"))
			}
		}
	}
	if r := c.run(n1, "repo", "verify", repo); r.code != 0 {
		t.Errorf("repo verify after housekeeping: %s", r)
	}
	// The failed push's leftovers on n3 are gone.
	if _, err := os.Stat(quarantine); !os.IsNotExist(err) {
		t.Errorf("the old quarantine on n3 is still there (%v)", err)
	}
	if r := gitIn(t, copy3, "cat-file", "-e", strayCommit); r.code == 0 {
		t.Error("the failed push's pack, unreachable and two hours old, survived housekeeping")
	}

	// One node only, and the table for people.
	out := c.must(n1, "repo", "housekeep", repo, "--node", "n2")
	if !strings.Contains(out, "n2") || strings.Contains(out, "n1 ") || !strings.Contains(out, "PACKS") {
		t.Errorf("housekeep --node n2 printed:\n%s", out)
	}

	// The scheduler ran on every node, and the metrics say so.
	for _, n := range c.nodes {
		waitFor(t, n.id+"'s housekeeping metrics", 60*time.Second, func() bool {
			_, body := httpGet("http://" + n.httpAddr + "/metrics")
			return strings.Contains(body, "\ngitraft_housekeeping_last_run_timestamp_seconds ") &&
				strings.Contains(body, "\ngitraft_repo_packs{agg=\"max\"} ") &&
				strings.Contains(body, "\ngitraft_housekeeping_failures_total 0\n") &&
				!strings.Contains(body, "\ngitraft_housekeeping_runs_total 0\n")
		})
	}
}

// sortedOIDs is the object ids of rev-list --objects output, sorted.
func sortedOIDs(out string) string {
	var ids []string
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if len(l) >= 40 {
			ids = append(ids, l[:40])
		}
	}
	sort.Strings(ids)
	return strings.Join(ids, "\n")
}
