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
)

// HeldError is returned (wrapping ErrLockHeld) when a repository already has
// an unexpired lock. It carries that lock so callers can say who holds it and
// until when.
type HeldError struct {
	Lock WriteLock
}

func (e *HeldError) Error() string {
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
	locks map[string]WriteLock
}

// NewTable returns an empty table.
func NewTable() *Table {
	return &Table{locks: make(map[string]WriteLock)}
}

// Restore builds a table from a list of locks, e.g. from a snapshot. If a
// repository appears more than once, the last entry wins.
func Restore(locks []WriteLock) *Table {
	t := &Table{locks: make(map[string]WriteLock, len(locks))}
	for _, l := range locks {
		l.AcquiredAt = l.AcquiredAt.Round(0)
		l.ExpiresAt = l.ExpiresAt.Round(0)
		t.locks[l.Repo] = l
	}
	return t
}

// Acquire grants the lock on repo to holder, with fencing token index, if
// repo has no lock or its lock has expired at now. lease must be positive
// (else ErrBadLease); repo and holder must not be empty and index must be
// positive (else ErrInvalid). If an unexpired lock exists, even one with the
// same holder, Acquire returns a *HeldError carrying it.
func (t *Table) Acquire(repo, holder string, now time.Time, lease time.Duration, index uint64) (WriteLock, error) {
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
	if cur, ok := t.locks[repo]; ok && !cur.Expired(now) {
		return WriteLock{}, &HeldError{Lock: cur}
	}
	l := WriteLock{
		Repo:       repo,
		Holder:     holder,
		Token:      index,
		AcquiredAt: now,
		ExpiresAt:  now.Add(lease),
	}
	if t.locks == nil {
		t.locks = make(map[string]WriteLock)
	}
	t.locks[repo] = l
	return l, nil
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

// Delete drops the lock on repo, if any (used when a repository is deleted).
func (t *Table) Delete(repo string) {
	delete(t.locks, repo)
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
