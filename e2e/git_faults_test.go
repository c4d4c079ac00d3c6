package e2e

import (
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
)

// gitSetup makes a 3-node cluster with one writable repo and its user.
func gitSetup(t *testing.T, repo string) (*cluster, *gitUser) {
	t.Helper()
	skipWithoutSSH(t)
	c := startCluster(t, 3)
	c.must(c.nodes[0], "repo", "create", repo)
	u := c.addGitUser("alice")
	c.must(c.nodes[0], "repo", "grant", repo, "alice", "write")
	return c, u
}

func (u *gitUser) hasCommit(n *node, repo, oid string) bool {
	d := u.cloneAndCheck(n, repo)
	return u.git(d, "cat-file", "-e", oid+"^{commit}").code == 0
}

func Test_E2E_GitNodeKilledRightAfterAck(t *testing.T) {
	c, u := gitSetup(t, "r")
	n1 := c.nodes[0]
	wt := u.workTree(url(n1, "r"))
	u.commit(wt, "a", "a\n")
	u.mustGit(wt, "push", "-q", "origin", "main")
	oid := u.commit(wt, "b", "acknowledged\n")
	u.mustGit(wt, "push", "-q", "origin", "main") // ok seen by the client ...
	n1.kill()                                     // ... then the node that took it dies
	for _, n := range c.nodes[1:] {
		if !u.hasCommit(n, "r", oid) {
			t.Fatalf("acknowledged push missing on %s after the node that took it died", n.id)
		}
	}
	n1.start()
	n1.waitReady(60 * time.Second)
	if !u.hasCommit(n1, "r", oid) {
		t.Fatal("the restarted node does not serve the push")
	}
	u.sameEverywhere("r")
}

func Test_E2E_GitFollowerDownCatchesUp(t *testing.T) {
	c, u := gitSetup(t, "r")
	lead := c.leader()
	f := c.other(lead)
	f.kill()
	via := c.other(f)
	wt := u.workTree(url(via, "r"))
	var last string
	for i := range 5 {
		last = u.commit(wt, fmt.Sprintf("f%d", i), strings.Repeat("x", 1000*(i+1)))
		u.mustGit(wt, "push", "-q", "origin", "main")
	}
	// While it is down, the admin API says so.
	var show repov1.GetRepoResponse
	c.protoOf(via, &show, "repo", "show", "r")
	// The nodes that are up get there once their reconcilers ran (a node
	// that acked the pack may still be recording the version).
	waitFor(t, "the live replicas current and the dead one unreachable", 30*time.Second, func() bool {
		c.protoOf(via, &show, "repo", "show", "r")
		for _, rep := range show.GetRepo().GetReplicas() {
			want := repov1.ReplicaState_REPLICA_STATE_CURRENT
			if rep.GetNodeId() == f.id {
				want = repov1.ReplicaState_REPLICA_STATE_UNREACHABLE
			}
			if rep.GetState() != want {
				return false
			}
		}
		return len(show.GetRepo().GetReplicas()) == 3
	})
	f.start()
	f.waitReady(60 * time.Second)
	// A clone through the node that was down is current (it catches up first).
	if !u.hasCommit(f, "r", last) {
		t.Fatalf("%s serves a stale copy after restart", f.id)
	}
	waitFor(t, "every replica current", 30*time.Second, func() bool {
		return c.run(lead, "repo", "verify", "r").code == 0
	})
	// verify notices a copy that differs from the state, and says how.
	path := filepath.Join(f.dir, "repos", "r.git")
	if r := runCmd(t, path, nil, time.Minute, "git", "update-ref", "refs/heads/rogue", last); r.code != 0 {
		t.Fatal(r)
	}
	r := c.run(lead, "repo", "verify", "r")
	if r.code == 0 || !strings.Contains(r.stdout, "refs/heads/rogue: disk "+last+", not in state") {
		t.Fatalf("verify missed a rogue ref on %s: %s", f.id, r)
	}
}

func Test_E2E_GitLeaderKilledMidPush(t *testing.T) {
	c, u := gitSetup(t, "r")
	lead := c.leader()
	via := c.other(lead)
	wt := u.workTree(url(via, "r"))
	u.commit(wt, "a", "a\n")
	u.mustGit(wt, "push", "-q", "origin", "main")
	// A push big enough to be in flight when the leader dies.
	data := make([]byte, 40<<20)
	rand.Read(data)
	os.WriteFile(filepath.Join(wt, "big.bin"), data, 0o644)
	u.mustGit(wt, "add", "big.bin")
	u.mustGit(wt, "commit", "-q", "-m", "big")
	big := strings.TrimSpace(u.mustGit(wt, "rev-parse", "HEAD"))
	done := make(chan result, 1)
	go func() { done <- runCmd(t, wt, u.env(), 5*time.Minute, "git", "push", "origin", "main") }()
	time.Sleep(300 * time.Millisecond)
	lead.kill()
	r := <-done
	t.Logf("push during leader death: exit %d: %s", r.code, strings.TrimSpace(r.stderr))
	// The next push succeeds within a few seconds of trying.
	wt2 := u.workTree(url(via, "r"))
	u.mustGit(wt2, "fetch", "-q", "origin")
	u.mustGit(wt2, "reset", "-q", "--hard", "origin/main")
	next := u.commit(wt2, "after", "after\n")
	start := time.Now()
	var ok bool
	for time.Since(start) < 30*time.Second && !ok {
		ok = u.git(wt2, "push", "-q", "origin", "main").code == 0
		if !ok {
			time.Sleep(500 * time.Millisecond)
		}
	}
	if !ok {
		t.Fatal("no push succeeded within 30s of the leader's death")
	}
	t.Logf("next push succeeded %s after the first try", time.Since(start).Round(time.Millisecond))
	// Either outcome of the interrupted push is fine, but it is the same
	// everywhere, and the acknowledged one is there.
	lead.start()
	lead.waitReady(60 * time.Second)
	waitFor(t, "all nodes to agree", 60*time.Second, func() bool { return c.run(via, "repo", "verify", "r").code == 0 })
	refs := u.sameEverywhere("r")
	if !strings.Contains(refs, next) {
		t.Fatalf("acknowledged push %s missing: %s", next, refs)
	}
	if r.code == 0 && !u.hasCommit(lead, "r", big) {
		t.Fatal("the interrupted push was acknowledged but is lost")
	}
}

func Test_E2E_GitNoQuorum(t *testing.T) {
	c, u := gitSetup(t, "r")
	n3 := c.nodes[2]
	wt := u.workTree(url(n3, "r"))
	u.commit(wt, "a", "a\n")
	u.mustGit(wt, "push", "-q", "origin", "main")
	waitFor(t, "every replica current", 30*time.Second, func() bool { return c.run(n3, "repo", "verify", "r").code == 0 })
	before := u.lsRemote(url(n3, "r"))
	c.nodes[0].kill()
	c.nodes[1].kill()
	u.commit(wt, "b", "b\n")
	start := time.Now()
	s := u.failGit(wt, "push", "origin", "main")
	took := time.Since(start)
	t.Logf("push without quorum failed after %s: %s", took.Round(time.Millisecond), strings.TrimSpace(s))
	if !strings.Contains(s, "quorum") {
		t.Errorf("the refusal does not name the lost quorum: %q", s)
	}
	if took > 60*time.Second {
		t.Errorf("push took %s to fail", took)
	}
	// The survivor cannot confirm its copy is current: it refuses reads,
	// saying why and where to go, rather than serve a copy that may be stale.
	s = u.failGit(c.dir, "clone", url(n3, "r"), filepath.Join(c.dir, "stale-clone"))
	if !strings.Contains(s, "cannot reach the cluster's leader") || !strings.Contains(s, "try another node") {
		t.Errorf("a clone from the cut-off survivor: %q", s)
	}
	c.nodes[0].start()
	c.nodes[1].start()
	for _, n := range c.nodes {
		n.waitReady(60 * time.Second)
	}
	if got := u.sameEverywhere("r"); got != before {
		t.Fatalf("refs changed by a push that failed:\n%s\nwas\n%s", got, before)
	}
}

func Test_E2E_GitConcurrentPushers(t *testing.T) {
	c, u := gitSetup(t, "r")
	seed := u.workTree(url(c.nodes[0], "r"))
	u.commit(seed, "seed", "seed\n")
	u.mustGit(seed, "push", "-q", "origin", "main")
	var mu sync.Mutex
	var acked []string
	var wg sync.WaitGroup
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n := c.nodes[w+1]
			dir := u.cloneAndCheck(n, "r")
			for i := range 8 {
				for attempt := 0; attempt < 20; attempt++ {
					u.git(dir, "fetch", "-q", "origin")
					u.git(dir, "reset", "-q", "--hard", "origin/main")
					oid := u.commit(dir, fmt.Sprintf("w%d/%d", w, i), fmt.Sprintf("writer %d push %d attempt %d\n", w, i, attempt))
					if r := u.git(dir, "push", "-q", "origin", "main"); r.code == 0 {
						mu.Lock()
						acked = append(acked, oid)
						mu.Unlock()
						break
					}
				}
			}
		}()
	}
	wg.Wait()
	if len(acked) < 2 {
		t.Fatalf("only %d pushes acknowledged", len(acked))
	}
	final := u.cloneAndCheck(c.nodes[0], "r")
	for _, oid := range acked {
		if u.git(final, "merge-base", "--is-ancestor", oid, "HEAD").code != 0 {
			t.Errorf("acknowledged push %s is not in the final history (lost update)", oid)
		}
	}
	t.Logf("%d acknowledged pushes, all in the final history", len(acked))
	u.sameEverywhere("r")
}

func Test_E2E_GitClientVanishesMidPush(t *testing.T) {
	c, u := gitSetup(t, "r")
	n2 := c.nodes[1]
	wt := u.workTree(url(n2, "r"))
	u.commit(wt, "a", "a\n")
	u.mustGit(wt, "push", "-q", "origin", "main")
	before := u.sameEverywhere("r")
	data := make([]byte, 60<<20)
	rand.Read(data)
	os.WriteFile(filepath.Join(wt, "big.bin"), data, 0o644)
	u.mustGit(wt, "add", "big.bin")
	u.mustGit(wt, "commit", "-q", "-m", "big")
	cmd := exec.Command("git", "push", "origin", "main")
	cmd.Dir, cmd.Env = wt, append(os.Environ(), u.env()...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(400 * time.Millisecond) // mid-transfer
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	cmd.Wait()
	var ls struct {
		Locks []struct{ Repo string } `json:"locks"`
	}
	waitFor(t, "the write lock to be free again", 60*time.Second, func() bool {
		c.jsonOf(n2, &ls, "lock", "ls")
		return len(ls.Locks) == 0
	})
	if got := u.sameEverywhere("r"); got != before {
		t.Fatalf("a vanished client's push changed refs:\n%s\nwas\n%s", got, before)
	}
	// The repo takes the next push.
	wt2 := u.cloneAndCheck(c.nodes[2], "r")
	u.commit(wt2, "next", "next\n")
	u.mustGit(wt2, "push", "-q", "origin", "main")
}
