package pgtest

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Write is one transaction a Writer attempted.
type Write struct {
	ID         int64
	Start, End time.Time
	Err        error // nil: committed
	// Port is the port of the server that committed it (inet_server_port()).
	Port int
	// Writer is the index of the pgbouncer it went through (StartWriter's
	// order).
	Writer int
}

// Writer is a client that inserts numbered rows, one INSERT per
// transaction, through pgbouncers the whole time: one goroutine per
// pgbouncer, each on one client connection it opens again after an error,
// as an application's pool would.
type Writer struct {
	t      testing.TB
	next   atomic.Int64
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	writes []Write
}

// StartWriter starts writing through each of bouncers until Stop. Each
// INSERT waits at most perWrite (pgbouncer holds queries while paused).
func StartWriter(t testing.TB, perWrite time.Duration, bouncers ...*Bouncer) *Writer {
	ctx, cancel := context.WithCancel(context.Background())
	w := &Writer{t: t, cancel: cancel}
	t.Cleanup(w.Stop)
	for i, b := range bouncers {
		w.wg.Add(1)
		go w.loop(ctx, i, b, perWrite)
	}
	return w
}

func (w *Writer) loop(ctx context.Context, writer int, b *Bouncer, perWrite time.Duration) {
	defer w.wg.Done()
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	for ctx.Err() == nil {
		id := w.next.Add(1)
		wr := Write{ID: id, Start: time.Now(), Writer: writer}
		wctx, cancel := context.WithTimeout(ctx, perWrite)
		if conn == nil {
			conn, wr.Err = b.Connect(wctx)
		}
		if wr.Err == nil {
			wr.Err = conn.QueryRow(wctx, fmt.Sprintf("INSERT INTO %s (id, writer) VALUES (%d, %d) RETURNING inet_server_port()", Table, id, writer)).Scan(&wr.Port)
		}
		cancel()
		wr.End = time.Now()
		if ctx.Err() != nil && wr.Err != nil {
			// Cut off by Stop, not by the database.
			return
		}
		if wr.Err != nil && conn != nil {
			conn.Close(context.Background())
			conn = nil
		}
		w.mu.Lock()
		w.writes = append(w.writes, wr)
		w.mu.Unlock()
		if wr.Err != nil {
			// Do not spin while nothing answers.
			select {
			case <-ctx.Done():
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
}

// Stop ends the writing and waits for it.
func (w *Writer) Stop() {
	w.cancel()
	w.wg.Wait()
}

// Writes returns a copy of the writes so far, in the order they ended.
func (w *Writer) Writes() []Write {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := append([]Write(nil), w.writes...)
	sort.Slice(out, func(i, j int) bool { return out[i].End.Before(out[j].End) })
	return out
}

// Committed is how many writes committed so far.
func (w *Writer) Committed() int {
	n := 0
	for _, x := range w.Writes() {
		if x.Err == nil {
			n++
		}
	}
	return n
}

// WaitCommitted waits until n more writes than now have committed.
func (w *Writer) WaitCommitted(n int, timeout time.Duration) {
	w.t.Helper()
	want := w.Committed() + n
	waitUntil(w.t, fmt.Sprintf("%d committed writes", want), timeout, func() bool { return w.Committed() >= want })
}

// Report sums up writes.
type Report struct {
	Committed, Failed int
	// FirstErrors are up to five failures.
	FirstErrors []string
	// CommittedIDs are the ids of committed rows.
	CommittedIDs []int64
	// MaxLatency is the longest single write (committed or not); under
	// PAUSE one write per client waits for RESUME, so this is the write
	// pause a client sees.
	MaxLatency time.Duration
	// MaxGap is the longest time between two commits (or from the start
	// of the window to the first one).
	MaxGap time.Duration
}

// ReportBetween sums up the writes that ended in [from, to] (zero times:
// no bound).
func ReportBetween(writes []Write, from, to time.Time) Report {
	var r Report
	last := from
	for _, x := range writes {
		if !from.IsZero() && x.End.Before(from) || !to.IsZero() && x.End.After(to) {
			continue
		}
		if d := x.End.Sub(x.Start); d > r.MaxLatency {
			r.MaxLatency = d
		}
		if x.Err != nil {
			r.Failed++
			if len(r.FirstErrors) < 5 {
				r.FirstErrors = append(r.FirstErrors, fmt.Sprintf("row %d: %v", x.ID, x.Err))
			}
			continue
		}
		r.Committed++
		r.CommittedIDs = append(r.CommittedIDs, x.ID)
		if !last.IsZero() && x.End.Sub(last) > r.MaxGap {
			r.MaxGap = x.End.Sub(last)
		}
		last = x.End
	}
	return r
}

// FirstCommitOn is the end of the first commit on the server listening on
// port at or after t, or the zero time.
func FirstCommitOn(writes []Write, port int, t time.Time) time.Time {
	var first time.Time
	for _, x := range writes {
		if x.Err == nil && x.Port == port && !x.End.Before(t) && (first.IsZero() || x.End.Before(first)) {
			first = x.End
		}
	}
	return first
}

// CommitsOn returns the writes committed on the server listening on port
// that ended after t.
func CommitsOn(writes []Write, port int, t time.Time) []Write {
	var out []Write
	for _, x := range writes {
		if x.Err == nil && x.Port == port && x.End.After(t) {
			out = append(out, x)
		}
	}
	return out
}

// Missing returns the committed ids that are not in have.
func Missing(committed []int64, have map[int64]bool) []int64 {
	var out []int64
	for _, id := range committed {
		if !have[id] {
			out = append(out, id)
		}
	}
	return out
}
