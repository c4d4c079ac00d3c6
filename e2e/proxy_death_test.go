package e2e

import (
	"strings"
	"testing"
	"time"
)

// A push handed to a peer (the node the client reached has too little free
// disk) holds the write lock on that peer. When the node that relays the
// client's session is SIGKILLed, the peer must end the push and give the
// lock back at once, not when its lease (15 s) runs out: the client is
// gone. A second push waiting for the lock goes through.
func Test_E2E_ProxyKilledMidPush(t *testing.T) {
	skipWithoutSSH(t)
	c := startCluster(t, 3, func(n *node) {
		if n.id == "n1" {
			n.args = append(n.args, "--git-min-free-bytes", "1000000000000000000")
		}
	})
	u := c.addGitUser("alice")
	n1 := c.nodes[0]
	lead := c.leader()
	c.must(lead, "repo", "create", "site")
	c.must(lead, "repo", "grant", "site", "alice", "write")
	other := c.other(n1)
	seed := u.workTree(url(other, "site"))
	u.commit(seed, "README", "site\n")
	u.mustGit(seed, "push", "-q", "origin", "HEAD:main")
	waitFor(t, "every copy current", 30*time.Second, func() bool { return c.run(lead, "repo", "verify", "site").code == 0 })

	h := u.holdWriteLock(n1, "site") // relayed by n1 to a peer, which holds the lock
	defer h.end()
	var ls struct {
		Locks []struct {
			Repo   string `json:"repo"`
			Holder string `json:"holder"`
		} `json:"locks"`
	}
	c.jsonOf(lead, &ls, "lock", "ls")
	if len(ls.Locks) != 1 || strings.HasPrefix(ls.Locks[0].Holder, "n1/") {
		t.Fatalf("locks %+v: want site's lock held by the peer n1 handed the push to", ls.Locks)
	}
	via := c.other(n1)
	wt := u.workTree(url(via, "site"))
	u.mustGit(wt, "pull", "-q", "origin", "main")
	u.commit(wt, "f.txt", "second\n")
	p := u.pushInBackground(wt, "origin", "HEAD:main")
	waitFor(t, "the second push to wait for the write lock", 60*time.Second, func() bool { return p.said("waiting for the write lock") })
	killed := time.Now()
	n1.kill()
	var r result
	select {
	case r = <-p.done:
	case <-time.After(120 * time.Second):
		t.Fatal("the waiting push did not finish within 120s")
	}
	waited := time.Since(killed)
	if r.code != 0 {
		t.Fatalf("the waiting push failed: %s", r)
	}
	var events []string
	for _, n := range c.nodes {
		if n.running() {
			for _, id := range []string{"n2", "n3"} {
				events = append(events, n.id+":"+id+":"+strings.Join(n.lockEvents(id), ","))
			}
		}
	}
	t.Logf("the waiting push went through %s after the relaying node was killed; lock events: %v", waited.Round(time.Millisecond), events)
	if strings.Contains(strings.Join(events, " "), "expired") {
		t.Fatalf("the relayed push's lock was only freed by its lease (%s): %v", waited.Round(time.Millisecond), events)
	}
}
