package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
)

// withDefaultRaftTimeouts drops the short Raft timeouts the e2e tests use,
// so a node runs with the defaults an operator gets.
func withDefaultRaftTimeouts() clusterOpt {
	return func(n *node) {
		var args []string
		for i := 0; i < len(n.args); i++ {
			if strings.HasPrefix(n.args[i], "--raft-") && strings.HasSuffix(n.args[i], "-timeout") {
				i++ // and its value
				continue
			}
			args = append(args, n.args[i])
		}
		n.args = args
	}
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// onDisk counts the repositories under prefix that a node has built on
// disk (their version marker written).
func onDisk(n *node, prefix string) int {
	m, _ := filepath.Glob(filepath.Join(n.dir, "repos", prefix, "*.git", "gitraft-replica.json"))
	return len(m)
}

// leaderChanges sums gitraft_raft_leader_changes_total over the nodes.
func (c *cluster) leaderChanges() int {
	total := 0
	for _, n := range c.nodes {
		_, m := httpGet("http://" + n.httpAddr + "/metrics")
		for _, line := range strings.Split(m, "\n") {
			if v, ok := strings.CutPrefix(line, "gitraft_raft_leader_changes_total "); ok {
				f, _ := strconv.ParseFloat(strings.TrimSpace(v), 64)
				total += int(f)
			}
		}
	}
	return total
}

func rssMB(n *node) float64 {
	if n.cmd == nil || n.cmd.Process == nil {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", n.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return kb / 1024
		}
	}
	return 0
}

// allCurrent reports whether node n holds every repository at its committed
// version (its own GetReplicas report).
func (c *cluster) allCurrent(n *node) (current, total int) {
	conn := c.grpcConn(n, c.nodes[0].id) // NodeService takes node certificates
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := replicav1.NewReplicaServiceClient(conn).GetReplicas(ctx, &replicav1.GetReplicasRequest{})
	if err != nil {
		return 0, -1
	}
	for _, r := range resp.GetReplicas() {
		if r.GetState() == replicav1.ReplicaState_REPLICA_STATE_CURRENT {
			current++
		}
	}
	return current, len(resp.GetReplicas())
}

// BenchmarkScale fills a three-process cluster with default settings to
// GITRAFT_SCALE_REPOS repositories (10,000) and GITRAFT_SCALE_BIG_REPOS
// (100) of GITRAFT_SCALE_REFS branches (10,000), a million refs, and prints
// what the scale issue asks: creates per second committed and on disk, the
// time until every node holds every repo, a big push and ls-remote against
// plain git over OpenSSH in the same run, restarts and memory, and a fourth
// node's time to hold everything. Smaller figures through the variables
// make a quick run.
func BenchmarkScale(b *testing.B) {
	repos := envInt("GITRAFT_SCALE_REPOS", 10000)
	bigRepos := envInt("GITRAFT_SCALE_BIG_REPOS", 100)
	refs := envInt("GITRAFT_SCALE_REFS", 10000)
	c := startCluster(b, 3, withDefaultRaftTimeouts())
	u := c.addGitUser("bench")
	lead := c.leader()
	plain := startPlainSSHD(b, u.key+".pub")
	plainUser := &gitUser{c: c, name: "bench", key: u.key, knownHosts: filepath.Join(plain.dir, "known_hosts")}
	pk, _ := os.ReadFile(filepath.Join(plain.dir, "ssh_host_ed25519_key.pub"))
	os.WriteFile(plainUser.knownHosts, []byte("[127.0.0.1]:"+plain.port+" "+string(pk)), 0o600)
	add := func(name, format string, args ...any) {
		fmt.Printf("  %-58s %s\n", name, fmt.Sprintf(format, args...))
	}
	fmt.Printf("\nscale: %d repositories, %d of them with %d branches, 3 nodes, default settings\n", repos+bigRepos, bigRepos, refs)

	// 1. Creates through 16 clients, each on a random node.
	var conns []repov1.RepoServiceClient
	for _, n := range c.nodes {
		conns = append(conns, repov1.NewRepoServiceClient(c.grpcConn(n, "admin")))
	}
	var next atomic.Int64
	var failed atomic.Int64
	start := time.Now()
	var wg sync.WaitGroup
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= int64(repos) {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				_, err := conns[rand.IntN(len(conns))].CreateRepo(ctx, &repov1.CreateRepoRequest{Name: fmt.Sprintf("scale/r%05d", i)})
				cancel()
				if err != nil {
					failed.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	committed := time.Since(start)
	if failed.Load() > 0 {
		b.Fatalf("%d creates failed", failed.Load())
	}
	add("creates committed (16 clients)", "%.0f/s (%d in %s)", float64(repos)/committed.Seconds(), repos, committed.Round(time.Millisecond))
	held := make([]time.Duration, len(c.nodes))
	waitFor(b, "every node to hold every repo on disk", 30*time.Minute, func() bool {
		all := true
		for i, n := range c.nodes {
			if held[i] == 0 {
				if onDisk(n, "scale") >= repos {
					held[i] = time.Since(start)
				} else {
					all = false
				}
			}
		}
		if !all {
			time.Sleep(200 * time.Millisecond)
		}
		return all
	})
	for i, n := range c.nodes {
		add(fmt.Sprintf("%s: every repo on disk after (from the first create)", n.id), "%s (%.0f creates/s on disk; %s after the last create)", held[i].Round(time.Millisecond), float64(repos)/held[i].Seconds(), (held[i] - committed).Round(time.Millisecond))
	}

	// 2. Repositories of many branches: one commit, refs branches, one push
	// each. The first is timed against plain git.
	wt := u.workTree(url(lead, "scale/r00000"))
	u.commit(wt, "f", "x\n")
	var tx strings.Builder
	head := strings.TrimSpace(u.mustGit(wt, "rev-parse", "HEAD"))
	for j := range refs {
		fmt.Fprintf(&tx, "create refs/heads/b%05d %s\n", j, head)
	}
	txFile := filepath.Join(c.dir, "branches.tx")
	os.WriteFile(txFile, []byte(tx.String()), 0o600)
	if r := runCmd(b, wt, u.env(), 5*time.Minute, "sh", "-c", "git update-ref --stdin < "+txFile); r.code != 0 {
		b.Fatal(r)
	}
	var pushTimes timing
	changesBefore := c.leaderChanges()
	for i := range bigRepos {
		name := fmt.Sprintf("big/r%03d", i)
		c.must(lead, "repo", "create", name)
		c.must(lead, "repo", "grant", name, "bench", "write")
		via := c.nodes[i%3]
		pushTimes = append(pushTimes, timed(b, func() result {
			return u.git(wt, "push", "-q", url(via, name), "refs/heads/b*:refs/heads/b*")
		}))
	}
	add("leader changes during the big pushes (default 1 s timeouts)", "%d", c.leaderChanges()-changesBefore)
	plain.initBare(b, "big")
	plainPush := timed(b, func() result { return plainUser.git(wt, "push", "-q", plain.url("big"), "refs/heads/b*:refs/heads/b*") })
	add(fmt.Sprintf("push of %d branches, plain git", refs), "%s", plainPush.Round(time.Millisecond))
	add(fmt.Sprintf("push of %d branches, gitraft p50 / max (%d pushes)", refs, bigRepos), "%s / %s (%.2fx plain at p50)", pushTimes.pct(0.5).Round(time.Millisecond), pushTimes.pct(1).Round(time.Millisecond), pushTimes.pct(0.5).Seconds()/plainPush.Seconds())
	for _, n := range c.nodes {
		add(fmt.Sprintf("%s RSS after filling", n.id), "%.0f MB", rssMB(n))
	}

	// 3. ls-remote of a big repo: plain, a current node, a behind node.
	var lsPlain, lsCur timing
	for range 5 {
		lsPlain = append(lsPlain, timed(b, func() result { return plainUser.git(c.dir, "ls-remote", plain.url("big")) }))
		lsCur = append(lsCur, timed(b, func() result { return u.git(c.dir, "ls-remote", url(lead, "big/r000")) }))
	}
	behind := c.other(lead)
	behind.kill()
	u.commit(wt, "g", "y\n")
	u.mustGit(wt, "push", "-q", url(lead, "big/r000"), "HEAD:refs/heads/b00000")
	behind.start()
	behind.waitReady(5 * time.Minute)
	lsBehind := timed(b, func() result { return u.git(c.dir, "ls-remote", url(behind, "big/r000")) })
	add(fmt.Sprintf("ls-remote of %d refs p50: plain / current node", refs), "%s / %s (%.2fx)", lsPlain.pct(0.5).Round(time.Millisecond), lsCur.pct(0.5).Round(time.Millisecond), lsCur.pct(0.5).Seconds()/lsPlain.pct(0.5).Seconds())
	add("ls-remote through a node behind on that repo", "%s (%.2fx a current node's)", lsBehind.Round(time.Millisecond), lsBehind.Seconds()/lsCur.pct(0.5).Seconds())

	// 4. Restarts, with default snapshot settings.
	f := c.other(c.leader())
	f.kill()
	t0 := time.Now()
	f.start()
	f.waitReady(10 * time.Minute)
	add("follower restart to ready", "%s", time.Since(t0).Round(time.Millisecond))
	for _, n := range c.nodes {
		n.kill()
	}
	t0 = time.Now()
	for _, n := range c.nodes {
		n.start()
	}
	for _, n := range c.nodes {
		n.waitReady(10 * time.Minute)
	}
	add("whole-cluster restart to every node ready", "%s", time.Since(t0).Round(time.Millisecond))
	for _, n := range c.nodes {
		add(fmt.Sprintf("%s RSS after restart", n.id), "%.0f MB", rssMB(n))
	}

	// 5. A fourth node joins and fills.
	t0 = time.Now()
	n4 := c.addNode("n4", false, withDefaultRaftTimeouts())
	n4.waitReady(10 * time.Minute)
	total := repos + bigRepos
	var lastCur int
	waitFor(b, "n4 to hold every repository", time.Hour, func() bool {
		cur, all := c.allCurrent(n4)
		lastCur = cur
		if all < total || cur < total {
			time.Sleep(time.Second)
			return false
		}
		return true
	})
	add("a fourth node holds every repo after", "%s (%d repos)", time.Since(t0).Round(time.Millisecond), lastCur)
	fmt.Println()
}
