package lockd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"
)

// Locker is what the client needs from the cluster: lock operations proposed
// through Raft. It is declared here and implemented by package cluster.
//
// AcquireLock must return an error wrapping ErrLockHeld (ideally a
// *HeldError) when another lock is held; RenewLock and ReleaseLock should
// return errors wrapping ErrNotHeld, ErrStaleToken or ErrLeaseExpired as
// [Table] does, so the client can tell a lost lock from a transient failure.
type Locker interface {
	AcquireLock(ctx context.Context, repo, holder string, lease time.Duration) (WriteLock, error)
	RenewLock(ctx context.Context, repo string, token uint64, lease time.Duration) (WriteLock, error)
	ReleaseLock(ctx context.Context, repo string, token uint64) error
}

// Watcher may be implemented by a Locker: LockChanged returns a channel
// that is closed the next time repo's lock may have become free (released,
// expired, freed) as this node sees it. A waiting Acquire then asks again
// at once instead of at its next retry.
type Watcher interface {
	LockChanged(repo string) <-chan struct{}
}

// Leaver may be implemented by a Locker: LeaveQueue gives up holder's
// place in repo's queue of waiters. Acquire calls it when its context ends
// while it waits, so that the writers behind it need not wait for the
// place to lapse.
type Leaver interface {
	LeaveQueue(ctx context.Context, repo, holder string) error
}

// ClientConfig configures a Client. Zero fields take their defaults.
type ClientConfig struct {
	// Lease is the lease requested on acquire and on every renewal.
	// Default 15s.
	Lease time.Duration
	// RenewEvery is the interval between renewals. Default Lease/3; values
	// not below Lease are replaced by the default.
	RenewEvery time.Duration
	// RetryMin and RetryMax bound the jittered exponential backoff used
	// while the lock is held by someone else, and between failed renewals.
	// Defaults 50ms and 1s.
	RetryMin, RetryMax time.Duration
}

// Defaults for ClientConfig.
const (
	DefaultLease    = 15 * time.Second
	DefaultRetryMin = 50 * time.Millisecond
	DefaultRetryMax = time.Second
)

func (cfg ClientConfig) withDefaults() ClientConfig {
	if cfg.Lease <= 0 {
		cfg.Lease = DefaultLease
	}
	if cfg.RenewEvery <= 0 || cfg.RenewEvery >= cfg.Lease {
		cfg.RenewEvery = cfg.Lease / 3
	}
	if cfg.RetryMin <= 0 {
		cfg.RetryMin = DefaultRetryMin
	}
	if cfg.RetryMax <= 0 {
		cfg.RetryMax = DefaultRetryMax
	}
	if cfg.RetryMax < cfg.RetryMin {
		cfg.RetryMax = cfg.RetryMin
	}
	return cfg
}

// Client acquires and keeps write locks for a writer. It is safe for
// concurrent use.
type Client struct {
	l   Locker
	cfg ClientConfig
	log *slog.Logger
}

// NewClient returns a client proposing through l. A nil logger discards logs.
func NewClient(l Locker, cfg ClientConfig, logger *slog.Logger) *Client {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	return &Client{l: l, cfg: cfg.withDefaults(), log: logger}
}

// Acquire waits until it holds the write lock on repo for holder, or ctx
// ends. While the lock is held by someone else (errors.Is(err,
// ErrLockHeld)), or the cluster cannot answer (ErrUnavailable), it retries
// with jittered exponential backoff, and at once when a Locker that is a
// Watcher says the lock may be free; any other error is returned at once. If onWait is not nil, it is called once, the
// first time the lock is found held, with the lock that is in the way.
//
// On success a goroutine renews the lease every RenewEvery until
// [Held.Release] is called or the lock is lost. That goroutine is not tied to
// ctx (which typically bounds only the wait): the caller must call Release.
func (c *Client) Acquire(ctx context.Context, repo, holder string, onWait func(held WriteLock)) (*Held, error) {
	backoff := c.cfg.RetryMin
	var held WriteLock
	waited := false
	for {
		if err := ctx.Err(); err != nil {
			return nil, c.waitErr(repo, holder, held, waited, err)
		}
		var changed <-chan struct{} // taken before asking: no wake-up is missed
		if w, ok := c.l.(Watcher); ok {
			changed = w.LockChanged(repo)
		}
		sent := time.Now()
		lock, err := c.l.AcquireLock(ctx, repo, holder, c.cfg.Lease)
		if err == nil {
			c.log.Debug("write lock acquired", "repo", repo, "token", lock.Token)
			return c.start(ctx, lock, sent.Add(c.cfg.Lease)), nil
		}
		if errors.Is(err, ErrUnavailable) && ctx.Err() == nil {
			// A leader change: try again within ctx, keeping our turn
			// (the wait lease outlives a short election).
			c.log.Debug("write lock: cluster unavailable; trying again", "repo", repo, "err", err)
			t := time.NewTimer(jitter(backoff))
			select {
			case <-ctx.Done():
				t.Stop()
				return nil, fmt.Errorf("lockd: acquire write lock on %q: %w (last: %w)", repo, ctx.Err(), err)
			case <-t.C:
			}
			backoff = min(2*backoff, c.cfg.RetryMax)
			continue
		}
		if !errors.Is(err, ErrLockHeld) {
			if ctxErr := ctx.Err(); ctxErr != nil && waited {
				return nil, c.waitErr(repo, holder, held, waited, ctxErr)
			}
			return nil, fmt.Errorf("lockd: acquire write lock on %q: %w", repo, err)
		}
		held = WriteLock{Repo: repo}
		if he := (*HeldError)(nil); errors.As(err, &he) {
			held = he.Lock
		}
		if !waited {
			waited = true
			c.log.Info("waiting for write lock", "repo", repo, "holder", held.Holder, "token", held.Token)
			if onWait != nil {
				onWait(held)
			}
		}
		t := time.NewTimer(jitter(backoff))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, c.waitErr(repo, holder, held, waited, ctx.Err())
		case <-changed:
			t.Stop()
		case <-t.C:
		}
		backoff = min(2*backoff, c.cfg.RetryMax)
	}
}

func (c *Client) waitErr(repo, holder string, held WriteLock, waited bool, err error) error {
	if l, ok := c.l.(Leaver); ok && waited {
		// Best effort, and not bound to the ended context: if it fails,
		// the place lapses with its wait lease.
		lctx, cancel := context.WithTimeout(context.Background(), c.cfg.RetryMax)
		if lerr := l.LeaveQueue(lctx, repo, holder); lerr != nil {
			c.log.Debug("leaving the write lock queue failed; the place lapses", "repo", repo, "err", lerr)
		}
		cancel()
	}
	if waited && held.Holder != "" {
		return fmt.Errorf("lockd: waiting for write lock on %q held by %q: %w", repo, held.Holder, err)
	}
	return fmt.Errorf("lockd: acquire write lock on %q: %w", repo, err)
}

// jitter returns a random duration in [d/2, d].
func jitter(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	return d/2 + rand.N(d-d/2+1)
}

func (c *Client) start(ctx context.Context, lock WriteLock, deadline time.Time) *Held {
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	h := &Held{
		c:      c,
		lock:   lock,
		cancel: cancel,
		done:   make(chan struct{}),
		lost:   make(chan struct{}),
	}
	go h.renewLoop(rctx, deadline)
	return h
}

// Held is a write lock held by this client. Its lease is renewed in the
// background until Release is called or the lock is lost.
type Held struct {
	c      *Client
	cancel context.CancelFunc
	done   chan struct{} // closed when the renewal goroutine exits
	lost   chan struct{} // closed when the lock is lost

	mu   sync.Mutex
	lock WriteLock
	err  error // why the lock was lost
	gone bool  // the cluster said the lock is not ours any more

	releaseOnce sync.Once
	releaseErr  error
}

// Lock returns the current lock, as of the latest successful renewal.
func (h *Held) Lock() WriteLock {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.lock
}

// Token returns the fencing token to attach to writes.
func (h *Held) Token() uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.lock.Token
}

// Lost is closed when the lock is lost: a renewal failed with ErrNotHeld,
// ErrStaleToken or ErrLeaseExpired, or renewals kept failing for other
// reasons (e.g. no leader) until the lease ran out by the local clock. The
// writer must then stop writing. Release does not close Lost.
func (h *Held) Lost() <-chan struct{} { return h.lost }

// Err returns why the lock was lost, or nil if it was not.
func (h *Held) Err() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.err
}

func (h *Held) setLost(err error, gone bool) {
	h.mu.Lock()
	h.err = err
	h.gone = gone
	tok, repo := h.lock.Token, h.lock.Repo
	h.mu.Unlock()
	close(h.lost)
	h.c.log.Error("write lock lost", "repo", repo, "token", tok, "err", err)
}

// lockGone reports whether err says the lock is definitely no longer ours.
func lockGone(err error) bool {
	return errors.Is(err, ErrNotHeld) || errors.Is(err, ErrStaleToken) || errors.Is(err, ErrLeaseExpired)
}

// renewLoop renews the lease until ctx is cancelled (Release) or the lock is
// lost. deadline is the local time by which the lease surely ends: the send
// time of the last successful request plus the lease. The leader stamps the
// lease start after that send, so the real lease ends no earlier.
func (h *Held) renewLoop(ctx context.Context, deadline time.Time) {
	defer close(h.done)
	cfg := h.c.cfg
	lock := h.Lock()
	repo, token := lock.Repo, lock.Token
	log := h.c.log
	backoff := cfg.RetryMin
	var lastErr error
	t := time.NewTimer(cfg.RenewEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := time.Now()
		if !now.Before(deadline) {
			err := fmt.Errorf("lockd: write lock on %q (token %d): lease ran out while renewals failed: %w", repo, token, ErrLeaseExpired)
			if lastErr != nil {
				err = fmt.Errorf("%w: last error: %w", err, lastErr)
			}
			h.setLost(err, false)
			return
		}
		callDeadline := now.Add(cfg.RenewEvery)
		if deadline.Before(callDeadline) {
			callDeadline = deadline
		}
		callCtx, cancel := context.WithDeadline(ctx, callDeadline)
		l, err := h.c.l.RenewLock(callCtx, repo, token, cfg.Lease)
		cancel()
		if ctx.Err() != nil {
			return // released meanwhile
		}
		if err == nil {
			h.mu.Lock()
			h.lock = l
			h.mu.Unlock()
			deadline = now.Add(cfg.Lease)
			backoff = cfg.RetryMin
			lastErr = nil
			log.Debug("write lock renewed", "repo", repo, "token", token)
			t.Reset(cfg.RenewEvery)
			continue
		}
		if lockGone(err) {
			h.setLost(fmt.Errorf("lockd: write lock on %q (token %d) lost: %w", repo, token, err), true)
			return
		}
		lastErr = err
		wait := min(jitter(backoff), max(time.Until(deadline), 0))
		backoff = min(2*backoff, cfg.RetryMax)
		log.Warn("write lock renewal failed", "repo", repo, "token", token, "err", err)
		t.Reset(wait)
	}
}

// Release stops renewal and releases the lock, best effort, within ctx. It
// is safe to call more than once (also concurrently); later calls wait for
// and return the first call's result. If the lock was already lost, Release
// returns nil: when the cluster said the lock is gone it does not call the
// Locker at all, and when the lease ran out locally it still tries to free
// the (expired) lock but ignores a failure.
func (h *Held) Release(ctx context.Context) error {
	h.releaseOnce.Do(func() {
		h.cancel()
		<-h.done
		h.mu.Lock()
		repo, token, lost, gone := h.lock.Repo, h.lock.Token, h.err != nil, h.gone
		h.mu.Unlock()
		if gone {
			return
		}
		err := h.c.l.ReleaseLock(ctx, repo, token)
		switch {
		case err == nil:
			h.c.log.Debug("write lock released", "repo", repo, "token", token)
		case lost:
			h.c.log.Debug("releasing lost write lock", "repo", repo, "token", token, "err", err)
		default:
			h.releaseErr = fmt.Errorf("lockd: release write lock on %q (token %d): %w", repo, token, err)
			h.c.log.Warn("write lock release failed", "repo", repo, "token", token, "err", err)
		}
	})
	return h.releaseErr
}

// MarkReleased records that the cluster released the lock itself, in an
// entry that carried the release with the write it fenced (a push's
// UpdateRefs with release_lock): renewal stops, and Release, which may
// still be called, proposes nothing.
func (h *Held) MarkReleased() {
	h.releaseOnce.Do(func() {
		h.cancel()
		<-h.done
	})
}
