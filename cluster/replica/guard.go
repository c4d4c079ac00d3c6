package replica

import "context"

// guard serialises the work that changes one copy on disk (a push from
// BeginPush to Finish, a catch-up). Unlike a mutex, waiting for it honours
// a context, and a caller that cannot wait can try.
type guard chan struct{}

func newGuard() guard { return make(guard, 1) }

// Lock takes the guard, or returns ctx's error once it ends.
func (g guard) Lock(ctx context.Context) error {
	select {
	case g <- struct{}{}:
		return nil
	default:
	}
	select {
	case g <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// TryLock takes the guard if it is free.
func (g guard) TryLock() bool {
	select {
	case g <- struct{}{}:
		return true
	default:
		return false
	}
}

// Unlock gives the guard back; it must be held.
func (g guard) Unlock() {
	select {
	case <-g:
	default:
		panic("replica: unlock of a guard that is not held")
	}
}
