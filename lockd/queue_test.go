package lockd

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"testing"
	"time"
)

const waitLease = 3 * time.Second

func queued(repo, holder, node, inc string) Request {
	return Request{Repo: repo, Holder: holder, Node: node, Incarnation: inc, Lease: lease, WaitLease: waitLease}
}

// Waiters are served in the order they first asked, whoever asks first
// once the lock is free: a later waiter that asks before the first one is
// refused, naming the one ahead.
func Test_Table_WaitersServedInOrderOfArrival(t *testing.T) {
	tb := NewTable()
	now := t0
	index := uint64(10)
	acquire := func(holder string) (WriteLock, error) {
		now = now.Add(10 * time.Millisecond)
		index++
		return tb.AcquireFor(queued("acme/site", holder, "n1", "i1"), now, index)
	}
	if _, err := acquire("n1/a"); err != nil {
		t.Fatal(err)
	}
	for _, h := range []string{"n1/b", "n1/c", "n1/d", "n1/c"} { // c asks twice: keeps its place
		if _, err := acquire(h); !errors.Is(err, ErrLockHeld) {
			t.Fatalf("%s: %v, want ErrLockHeld", h, err)
		}
	}
	q := tb.Queues()
	if len(q) != 1 || len(q[0].Waiters) != 3 || q[0].Waiters[0].Holder != "n1/b" || q[0].Waiters[1].Holder != "n1/c" || q[0].Waiters[2].Holder != "n1/d" {
		t.Fatalf("queue %+v, want b, c, d", q)
	}
	var order []string
	cur, _ := tb.Get("acme/site")
	for range 3 {
		if _, err := tb.Release("acme/site", cur.Token); err != nil {
			t.Fatal(err)
		}
		// The last in the queue asks first, then the others: only the
		// first in the queue gets the lock.
		ws := tb.Queues()[0].Waiters
		for i := len(ws) - 1; i >= 0; i-- {
			l, err := acquire(ws[i].Holder)
			if i > 0 {
				var he *HeldError
				if !errors.As(err, &he) || he.Lock.Holder != ws[0].Holder || !he.Queued {
					t.Fatalf("%s asked while %s is first: %v", ws[i].Holder, ws[0].Holder, err)
				}
				continue
			}
			if err != nil {
				t.Fatalf("%s, first in the queue: %v", ws[i].Holder, err)
			}
			order = append(order, l.Holder)
			cur = l
		}
	}
	if want := []string{"n1/b", "n1/c", "n1/d"}; !reflect.DeepEqual(order, want) {
		t.Fatalf("served %v, want %v", order, want)
	}
	if len(tb.Queues()) != 0 {
		t.Fatalf("queue left: %+v", tb.Queues())
	}
}

// A waiter that stops asking loses its place once its wait lease runs out;
// one that keeps asking keeps it.
func Test_Table_VanishedWaiterIsDropped(t *testing.T) {
	tb := NewTable()
	if _, err := tb.AcquireFor(queued("r", "n1/a", "n1", "i"), t0, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := tb.AcquireFor(queued("r", "n2/gone", "n2", "i"), t0.Add(time.Second), 2); !errors.Is(err, ErrLockHeld) {
		t.Fatal(err)
	}
	if _, err := tb.AcquireFor(queued("r", "n3/alive", "n3", "i"), t0.Add(2*time.Second), 3); !errors.Is(err, ErrLockHeld) {
		t.Fatal(err)
	}
	// alive asks again, renewing its wait; gone never does.
	if _, err := tb.AcquireFor(queued("r", "n3/alive", "n3", "i"), t0.Add(3*time.Second), 4); !errors.Is(err, ErrLockHeld) {
		t.Fatal(err)
	}
	if _, err := tb.Release("r", 1); err != nil {
		t.Fatal(err)
	}
	// Before gone's wait runs out, alive must still wait for it.
	if _, err := tb.AcquireFor(queued("r", "n3/alive", "n3", "i"), t0.Add(time.Second+waitLease/2), 5); !errors.Is(err, ErrLockHeld) {
		t.Fatalf("alive took the lock from a waiter that still had its turn: %v", err)
	}
	l, err := tb.AcquireFor(queued("r", "n3/alive", "n3", "i"), t0.Add(time.Second+waitLease), 6)
	if err != nil || l.Holder != "n3/alive" {
		t.Fatalf("after gone's wait ran out: %+v, %v", l, err)
	}
}

// Requests without a wait lease (entries written before the queue) ignore
// it, exactly as before: replaying an old log gives the same table.
func Test_Table_NoQueueWithoutWaitLease(t *testing.T) {
	tb := NewTable()
	if _, err := tb.AcquireFor(queued("r", "n1/a", "n1", "i"), t0, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := tb.AcquireFor(queued("r", "n2/b", "n2", "i"), t0, 2); !errors.Is(err, ErrLockHeld) {
		t.Fatal(err)
	}
	if _, err := tb.Release("r", 1); err != nil {
		t.Fatal(err)
	}
	l, err := tb.Acquire("r", "old/c", t0, lease, 3)
	if err != nil || l.Holder != "old/c" || l.Node != "" {
		t.Fatalf("an acquire without a wait lease: %+v, %v; want granted as before", l, err)
	}
}

// A node that starts under a new incarnation frees what its earlier life
// held, and drops its earlier waits; its new locks, other nodes' locks, and
// locks whose request named no node stay. The old holder's token is
// refused afterwards.
func Test_Table_FreeNodeByIncarnation(t *testing.T) {
	tb := NewTable()
	mk := func(repo, holder, node, inc string, index uint64) {
		t.Helper()
		if _, err := tb.AcquireFor(queued(repo, holder, node, inc), t0, index); err != nil {
			t.Fatal(err)
		}
	}
	mk("a", "n1/p1", "n1", "old", 1)
	mk("b", "n1/p2", "n1", "new", 2)
	mk("c", "n2/p3", "n2", "x", 3)
	if _, err := tb.Acquire("d", "n1/p4", t0, lease, 4); err != nil { // no node: an old entry
		t.Fatal(err)
	}
	if _, err := tb.AcquireFor(queued("c", "n1/w", "n1", "old"), t0, 5); !errors.Is(err, ErrLockHeld) {
		t.Fatal(err)
	}
	freed := tb.FreeNode("n1", "new", 0)
	if len(freed) != 1 || freed[0].Repo != "a" || freed[0].Token != 1 {
		t.Fatalf("freed %+v, want the lock on a", freed)
	}
	for _, repo := range []string{"b", "c", "d"} {
		if _, ok := tb.Get(repo); !ok {
			t.Errorf("lock on %s was freed", repo)
		}
	}
	if len(tb.Queues()) != 0 {
		t.Fatalf("the old incarnation's wait stayed: %+v", tb.Queues())
	}
	// The old holder's writes fail: at once, and after another took the lock.
	if err := tb.Check("a", 1, t0); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("Check after free: %v", err)
	}
	if _, err := tb.AcquireFor(queued("a", "n3/next", "n3", "y"), t0.Add(time.Millisecond), 6); err != nil {
		t.Fatal(err)
	}
	for name, err := range map[string]error{
		"check":   tb.Check("a", 1, t0.Add(time.Second)),
		"renew":   second(tb.Renew("a", 1, t0.Add(time.Second), lease)),
		"release": second(tb.Release("a", 1)),
	} {
		if !errors.Is(err, ErrStaleToken) {
			t.Errorf("%s with the freed token: %v, want ErrStaleToken", name, err)
		}
	}
}

// The leader frees a silent node's locks up to the tokens it saw: a lock
// the node is granted after that stays.
func Test_Table_FreeNodeUpToToken(t *testing.T) {
	tb := NewTable()
	for i, repo := range []string{"a", "b"} {
		if _, err := tb.AcquireFor(queued(repo, "n1/p", "n1", "i"), t0, uint64(10*(i+1))); err != nil {
			t.Fatal(err)
		}
	}
	freed := tb.FreeNode("n1", "", 15)
	if len(freed) != 1 || freed[0].Repo != "a" {
		t.Fatalf("freed %+v, want a only", freed)
	}
	if _, ok := tb.Get("b"); !ok {
		t.Fatal("a lock granted after the leader looked was freed")
	}
	if got := tb.FreeNode("", "", 0); got != nil {
		t.Fatalf("FreeNode of no node freed %+v", got)
	}
}

// Queues survive a snapshot (Restore) and two tables fed the same requests
// agree.
func Test_Table_RestoreQueues(t *testing.T) {
	tb := NewTable()
	if _, err := tb.AcquireFor(queued("r", "n1/a", "n1", "i"), t0, 1); err != nil {
		t.Fatal(err)
	}
	for i, h := range []string{"n2/b", "n3/c"} {
		tb.AcquireFor(queued("r", h, h[:2], "i"), t0.Add(time.Duration(i+1)*time.Second), uint64(i+2))
	}
	rt := Restore(tb.List(), tb.Queues()...)
	if !reflect.DeepEqual(rt.Queues(), tb.Queues()) || !reflect.DeepEqual(rt.List(), tb.List()) {
		t.Fatalf("restored %+v %+v, want %+v %+v", rt.List(), rt.Queues(), tb.List(), tb.Queues())
	}
	tb.Delete("r")
	if len(tb.Queues()) != 0 {
		t.Fatal("Delete left the queue")
	}
}

func second[T any](_ T, err error) error { return err }

// unavailableLocker fails with ErrUnavailable a few times (a leader
// change), then works.
type unavailableLocker struct {
	*fakeLocker
	mu    sync.Mutex
	fails int
}

func (u *unavailableLocker) AcquireLock(ctx context.Context, repo, holder string, lease time.Duration) (WriteLock, error) {
	u.mu.Lock()
	if u.fails > 0 {
		u.fails--
		u.mu.Unlock()
		return WriteLock{}, fmt.Errorf("forward to leader: %w", ErrUnavailable)
	}
	u.mu.Unlock()
	return u.fakeLocker.AcquireLock(ctx, repo, holder, lease)
}

// Acquire tries again across a leader change instead of failing at once,
// and gives up with its context.
func Test_Client_AcquireRetriesUnavailable(t *testing.T) {
	t.Parallel()
	u := &unavailableLocker{fakeLocker: newFake(), fails: 3}
	c := NewClient(u, testConfig(), nil)
	h, err := c.Acquire(context.Background(), "acme/site", "node1/push-1", nil)
	if err != nil {
		t.Fatalf("Acquire: %v", err)
	}
	h.Release(context.Background())

	u.fails = 1 << 30
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := c.Acquire(ctx, "acme/site", "node1/push-2", nil); !errors.Is(err, context.DeadlineExceeded) || !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Acquire with no leader until ctx ends: %v", err)
	}
}

// watchingLocker is a fakeLocker that is also a Watcher: a release wakes
// the waiters.
type watchingLocker struct {
	*fakeLocker
	wmu sync.Mutex
	ch  chan struct{}
}

func (w *watchingLocker) LockChanged(string) <-chan struct{} {
	w.wmu.Lock()
	defer w.wmu.Unlock()
	if w.ch == nil {
		w.ch = make(chan struct{})
	}
	return w.ch
}

func (w *watchingLocker) ReleaseLock(ctx context.Context, repo string, token uint64) error {
	err := w.fakeLocker.ReleaseLock(ctx, repo, token)
	w.wmu.Lock()
	if w.ch != nil {
		close(w.ch)
		w.ch = nil
	}
	w.wmu.Unlock()
	return err
}

// A waiter whose Locker is a Watcher asks again as soon as the lock is
// released, not at its next retry (here a minute away).
func Test_Client_WatcherWakesWaiter(t *testing.T) {
	t.Parallel()
	w := &watchingLocker{fakeLocker: newFake()}
	c := NewClient(w, ClientConfig{Lease: time.Minute, RetryMin: time.Minute, RetryMax: time.Minute}, nil)
	first, err := c.Acquire(context.Background(), "r", "n1/a", nil)
	if err != nil {
		t.Fatal(err)
	}
	waiting := make(chan struct{})
	got := make(chan error, 1)
	go func() {
		h, err := c.Acquire(context.Background(), "r", "n2/b", func(WriteLock) { close(waiting) })
		if err == nil {
			h.Release(context.Background())
		}
		got <- err
	}()
	<-waiting
	if err := first.Release(context.Background()); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the waiter was not woken by the release (it would retry only after a minute)")
	}
}

// A waiter that gives up leaves the queue at once: the next one is first.
func Test_Table_Leave(t *testing.T) {
	tb := NewTable()
	tb.AcquireFor(queued("r", "n1/a", "n1", "i"), t0, 1)
	tb.AcquireFor(queued("r", "n2/b", "n2", "i"), t0, 2)
	tb.AcquireFor(queued("r", "n3/c", "n3", "i"), t0, 3)
	if !tb.Leave("r", "n2/b") || tb.Leave("r", "n2/b") || tb.Leave("other", "n2/b") {
		t.Fatal("Leave reported wrongly whether the waiter had a place")
	}
	tb.Release("r", 1)
	if l, err := tb.AcquireFor(queued("r", "n3/c", "n3", "i"), t0, 4); err != nil || l.Holder != "n3/c" {
		t.Fatalf("after b left, c: %+v, %v", l, err)
	}
}

// leavingLocker records the places given up.
type leavingLocker struct {
	*fakeLocker
	mu   sync.Mutex
	left []string
}

func (l *leavingLocker) LeaveQueue(_ context.Context, repo, holder string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.left = append(l.left, repo+" "+holder)
	return nil
}

// Acquire gives up its place when its context ends while it waits, and
// not when it never waited.
func Test_Client_LeavesQueueWhenGivingUp(t *testing.T) {
	t.Parallel()
	l := &leavingLocker{fakeLocker: newFake()}
	c := NewClient(l, testConfig(), nil)
	h, err := c.Acquire(context.Background(), "r", "n1/a", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Release(context.Background())
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := c.Acquire(ctx, "r", "n2/b", nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Acquire: %v", err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.left) != 1 || l.left[0] != "r n2/b" {
		t.Fatalf("left %q, want [r n2/b]", l.left)
	}
}
