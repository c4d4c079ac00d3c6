package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
)

// gitUser is a person with an SSH key registered in the cluster.
type gitUser struct {
	c          *cluster
	name, key  string
	knownHosts string
}

// addGitUser creates a user with a fresh SSH key and a known_hosts file made
// from `gitraft cluster known-hosts`.
func (c *cluster) addGitUser(name string) *gitUser {
	c.t.Helper()
	key := filepath.Join(c.dir, "key-"+name)
	if r := runCmd(c.t, c.dir, nil, 30*time.Second, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", key); r.code != 0 {
		c.t.Fatalf("ssh-keygen: %s", r)
	}
	n := c.other()
	c.must(n, "user", "add", name)
	c.must(n, "key", "add", name, key+".pub")
	kh := filepath.Join(c.dir, "known_hosts")
	if err := os.WriteFile(kh, []byte(c.knownHostsOf(n)), 0o600); err != nil {
		c.t.Fatal(err)
	}
	return &gitUser{c: c, name: name, key: key, knownHosts: kh}
}

// knownHostsOf is `gitraft cluster known-hosts` once every running node has
// registered its SSH address and host keys (nodes do so just after they
// join, so a moment after /readyz).
func (c *cluster) knownHostsOf(n *node) string {
	c.t.Helper()
	var out string
	waitFor(c.t, "every node's SSH host keys in known-hosts", 30*time.Second, func() bool {
		r := c.run(n, "cluster", "known-hosts")
		if r.code != 0 {
			return false
		}
		for _, m := range c.nodes {
			if m.running() && !strings.Contains(r.stdout, "]:"+m.sshAdr[strings.LastIndex(m.sshAdr, ":")+1:]) {
				return false
			}
		}
		out = r.stdout
		return true
	})
	return out
}

// env runs git as this user over SSH with strict host key checking.
func (u *gitUser) env() []string {
	return []string{
		fmt.Sprintf("GIT_SSH_COMMAND=ssh -i %s -o IdentitiesOnly=yes -o UserKnownHostsFile=%s -o StrictHostKeyChecking=yes -o BatchMode=yes", u.key, u.knownHosts),
		"GIT_AUTHOR_NAME=" + u.name, "GIT_AUTHOR_EMAIL=" + u.name + "@example.org",
		"GIT_COMMITTER_NAME=" + u.name, "GIT_COMMITTER_EMAIL=" + u.name + "@example.org",
		"GIT_CONFIG_NOSYSTEM=1", "GIT_CONFIG_GLOBAL=/dev/null", "GIT_TERMINAL_PROMPT=0",
	}
}

func url(n *node, repo string) string { return "ssh://git@" + n.sshAdr + "/" + repo + ".git" }

// git runs git as the user in dir.
func (u *gitUser) git(dir string, args ...string) result {
	u.c.t.Helper()
	return runCmd(u.c.t, dir, u.env(), 5*time.Minute, "git", args...)
}

// mustGit runs git and fails the test unless it succeeds.
func (u *gitUser) mustGit(dir string, args ...string) string {
	u.c.t.Helper()
	r := u.git(dir, args...)
	if r.code != 0 {
		u.c.t.Fatalf("git %s: %s", strings.Join(args, " "), r)
	}
	return r.stdout + r.stderr
}

// failGit runs git, expects failure, and returns stderr.
func (u *gitUser) failGit(dir string, args ...string) string {
	u.c.t.Helper()
	r := u.git(dir, args...)
	if r.code == 0 {
		u.c.t.Fatalf("git %s succeeded, want a failure: %s", strings.Join(args, " "), r)
	}
	return r.stderr
}

// workTree makes a fresh non-bare repository with the given remote.
func (u *gitUser) workTree(remote string) string {
	u.c.t.Helper()
	dir, err := os.MkdirTemp(u.c.dir, "wt-")
	if err != nil {
		u.c.t.Fatal(err)
	}
	u.mustGit(dir, "init", "-q", "-b", "main")
	u.mustGit(dir, "remote", "add", "origin", remote)
	return dir
}

// commit writes a file and commits it; it returns the new commit id.
func (u *gitUser) commit(dir, file, content string) string {
	u.c.t.Helper()
	if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, file)), 0o755); err != nil {
		u.c.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, file), []byte(content), 0o644); err != nil {
		u.c.t.Fatal(err)
	}
	u.mustGit(dir, "add", file)
	u.mustGit(dir, "commit", "-q", "-m", "edit "+file)
	return strings.TrimSpace(u.mustGit(dir, "rev-parse", "HEAD"))
}

// lsRemote returns the remote's refs as sorted "oid ref" lines.
func (u *gitUser) lsRemote(remote string) string {
	u.c.t.Helper()
	out := u.mustGit(u.c.dir, "ls-remote", remote)
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if l != "" && !strings.HasPrefix(l, "gitraft:") {
			lines = append(lines, l)
		}
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// cloneAndCheck clones through n into a new dir, checks the clone with
// git fsck --strict, and returns the dir.
func (u *gitUser) cloneAndCheck(n *node, repo string, extra ...string) string {
	u.c.t.Helper()
	dir, err := os.MkdirTemp(u.c.dir, "clone-")
	if err != nil {
		u.c.t.Fatal(err)
	}
	args := append([]string{"clone", "-q"}, extra...)
	u.mustGit(u.c.dir, append(args, url(n, repo), dir)...)
	u.mustGit(dir, "fsck", "--strict", "--no-progress")
	return dir
}

// sameEverywhere checks that ls-remote through every running node shows the
// same refs, and returns them.
func (u *gitUser) sameEverywhere(repo string) string {
	u.c.t.Helper()
	var want string
	var from string
	for _, n := range u.c.nodes {
		if !n.running() {
			continue
		}
		got := u.lsRemote(url(n, repo))
		if from == "" {
			want, from = got, n.id
		} else if got != want {
			u.c.t.Fatalf("refs through %s differ from %s:\n%s\n---\n%s", n.id, from, got, want)
		}
	}
	return want
}

func skipWithoutSSH(t *testing.T) {
	t.Helper()
	for _, c := range []string{"ssh", "ssh-keygen"} {
		if _, err := lookPath(c); err != nil {
			t.Fatalf("%s is not installed; ./e2e/test.sh installs openssh-client", c)
		}
	}
}
