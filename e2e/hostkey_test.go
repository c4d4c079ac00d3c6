package e2e

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/pem"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"
)

// privateKeyMarkers are byte strings any copy of a private key would
// contain: its PEM's base64 lines, the decoded OpenSSH blob and the raw
// ed25519 seed.
func privateKeyMarkers(t *testing.T, file string) [][]byte {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	raw, err := gossh.ParseRawPrivateKey(b)
	if err != nil {
		t.Fatal(err)
	}
	out := [][]byte{blk.Bytes, raw.(*ed25519.PrivateKey).Seed()}
	for _, l := range bytes.Split(b, []byte("\n")) {
		if len(l) >= 40 && !bytes.HasPrefix(l, []byte("-----")) {
			out = append(out, l)
		}
	}
	return out
}

// publicKeyField is the base64 field of a .pub file.
func publicKeyField(t *testing.T, pubFile string) string {
	t.Helper()
	b, err := os.ReadFile(pubFile)
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		t.Fatalf("%s: %q", pubFile, b)
	}
	return f[1]
}

// A node serves the host key from its file, and the private key is nowhere
// in its data dir: not in raft.db, not in a snapshot. Only the public key is.
func Test_E2E_GitHostKeyNotInRaft(t *testing.T) {
	skipWithoutSSH(t)
	c := startCluster(t, 1, withArgs("--raft-snapshot-threshold", "1", "--raft-snapshot-interval", "200ms"))
	n1 := c.nodes[0]
	c.must(n1, "repo", "create", "r")
	alice := c.addGitUser("alice")
	c.must(n1, "repo", "grant", "r", "alice", "write")
	kh, _ := os.ReadFile(alice.knownHosts)
	pub := publicKeyField(t, c.hostKey()+".pub")
	if lines := strings.Split(strings.TrimSpace(string(kh)), "\n"); len(lines) != 1 || !strings.HasSuffix(lines[0], pub) {
		t.Fatalf("known-hosts = %q, want one line with the key file's public key", kh)
	}
	wt := alice.workTree(url(n1, "r"))
	alice.commit(wt, "f", "x\n")
	alice.mustGit(wt, "push", "origin", "main")

	// A snapshot taken after the node registered its keys and the push.
	var snaps []string
	waitFor(t, "a snapshot of the whole state", 30*time.Second, func() bool {
		snaps, _ = filepath.Glob(filepath.Join(n1.dir, "*", "snapshots", "*", "state.bin"))
		for _, s := range snaps {
			if b, _ := os.ReadFile(s); bytes.Contains(b, []byte(pub)) && bytes.Contains(b, []byte("refs/heads/main")) {
				return true
			}
		}
		return false
	})
	n1.stop() // raft.db and the snapshot as they rest on disk
	markers := privateKeyMarkers(t, c.hostKey())
	sawPublic := map[string]bool{}
	filepath.WalkDir(n1.dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range markers {
			if bytes.Contains(b, m) {
				t.Errorf("%s holds the private SSH host key", path)
				break
			}
		}
		if bytes.Contains(b, []byte(pub)) {
			sawPublic[filepath.Base(path)] = true
		}
		return nil
	})
	// The search can fail: the public key is there, in the log and the snapshot.
	if !sawPublic["raft.db"] || !sawPublic["state.bin"] {
		t.Fatalf("the public host key was found only in %v; want raft.db and state.bin (%v)", sawPublic, snaps)
	}
}

// Rotating the host key: the new key is added after the old one (nodes
// still serve the old one; known-hosts lists both), then put first (nodes
// serve it). A node whose keys differ from the others' shows in status.
func Test_E2E_GitHostKeyRotation(t *testing.T) {
	skipWithoutSSH(t)
	c := startCluster(t, 3)
	oldKey, newKey := c.hostKey(), filepath.Join(c.dir, "host-key-2")
	c.must(nil, "ca", "host-key", "--out", newKey)
	c.must(c.nodes[0], "repo", "create", "r")
	alice := c.addGitUser("alice")
	c.must(c.nodes[0], "repo", "grant", "r", "alice", "read")
	oldPub, newPub := publicKeyField(t, oldKey+".pub"), publicKeyField(t, newKey+".pub")

	// as is alice with a known_hosts that has only the lines with key pub.
	as := func(pub string) *gitUser {
		u := *alice
		b, _ := os.ReadFile(alice.knownHosts)
		var keep []string
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasSuffix(l, " "+pub) {
				keep = append(keep, l)
			}
		}
		// (A name from the key's base64 could hold a "/".)
		sum := sha256.Sum256([]byte(pub))
		u.knownHosts = filepath.Join(c.dir, fmt.Sprintf("known_hosts-%x", sum[:4]))
		if err := os.WriteFile(u.knownHosts, []byte(strings.Join(keep, "\n")+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		return &u
	}
	connects := func(u *gitUser, want bool) {
		t.Helper()
		for _, n := range c.nodes {
			r := u.git(c.dir, "ls-remote", url(n, "r"))
			if got := r.code == 0; got != want {
				t.Fatalf("ls-remote through %s with %s: connected %v, want %v\n%s", n.id, filepath.Base(u.knownHosts), got, want, r)
			}
			if !want && !strings.Contains(r.stderr, "Host key verification failed") {
				t.Fatalf("through %s: refused for another reason:\n%s", n.id, r)
			}
		}
	}
	restart := func(n *node, files ...string) {
		t.Helper()
		n.stop()
		for i, a := range n.args {
			if a == "--git-host-key-files" {
				n.args[i+1] = strings.Join(files, ",")
			}
		}
		n.start()
		n.waitReady(60 * time.Second)
	}
	knownHosts := func() string { return c.must(c.nodes[0], "cluster", "known-hosts") }
	onlyOld := as(oldPub)

	// 1. n1 gets the new key after the old one: it differs from the others,
	// and cluster status says so.
	restart(c.nodes[0], oldKey, newKey)
	waitFor(t, "status to name the node with other host keys", 30*time.Second, func() bool {
		out := c.must(c.nodes[1], "cluster", "status")
		return strings.Contains(out, "WARNING: members serve different SSH host keys (n1: ")
	})
	for _, n := range c.nodes[1:] {
		restart(n, oldKey, newKey)
	}
	waitFor(t, "known-hosts to list both keys and status to stop warning", 30*time.Second, func() bool {
		kh := knownHosts()
		return strings.Count(kh, "\n") == 2 && strings.Contains(kh, oldPub) && strings.Contains(kh, newPub) &&
			!strings.Contains(c.must(c.nodes[2], "cluster", "status"), "WARNING")
	})
	if err := os.WriteFile(alice.knownHosts, []byte(knownHosts()), 0o600); err != nil {
		t.Fatal(err)
	}
	onlyNew := as(newPub)
	connects(onlyOld, true) // the nodes still serve the old key
	connects(alice, true)
	connects(onlyNew, false)

	// 2. The new key first: the nodes serve it. Clients that learned both
	// lines in step 1 do not notice.
	for _, n := range c.nodes {
		restart(n, newKey, oldKey)
	}
	connects(onlyNew, true)
	connects(alice, true)
	connects(onlyOld, false)
}
