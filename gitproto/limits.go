package gitproto

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"time"
)

// Refusals of the connection and session limits.
var (
	// ErrStartupsFull: the node already has MaxStartups connections that
	// have not finished authenticating.
	ErrStartupsFull = errors.New("too many connections are authenticating")
	// ErrSourceStartupsFull: the source address already has
	// PerSourceMaxStartups connections that have not finished
	// authenticating.
	ErrSourceStartupsFull = errors.New("too many connections from this address are authenticating")
)

// startupGate counts connections that have not finished authenticating,
// in all and per source address, like OpenSSH's MaxStartups and
// PerSourceMaxStartups. A limit below 1 is no limit.
type startupGate struct {
	max, perSource int

	mu       sync.Mutex
	total    int
	bySource map[netip.Addr]int
}

func newStartupGate(max, perSource int) *startupGate {
	return &startupGate{max: max, perSource: perSource, bySource: map[netip.Addr]int{}}
}

// admit takes a place for a new connection from src; release gives it
// back and may be called more than once.
func (g *startupGate) admit(src netip.Addr) (release func(), err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.max > 0 && g.total >= g.max {
		return nil, ErrStartupsFull
	}
	if g.perSource > 0 && g.bySource[src] >= g.perSource {
		return nil, ErrSourceStartupsFull
	}
	g.total++
	g.bySource[src]++
	var once sync.Once
	return func() {
		once.Do(func() {
			g.mu.Lock()
			defer g.mu.Unlock()
			g.total--
			if g.bySource[src]--; g.bySource[src] <= 0 {
				delete(g.bySource, src)
			}
		})
	}, nil
}

// pending is how many connections are authenticating, in all and from src.
func (g *startupGate) pending(src netip.Addr) (total, fromSrc int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.total, g.bySource[src]
}

// sourceAddr is the IP address a connection comes from (the zero Addr for
// anything but TCP).
func sourceAddr(a net.Addr) netip.Addr {
	if t, ok := a.(*net.TCPAddr); ok {
		if ip, ok := netip.AddrFromSlice(t.IP); ok {
			return ip.Unmap()
		}
	}
	return netip.Addr{}
}

// sessionCount caps concurrent sessions per key (a user). A limit below 1
// is no limit.
type sessionCount struct {
	max int

	mu sync.Mutex
	n  map[string]int
}

func newSessionCount(max int) *sessionCount {
	return &sessionCount{max: max, n: map[string]int{}}
}

// acquire takes a session for key; it reports false, taking nothing, when
// key already has max sessions.
func (c *sessionCount) acquire(key string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.max > 0 && c.n[key] >= c.max {
		return false
	}
	c.n[key]++
	return true
}

func (c *sessionCount) release(key string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.n[key]--; c.n[key] <= 0 {
		delete(c.n, key)
	}
}

// logEvery lets a log line through at most once per interval and counts
// the ones it held back, so a flood cannot flood the log too.
type logEvery struct {
	every time.Duration

	mu         sync.Mutex
	last       time.Time
	suppressed int
}

// allow reports whether to log now, and how many lines were held back
// since the last one that was let through.
func (l *logEvery) allow(now time.Time) (ok bool, suppressed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() && now.Sub(l.last) < l.every {
		l.suppressed++
		return false, 0
	}
	suppressed, l.suppressed, l.last = l.suppressed, 0, now
	return true, suppressed
}

// rateFloor is a session's minimum transfer rate, in the manner of Apache's
// mod_reqtimeout MinRate: in every window of the session, counted from its
// start, at least floor bytes must move (either way), unless the node itself
// was busy for the session during that window (taking a write lock,
// catching up, replicating a push). It keeps no clock of its own.
type rateFloor struct {
	floor  int64
	window time.Duration

	start   time.Time // of the current window
	atStart int64     // bytes moved when it began
	busy    bool      // the node worked for the session in this window
}

func newRateFloor(floor int64, window time.Duration, start time.Time) *rateFloor {
	return &rateFloor{floor: floor, window: window, start: start}
}

// check is called now and then with the bytes moved so far and whether the
// node was busy for the session since the last call. When a window has
// ended, it reports whether the window met the floor, and the bytes moved
// in it; otherwise ok is true.
func (r *rateFloor) check(now time.Time, moved int64, busy bool) (ok bool, inWindow int64) {
	r.busy = r.busy || busy
	if now.Sub(r.start) < r.window {
		return true, 0
	}
	inWindow = moved - r.atStart
	ok = r.busy || inWindow >= r.floor
	r.start, r.atStart, r.busy = now, moved, busy
	return ok, inWindow
}
