package gitproto

import (
	"fmt"
	"io"
	"sync/atomic"
	"time"
)

// activity wraps a session's streams and remembers when data last moved.
type activity struct {
	last atomic.Int64
}

func (a *activity) touch() { a.last.Store(time.Now().UnixNano()) }

type activeReader struct {
	r io.Reader
	a *activity
}

func (r activeReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if n > 0 {
		r.a.touch()
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
		w.a.touch()
	}
	return n, err
}

// watch ends a session that is idle longer than idle or runs longer than
// total, telling the client why on stderr first. It returns a stop function.
func watch(idle, total time.Duration, a *activity, stderr io.Writer, end func()) (stop func()) {
	done := make(chan struct{})
	a.touch()
	start := time.Now()
	go func() {
		tick := time.NewTicker(min(idle, total) / 4)
		defer tick.Stop()
		for {
			select {
			case <-done:
				return
			case now := <-tick.C:
				switch {
				case now.Sub(start) > total:
					fmt.Fprintf(stderr, "gitraft: session ended: it ran longer than the %s limit (git.max_timeout)\n", total)
					end()
					return
				case now.Sub(time.Unix(0, a.last.Load())) > idle:
					fmt.Fprintf(stderr, "gitraft: session ended: no data for %s (git.idle_timeout)\n", idle)
					end()
					return
				}
			}
		}
	}()
	return func() { close(done) }
}
