package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

// The push path under failures, for BenchmarkGit (GITRAFT_BENCH_GIT=failover
// runs only these sections, without the OpenSSH baseline):
//   - leader SIGKILL → the next acknowledged push, over 10 kills;
//   - a push waiting for the write lock of a node that is SIGKILLed in the
//     middle of its push: how long it waited after the kill, with the node
//     restarted at once and with the node left down.

// benchGitFailoverOnly reports whether BenchmarkGit should run only these
// sections.
func benchGitFailoverOnly() bool { return os.Getenv("GITRAFT_BENCH_GIT") == "failover" }

// benchGitFailover runs the sections and prints their table.
func benchGitFailover(b *testing.B, c *cluster, u *gitUser) {
	b.Helper()
	kills := pushFailover(b, c, u, 10)
	restarted := lockWaitOnKilledHolder(b, c, u, 5, true)
	down := lockWaitOnKilledHolder(b, c, u, 5, false)
	fmt.Printf("\nthe push path under failures (3-node gitraft; a node is SIGKILLed)\n")
	fmt.Printf("%-70s %10s %10s %10s\n", "measurement", "p50", "max", "runs")
	row := func(name string, t timing) {
		fmt.Printf("%-70s %10s %10s %10d\n", name, t.pct(0.5).Round(time.Millisecond), t.pct(1).Round(time.Millisecond), len(t))
	}
	row("leader SIGKILL -> next acknowledged push", kills)
	row("push waiting on a killed holder's lock, holder restarted at once", restarted)
	row("push waiting on a killed holder's lock, holder left down", down)
	fmt.Printf("(times from the kill; the write lock's lease is 15s; 4 writers push to 4 repositories\n")
	fmt.Printf(" through the surviving nodes, and \"next\" is the first push sent after the kill)\n\n")
	b.ReportMetric(kills.pct(0.5).Seconds(), "failover-push-p50-s")
	b.ReportMetric(restarted.pct(0.5).Seconds(), "lockwait-restarted-p50-s")
	b.ReportMetric(down.pct(0.5).Seconds(), "lockwait-down-p50-s")
}

// pushAttempt is one push by a background writer.
type pushAttempt struct {
	start, end time.Time
	ok         bool
}

// pushWriter pushes an empty commit to its own repository through its
// node, again and again, until stopped.
type pushWriter struct {
	u    *gitUser
	repo string
	wt   string
}

// pushOnce commits and pushes, without failing the benchmark (it runs in
// its own goroutine): a failed push is an attempt that did not succeed.
func (w *pushWriter) pushOnce(via *node) pushAttempt {
	a := pushAttempt{start: time.Now()}
	run := func(args ...string) bool {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, "git", args...)
		cmd.Dir, cmd.Env = w.wt, append(os.Environ(), w.u.env()...)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		return cmd.Run() == nil
	}
	a.ok = run("commit", "-q", "--allow-empty", "-m", "failover") && run("push", "-q", url(via, w.repo), "HEAD:main")
	a.end = time.Now()
	return a
}

// pushFailover SIGKILLs the leader rounds times while writers push through
// the other nodes, and returns, for each kill, the time from the kill to
// the first push that was sent after it and acknowledged. It restarts the
// killed node and waits until every node is ready before the next round.
func pushFailover(b *testing.B, c *cluster, u *gitUser, rounds int) timing {
	b.Helper()
	const writers = 4
	ws := make([]*pushWriter, writers)
	for i := range ws {
		repo := fmt.Sprintf("failover-%d", i)
		c.must(c.leader(), "repo", "create", repo)
		c.must(c.leader(), "repo", "grant", repo, u.name, "write")
		ws[i] = &pushWriter{u: u, repo: repo, wt: u.workTree(url(c.leader(), repo))}
		u.commit(ws[i].wt, "f", "seed\n")
	}
	var out timing
	for round := range rounds {
		lead := c.leader()
		var vias []*node
		for _, n := range c.nodes {
			if n != lead {
				vias = append(vias, n)
			}
		}
		attempts := make(chan pushAttempt, 4096)
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for i, w := range ws {
			wg.Add(1)
			go func() {
				defer wg.Done()
				time.Sleep(time.Duration(i) * 50 * time.Millisecond) // staggered
				for {
					select {
					case <-stop:
						return
					default:
					}
					attempts <- w.pushOnce(vias[i%len(vias)])
				}
			}()
		}
		stopWriters := func() {
			close(stop)
			go func() { wg.Wait(); close(attempts) }()
			for range attempts {
			}
		}
		// Every writer is pushing before the kill.
		warm := time.After(60 * time.Second)
		for ok := 0; ok < 2*writers; {
			select {
			case a := <-attempts:
				if a.ok {
					ok++
				}
			case <-warm:
				stopWriters()
				b.Fatalf("round %d: the writers did not push within 60s before the kill", round)
			}
		}
		killedAt := time.Now()
		lead.kill()
		deadline := time.After(60 * time.Second)
		var took time.Duration
		for took == 0 {
			select {
			case a := <-attempts:
				if a.ok && !a.start.Before(killedAt) {
					took = a.end.Sub(killedAt)
				}
			case <-deadline:
				stopWriters()
				b.Fatalf("round %d: no push acknowledged within 60s of killing the leader %s", round, lead.id)
			}
		}
		stopWriters()
		out = append(out, took)
		lead.start()
		for _, n := range c.nodes {
			n.waitReady(60 * time.Second)
		}
		c.leader()
	}
	return out
}

// lockWaitOnKilledHolder, rounds times: a push through one node takes the
// write lock and stalls, a second push through another node waits for
// it, the first node is SIGKILLed (and restarted at once, with restart);
// it returns the time from the kill until the waiting push was
// acknowledged.
func lockWaitOnKilledHolder(b *testing.B, c *cluster, u *gitUser, rounds int, restart bool) timing {
	b.Helper()
	repo := "lockwait-down"
	if restart {
		repo = "lockwait-restarted"
	}
	c.must(c.leader(), "repo", "create", repo)
	c.must(c.leader(), "repo", "grant", repo, u.name, "write")
	wt := u.workTree(url(c.leader(), repo))
	u.commit(wt, "f", "seed\n")
	u.mustGit(wt, "push", "-q", "origin", "HEAD:main")
	var out timing
	for round := range rounds {
		// Every copy current first: a node still catching up on the
		// repository would hand the held push to a peer, which would then
		// be the holder.
		waitFor(b, "every copy of "+repo+" current", 60*time.Second, func() bool { return c.run(c.leader(), "repo", "verify", repo).code == 0 })
		holder := c.other(c.leader())
		via := c.other(holder)
		u.commit(wt, "f", fmt.Sprintf("round %d\n", round))
		h := u.holdWriteLock(holder, repo)
		p := u.pushInBackground(wt, url(via, repo), "HEAD:main")
		waitFor(b, "the push to wait for the write lock", 60*time.Second, func() bool { return p.said("waiting for the write lock") })
		killedAt := time.Now()
		holder.kill()
		if restart {
			holder.start()
		}
		var r result
		select {
		case r = <-p.done:
		case <-time.After(120 * time.Second):
			b.Fatalf("round %d: the waiting push did not finish within 120s of the kill", round)
		}
		took := time.Since(killedAt)
		if took > 10*time.Second {
			fmt.Printf("  round %d: the push waited %s; lock events of %s's holders on %s: %v\n", round, took.Round(time.Millisecond), holder.id, via.id, via.lockEvents(holder.id))
			if os.Getenv("GITRAFT_BENCH_DEBUG") != "" {
				for _, n := range c.nodes {
					data, _ := os.ReadFile(n.dir + ".log")
					for _, l := range strings.Split(string(data), "\n") {
						if strings.Contains(l, "silent") || strings.Contains(l, "write lock") || strings.Contains(l, "became leader") || strings.Contains(l, "entering leader") {
							fmt.Printf("    %s: %.300s\n", n.id, l)
						}
					}
				}
			}
		}
		h.end()
		if r.code != 0 {
			b.Fatalf("round %d: the waiting push failed: %s", round, r)
		}
		out = append(out, took)
		if !restart {
			holder.start()
		}
		for _, n := range c.nodes {
			n.waitReady(60 * time.Second)
		}
	}
	return out
}

// BenchmarkPushFailoverTimeouts measures leader SIGKILL -> next acknowledged
// push under each of a few Raft timing settings (heartbeat, election,
// leader lease), the nodes' built-in defaults included: what the defaults
// were chosen from. GITRAFT_BENCH_RAFT lists the settings to try, as
// "heartbeat/election/lease" separated by spaces, "default" for the
// built-in ones (default: "1s/1s/500ms default").
func BenchmarkPushFailoverTimeouts(b *testing.B) {
	settings := strings.Fields(os.Getenv("GITRAFT_BENCH_RAFT"))
	if len(settings) == 0 {
		settings = []string{"1s/1s/500ms", "default"}
	}
	var rows []string
	for _, s := range settings {
		opt := func(n *node) {
			// Drop the e2e clusters' own Raft timings, then set these.
			var args []string
			for i := 0; i < len(n.args); i++ {
				if strings.HasPrefix(n.args[i], "--raft-") && strings.HasSuffix(n.args[i], "-timeout") {
					i++
					continue
				}
				args = append(args, n.args[i])
			}
			if s != "default" {
				t := strings.Split(s, "/")
				if len(t) != 3 {
					b.Fatalf("GITRAFT_BENCH_RAFT: %q is not heartbeat/election/lease", s)
				}
				args = append(args, "--raft-heartbeat-timeout", t[0], "--raft-election-timeout", t[1], "--raft-leader-lease-timeout", t[2])
			}
			n.args = args
		}
		c := startCluster(b, 3, opt)
		u := c.addGitUser("bench")
		changes, pushes := leaderChangesUnderLoad(b, c, u, 16, 30*time.Second)
		t := pushFailover(b, c, u, 10)
		rows = append(rows, fmt.Sprintf("%-24s %10s %10s %10d %16d %10d", s, t.pct(0.5).Round(time.Millisecond), t.pct(1).Round(time.Millisecond), len(t), changes, pushes))
		for _, n := range c.nodes {
			n.kill()
		}
	}
	fmt.Printf("\nleader SIGKILL -> next acknowledged push, by Raft timing (heartbeat/election/leader lease)\n")
	fmt.Printf("%-24s %10s %10s %10s %16s %10s\n", "raft timing", "p50", "max", "kills", "leader changes*", "pushes*")
	for _, r := range rows {
		fmt.Println(r)
	}
	fmt.Printf("(* while 16 writers pushed through every node for 30s before the kills, saturating the machine:\n")
	fmt.Printf("   leader changes seen by the nodes (0 = the leader never stepped down) and pushes acknowledged)\n\n")
}

// leaderChangesUnderLoad runs writers pushing through every node for d and
// returns the leadership changes the nodes saw meanwhile, and the pushes
// acknowledged.
func leaderChangesUnderLoad(b *testing.B, c *cluster, u *gitUser, writers int, d time.Duration) (changes, pushes int) {
	b.Helper()
	ws := make([]*pushWriter, writers)
	for i := range ws {
		repo := fmt.Sprintf("load-%d", i)
		c.must(c.leader(), "repo", "create", repo)
		c.must(c.leader(), "repo", "grant", repo, u.name, "write")
		ws[i] = &pushWriter{u: u, repo: repo, wt: u.workTree(url(c.leader(), repo))}
		u.commit(ws[i].wt, "f", "seed\n")
	}
	before := c.leaderChanges()
	end := time.Now().Add(d)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i, w := range ws {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(end) {
				if a := w.pushOnce(c.nodes[i%len(c.nodes)]); a.ok {
					mu.Lock()
					pushes++
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	return c.leaderChanges() - before, pushes
}
