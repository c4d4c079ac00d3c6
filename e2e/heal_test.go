package e2e

import (
	"bufio"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	clusterv1 "github.com/gitraft/gitraft/proto/gitraft/cluster/v1"
	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
)

// metricValue reads one unlabelled metric from a node's /metrics (-1 when
// the node does not answer or has no such metric).
func metricValue(n *node, name string) float64 {
	code, body := httpGet("http://" + n.httpAddr + "/metrics")
	if code != 200 {
		return -1
	}
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil {
				return f
			}
		}
	}
	return -1
}

// removePack deletes a pack and the files that go with it, as a disk that
// lost them would.
func removePack(t *testing.T, pack string) {
	t.Helper()
	base := strings.TrimSuffix(pack, ".pack")
	for _, ext := range []string{".pack", ".idx", ".rev", ".bitmap"} {
		if err := os.Remove(base + ext); err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
	}
}

// refThrough is what ls-remote through n says ref is ("" when the read
// failed: a refused or failed read is not a wrong one).
func refThrough(u *gitUser, n *node, repo, ref string) string {
	r := u.git(u.c.dir, "ls-remote", url(n, repo), ref)
	if r.code != 0 {
		return ""
	}
	oid, _, _ := strings.Cut(strings.TrimSpace(r.stdout), "\t")
	return oid
}

// Test_E2E_ScrubHealsDamagedCopy damages one node's copy three ways and
// checks each is found and healed from a peer, and that reads through that
// node never show a ref other than the committed one:
//   - a ref edited by hand on n3 (a read finds it before serving it);
//   - the pack under the tip deleted on n3 (the periodic scrub finds it:
//     the tip is still there, only git fsck --connectivity-only sees it);
//   - a byte flipped in a pack on n2, which scrubs only when asked
//     (gitraft repo scrub finds it by the pack's checksum).
func Test_E2E_ScrubHealsDamagedCopy(t *testing.T) {
	skipWithoutSSH(t)
	c := startCluster(t, 3, func(n *node) {
		interval := "2s"
		if n.id == "n2" {
			interval = "-1s"
		}
		n.args = append(n.args, "--git-scrub-interval", interval, "--git-scrub-rate", "-1")
	})
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]
	c.must(n1, "repo", "create", "r")
	u := c.addGitUser("alice")
	c.must(n1, "repo", "grant", "r", "alice", "write")
	wt := u.workTree(url(n1, "r"))
	a := u.commit(wt, "a", "a\n")
	u.mustGit(wt, "push", "-q", "origin", "main")
	waitFor(t, "every copy current", 30*time.Second, func() bool { return c.run(n1, "repo", "verify", "r").code == 0 })
	firstOnN3, firstOnN2 := packsOf(n3, "r"), packsOf(n2, "r")
	b := u.commit(wt, "b", strings.Repeat("b\n", 5000))
	u.mustGit(wt, "push", "-q", "origin", "main")
	waitFor(t, "every copy current", 30*time.Second, func() bool { return c.run(n1, "repo", "verify", "r").code == 0 })

	// Reads through n3 run throughout and must never show another main.
	var wrong atomic.Value
	var reads atomic.Int32
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if got := refThrough(u, n3, "r", "refs/heads/main"); got != "" {
				reads.Add(1)
				if got != b {
					wrong.Store(got)
				}
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	defer func() {
		close(stop)
		wg.Wait()
	}()

	// 1. A ref edited by hand.
	if err := os.WriteFile(filepath.Join(repoDir(n3, "r"), "refs", "heads", "main"), []byte(a+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		if got := refThrough(u, n3, "r", "refs/heads/main"); got != b {
			t.Fatalf("right after the edit, n3 serves main at %q, want %s", got, b)
		}
	}
	waitFor(t, "every copy identical again", 30*time.Second, func() bool { return c.run(n1, "repo", "verify", "r").code == 0 })

	// 2. The pack under the tip lost: only a walk of the whole history
	// (the scrub's fsck) sees it.
	healed := metricValue(n3, "gitraft_heal_total")
	lost := 0
	for p := range firstOnN3 {
		removePack(t, p)
		lost++
	}
	if lost == 0 {
		t.Fatal("n3 had no pack for the first push")
	}
	waitFor(t, "n3's scrub to find and heal the lost pack", 90*time.Second, func() bool { return metricValue(n3, "gitraft_heal_total") > healed })
	if metricValue(n3, "gitraft_scrub_damaged_total") < 2 || metricValue(n3, "gitraft_scrub_last_completed_timestamp_seconds") <= 0 {
		t.Errorf("n3's scrub metrics do not show its work")
	}
	if logOf(n3, "healed a damaged copy from a current peer") == 0 {
		t.Errorf("n3's log does not say it healed a copy")
	}
	waitFor(t, "every copy identical", 30*time.Second, func() bool { return c.run(n1, "repo", "verify", "r").code == 0 })
	if got := strings.TrimSpace(u.mustGit(u.cloneAndCheck(n3, "r"), "rev-parse", "HEAD")); got != b {
		t.Fatalf("a clone through n3 has %s, want %s", got, b)
	}

	// 3. A byte flipped in n2's pack of the second push, found on demand.
	var flipped string
	for p := range packsOf(n2, "r") {
		if !firstOnN2[p] {
			flipped = p
		}
	}
	if flipped == "" {
		t.Fatal("n2 has no pack of the second push")
	}
	os.Chmod(flipped, 0o644)
	data, err := os.ReadFile(flipped)
	if err != nil {
		t.Fatal(err)
	}
	data[len(data)/2] ^= 0x20
	if err := os.WriteFile(flipped, data, 0o444); err != nil {
		t.Fatal(err)
	}
	out := c.must(n1, "repo", "scrub", "r", "--node", "n2")
	if !strings.Contains(out, "damaged, healed") || !strings.Contains(out, "checksum") || !strings.Contains(out, "n2") {
		t.Fatalf("repo scrub --node n2:\n%s", out)
	}
	if _, err := os.Stat(filepath.Join(repoDir(n2, "r"), "gitraft-damaged")); err != nil {
		t.Errorf("the damaged pack was not set aside: %v", err)
	}
	var sr repov1.ScrubRepoResponse
	c.protoOf(n2, &sr, "repo", "scrub", "r")
	if len(sr.GetCopies()) != 3 {
		t.Fatalf("repo scrub checked %d copies, want 3", len(sr.GetCopies()))
	}
	for _, cc := range sr.GetCopies() {
		if len(cc.GetFindings()) > 0 || cc.GetError() != "" || cc.GetState() != repov1.ReplicaState_REPLICA_STATE_CURRENT || cc.GetBytesChecked() == 0 {
			t.Errorf("after healing, %s: %+v", cc.GetNodeId(), cc)
		}
	}
	if got := strings.TrimSpace(u.mustGit(u.cloneAndCheck(n2, "r"), "rev-parse", "HEAD")); got != b {
		t.Fatalf("a clone through n2 has %s, want %s", got, b)
	}
	c.must(n1, "repo", "verify", "r")
	if v := metricValue(n2, "gitraft_heal_total"); v != 1 {
		t.Errorf("n2 gitraft_heal_total = %v, want 1", v)
	}
	if s := c.fails(n1, "repo", "scrub", "r", "--node", "n9"); !strings.Contains(s, "no member") {
		t.Errorf("scrub on an unknown node: %q", s)
	}
	if w := wrong.Load(); w != nil {
		t.Fatalf("a read through n3 showed main at %v, want %s", w, b)
	}
	if reads.Load() == 0 {
		t.Fatal("no read through n3 succeeded")
	}
	// And the repository takes pushes as before.
	u.commit(wt, "c", "c\n")
	u.mustGit(wt, "push", "-q", "origin", "main")
}

// logOf counts the lines of a node's log that contain s.
func logOf(n *node, s string) int {
	b, _ := os.ReadFile(n.dir + ".log")
	return strings.Count(string(b), s)
}

// Test_E2E_DataLossTwoDisks loses a repository's objects on two of three
// nodes, and another's on all three: gitraft repo dataloss reports the
// first as held by 1 of 3 voters, the second as lost, and not the healthy
// one; gitraft repo repair heals the first from the copy left and resets
// the second, saying what is gone.
func Test_E2E_DataLossTwoDisks(t *testing.T) {
	skipWithoutSSH(t)
	c := startCluster(t, 3)
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]
	u := c.addGitUser("alice")
	tips := map[string]string{}
	for _, r := range []string{"ok", "weak", "gone"} {
		c.must(n1, "repo", "create", r)
		c.must(n1, "repo", "grant", r, "alice", "write")
		wt := u.workTree(url(n1, r))
		tips[r] = u.commit(wt, "f", r+"\n")
		u.mustGit(wt, "push", "-q", "origin", "main")
		waitFor(t, r+" on every node", 30*time.Second, func() bool { return c.run(n1, "repo", "verify", r).code == 0 })
	}
	if r := c.run(n2, "repo", "dataloss"); r.code != 0 || !strings.Contains(r.stdout, "no data loss") {
		t.Fatalf("dataloss on a healthy cluster: %s", r)
	}
	// Two disks lose weak; every disk loses gone.
	for n, repos := range map[*node][]string{n1: {"weak", "gone"}, n2: {"weak", "gone"}, n3: {"gone"}} {
		for _, r := range repos {
			for p := range packsOf(n, r) {
				removePack(t, p)
			}
		}
	}
	r := c.run(n2, "repo", "dataloss")
	t.Logf("gitraft repo dataloss:\n%s", r.stdout)
	if r.code != 2 {
		t.Fatalf("dataloss exit code %d, want 2:\n%s", r.code, r)
	}
	for _, want := range []string{"weak", "below majority", "1 of 3 voters", "n3: holds", "n1: lacks refs/heads/main", "gone", "lost", "no node holds refs/heads/main"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("dataloss does not say %q:\n%s", want, r.stdout)
		}
	}
	for _, line := range strings.Split(r.stdout, "\n") {
		if strings.HasPrefix(line, "ok ") {
			t.Errorf("dataloss lists the healthy repo:\n%s", r.stdout)
		}
	}
	var dl repov1.DataLossResponse
	js := c.run(n3, "repo", "dataloss", "--all", "--json")
	if js.code != 2 {
		t.Fatalf("dataloss --all --json: %s", js)
	}
	if err := protojson.Unmarshal([]byte(js.stdout), &dl); err != nil {
		t.Fatal(err)
	}
	status := map[string]repov1.DataLossStatus{}
	for _, x := range dl.GetRepos() {
		status[x.GetName()] = x.GetStatus()
		if x.GetName() == "weak" && (x.GetHeldBy() != 1 || x.GetVoters() != 3) {
			t.Errorf("weak held by %d of %d, want 1 of 3", x.GetHeldBy(), x.GetVoters())
		}
	}
	if status["ok"] != repov1.DataLossStatus_DATA_LOSS_STATUS_HEALTHY || status["weak"] != repov1.DataLossStatus_DATA_LOSS_STATUS_BELOW_MAJORITY || status["gone"] != repov1.DataLossStatus_DATA_LOSS_STATUS_LOST || dl.GetChecked() != 3 {
		t.Fatalf("dataloss --all: %v (checked %d)", status, dl.GetChecked())
	}

	// repair: weak's ref stays (n3 holds it) and the copies heal from n3.
	out := c.must(n1, "repo", "repair", "weak", "--auto", "--reason", "lost disks n1, n2")
	t.Logf("gitraft repo repair weak:\n%s", out)
	if !strings.Contains(out, "no ref to repair") || strings.Count(out, "healed") < 2 {
		t.Fatalf("repair weak:\n%s", out)
	}
	for _, n := range c.nodes {
		if got := strings.TrimSpace(u.mustGit(u.cloneAndCheck(n, "weak"), "rev-parse", "HEAD")); got != tips["weak"] {
			t.Fatalf("%s serves weak at %s, want %s", n.id, got, tips["weak"])
		}
	}
	// gone: no node holds main; it is deleted, and the output says so.
	out = c.must(n1, "repo", "repair", "gone", "--auto", "--reason", "lost every disk")
	t.Logf("gitraft repo repair gone:\n%s", out)
	if !strings.Contains(out, "refs/heads/main") || !strings.Contains(out, "(deleted)") || !strings.Contains(out, "objects are lost") {
		t.Fatalf("repair gone:\n%s", out)
	}
	if r := c.run(n2, "repo", "dataloss"); r.code != 0 {
		t.Fatalf("dataloss after the repairs: %s", r)
	}
	if r := c.run(n2, "repo", "dataloss", "nosuch"); r.code != 1 || !strings.Contains(r.stderr, "not found") {
		t.Errorf("dataloss of an unknown repo: %s", r)
	}
}

// Test_E2E_NodeRefilledFromEmptyDataDir loses n3's data dir. Started again
// with an empty dir under the same ID, it is refused while it is still a
// voter (it takes no part in Raft meanwhile); after `gitraft cluster remove
// n3` it joins again as a non-voter, refills every repository (cluster
// status and /readyz show the progress), turns ready only when full, is
// promoted, and serves pushes and clones.
func Test_E2E_NodeRefilledFromEmptyDataDir(t *testing.T) {
	skipWithoutSSH(t)
	c := startCluster(t, 3)
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]
	u := c.addGitUser("alice")
	const repos, pushed = 40, 20
	tips := map[string]string{}
	for i := range repos {
		name := "r" + strconv.Itoa(i)
		c.must(n1, "repo", "create", name)
		if i < pushed {
			c.must(n1, "repo", "grant", name, "alice", "write")
			wt := u.workTree(url(n1, name))
			tips[name] = u.commit(wt, "f", strings.Repeat(name+"\n", 2000))
			u.mustGit(wt, "push", "-q", "origin", "main")
		}
	}
	n3.kill()
	if err := os.RemoveAll(n3.dir); err != nil {
		t.Fatal(err)
	}
	// Started again, empty, under the same ID: still a voter, so refused.
	n3.start()
	waitFor(t, "n3 refused while it is a voter", 60*time.Second, func() bool {
		code, body := n3.readyz()
		return code == 503 && strings.Contains(body, "gitraft cluster remove n3")
	})
	if logOf(n3, "must not vote as if it had it") == 0 {
		t.Error("n3's log does not say why it may not join")
	}
	var st clusterv1.GetStatusResponse
	c.protoOf(n1, &st, "cluster", "status")
	for _, m := range st.GetMembers() {
		// Still the voter it was, and it took no log: it takes no part in Raft.
		if m.GetId() == "n3" && (m.GetAppliedIndex() != 0 || m.GetSuffrage() != clusterv1.Suffrage_SUFFRAGE_VOTER) {
			t.Fatalf("n3 while refused: applied index %d, suffrage %v", m.GetAppliedIndex(), m.GetSuffrage())
		}
	}

	// The procedure: remove it; it joins again by itself. Meanwhile
	// cluster status and n3's /readyz show how far it got.
	fillRe := regexp.MustCompile(`filling:? (\d+)/(\d+) repos`)
	var mu sync.Mutex
	seen := map[string]bool{}
	partial := false
	note := func(text string) {
		for _, m := range fillRe.FindAllStringSubmatch(text, -1) {
			mu.Lock()
			seen[m[0]] = true
			if m[1] != m[2] {
				partial = true
			}
			mu.Unlock()
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, poll := range []func(){
		func() {
			if r := c.run(n1, "cluster", "status"); r.code == 0 {
				note(r.stdout)
			}
		},
		func() {
			if code, body := n3.readyz(); code == 503 {
				note(body)
			}
		},
	} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				poll()
				time.Sleep(20 * time.Millisecond)
			}
		}()
	}
	c.must(n2, "cluster", "remove", "n3")
	n3.waitReady(3 * time.Minute)
	// Ready means it holds every repository: nothing was pushed since.
	for name, tip := range tips {
		var show repov1.GetRepoResponse
		c.protoOf(n1, &show, "repo", "show", name)
		for _, r := range show.GetRepo().GetReplicas() {
			if r.GetNodeId() == "n3" && r.GetState() != repov1.ReplicaState_REPLICA_STATE_CURRENT {
				t.Errorf("n3 is ready but its copy of %s is %v", name, r.GetState())
			}
		}
		if got := strings.TrimSpace(u.mustGit(u.cloneAndCheck(n3, name), "rev-parse", "HEAD")); got != tip {
			t.Fatalf("a clone of %s through n3 has %s, want %s", name, got, tip)
		}
	}
	c.waitVoters(3)
	close(stop)
	wg.Wait()
	t.Logf("fill progress seen: %v", slices.Sorted(maps.Keys(seen)))
	if !partial {
		t.Error("neither cluster status nor n3's /readyz ever showed the fill in progress")
	}
	if got := len(c.repoNames(n3)); got != repos {
		t.Fatalf("n3 lists %d repositories, want %d", got, repos)
	}
	// Pushes and clones through it.
	wt := u.workTree(url(n3, "r0"))
	u.mustGit(wt, "pull", "-q", "origin", "main")
	next := u.commit(wt, "g", "after the refill\n")
	u.mustGit(wt, "push", "-q", "origin", "main")
	for _, n := range c.nodes {
		if got := strings.TrimSpace(u.mustGit(u.cloneAndCheck(n, "r0"), "rev-parse", "HEAD")); got != next {
			t.Fatalf("a clone through %s has %s, want %s", n.id, got, next)
		}
	}
}
