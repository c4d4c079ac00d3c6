package gitproto

import (
	"fmt"
	"io"
	"sync/atomic"
	"time"
)

// activity wraps a session's streams and remembers when data last moved,
// how much has moved either way, and whether the node itself is working for
// the session (then a slow window is not the client's doing).
type activity struct {
	last    atomic.Int64
	moved   atomic.Int64
	working atomic.Int32 // node-side work under way
	worked  atomic.Bool  // node-side work since the watchdog last looked
}

func (a *activity) touch(n int) {
	a.last.Store(time.Now().UnixNano())
	a.moved.Add(int64(n))
}

// nodeBusy marks the node working for the session (taking the write lock,
// catching up, replicating and committing a push) until the returned
// function is called. A nil activity (a proxied session) ignores it.
func (a *activity) nodeBusy() (done func()) {
	if a == nil {
		return func() {}
	}
	a.working.Add(1)
	a.worked.Store(true)
	return func() {
		a.working.Add(-1)
		a.worked.Store(true)
	}
}

// busySinceLastLook reports whether the node worked for the session since
// the last call.
func (a *activity) busySinceLastLook() bool {
	return a.worked.Swap(false) || a.working.Load() > 0
}

type activeReader struct {
	r io.Reader
	a *activity
}

func (r activeReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if n > 0 {
		r.a.touch(n)
	}
	return n, err
}

type activeWriter struct {
	w io.Writer
	a *activity
}

func (w activeWriter) Write(p []byte) (int, error) {
	n, err := w.w.Write(p)
	if n > 0 {
		w.a.touch(n)
	}
	return n, err
}

// sessionLimits are the time and rate limits of one session.
type sessionLimits struct {
	idle, total time.Duration
	// minRate bytes must move in every minRateWindow; 0: no floor.
	minRate       int64
	minRateWindow time.Duration
}

// watch ends a session that is idle longer than idle, runs longer than
// total or moves fewer than minRate bytes in a minRateWindow, telling the
// client why on stderr first. It returns a stop function.
func watch(l sessionLimits, a *activity, stderr io.Writer, end func(why string)) (stop func()) {
	done := make(chan struct{})
	a.touch(0)
	start := time.Now()
	interval := min(l.idle, l.total) / 4
	var floor *rateFloor
	if l.minRate > 0 && l.minRateWindow > 0 {
		floor = newRateFloor(l.minRate, l.minRateWindow, start)
		interval = min(interval, l.minRateWindow/4)
	}
	go func() {
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case now := <-tick.C:
				switch {
				case now.Sub(start) > l.total:
					fmt.Fprintf(stderr, "gitraft: session ended: it ran longer than the %s limit (git.max_timeout)\n", l.total)
					end("max_timeout")
					return
				case now.Sub(time.Unix(0, a.last.Load())) > l.idle:
					fmt.Fprintf(stderr, "gitraft: session ended: no data for %s (git.idle_timeout)\n", l.idle)
					end("idle_timeout")
					return
				}
				if floor == nil {
					continue
				}
				if ok, got := floor.check(now, a.moved.Load(), a.busySinceLastLook()); !ok {
					fmt.Fprintf(stderr, "gitraft: session ended: only %d bytes moved in %s, below the floor of %d (git.min_rate_bytes per git.min_rate_window); a stalled or very slow connection, try again\n", got, l.minRateWindow, l.minRate)
					end("min_rate")
					return
				}
			}
		}
	}()
	return func() { close(done) }
}
