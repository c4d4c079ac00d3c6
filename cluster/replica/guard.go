package replica

import (
	"context"
	"sync/atomic"
)

// guard serialises the work that changes one copy on disk (a push from
// BeginPush to Finish, a catch-up). Unlike a mutex, waiting for it honours
// a context, and a caller that cannot wait can try. It counts the times it
// was taken, so that a reader that looked at the copy without it can tell
// whether anything may have changed the copy since (mark, then taken).
type guard struct {
	ch    chan struct{}
	taken atomic.Uint64
}

// guards numbers the guards: each counts from a base of its own, so that a
// mark of one guard never matches a count of another (a copy dropped and
// made again has a new guard).
var guards atomic.Uint64

func newGuard() *guard {
	g := &guard{ch: make(chan struct{}, 1)}
	g.taken.Store(guards.Add(1) << 32)
	return g
}

// Lock takes the guard, or returns ctx's error once it ends.
func (g *guard) Lock(ctx context.Context) error {
	select {
	case g.ch <- struct{}{}:
		g.taken.Add(1)
		return nil
	default:
	}
	select {
	case g.ch <- struct{}{}:
		g.taken.Add(1)
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// TryLock takes the guard if it is free.
func (g *guard) TryLock() bool {
	select {
	case g.ch <- struct{}{}:
		g.taken.Add(1)
		return true
	default:
		return false
	}
}

// Unlock gives the guard back; it must be held.
func (g *guard) Unlock() {
	select {
	case <-g.ch:
	default:
		panic("replica: unlock of a guard that is not held")
	}
}

// mark is how many times the guard has been taken, and whether it is free
// now. A holder whose Lock is the mark's next (held reports taken ==
// mark+1) knows nobody else held the guard since the mark.
func (g *guard) mark() (n uint64, free bool) {
	n = g.taken.Load()
	return n, len(g.ch) == 0
}

// held is how many times the guard had been taken once the caller, who
// holds it, took it.
func (g *guard) held() uint64 { return g.taken.Load() }
