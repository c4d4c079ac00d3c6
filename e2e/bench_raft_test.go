package e2e

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	lockv1 "github.com/gitraft/gitraft/proto/gitraft/lock/v1"
	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
)

// latencies summarises one measurement.
type latencies struct {
	name  string
	ops   int
	took  time.Duration
	lat   []time.Duration
	notes string
}

func (l *latencies) pct(p float64) time.Duration {
	if len(l.lat) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), l.lat...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

func printTable(title string, rows []*latencies) {
	fmt.Printf("\n%s\n", title)
	fmt.Printf("%-46s %7s %12s %10s %10s\n", "measurement", "ops", "writes/s", "p50", "p99")
	for _, r := range rows {
		fmt.Printf("%-46s %7d %12.0f %10s %10s %s\n", r.name, r.ops, float64(r.ops)/r.took.Seconds(),
			r.pct(0.50).Round(10*time.Microsecond), r.pct(0.99).Round(10*time.Microsecond), r.notes)
	}
}

// run measures fn over ops operations spread across workers; each operation
// may be several writes (writesPerOp).
func measure(name string, workers, opsPerWorker, writesPerOp int, fn func(w, i int) error) (*latencies, error) {
	l := &latencies{name: name, ops: workers * opsPerWorker * writesPerOp}
	var mu sync.Mutex
	var firstErr error
	var wg sync.WaitGroup
	start := time.Now()
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range opsPerWorker {
				t0 := time.Now()
				err := fn(w, i)
				d := time.Since(t0)
				mu.Lock()
				if err != nil && firstErr == nil {
					firstErr = err
				}
				l.lat = append(l.lat, d)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	l.took = time.Since(start)
	return l, firstErr
}

// BenchmarkCluster measures committed Raft writes on a 3-node TLS cluster of
// real processes with fsync on: lock acquire+release pairs and ref-update
// entries, with 1 and 32 writers, and the time from SIGKILL of the leader to
// the next committed write.
func BenchmarkCluster(b *testing.B) {
	c := startCluster(b, 3)
	lead := c.leader()
	follower := c.other(lead)
	const writers = 32
	for i := range writers {
		c.must(lead, "repo", "create", fmt.Sprintf("bench/r%d", i))
	}
	// A commit every node holds, so ref updates may point at it.
	u := c.addGitUser("bench")
	c.must(lead, "repo", "grant", "bench/r0", "bench", "write")
	wt := u.workTree(url(lead, "bench/r0"))
	oidA := u.commit(wt, "a", "a\n")
	oidB := u.commit(wt, "b", "b\n")
	u.mustGit(wt, "push", "-q", "origin", "main")
	for i := 1; i < writers; i++ {
		c.must(lead, "repo", "grant", fmt.Sprintf("bench/r%d", i), "bench", "write")
		u.mustGit(wt, "push", "-q", url(lead, fmt.Sprintf("bench/r%d", i)), "main")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var rows []*latencies
	for _, target := range []*node{lead, follower} {
		role := "leader"
		if target == follower {
			role = "follower"
		}
		conn := c.grpcConn(target, "admin")
		locks, repos := lockv1.NewLockServiceClient(conn), repov1.NewRepoServiceClient(conn)
		pair := func(w, i int) error {
			repo := fmt.Sprintf("bench/r%d", w)
			l, err := locks.AcquireLock(ctx, &lockv1.AcquireLockRequest{Repo: repo, Holder: "bench", Lease: durationpb.New(time.Minute)})
			if err != nil {
				return err
			}
			_, err = locks.ReleaseLock(ctx, &lockv1.ReleaseLockRequest{Repo: repo, FencingToken: l.GetLock().GetFencingToken()})
			return err
		}
		for _, cfg := range []struct{ workers, ops int }{{1, 200}, {writers, 50}} {
			r, err := measure(fmt.Sprintf("lock acquire+release via %s, %d writers", role, cfg.workers), cfg.workers, cfg.ops, 2, pair)
			if err != nil {
				b.Fatal(err)
			}
			r.notes = "(latency: one pair)"
			rows = append(rows, r)
		}
		// Ref updates: each writer holds its repo's lock and swings main
		// between two commits every node has.
		tokens := make([]uint64, writers)
		cur := make([]string, writers)
		for w := range writers {
			l, err := locks.AcquireLock(ctx, &lockv1.AcquireLockRequest{Repo: fmt.Sprintf("bench/r%d", w), Holder: "bench", Lease: durationpb.New(10 * time.Minute)})
			if err != nil {
				b.Fatal(err)
			}
			tokens[w], cur[w] = l.GetLock().GetFencingToken(), oidB
		}
		update := func(w, i int) error {
			next := oidA
			if cur[w] == oidA {
				next = oidB
			}
			_, err := repos.UpdateRefs(ctx, &repov1.UpdateRefsRequest{Repo: fmt.Sprintf("bench/r%d", w), FencingToken: tokens[w],
				Updates: []*repov1.RefUpdate{{Ref: "refs/heads/main", OldOid: cur[w], NewOid: next}}})
			if err == nil {
				cur[w] = next
			}
			return err
		}
		for _, cfg := range []struct{ workers, ops int }{{1, 200}, {writers, 30}} {
			r, err := measure(fmt.Sprintf("ref update (CAS) via %s, %d writers", role, cfg.workers), cfg.workers, cfg.ops, 1, update)
			if err != nil {
				b.Fatal(err)
			}
			r.notes = "(incl. object check on a majority)"
			rows = append(rows, r)
		}
		for w := range writers {
			locks.ReleaseLock(ctx, &lockv1.ReleaseLockRequest{Repo: fmt.Sprintf("bench/r%d", w), FencingToken: tokens[w]})
		}
	}
	printTable("gitraft: committed Raft writes, 3 nodes, TLS, fsync on (one machine, loopback)", rows)

	// Failover: SIGKILL the leader while a writer keeps creating repos
	// through a survivor; time from the kill to the next committed write.
	var failovers []time.Duration
	for round := range 3 {
		lead := c.leader()
		via := c.other(lead)
		conn := c.grpcConn(via, "admin")
		repos := repov1.NewRepoServiceClient(conn)
		killed := make(chan time.Time, 1)
		go func() {
			time.Sleep(300 * time.Millisecond)
			lead.kill()
			killed <- time.Now()
		}()
		var at time.Time
		for i := 0; ; i++ {
			_, err := repos.CreateRepo(ctx, &repov1.CreateRepoRequest{Name: fmt.Sprintf("failover/%d-%d", round, i)})
			select {
			case at = <-killed:
			default:
			}
			if err == nil && !at.IsZero() {
				failovers = append(failovers, time.Since(at))
				break
			}
		}
		lead.start()
		lead.waitReady(60 * time.Second)
	}
	var worst time.Duration
	var parts []string
	for _, d := range failovers {
		worst = max(worst, d)
		parts = append(parts, d.Round(time.Millisecond).String())
	}
	fmt.Printf("\nSIGKILL of the leader to the next committed write (election timeout 500ms): %s (max %s)\n", strings.Join(parts, ", "), worst.Round(time.Millisecond))
	b.ReportMetric(float64(worst.Milliseconds()), "failover-max-ms")
	fmt.Fprintln(os.Stdout)
}
