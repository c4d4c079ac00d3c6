package e2e

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	lockv1 "github.com/gitraft/gitraft/proto/gitraft/lock/v1"
	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
)

// measurement is one row of the benchmark's table.
type measurement struct {
	name   string // what a person reads
	metric string // the b.ReportMetric prefix, no spaces
	ops    int    // operations timed (a lock pair is one operation)
	writes int    // Raft entries they committed
	took   time.Duration
	lat    []time.Duration // one per operation
	note   string
}

func (m *measurement) pct(p float64) time.Duration {
	if len(m.lat) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), m.lat...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

func (m *measurement) writesPerSec() float64 { return float64(m.writes) / m.took.Seconds() }

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func printTable(title string, rows []*measurement) {
	fmt.Printf("\n%s\n", title)
	fmt.Printf("%-48s %6s %7s %9s %9s %9s\n", "measurement", "ops", "writes", "writes/s", "p50", "p99")
	for _, r := range rows {
		fmt.Printf("%-48s %6d %7d %9.0f %9s %9s  %s\n", r.name, r.ops, r.writes, r.writesPerSec(),
			r.pct(0.50).Round(10*time.Microsecond), r.pct(0.99).Round(10*time.Microsecond), r.note)
	}
}

// measure runs fn opsPerWorker times in each of workers goroutines and
// times every call; each call commits writesPerOp Raft entries.
func measure(name string, workers, opsPerWorker, writesPerOp int, fn func(w, i int) error) (*measurement, error) {
	m := &measurement{name: name, ops: workers * opsPerWorker, writes: workers * opsPerWorker * writesPerOp}
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
					firstErr = fmt.Errorf("%s: %w", name, err)
				}
				m.lat = append(m.lat, d)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	m.took = time.Since(start)
	return m, firstErr
}

// BenchmarkCluster measures committed Raft writes on a 3-node TLS cluster of
// real `gitraft serve` processes with fsync on, through the gRPC API of the
// leader and of a follower (which forwards to the leader): lock
// acquire+release pairs and ref-update entries, with 1 writer and with 32
// (each on its own repository); then the time from a SIGKILL of the leader to
// the next committed write, three times. Run it with
//
//	go test ./e2e -run '^$' -bench Cluster -benchtime 1x
func BenchmarkCluster(b *testing.B) {
	// Production Raft timing (1s), not the tests' quicker 500ms.
	c := startCluster(b, 3, withArgs("--raft-heartbeat-timeout", "1s", "--raft-election-timeout", "1s", "--raft-leader-lease-timeout", "500ms"))
	lead := c.leader()
	follower := c.other(lead)
	const writers = 32
	for i := range writers {
		c.must(lead, "repo", "create", fmt.Sprintf("bench/r%d", i))
	}
	// Ref updates may only point at objects a majority holds (the product's
	// rule), so they swing main between two commits pushed to every repo,
	// not through random ids.
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
	var rows []*measurement
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
		for _, cfg := range []struct{ workers, ops int }{{1, 300}, {writers, 94}} {
			m, err := measure(fmt.Sprintf("lock acquire+release via %s, %d writers", role, cfg.workers), cfg.workers, cfg.ops, 2, pair)
			if err != nil {
				b.Fatal(err)
			}
			m.metric, m.note = fmt.Sprintf("lock-%s-%dw", role, cfg.workers), "latency of one pair"
			rows = append(rows, m)
		}
		// Ref updates: each writer holds its repo's lock and moves main with
		// a compare-and-swap carrying its fencing token.
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
			resp, err := repos.UpdateRefs(ctx, &repov1.UpdateRefsRequest{Repo: fmt.Sprintf("bench/r%d", w), FencingToken: tokens[w],
				Updates: []*repov1.RefUpdate{{Ref: "refs/heads/main", OldOid: cur[w], NewOid: next}}})
			if err != nil {
				return err
			}
			if r := resp.GetResults(); len(r) != 1 || r[0].GetStatus() != repov1.RefStatus_REF_STATUS_OK {
				return fmt.Errorf("update of %s refused: %v", fmt.Sprintf("bench/r%d", w), r)
			}
			cur[w] = next
			return nil
		}
		for _, cfg := range []struct{ workers, ops int }{{1, 100}, {writers, 10}} {
			m, err := measure(fmt.Sprintf("ref update (CAS) via %s, %d writers", role, cfg.workers), cfg.workers, cfg.ops, 1, update)
			if err != nil {
				b.Fatal(err)
			}
			m.metric, m.note = fmt.Sprintf("ref-%s-%dw", role, cfg.workers), "incl. object check on a majority"
			rows = append(rows, m)
		}
		for w := range writers {
			if _, err := locks.ReleaseLock(ctx, &lockv1.ReleaseLockRequest{Repo: fmt.Sprintf("bench/r%d", w), FencingToken: tokens[w]}); err != nil {
				b.Fatal(err)
			}
		}
	}
	printTable("gitraft: committed Raft writes, 3 nodes, TLS, fsync on (one machine, loopback)", rows)
	for _, m := range rows {
		b.ReportMetric(m.writesPerSec(), m.metric+"-writes/s")
		b.ReportMetric(ms(m.pct(0.99)), m.metric+"-p99-ms")
	}

	failovers := make([]time.Duration, 3)
	for round := range failovers {
		failovers[round] = failover(b, c, round)
	}
	var worst time.Duration
	var parts []string
	for i, d := range failovers {
		worst = max(worst, d)
		parts = append(parts, d.Round(time.Millisecond).String())
		b.ReportMetric(ms(d), fmt.Sprintf("failover-%d-ms", i+1))
	}
	fmt.Printf("\nSIGKILL of the leader to the next committed write through a survivor (election timeout 1s):\n  %s (max %s)\n\n",
		strings.Join(parts, ", "), worst.Round(time.Millisecond))
	b.ReportMetric(ms(worst), "failover-max-ms")
}

// failover SIGKILLs the leader while a writer keeps creating repositories
// through a survivor, and returns the time from the kill to the first write
// that was sent after the kill and committed. It restarts the killed node
// and waits until every node is ready again.
func failover(b *testing.B, c *cluster, round int) time.Duration {
	b.Helper()
	lead := c.leader()
	via := c.other(lead)
	repos := repov1.NewRepoServiceClient(c.grpcConn(via, "admin"))
	type attempt struct {
		start, end time.Time
		err        error
	}
	attempts := make(chan attempt, 1024)
	stop := make(chan struct{})
	go func() {
		defer close(attempts)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			start := time.Now()
			_, err := repos.CreateRepo(ctx, &repov1.CreateRepoRequest{Name: fmt.Sprintf("failover/%d-%d", round, i)})
			cancel()
			attempts <- attempt{start, time.Now(), err}
		}
	}()
	stopWriter := func() {
		close(stop)
		for range attempts {
		}
	}
	// The writer is committing before the kill.
	for ok := 0; ok < 10; {
		if a := <-attempts; a.err == nil {
			ok++
		}
	}
	killedAt := time.Now()
	lead.kill()
	deadline := time.After(60 * time.Second)
	var took time.Duration
	for took == 0 {
		select {
		case a := <-attempts:
			// A write sent before the kill may have committed before it.
			if a.err == nil && !a.start.Before(killedAt) {
				took = a.end.Sub(killedAt)
			}
		case <-deadline:
			stopWriter()
			b.Fatalf("no write committed within 60s of killing the leader %s", lead.id)
		}
	}
	stopWriter()
	lead.start()
	for _, n := range c.nodes {
		n.waitReady(60 * time.Second)
	}
	return took
}
