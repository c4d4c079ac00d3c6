package e2e

import (
	"bytes"
	"crypto/rand"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func withArgs(args ...string) clusterOpt {
	return func(n *node) { n.args = append(n.args, args...) }
}

func Test_E2E_GitLimits(t *testing.T) {
	skipWithoutSSH(t)
	c := startCluster(t, 3, withArgs("--git-max-pack-bytes", "2000000", "--git-max-sessions", "1", "--git-idle-timeout", "2s"))
	n1 := c.nodes[0]
	c.must(n1, "repo", "create", "r")
	u := c.addGitUser("alice")
	c.must(n1, "repo", "grant", "r", "alice", "write")
	wt := u.workTree(url(n1, "r"))
	u.commit(wt, "a", "a\n")
	u.mustGit(wt, "push", "-q", "origin", "main")
	before := u.sameEverywhere("r")

	// An oversized pack is refused, and nothing changes.
	data := make([]byte, 3<<20)
	rand.Read(data)
	os.WriteFile(filepath.Join(wt, "big.bin"), data, 0o644)
	u.mustGit(wt, "add", "big.bin")
	u.mustGit(wt, "commit", "-q", "-m", "too big")
	if s := u.failGit(wt, "push", "origin", "main"); !strings.Contains(s, "maximum allowed size") {
		t.Errorf("oversized push: %q", s)
	}
	if got := u.sameEverywhere("r"); got != before {
		t.Fatalf("an oversized push changed refs")
	}

	// One session per node: a second one is turned away with a reason, and
	// the idle one ends after the idle limit, saying why.
	host, port, _ := strings.Cut(n1.sshAdr, ":")
	held := exec.Command("ssh", "-i", u.key, "-o", "IdentitiesOnly=yes", "-o", "UserKnownHostsFile="+u.knownHosts, "-o", "BatchMode=yes", "-p", port, "git@"+host, "git-upload-pack", "'r'")
	stdin, _ := held.StdinPipe()
	defer stdin.Close()
	var heldErr bytes.Buffer
	held.Stderr = &heldErr
	stdout, _ := held.StdoutPipe()
	if err := held.Start(); err != nil {
		t.Fatal(err)
	}
	// Wait until the held session is being served (it has advertised refs).
	first := make([]byte, 4)
	if _, err := io.ReadFull(stdout, first); err != nil {
		t.Fatalf("held session: %v (%s)", err, heldErr.String())
	}
	go io.Copy(io.Discard, stdout)
	if s := u.failGit(c.dir, "ls-remote", url(n1, "r")); !strings.Contains(s, "maximum of 1 sessions") {
		t.Errorf("second session: %q", s)
	}
	done := make(chan error, 1)
	go func() { done <- held.Wait() }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		held.Process.Kill()
		t.Fatal("an idle session was not ended")
	}
	if !strings.Contains(heldErr.String(), "no data for 2s") {
		t.Errorf("idle session ended without saying why: %q", heldErr.String())
	}
	// The node serves again once the slot is free.
	u.lsRemote(url(n1, "r"))
}

func Test_E2E_GitDiskFullOnOneNode(t *testing.T) {
	skipWithoutSSH(t)
	if os.Getuid() != 0 {
		t.Fatal("this test mounts a small tmpfs and needs root (CI runs as root)")
	}
	small := func(n *node) {
		if n.id != "n3" {
			return
		}
		os.MkdirAll(n.dir, 0o700)
		if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", n.dir).CombinedOutput(); err != nil {
			t.Fatalf("mount tmpfs: %v %s", err, out)
		}
		t.Cleanup(func() { exec.Command("umount", "-l", n.dir).Run() })
	}
	c := startCluster(t, 3, small)
	n1, n3 := c.nodes[0], c.nodes[2]
	c.must(n1, "repo", "create", "r")
	u := c.addGitUser("alice")
	c.must(n1, "repo", "grant", "r", "alice", "write")
	wt := u.workTree(url(n1, "r"))
	u.commit(wt, "a", "a\n")
	u.mustGit(wt, "push", "-q", "origin", "main")
	// 30 MB does not fit on n3; the push still lands on the other two.
	data := make([]byte, 30<<20)
	rand.Read(data)
	os.WriteFile(filepath.Join(wt, "big.bin"), data, 0o644)
	u.mustGit(wt, "add", "big.bin")
	u.mustGit(wt, "commit", "-q", "-m", "big")
	big := strings.TrimSpace(u.mustGit(wt, "rev-parse", "HEAD"))
	out := u.mustGit(wt, "push", "origin", "main")
	if !strings.Contains(out, "replicated to 2/3") {
		t.Errorf("push with one full node: %s", out)
	}
	// A push that reaches the full node is handed to a peer, saying why.
	wt3 := u.workTree(url(n3, "r"))
	u.mustGit(wt3, "fetch", "-q", "origin")
	u.mustGit(wt3, "reset", "-q", "--hard", "origin/main")
	next := u.commit(wt3, "small.txt", "through the full node\n")
	out = u.mustGit(wt3, "push", "origin", "main")
	t.Logf("push through the full node: %s", strings.TrimSpace(out))
	if !strings.Contains(out, "free on its data disk") || !strings.Contains(out, "handing the push to") {
		t.Errorf("the push through the full node does not say what happened: %q", out)
	}
	big = next
	// The full node keeps serving everyone: reads it cannot hold are
	// proxied to a current peer.
	d := u.cloneAndCheck(n3, "r")
	if got := strings.TrimSpace(u.mustGit(d, "rev-parse", "HEAD")); got != big {
		t.Fatalf("clone through the full node: HEAD %s, want %s", got, big)
	}
}

func Test_E2E_GitKeysCommand(t *testing.T) {
	skipWithoutSSH(t)
	dir := t.TempDir()
	forgeKey := filepath.Join(dir, "forge-key")
	if r := runCmd(t, dir, nil, 30*time.Second, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", forgeKey); r.code != 0 {
		t.Fatal(r)
	}
	fp := strings.Fields(runCmd(t, dir, nil, 30*time.Second, "ssh-keygen", "-lf", forgeKey+".pub").stdout)[1]
	// The forge answers for keys gitraft does not know, like OpenSSH's
	// AuthorizedKeysCommand: type, key and fingerprint in, user name out.
	script := filepath.Join(dir, "whose-key")
	os.WriteFile(script, []byte("#!/bin/sh\n[ \"$3\" = '"+fp+"' ] && echo dana\nexit 0\n"), 0o755)
	c := startCluster(t, 3, withArgs("--git-keys-command", script))
	c.must(c.nodes[0], "repo", "create", "r")
	c.must(c.nodes[0], "user", "add", "dana")
	c.must(c.nodes[0], "repo", "grant", "r", "dana", "write")
	kh := filepath.Join(dir, "known_hosts")
	os.WriteFile(kh, []byte(c.knownHostsOf(c.nodes[0])), 0o600)
	dana := &gitUser{c: c, name: "dana", key: forgeKey, knownHosts: kh}
	wt := dana.workTree(url(c.nodes[1], "r"))
	dana.commit(wt, "a", "by dana\n")
	dana.mustGit(wt, "push", "-q", "origin", "main")
	// A key neither gitraft nor the forge knows is refused.
	other := &gitUser{c: c, name: "eve", key: filepath.Join(dir, "eve"), knownHosts: kh}
	runCmd(t, dir, nil, 30*time.Second, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", other.key)
	if s := other.failGit(dir, "ls-remote", url(c.nodes[1], "r")); !strings.Contains(s, "Permission denied") {
		t.Errorf("unknown key: %q", s)
	}
}
