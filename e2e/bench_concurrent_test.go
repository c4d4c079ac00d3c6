package e2e

import (
	"fmt"
	"os"
	"sync"
	"testing"
	"time"
)

// benchGitConcurrent: 16 clients push at once, each its own small commits
// one after another, first each to a repository of its own, then each to
// its own branch of one shared repository; plain git over OpenSSH and
// gitraft in the same run. gitraft's clients spread over the three nodes.
// It prints pushes per second and the latency p50 and p99 of each.
// GITRAFT_BENCH_CLIENTS and GITRAFT_BENCH_CLIENT_PUSHES change the load.
func benchGitConcurrent(b *testing.B, c *cluster, u *gitUser, plain *plainSSHD, plainUser *gitUser) {
	b.Helper()
	clients := envInt("GITRAFT_BENCH_CLIENTS", 16)
	pushes := envInt("GITRAFT_BENCH_CLIENT_PUSHES", 8)
	lead := c.leader()
	for i := range clients {
		repo := fmt.Sprintf("conc-%d", i)
		c.must(lead, "repo", "create", repo)
		c.must(lead, "repo", "grant", repo, u.name, "write")
		plain.initBare(b, repo)
	}
	c.must(lead, "repo", "create", "conc-shared")
	c.must(lead, "repo", "grant", "conc-shared", u.name, "write")
	plain.initBare(b, "conc-shared")

	type result struct {
		rate     float64
		p50, p99 time.Duration
	}
	run := func(gitraft, shared bool) result {
		who := plainUser
		if gitraft {
			who = u
		}
		type client struct{ wt, ref string }
		cs := make([]client, clients)
		for i := range cs {
			repo, ref := fmt.Sprintf("conc-%d", i), "main"
			if shared {
				repo, ref = "conc-shared", fmt.Sprintf("main:refs/heads/client-%d", i)
			}
			remote := plain.url(repo)
			if gitraft {
				remote = url(c.nodes[i%len(c.nodes)], repo)
			}
			cs[i] = client{wt: who.workTree(remote), ref: ref}
			who.commit(cs[i].wt, "f.txt", "start\n")
			who.mustGit(cs[i].wt, "push", "-q", "origin", cs[i].ref)
		}
		var (
			mu  sync.Mutex
			lat timing
			wg  sync.WaitGroup
		)
		failed := make(chan string, clients*pushes)
		start := time.Now()
		for i := range cs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for k := range pushes {
					who.commit(cs[i].wt, "f.txt", fmt.Sprintf("client %d push %d\n", i, k))
					t0 := time.Now()
					r := who.git(cs[i].wt, "push", "-q", "origin", cs[i].ref)
					d := time.Since(t0)
					if r.code != 0 {
						failed <- fmt.Sprintf("client %d push %d: %s", i, k, r)
						return
					}
					mu.Lock()
					lat = append(lat, d)
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		wall := time.Since(start)
		close(failed)
		for f := range failed {
			b.Fatal(f)
		}
		return result{rate: float64(len(lat)) / wall.Seconds(), p50: lat.pct(0.5), p99: lat.pct(0.99)}
	}
	fmt.Printf("\n%d clients pushing at once, %d small pushes each (plain: one sshd; gitraft: clients spread over 3 nodes)\n", clients, pushes)
	fmt.Printf("%-34s %10s %10s %10s %10s %10s %10s\n", "", "plain/s", "gitraft/s", "plain p50", "gitraft", "plain p99", "gitraft")
	for _, shared := range []bool{false, true} {
		name := fmt.Sprintf("%d repos, one each", clients)
		if shared {
			name = fmt.Sprintf("one repo, %d branches", clients)
		}
		p, g := run(false, shared), run(true, shared)
		fmt.Printf("%-34s %10.2f %10.2f %10s %10s %10s %10s\n", name, p.rate, g.rate,
			p.p50.Round(time.Millisecond), g.p50.Round(time.Millisecond), p.p99.Round(time.Millisecond), g.p99.Round(time.Millisecond))
	}
	fmt.Printf("(targets: gitraft pushes/s at least plain's, p99 at most 1.5x plain's)\n")
}

func benchGitConcurrentOnly() bool { return os.Getenv("GITRAFT_BENCH_GIT") == "concurrent" }
