package e2e

import (
	"bytes"
	"crypto/sha1"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
)

const zeroOID = "0000000000000000000000000000000000000000"

// rawPush speaks receive-pack itself over the user's ssh: the commands (the
// first carries caps), a flush, then pack. It returns what the server
// printed on stdout (the advertisement and report-status) and stderr.
func (u *gitUser) rawPush(n *node, repo string, cmds []string, caps string, pack []byte) (stdout, stderr string) {
	u.c.t.Helper()
	host, port, _ := strings.Cut(n.sshAdr, ":")
	var in bytes.Buffer
	for i, c := range cmds {
		line := c
		if i == 0 {
			line += "\x00" + caps
		}
		line += "\n"
		fmt.Fprintf(&in, "%04x%s", len(line)+4, line)
	}
	in.WriteString("0000")
	in.Write(pack)
	cmd := exec.Command("ssh", "-i", u.key, "-o", "IdentitiesOnly=yes", "-o", "UserKnownHostsFile="+u.knownHosts,
		"-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-p", port, "git@"+host, "git-receive-pack '"+repo+".git'")
	cmd.Stdin = &in
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.WaitDelay = time.Minute
	done := make(chan struct{})
	go func() { cmd.Run(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		cmd.Process.Kill()
		<-done
		u.c.t.Fatalf("raw push through %s hung", n.id)
	}
	return out.String(), errb.String()
}

// emptyPack is a valid pack with no objects.
func emptyPack() []byte {
	var b bytes.Buffer
	b.WriteString("PACK")
	binary.Write(&b, binary.BigEndian, uint32(2))
	binary.Write(&b, binary.BigEndian, uint32(0))
	sum := sha1.Sum(b.Bytes())
	b.Write(sum[:])
	return b.Bytes()
}

// repoVersion is the committed version of repo, read through n.
func (c *cluster) repoVersion(n *node, repo string) uint64 {
	c.t.Helper()
	var show repov1.GetRepoResponse
	c.protoOf(n, &show, "repo", "show", repo)
	return show.GetRepo().GetVersion()
}

// Test_E2E_GitStateSaysWhatGitAccepted pushes what git refuses, with stock
// git and raw protocol, and checks that the replicated state and every copy
// are left exactly as git left them: a ref git reported rejected or ng is
// unchanged everywhere, and the repo stays healthy for the next push.
func Test_E2E_GitStateSaysWhatGitAccepted(t *testing.T) {
	skipWithoutSSH(t)
	c := startCluster(t, 3, withArgs("--git-max-refs-per-push", "4"))
	c.must(c.nodes[0], "repo", "create", "r")
	u := c.addGitUser("alice")
	c.must(c.nodes[0], "repo", "grant", "r", "alice", "write")
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]

	wt := u.workTree(url(n1, "r"))
	base := u.commit(wt, "a", "a\n")
	u.mustGit(wt, "push", "-q", "origin", "main")
	v := c.repoVersion(n1, "r")
	before := u.sameEverywhere("r")

	// Everything below must leave the state alone.
	unchanged := func(what string) {
		t.Helper()
		if got := c.repoVersion(n2, "r"); got != v {
			t.Errorf("%s: version %d, want %d (nothing committed)", what, got, v)
		}
		if got := u.sameEverywhere("r"); got != before {
			t.Errorf("%s: refs changed:\n%s\nwas\n%s", what, got, before)
		}
	}

	// 1. A ref name git refuses ("funny refname"), with the stock client.
	s := u.failGit(wt, "push", url(n2, "r"), "HEAD:refs/foo")
	if !strings.Contains(s, "funny refname") {
		t.Errorf("funny refname: %q", s)
	}
	unchanged("refs/foo")

	// 2. An atomic push with one ref git refuses: nothing at all.
	u.commit(wt, "b", "b\n")
	s = u.failGit(wt, "push", "--atomic", url(n3, "r"), "HEAD:refs/heads/ok", "HEAD:refs/bad")
	if !strings.Contains(s, "atomic push refused") {
		t.Errorf("atomic push with a funny ref: %q", s)
	}
	unchanged("atomic push with a funny ref")

	// 3. A non-atomic push with one good and one funny ref: git accepts the
	// good one, and so does the state, and nothing else.
	s = u.failGit(wt, "push", url(n3, "r"), "HEAD:refs/heads/good", "HEAD:refs/bad2")
	if !strings.Contains(s, "funny refname") || !strings.Contains(s, "[new branch]      HEAD -> good") {
		t.Errorf("mixed push: %q", s)
	}
	head := strings.TrimSpace(u.mustGit(wt, "rev-parse", "HEAD"))
	v++
	before = base + "\tHEAD\n" + base + "\trefs/heads/main\n" + head + "\trefs/heads/good"
	before = sortLines(before)
	unchanged("mixed push")

	// 4. Raw protocol: a ref at an object never sent (empty pack). git says
	// "missing necessary objects"; before, the state committed it and every
	// copy stayed behind for good.
	bogus := strings.Repeat("1", 40)
	out, errs := u.rawPush(n2, "r", []string{zeroOID + " " + bogus + " refs/heads/bogus"}, "report-status", emptyPack())
	if !strings.Contains(out, "ng refs/heads/bogus missing necessary objects") {
		t.Errorf("raw push of a missing object: stdout %q stderr %q", out, errs)
	}
	unchanged("missing object")

	// 5. Raw protocol: a commit whose tree is not sent.
	c2 := u.commit(wt, "c", "c\n")
	pack := runCmd(t, wt, u.env(), time.Minute, "sh", "-c", "echo "+c2+" | git pack-objects --stdout")
	if pack.code != 0 {
		t.Fatal(pack)
	}
	out, errs = u.rawPush(n1, "r", []string{head + " " + c2 + " refs/heads/good"}, "report-status", []byte(pack.stdout))
	if !strings.Contains(out, "ng refs/heads/good ") { // unpacker error (fsck) or missing objects
		t.Errorf("raw push of a commit without its tree: stdout %q stderr %q", out, errs)
	}
	unchanged("commit without its tree")

	// 6. A ref that is a directory of another (refs/heads/good/x).
	s = u.failGit(wt, "push", url(n1, "r"), "HEAD:refs/heads/good/x")
	if !strings.Contains(s, "rejected") {
		t.Errorf("directory/file conflict: %q", s)
	}
	unchanged("directory/file conflict")

	// 7. Objects git's fsck refuses (receive.fsckObjects): a tree with a
	// ".git" entry.
	blob := strings.TrimSpace(u.mustGit(wt, "hash-object", "-w", "a"))
	var tree bytes.Buffer
	tree.WriteString("100644 .git\x00")
	tree.Write(hexBytes(t, blob))
	tf := filepath.Join(c.dir, "evil-tree")
	os.WriteFile(tf, tree.Bytes(), 0o600)
	evilTree := strings.TrimSpace(u.mustGit(wt, "hash-object", "-w", "-t", "tree", "--literally", tf))
	evil := strings.TrimSpace(u.mustGit(wt, "commit-tree", evilTree, "-p", head, "-m", "evil"))
	s = u.failGit(wt, "push", url(n2, "r"), evil+":refs/heads/evil")
	if !strings.Contains(s, "dotgit") && !strings.Contains(s, ".git") {
		t.Errorf("fsck: %q", s)
	}
	unchanged("a tree with .git")

	// 8. More refs than git.max_refs_per_push, refused whole.
	var specs []string
	for i := range 5 {
		specs = append(specs, fmt.Sprintf("HEAD:refs/heads/many-%d", i))
	}
	s = u.failGit(wt, append([]string{"push", url(n3, "r")}, specs...)...)
	if !strings.Contains(s, "at most 4 (git.max_refs_per_push)") {
		t.Errorf("too many refs: %q", s)
	}
	unchanged("too many refs")

	// After all that the repo is healthy through every node: a push and a
	// clone work and every copy is current.
	u.mustGit(wt, "push", "-q", url(n2, "r"), "HEAD:refs/heads/main")
	for _, n := range c.nodes {
		u.cloneAndCheck(n, "r")
	}
	waitFor(t, "every replica current", 30*time.Second, func() bool { return c.run(n1, "repo", "verify", "r").code == 0 })
}

func hexBytes(t *testing.T, h string) []byte {
	t.Helper()
	b := make([]byte, len(h)/2)
	if _, err := fmt.Sscanf(h, "%x", &b); err != nil {
		t.Fatal(err)
	}
	return b
}

func sortLines(s string) string {
	lines := strings.Split(s, "\n")
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// packsOf lists a copy's pack files.
func packsOf(n *node, repo string) map[string]bool {
	out := map[string]bool{}
	m, _ := filepath.Glob(filepath.Join(n.dir, "repos", repo+".git", "objects", "pack", "*.pack"))
	for _, p := range m {
		out[p] = true
	}
	return out
}

// Test_E2E_GitRepairLostObjects loses the objects of an acknowledged push on
// a majority of disks (the thing the contract cannot survive), and checks
// that `gitraft repo repair --auto` finds the ref no majority can serve,
// resets it to the value the remaining copy has, records the repair, and
// leaves a repository every node serves again.
func Test_E2E_GitRepairLostObjects(t *testing.T) {
	skipWithoutSSH(t)
	c := startCluster(t, 3, withArgs("--git-stuck-after", "2s"))
	c.must(c.nodes[0], "repo", "create", "r")
	u := c.addGitUser("alice")
	c.must(c.nodes[0], "repo", "grant", "r", "alice", "write")
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]
	wt := u.workTree(url(n1, "r"))
	a := u.commit(wt, "a", "a\n")
	u.mustGit(wt, "push", "-q", "origin", "main")
	waitFor(t, "every replica current", 30*time.Second, func() bool { return c.run(n1, "repo", "verify", "r").code == 0 })
	n3.kill()
	before1, before2 := packsOf(n1, "r"), packsOf(n2, "r")
	b := u.commit(wt, "b", "b\n")
	u.mustGit(wt, "push", "-q", "origin", "main")
	// The disks of n1 and n2 lose the pack of the second push.
	for _, x := range []struct {
		n      *node
		before map[string]bool
	}{{n1, before1}, {n2, before2}} {
		lost := 0
		for p := range packsOf(x.n, "r") {
			if !x.before[p] {
				base := strings.TrimSuffix(p, ".pack")
				for _, ext := range []string{".pack", ".idx", ".rev", ".bitmap"} {
					os.Remove(base + ext)
				}
				lost++
			}
		}
		if lost == 0 {
			t.Fatalf("%s holds no new pack for the second push", x.n.id)
		}
	}
	n3.start()
	// n3 cannot catch up: no copy holds the second push whole. Readiness
	// and the metrics say so once that has lasted git.stuck_after.
	waitFor(t, n3.id+" /readyz naming the stuck repository", 60*time.Second, func() bool {
		code, body := n3.readyz()
		return code == 503 && strings.Contains(body, "failed to catch up") && strings.Contains(body, "(r)")
	})
	if _, m := httpGet("http://" + n3.httpAddr + "/metrics"); !strings.Contains(m, "gitraft_repos_stuck 1") {
		t.Errorf("gitraft_repos_stuck is not 1 on %s", n3.id)
	}

	// A dry run says what it would do and changes nothing.
	dry := c.must(n2, "repo", "repair", "r", "--auto", "--dry-run")
	if !strings.Contains(dry, "refs/heads/main") || !strings.Contains(dry, a) || !strings.Contains(dry, "dry run") {
		t.Fatalf("dry run: %s", dry)
	}
	if c.repoVersion(n1, "r") != 3 {
		t.Fatalf("the dry run changed the repo")
	}
	if s := c.fails(n2, "repo", "repair", "r", "--auto"); !strings.Contains(s, "--reason") {
		t.Errorf("a repair without a reason: %q", s)
	}
	out := c.must(n2, "repo", "repair", "r", "--auto", "--reason", "lost disks n1, n2")
	if !strings.Contains(out, "repaired") || !strings.Contains(out, b) {
		t.Fatalf("repair: %s", out)
	}
	n3.waitReady(60 * time.Second)
	// Every node serves the repaired repo, and the record says what was done.
	for _, n := range c.nodes {
		d := u.cloneAndCheck(n, "r")
		if got := strings.TrimSpace(u.mustGit(d, "rev-parse", "HEAD")); got != a {
			t.Fatalf("%s serves %s after the repair, want %s", n.id, got, a)
		}
	}
	show := c.must(n3, "repo", "show", "r")
	if !strings.Contains(show, "lost disks n1, n2") || !strings.Contains(show, "refs/heads/main: "+b+" -> "+a) {
		t.Errorf("repo show does not record the repair:\n%s", show)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		r := c.run(n1, "repo", "verify", "r")
		if r.code == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("copies not current after the repair: %s", r)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// And pushes work again.
	u.mustGit(wt, "push", "-q", "-f", "origin", "main")
}

// Test_E2E_GitRefWriteFailsAfterCommit: git writes a ref only after the
// pre-receive hook has committed it to the cluster. When that local write
// fails (here a directory where git wants its ref lock file, as a full disk
// or a leftover could), git reports "ng ... failed to lock" for a ref the
// cluster has applied and every node serves. The client must be told what
// was applied: ok, with stock git (side-band) and with raw protocol
// (report-status without side-band). The copy heals once the obstacle goes.
func Test_E2E_GitRefWriteFailsAfterCommit(t *testing.T) {
	c, u := gitSetup(t, "r")
	n1 := c.nodes[0]
	wt := u.workTree(url(n1, "r"))
	oid := u.commit(wt, "a", "a\n")
	u.mustGit(wt, "push", "-q", "origin", "main")
	waitFor(t, "every replica current", 30*time.Second, func() bool { return c.run(n1, "repo", "verify", "r").code == 0 })

	block := func(ref string) func() {
		var dirs []string
		for _, n := range c.nodes {
			d := filepath.Join(n.dir, "repos", "r.git", ref+".lock")
			if err := os.MkdirAll(d, 0o755); err != nil {
				t.Fatal(err)
			}
			dirs = append(dirs, d)
		}
		return func() {
			for _, d := range dirs {
				if err := os.RemoveAll(d); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	committed := func(ref string) string {
		var show repov1.GetRepoResponse
		c.protoOf(n1, &show, "repo", "show", "r")
		for _, r := range show.GetRepo().GetRefs() {
			if r.GetName() == ref {
				return r.GetOid()
			}
		}
		return ""
	}

	unblock := block("refs/heads/feature")
	out := u.mustGit(wt, "push", "origin", "main:refs/heads/feature")
	if strings.Contains(out, "failed") || strings.Contains(out, "[remote") {
		t.Fatalf("push of a committed ref reported a failure:\n%s", out)
	}
	if got := committed("refs/heads/feature"); got != oid {
		t.Fatalf("state has feature=%q, want %s", got, oid)
	}
	unblock()
	waitFor(t, "every copy to heal", 60*time.Second, func() bool { return c.run(n1, "repo", "verify", "r").code == 0 })
	if refs := u.sameEverywhere("r"); !strings.Contains(refs, oid+"\trefs/heads/feature") {
		t.Fatalf("feature not served everywhere:\n%s", refs)
	}

	unblock = block("refs/heads/raw")
	stdout, stderr := u.rawPush(n1, "r", []string{zeroOID + " " + oid + " refs/heads/raw"}, "report-status", emptyPack())
	if !strings.Contains(stdout, "ok refs/heads/raw") || strings.Contains(stdout, "ng refs/heads/raw") {
		t.Fatalf("raw push report: %q (stderr %q)", stdout, stderr)
	}
	if got := committed("refs/heads/raw"); got != oid {
		t.Fatalf("state has raw=%q, want %s", got, oid)
	}
	unblock()
	waitFor(t, "every copy to heal", 60*time.Second, func() bool { return c.run(n1, "repo", "verify", "r").code == 0 })
	u.sameEverywhere("r")
}
