package lockd

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeLocker implements Locker on a Table, like the cluster does through
// Raft: a mutex serialises "entries", each one takes the next index, and the
// local clock plays the leader's clock.
type fakeLocker struct {
	mu       sync.Mutex
	tb       *Table
	index    uint64
	acquires int
	renews   int
	releases int
	// acquireErr / renewErr, if set, are returned instead of applying.
	acquireErr error
	renewErr   error
}

func newFake() *fakeLocker { return &fakeLocker{tb: NewTable()} }

func (f *fakeLocker) AcquireLock(ctx context.Context, repo, holder string, lease time.Duration) (WriteLock, error) {
	if err := ctx.Err(); err != nil {
		return WriteLock{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.acquires++
	if f.acquireErr != nil {
		return WriteLock{}, f.acquireErr
	}
	f.index++
	return f.tb.Acquire(repo, holder, time.Now(), lease, f.index)
}

func (f *fakeLocker) RenewLock(ctx context.Context, repo string, token uint64, lease time.Duration) (WriteLock, error) {
	if err := ctx.Err(); err != nil {
		return WriteLock{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.renews++
	if f.renewErr != nil {
		return WriteLock{}, f.renewErr
	}
	f.index++
	return f.tb.Renew(repo, token, time.Now(), lease)
}

func (f *fakeLocker) ReleaseLock(ctx context.Context, repo string, token uint64) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.releases++
	f.index++
	_, err := f.tb.Release(repo, token)
	return err
}

// do runs fn on the fake's table as one "entry" with the next index.
func (f *fakeLocker) do(fn func(tb *Table, index uint64)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.index++
	fn(f.tb, f.index)
}

func (f *fakeLocker) counts() (acquires, renews, releases int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.acquires, f.renews, f.releases
}

func (f *fakeLocker) set(fn func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn()
}

const testLease = 200 * time.Millisecond

func testConfig() ClientConfig {
	return ClientConfig{Lease: testLease, RetryMin: 5 * time.Millisecond, RetryMax: 20 * time.Millisecond}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func waitClosed(t *testing.T, what string, ch <-chan struct{}) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(3 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func Test_ClientConfig_Defaults(t *testing.T) {
	got := ClientConfig{}.withDefaults()
	want := ClientConfig{Lease: 15 * time.Second, RenewEvery: 5 * time.Second, RetryMin: 50 * time.Millisecond, RetryMax: time.Second}
	if got != want {
		t.Fatalf("defaults = %+v, want %+v", got, want)
	}
	got = ClientConfig{Lease: time.Second, RenewEvery: 2 * time.Second, RetryMin: time.Second, RetryMax: time.Millisecond}.withDefaults()
	if got.RenewEvery != time.Second/3 || got.RetryMax != time.Second {
		t.Fatalf("normalised = %+v", got)
	}
	for range 1000 {
		if j := jitter(100 * time.Millisecond); j < 50*time.Millisecond || j > 100*time.Millisecond {
			t.Fatalf("jitter out of range: %v", j)
		}
	}
}

func Test_Client_AcquireFree(t *testing.T) {
	t.Parallel()
	f := newFake()
	c := NewClient(f, testConfig(), nil)
	h, err := c.Acquire(context.Background(), "acme/site", "node1/push-1", func(WriteLock) {
		t.Error("onWait called for a free lock")
	})
	if err != nil {
		t.Fatal(err)
	}
	l := h.Lock()
	if l.Repo != "acme/site" || l.Holder != "node1/push-1" || h.Token() == 0 || h.Token() != l.Token {
		t.Fatalf("lock = %+v, token %d", l, h.Token())
	}
	f.do(func(tb *Table, _ uint64) {
		if err := tb.Check("acme/site", h.Token(), time.Now()); err != nil {
			t.Errorf("Check: %v", err)
		}
	})
	if err := h.Release(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.do(func(tb *Table, _ uint64) {
		if tb.Len() != 0 {
			t.Errorf("lock not released: %+v", tb.List())
		}
	})
	if h.Err() != nil || isClosed(h.Lost()) {
		t.Fatal("released lock reported lost")
	}
}

func Test_Client_AcquireWaitsForRelease(t *testing.T) {
	t.Parallel()
	f := newFake()
	var other WriteLock
	f.do(func(tb *Table, index uint64) {
		var err error
		other, err = tb.Acquire("acme/site", "node2/push-9", time.Now(), time.Minute, index)
		if err != nil {
			t.Fatal(err)
		}
	})
	c := NewClient(f, testConfig(), nil)

	var waits atomic.Int32
	var seen WriteLock
	type result struct {
		h   *Held
		err error
	}
	done := make(chan result, 1)
	go func() {
		h, err := c.Acquire(context.Background(), "acme/site", "node1/push-1", func(held WriteLock) {
			seen = held
			waits.Add(1)
		})
		done <- result{h, err}
	}()

	// Let it retry several times while held.
	waitFor(t, "several acquire attempts", func() bool { a, _, _ := f.counts(); return a >= 4 })
	if len(done) > 0 {
		t.Fatal("Acquire returned while the lock was held")
	}
	f.do(func(tb *Table, _ uint64) {
		if _, err := tb.Release("acme/site", other.Token); err != nil {
			t.Fatal(err)
		}
	})
	var r result
	select {
	case r = <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("Acquire did not return after release")
	}
	if r.err != nil {
		t.Fatal(r.err)
	}
	defer r.h.Release(context.Background())
	if n := waits.Load(); n != 1 {
		t.Fatalf("onWait called %d times, want 1", n)
	}
	if seen != other {
		t.Fatalf("onWait got %+v, want %+v", seen, other)
	}
	if r.h.Token() <= other.Token {
		t.Fatalf("new token %d not above old %d", r.h.Token(), other.Token)
	}
}

func Test_Client_AcquireCtxCancelWhileWaiting(t *testing.T) {
	t.Parallel()
	f := newFake()
	f.do(func(tb *Table, index uint64) {
		if _, err := tb.Acquire("acme/site", "node2/push-9", time.Now(), time.Minute, index); err != nil {
			t.Fatal(err)
		}
	})
	c := NewClient(f, testConfig(), nil)
	ctx, cancel := context.WithCancel(context.Background())
	var waits atomic.Int32
	errc := make(chan error, 1)
	go func() {
		h, err := c.Acquire(ctx, "acme/site", "node1/push-1", func(WriteLock) { waits.Add(1) })
		if h != nil {
			t.Error("got a Held on cancel")
		}
		errc <- err
	}()
	waitFor(t, "onWait", func() bool { return waits.Load() == 1 })
	cancel()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("Acquire did not return after cancel")
	}

	// Deadline variant, and an already-ended context.
	ctx2, cancel2 := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel2()
	if _, err := c.Acquire(ctx2, "acme/site", "node1/push-1", nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want DeadlineExceeded", err)
	}
	if _, err := c.Acquire(ctx2, "acme/site", "node1/push-1", nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("ended ctx: err = %v", err)
	}
}

func Test_Client_AcquireOtherErrorReturnsAtOnce(t *testing.T) {
	t.Parallel()
	f := newFake()
	noLeader := errors.New("no leader")
	f.acquireErr = noLeader
	c := NewClient(f, testConfig(), nil)
	_, err := c.Acquire(context.Background(), "acme/site", "node1/push-1", nil)
	if !errors.Is(err, noLeader) {
		t.Fatalf("err = %v", err)
	}
	if a, _, _ := f.counts(); a != 1 {
		t.Fatalf("%d attempts, want 1", a)
	}
}

func Test_Client_RenewKeepsLockAlive(t *testing.T) {
	t.Parallel()
	f := newFake()
	c := NewClient(f, testConfig(), nil)
	h, err := c.Acquire(context.Background(), "acme/site", "node1/push-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Release(context.Background())
	first := h.Lock()

	time.Sleep(4 * testLease)

	if isClosed(h.Lost()) {
		t.Fatalf("lock lost: %v", h.Err())
	}
	f.do(func(tb *Table, _ uint64) {
		if err := tb.Check("acme/site", first.Token, time.Now()); err != nil {
			t.Fatalf("Check after %v: %v", 4*testLease, err)
		}
	})
	if _, renews, _ := f.counts(); renews < 6 {
		t.Fatalf("only %d renewals", renews)
	}
	if cur := h.Lock(); !cur.ExpiresAt.After(first.ExpiresAt) || cur.Token != first.Token {
		t.Fatalf("Lock() not updated: first %+v, now %+v", first, cur)
	}
}

func Test_Client_LostOnStaleToken(t *testing.T) {
	t.Parallel()
	f := newFake()
	c := NewClient(f, testConfig(), nil)
	h, err := c.Acquire(context.Background(), "acme/site", "node1/push-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	var other WriteLock
	f.do(func(tb *Table, index uint64) {
		if _, err := tb.ForceRelease("acme/site"); err != nil {
			t.Fatal(err)
		}
		if other, err = tb.Acquire("acme/site", "node2/push-2", time.Now(), time.Minute, index); err != nil {
			t.Fatal(err)
		}
	})
	waitClosed(t, "Lost", h.Lost())
	if err := h.Err(); !errors.Is(err, ErrStaleToken) {
		t.Fatalf("Err = %v, want ErrStaleToken", err)
	}
	// Releasing a lost lock is a no-op and must not touch the new holder's.
	if err := h.Release(context.Background()); err != nil {
		t.Fatalf("Release after loss: %v", err)
	}
	f.do(func(tb *Table, _ uint64) {
		if l, ok := tb.Get("acme/site"); !ok || l != other {
			t.Fatalf("other lock disturbed: %+v", l)
		}
	})
}

func Test_Client_LostOnNotHeld(t *testing.T) {
	t.Parallel()
	f := newFake()
	c := NewClient(f, testConfig(), nil)
	h, err := c.Acquire(context.Background(), "acme/site", "node1/push-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	f.do(func(tb *Table, _ uint64) { tb.Delete("acme/site") })
	waitClosed(t, "Lost", h.Lost())
	if err := h.Err(); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("Err = %v, want ErrNotHeld", err)
	}
	if err := h.Release(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func Test_Client_LostWhenRenewalsKeepFailing(t *testing.T) {
	t.Parallel()
	f := newFake()
	noLeader := errors.New("no leader")
	c := NewClient(f, testConfig(), nil)
	start := time.Now()
	h, err := c.Acquire(context.Background(), "acme/site", "node1/push-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	f.set(func() { f.renewErr = noLeader })
	waitClosed(t, "Lost", h.Lost())
	if el := time.Since(start); el < testLease {
		t.Fatalf("lost after %v, before the lease (%v) ran out", el, testLease)
	}
	err = h.Err()
	if !errors.Is(err, ErrLeaseExpired) || !errors.Is(err, noLeader) {
		t.Fatalf("Err = %v, want ErrLeaseExpired and the last renewal error", err)
	}
	if _, renews, _ := f.counts(); renews < 2 {
		t.Fatalf("only %d renewal attempts; failed renewals should be retried", renews)
	}
	// Release still tries (the lock may be there, expired) and succeeds.
	f.set(func() { f.renewErr = nil })
	if err := h.Release(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, _, rel := f.counts(); rel != 1 {
		t.Fatalf("%d releases, want 1", rel)
	}
}

func Test_Client_TransientRenewFailureRecovers(t *testing.T) {
	t.Parallel()
	f := newFake()
	c := NewClient(f, testConfig(), nil)
	h, err := c.Acquire(context.Background(), "acme/site", "node1/push-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Release(context.Background())
	f.set(func() { f.renewErr = errors.New("no leader") })
	waitFor(t, "a failed renewal", func() bool { _, r, _ := f.counts(); return r >= 1 })
	f.set(func() { f.renewErr = nil })
	time.Sleep(2 * testLease)
	if isClosed(h.Lost()) {
		t.Fatalf("lost after recovery: %v", h.Err())
	}
	f.do(func(tb *Table, _ uint64) {
		if err := tb.Check("acme/site", h.Token(), time.Now()); err != nil {
			t.Fatal(err)
		}
	})
}

func Test_Client_ReleaseIdempotent(t *testing.T) {
	t.Parallel()
	f := newFake()
	c := NewClient(f, testConfig(), nil)
	h, err := c.Acquire(context.Background(), "acme/site", "node1/push-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := h.Release(context.Background()); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if err := h.Release(context.Background()); err != nil {
		t.Fatal(err)
	}
	_, renews, releases := f.counts()
	if releases != 1 {
		t.Fatalf("%d releases, want 1", releases)
	}
	f.do(func(tb *Table, _ uint64) {
		if tb.Len() != 0 {
			t.Fatalf("lock still there: %+v", tb.List())
		}
	})
	// Renewal has stopped.
	time.Sleep(testLease / 2)
	if _, r, _ := f.counts(); r != renews {
		t.Fatalf("renewals continued after Release: %d -> %d", renews, r)
	}
	if isClosed(h.Lost()) || h.Err() != nil {
		t.Fatal("Release reported as loss")
	}
}

func Test_Client_ReleaseReportsError(t *testing.T) {
	t.Parallel()
	f := newFake()
	c := NewClient(f, testConfig(), nil)
	h, err := c.Acquire(context.Background(), "acme/site", "node1/push-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := h.Release(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v", err)
	}
	// Same result again, no second attempt.
	if err := h.Release(context.Background()); !errors.Is(err, context.Canceled) {
		t.Fatalf("second err = %v", err)
	}
}

// A lock the cluster released itself (with the write it fenced) is
// neither renewed nor released again, and is not reported lost.
func Test_Client_MarkReleased(t *testing.T) {
	t.Parallel()
	f := newFake()
	c := NewClient(f, testConfig(), nil)
	h, err := c.Acquire(context.Background(), "acme/site", "node1/push-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	tok := h.Token()
	f.do(func(tb *Table, _ uint64) {
		if _, err := tb.Release("acme/site", tok); err != nil {
			t.Fatal(err)
		}
	})
	h.MarkReleased()
	_, renews, _ := f.counts()
	time.Sleep(3 * testLease)
	if err := h.Release(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, after, releases := f.counts(); after != renews || releases != 0 {
		t.Fatalf("after MarkReleased: %d more renewals, %d releases; want none", after-renews, releases)
	}
	if isClosed(h.Lost()) {
		t.Fatalf("a lock released by the cluster was reported lost: %v", h.Err())
	}
}
