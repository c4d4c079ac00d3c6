package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// BenchmarkHousekeep: clone time of a repository after many small pushes
// (a pack each), without housekeeping and after `gitraft repo housekeep`,
// next to the same history pushed at once. GITRAFT_BENCH_HOUSEKEEP_PUSHES
// sets the number of pushes (default 1000). Run it with
// `./e2e/bench.sh Housekeep`.
func BenchmarkHousekeep(b *testing.B) {
	pushes := 1000
	if s := os.Getenv("GITRAFT_BENCH_HOUSEKEEP_PUSHES"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			b.Fatalf("GITRAFT_BENCH_HOUSEKEEP_PUSHES=%q: want a positive number", s)
		}
		pushes = n
	}
	for range b.N {
		benchHousekeep(b, pushes)
	}
}

func benchHousekeep(b *testing.B, pushes int) {
	// The scheduler off, so that only `repo housekeep` repacks.
	c := startCluster(b, 3, withArgs("--git-housekeeping-enabled=false"))
	n1 := c.nodes[0]
	u := c.addGitUser("bench")
	for _, r := range []string{"bench/one", "bench/many"} {
		c.must(n1, "repo", "create", r)
		c.must(n1, "repo", "grant", r, "bench", "write")
	}
	// The history: a few files, each push changes one.
	wt := u.workTree(url(n1, "bench/many"))
	var commits []string
	for i := range pushes {
		commits = append(commits, u.commit(wt, fmt.Sprintf("src/f%d.txt", i%20), strings.Repeat(fmt.Sprintf("line %d of push %d\n", i%7, i), 20)))
	}
	start := time.Now()
	for i, oid := range commits {
		u.mustGit(wt, "push", "-q", url(c.nodes[i%3], "bench/many"), oid+":refs/heads/main")
	}
	pushTook := time.Since(start)
	u.mustGit(wt, "push", "-q", url(n1, "bench/one"), commits[len(commits)-1]+":refs/heads/main")

	packs := func(repo string) int {
		m, _ := filepath.Glob(filepath.Join(repoDir(n1, repo), "objects", "pack", "*.pack"))
		return len(m)
	}
	const clones = 5
	cloneTime := func(repo string) time.Duration {
		var took []time.Duration
		for i := range clones {
			dir := filepath.Join(c.dir, fmt.Sprintf("clone-%s-%d-%d", strings.ReplaceAll(repo, "/", "-"), i, time.Now().UnixNano()))
			t0 := time.Now()
			u.mustGit(c.dir, "clone", "-q", "--bare", url(n1, repo), dir)
			took = append(took, time.Since(t0))
			os.RemoveAll(dir)
		}
		slices.Sort(took)
		return took[clones/2]
	}
	type row struct {
		what  string
		packs int
		clone time.Duration
	}
	var rows []row
	rows = append(rows, row{"one push", packs("bench/one"), cloneTime("bench/one")})
	rows = append(rows, row{fmt.Sprintf("%d pushes, no housekeeping", pushes), packs("bench/many"), cloneTime("bench/many")})
	start = time.Now()
	out := c.must(n1, "repo", "housekeep", "bench/many")
	hkTook := time.Since(start)
	rows = append(rows, row{fmt.Sprintf("%d pushes, after repo housekeep", pushes), packs("bench/many"), cloneTime("bench/many")})

	fmt.Printf("\nBenchmarkHousekeep: clone through n1 of a 3-node cluster, %d commits (median of %d clones)\n", pushes, clones)
	fmt.Printf("  %-40s %8s %12s\n", "repository", "packs", "clone")
	for _, r := range rows {
		fmt.Printf("  %-40s %8d %12s\n", r.what, r.packs, r.clone.Round(time.Millisecond))
	}
	fmt.Printf("  %d pushes took %s; repo housekeep on every node took %s:\n%s\n", pushes, pushTook.Round(time.Second), hkTook.Round(time.Millisecond), out)
	b.ReportMetric(float64(rows[1].clone.Milliseconds()), "ms/clone-no-housekeeping")
	b.ReportMetric(float64(rows[2].clone.Milliseconds()), "ms/clone-housekept")
	b.ReportMetric(float64(rows[0].clone.Milliseconds()), "ms/clone-one-push")
}
