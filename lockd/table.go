package lockd

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// WriteLock is one granted write lock.
type WriteLock struct {
	Repo       string
	Holder     string
	Token      uint64    // fencing token: Raft index of the entry that granted it
	AcquiredAt time.Time // leader time of the grant
	ExpiresAt  time.Time // leader time at which the lease runs out
	// Node and Incarnation say which node process holds the lock, when the
	// request said so ("" otherwise): FreeNode frees it when that process
	// is gone.
	Node        string
	Incarnation string
}

// Waiter is a writer queued for a repository's lock (Request.WaitLease).
type Waiter struct {
	Holder      string
	Node        string
	Incarnation string
	Since       time.Time // leader time it first asked
	ExpiresAt   time.Time // dropped at this leader time unless it asks again
}

// Queue is one repository's waiters, first first.
type Queue struct {
	Repo    string
	Waiters []Waiter
}

// Request is one acquire.
type Request struct {
	Repo, Holder      string
	Node, Incarnation string // who asks (see WriteLock); may be empty
	Lease             time.Duration
	// WaitLease, when positive, queues the holder (first come, first
	// served) while the lock is held or promised to an earlier waiter,
	// for this long; asking again renews the wait. 0: no queue, the lock
	// goes to whoever asks first once it is free (and the queue is not
	// looked at).
	WaitLease time.Duration
}

// Expired reports whether the lease has run out at now (now is at or after
// ExpiresAt).
func (l WriteLock) Expired(now time.Time) bool {
	return !now.Before(l.ExpiresAt)
}

var (
	// ErrLockHeld means another, unexpired lock exists on the repository.
	// Errors returned by Acquire wrap it in a *HeldError.
	ErrLockHeld = errors.New("write lock held")
	// ErrNotHeld means there is no lock on the repository.
	ErrNotHeld = errors.New("write lock not held")
	// ErrStaleToken means the repository is locked under another token.
	ErrStaleToken = errors.New("stale fencing token")
	// ErrLeaseExpired means the lock's lease ran out.
	ErrLeaseExpired = errors.New("write lock lease expired")
	// ErrBadLease means a lease duration was not positive.
	ErrBadLease = errors.New("invalid lease")
	// ErrInvalid means a request had an empty repo or holder, or a zero
	// fencing token index.
	ErrInvalid = errors.New("invalid write lock request")
	// ErrUnavailable is wrapped by a Locker's errors that say the cluster
	// could not answer now (no leader, a leader change): Client.Acquire
	// tries again within its context.
	ErrUnavailable = errors.New("lock service unavailable")
)

// HeldError is returned (wrapping ErrLockHeld) when a repository already has
// an unexpired lock. It carries that lock so callers can say who holds it and
// until when. When the lock is free but promised to an earlier waiter, Lock
// names that waiter (Token 0) and Queued is set.
type HeldError struct {
	Lock   WriteLock
	Queued bool
}

func (e *HeldError) Error() string {
	if e.Queued && e.Lock.Token == 0 {
		return fmt.Sprintf("write lock on %q is next for %q, who asked first", e.Lock.Repo, e.Lock.Holder)
	}
	return fmt.Sprintf("write lock on %q held by %q (token %d) until %s",
		e.Lock.Repo, e.Lock.Holder, e.Lock.Token, e.Lock.ExpiresAt.UTC().Format(time.RFC3339))
}

// Unwrap returns ErrLockHeld.
func (e *HeldError) Unwrap() error { return ErrLockHeld }

// Table is the deterministic write lock table embedded in the Raft state
// machine, one lock at most per repository.
//
// The table never reads the local clock: every time is passed in by the
// caller and must come from the log entry being applied (the leader's clock),
// so that all replicas reach the same state. Monotonic clock readings are
// stripped from stored times.
//
// A Table is not safe for concurrent use; the state machine serialises
// access. The zero Table is empty and ready to use.
type Table struct {
	locks  map[string]WriteLock
	queues map[string][]Waiter // only repos with waiters
}

// NewTable returns an empty table.
func NewTable() *Table {
	return &Table{locks: make(map[string]WriteLock), queues: make(map[string][]Waiter)}
}

// Restore builds a table from a list of locks and queues, e.g. from a
// snapshot. If a repository appears more than once, the last entry wins.
func Restore(locks []WriteLock, queues ...Queue) *Table {
	t := &Table{locks: make(map[string]WriteLock, len(locks)), queues: make(map[string][]Waiter, len(queues))}
	for _, l := range locks {
		l.AcquiredAt = l.AcquiredAt.Round(0)
		l.ExpiresAt = l.ExpiresAt.Round(0)
		t.locks[l.Repo] = l
	}
	for _, q := range queues {
		ws := make([]Waiter, 0, len(q.Waiters))
		for _, w := range q.Waiters {
			w.Since, w.ExpiresAt = w.Since.Round(0), w.ExpiresAt.Round(0)
			ws = append(ws, w)
		}
		if len(ws) > 0 {
			t.queues[q.Repo] = ws
		}
	}
	return t
}

// Acquire grants the lock on repo to holder, with fencing token index, if
// repo has no lock or its lock has expired at now. lease must be positive
// (else ErrBadLease); repo and holder must not be empty and index must be
// positive (else ErrInvalid). If an unexpired lock exists, even one with the
// same holder, Acquire returns a *HeldError carrying it. It does not look
// at the queue (see AcquireFor).
func (t *Table) Acquire(repo, holder string, now time.Time, lease time.Duration, index uint64) (WriteLock, error) {
	return t.AcquireFor(Request{Repo: repo, Holder: holder, Lease: lease}, now, index)
}

// AcquireFor is Acquire for a Request. With WaitLease set, waiters are
// served in order of arrival: expired waits are dropped first; then, if the
// lock is held, or free while an earlier waiter is queued, the holder is
// queued (or its wait renewed) and a *HeldError says who is in the way;
// else the lock is granted and the holder leaves the queue.
func (t *Table) AcquireFor(req Request, now time.Time, index uint64) (WriteLock, error) {
	repo, holder, lease := req.Repo, req.Holder, req.Lease
	switch {
	case repo == "":
		return WriteLock{}, fmt.Errorf("acquire: empty repo: %w", ErrInvalid)
	case holder == "":
		return WriteLock{}, fmt.Errorf("acquire %q: empty holder: %w", repo, ErrInvalid)
	case index == 0:
		return WriteLock{}, fmt.Errorf("acquire %q: zero token: %w", repo, ErrInvalid)
	case lease <= 0:
		return WriteLock{}, fmt.Errorf("acquire %q: lease %v: %w", repo, lease, ErrBadLease)
	}
	now = now.Round(0)
	cur, held := t.locks[repo]
	held = held && !cur.Expired(now)
	if req.WaitLease > 0 {
		q := t.dropExpiredWaiters(repo, now)
		var ahead *Waiter
		if len(q) > 0 && q[0].Holder != holder {
			ahead = &q[0]
		}
		if held || ahead != nil {
			t.enqueue(req, now)
			if held {
				return WriteLock{}, &HeldError{Lock: cur, Queued: true}
			}
			return WriteLock{}, &HeldError{Lock: WriteLock{Repo: repo, Holder: ahead.Holder, Node: ahead.Node, Incarnation: ahead.Incarnation}, Queued: true}
		}
		t.dequeue(repo, holder)
	} else if held {
		return WriteLock{}, &HeldError{Lock: cur}
	}
	l := WriteLock{
		Repo:        repo,
		Holder:      holder,
		Token:       index,
		AcquiredAt:  now,
		ExpiresAt:   now.Add(lease),
		Node:        req.Node,
		Incarnation: req.Incarnation,
	}
	if t.locks == nil {
		t.locks = make(map[string]WriteLock)
	}
	t.locks[repo] = l
	return l, nil
}

// dropExpiredWaiters removes the waits on repo that ran out at now and
// returns the queue left.
func (t *Table) dropExpiredWaiters(repo string, now time.Time) []Waiter {
	q := slices.DeleteFunc(t.queues[repo], func(w Waiter) bool { return !now.Before(w.ExpiresAt) })
	t.setQueue(repo, q)
	return q
}

// enqueue appends req's holder to repo's queue, or renews its wait.
func (t *Table) enqueue(req Request, now time.Time) {
	q := t.queues[req.Repo]
	for i := range q {
		if q[i].Holder == req.Holder {
			q[i].ExpiresAt = now.Add(req.WaitLease)
			return
		}
	}
	if t.queues == nil {
		t.queues = make(map[string][]Waiter)
	}
	t.queues[req.Repo] = append(q, Waiter{
		Holder: req.Holder, Node: req.Node, Incarnation: req.Incarnation,
		Since: now, ExpiresAt: now.Add(req.WaitLease),
	})
}

// Leave removes holder's place in repo's queue, if it has one, and reports
// whether it had.
func (t *Table) Leave(repo, holder string) bool {
	n := len(t.queues[repo])
	t.dequeue(repo, holder)
	return len(t.queues[repo]) < n
}

func (t *Table) dequeue(repo, holder string) {
	t.setQueue(repo, slices.DeleteFunc(t.queues[repo], func(w Waiter) bool { return w.Holder == holder }))
}

func (t *Table) setQueue(repo string, q []Waiter) {
	if len(q) == 0 {
		delete(t.queues, repo)
		return
	}
	t.queues[repo] = q
}

// FreeNode frees the locks that node holds and drops its waits, returning
// the freed locks sorted by repo. With keep set, what node holds under the
// incarnation keep stays (node restarted as keep: the rest is its earlier
// life's); with upTo set, only locks with a token up to upTo are freed
// (locks granted later stay). Locks and waits without a node (requests
// that did not say) are never freed here.
func (t *Table) FreeNode(node, keep string, upTo uint64) []WriteLock {
	if node == "" {
		return nil
	}
	gone := func(n, inc string) bool { return n == node && (keep == "" || inc != keep) }
	var out []WriteLock
	for repo, l := range t.locks {
		if gone(l.Node, l.Incarnation) && (upTo == 0 || l.Token <= upTo) {
			out = append(out, l)
			delete(t.locks, repo)
		}
	}
	for repo, q := range t.queues {
		t.setQueue(repo, slices.DeleteFunc(q, func(w Waiter) bool { return gone(w.Node, w.Incarnation) }))
	}
	sortLocks(out)
	return out
}

// Queues lists the queues with waiters, sorted by repo; the waiters are
// copies.
func (t *Table) Queues() []Queue {
	out := make([]Queue, 0, len(t.queues))
	for repo, q := range t.queues {
		out = append(out, Queue{Repo: repo, Waiters: slices.Clone(q)})
	}
	slices.SortFunc(out, func(a, b Queue) int { return strings.Compare(a.Repo, b.Repo) })
	return out
}

// NodeLocks lists the locks node holds, sorted by repo.
func (t *Table) NodeLocks(node string) []WriteLock {
	var out []WriteLock
	for _, l := range t.locks {
		if node != "" && l.Node == node {
			out = append(out, l)
		}
	}
	sortLocks(out)
	return out
}

// Renew extends the lease of the lock on repo with this token to now+lease.
// It fails with ErrBadLease if lease is not positive, ErrNotHeld if repo has
// no lock, ErrStaleToken if the lock has another token, and ErrLeaseExpired
// if the lock has expired at now; in that last case the lock is removed.
func (t *Table) Renew(repo string, token uint64, now time.Time, lease time.Duration) (WriteLock, error) {
	if lease <= 0 {
		return WriteLock{}, fmt.Errorf("renew %q token %d: lease %v: %w", repo, token, lease, ErrBadLease)
	}
	now = now.Round(0)
	cur, err := t.lookup("renew", repo, token)
	if err != nil {
		return WriteLock{}, err
	}
	if cur.Expired(now) {
		delete(t.locks, repo)
		return WriteLock{}, fmt.Errorf("renew %q token %d: expired at %s: %w",
			repo, token, cur.ExpiresAt.UTC().Format(time.RFC3339Nano), ErrLeaseExpired)
	}
	cur.ExpiresAt = now.Add(lease)
	t.locks[repo] = cur
	return cur, nil
}

// Release frees the lock on repo if it has this token, and returns it. It
// fails with ErrNotHeld if repo has no lock and ErrStaleToken if the lock has
// another token. Releasing an expired lock with the right token succeeds.
func (t *Table) Release(repo string, token uint64) (WriteLock, error) {
	cur, err := t.lookup("release", repo, token)
	if err != nil {
		return WriteLock{}, err
	}
	delete(t.locks, repo)
	return cur, nil
}

// ForceRelease removes whatever lock is on repo (an operator action) and
// returns it. It fails with ErrNotHeld if repo has no lock.
func (t *Table) ForceRelease(repo string) (WriteLock, error) {
	cur, ok := t.locks[repo]
	if !ok {
		return WriteLock{}, fmt.Errorf("force release %q: %w", repo, ErrNotHeld)
	}
	delete(t.locks, repo)
	return cur, nil
}

// Check reports whether token is the current, unexpired fencing token for
// repo at now. It returns nil, or an error wrapping ErrNotHeld,
// ErrStaleToken or ErrLeaseExpired. It does not modify the table.
func (t *Table) Check(repo string, token uint64, now time.Time) error {
	cur, err := t.lookup("check", repo, token)
	if err != nil {
		return err
	}
	if cur.Expired(now.Round(0)) {
		return fmt.Errorf("check %q token %d: expired at %s: %w",
			repo, token, cur.ExpiresAt.UTC().Format(time.RFC3339Nano), ErrLeaseExpired)
	}
	return nil
}

// lookup returns the lock on repo if it has token.
func (t *Table) lookup(op, repo string, token uint64) (WriteLock, error) {
	cur, ok := t.locks[repo]
	if !ok {
		return WriteLock{}, fmt.Errorf("%s %q token %d: %w", op, repo, token, ErrNotHeld)
	}
	if cur.Token != token {
		return WriteLock{}, fmt.Errorf("%s %q token %d: current token is %d: %w", op, repo, token, cur.Token, ErrStaleToken)
	}
	return cur, nil
}

// Expired lists the locks expired at now, sorted by repo, without removing
// them. The leader uses it to decide whether to propose an expiry entry.
func (t *Table) Expired(now time.Time) []WriteLock {
	now = now.Round(0)
	var out []WriteLock
	for _, l := range t.locks {
		if l.Expired(now) {
			out = append(out, l)
		}
	}
	sortLocks(out)
	return out
}

// Expire removes and returns, sorted by repo, every lock expired at now.
func (t *Table) Expire(now time.Time) []WriteLock {
	out := t.Expired(now)
	for _, l := range out {
		delete(t.locks, l.Repo)
	}
	return out
}

// Get returns the lock on repo, expired or not.
func (t *Table) Get(repo string) (WriteLock, bool) {
	l, ok := t.locks[repo]
	return l, ok
}

// Delete drops the lock on repo and its waiters, if any (used when a
// repository is deleted).
func (t *Table) Delete(repo string) {
	delete(t.locks, repo)
	delete(t.queues, repo)
}

// List returns every lock, expired or not, sorted by repo.
func (t *Table) List() []WriteLock {
	out := make([]WriteLock, 0, len(t.locks))
	for _, l := range t.locks {
		out = append(out, l)
	}
	sortLocks(out)
	return out
}

// Len returns the number of locks, expired or not.
func (t *Table) Len() int { return len(t.locks) }

func sortLocks(ls []WriteLock) {
	slices.SortFunc(ls, func(a, b WriteLock) int { return strings.Compare(a.Repo, b.Repo) })
}
