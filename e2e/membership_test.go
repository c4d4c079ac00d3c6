package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clusterv1 "github.com/gitraft/gitraft/proto/gitraft/cluster/v1"
)

// withBlockedFetch puts a git in front of the node's PATH that refuses to
// fetch while the file gate exists: the node cannot fill its repositories
// from its peers until the test removes it.
func withBlockedFetch(t *testing.T, gate string) clusterOpt {
	realGit, err := lookPath("git")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	script := fmt.Sprintf(`#!/bin/sh
if [ -e %q ]; then
  for a in "$@"; do
    if [ "$a" = fetch ]; then echo "e2e: fetching is blocked on this node" >&2; exit 1; fi
  done
fi
exec %q "$@"
`, gate, realGit)
	if err := os.WriteFile(filepath.Join(dir, "git"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return func(n *node) { n.env = append(n.env, "PATH="+dir+":"+os.Getenv("PATH")) }
}

func memberOf(st *clusterv1.GetStatusResponse, id string) *clusterv1.Member {
	for _, m := range st.GetMembers() {
		if m.GetId() == id {
			return m
		}
	}
	return nil
}

// A fourth node that joins a cluster holding repositories stays a non-voter
// (no vote, cannot lead) and not ready (/readyz 503) while it lacks any of
// them, and becomes a voter, and ready, once it holds every one at its
// committed version.
func Test_E2E_JoinAsNonvoterUntilFilled(t *testing.T) {
	skipWithoutSSH(t)
	c := startCluster(t, 3)
	n1 := c.nodes[0]
	alice := c.addGitUser("alice")
	const repos = 3
	for i := range repos {
		name := fmt.Sprintf("team/r%d", i)
		c.must(n1, "repo", "create", name)
		c.must(n1, "repo", "grant", name, "alice", "write")
		wt := alice.workTree(url(c.nodes[i%3], name))
		alice.commit(wt, "README", fmt.Sprintf("repo %d\n", i))
		alice.mustGit(wt, "push", "-q", "origin", "main")
	}
	c.must(n1, "repo", "create", "team/empty") // nothing to fetch: filled at once

	gate := filepath.Join(t.TempDir(), "block-fetch")
	if err := os.WriteFile(gate, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	n4 := c.addNode("n4", false, withBlockedFetch(t, gate))
	// Not ready while it cannot hold every repository: /readyz says how far
	// it got.
	waitFor(t, "n4's /readyz to say it is filling", 60*time.Second, func() bool {
		code, body := n4.readyz()
		return code == 503 && strings.Contains(body, "filling ") && strings.Contains(body, fmt.Sprintf("/%d repos", repos+1))
	})
	var st clusterv1.GetStatusResponse
	waitFor(t, "n4 to report its fill", 30*time.Second, func() bool {
		c.protoOf(n1, &st, "cluster", "status")
		m := memberOf(&st, "n4")
		if m.GetSuffrage() == clusterv1.Suffrage_SUFFRAGE_VOTER {
			t.Fatalf("n4 is a voter right after joining, while it cannot fetch any pushed repository")
		}
		return m.GetFill().GetReposTotal() == repos+1
	})
	// It cannot fetch the pushed repositories: many promotion rounds pass
	// and it stays a non-voter.
	for range 5 {
		c.protoOf(c.nodes[1], &st, "cluster", "status")
		m := memberOf(&st, "n4")
		if m.GetSuffrage() != clusterv1.Suffrage_SUFFRAGE_NONVOTER {
			t.Fatalf("n4 is %v while it cannot fetch any pushed repository (fill %v)", m.GetSuffrage(), m.GetFill())
		}
		// (A status call that could not reach n4 in time, on a loaded
		// machine, reports no fill: that says nothing either way.)
		if f := m.GetFill(); f != nil && (f.GetReposCurrent() >= repos+1 || f.GetWaitingFor() == "") {
			t.Fatalf("n4's fill while blocked: %v", f)
		}
		time.Sleep(time.Second)
	}
	var out string
	waitFor(t, "cluster status to show n4 filling", 30*time.Second, func() bool {
		out = c.must(n1, "cluster", "status")
		return strings.Contains(out, "filling: ") && strings.Contains(out, "n4 is not a voter yet")
	})
	t.Logf("while blocked:\n%s", out)

	if code, body := n4.readyz(); code != 503 {
		t.Fatalf("n4 is ready while it cannot fill: %s", body)
	}
	os.Remove(gate)
	c.waitVoters(4)
	n4.waitReady(60 * time.Second)
	c.protoOf(n4, &st, "cluster", "status")
	if m := memberOf(&st, "n4"); m.GetSuffrage() != clusterv1.Suffrage_SUFFRAGE_VOTER || m.GetFill() != nil {
		t.Fatalf("n4 after filling: %v, fill %v", m.GetSuffrage(), m.GetFill())
	}
	// Holding everything, it serves every repository.
	if err := os.WriteFile(alice.knownHosts, []byte(c.must(n1, "cluster", "known-hosts")), 0o600); err != nil {
		t.Fatal(err)
	}
	for i := range repos {
		alice.cloneAndCheck(n4, fmt.Sprintf("team/r%d", i))
	}
}
