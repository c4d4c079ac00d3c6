package gitproto

import (
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"
)

func Test_StartupGate_TotalAndPerSource(t *testing.T) {
	g := newStartupGate(5, 2)
	a, b, c := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2"), netip.MustParseAddr("2001:db8::1")
	var releases []func()
	admit := func(src netip.Addr) error {
		rel, err := g.admit(src)
		if err == nil {
			releases = append(releases, rel)
		}
		return err
	}
	for i := 0; i < 2; i++ {
		if err := admit(a); err != nil {
			t.Fatalf("connection %d from %s: %v", i+1, a, err)
		}
	}
	if err := admit(a); !errors.Is(err, ErrSourceStartupsFull) {
		t.Fatalf("third connection from %s: %v, want ErrSourceStartupsFull", a, err)
	}
	// Another source still gets in, up to the total.
	for _, src := range []netip.Addr{b, b, c} {
		if err := admit(src); err != nil {
			t.Fatalf("connection from %s: %v", src, err)
		}
	}
	if err := admit(c); !errors.Is(err, ErrStartupsFull) {
		t.Fatalf("sixth connection: %v, want ErrStartupsFull", err)
	}
	if total, fromA := g.pending(a); total != 5 || fromA != 2 {
		t.Fatalf("pending = %d, %d from %s; want 5, 2", total, fromA, a)
	}
	// A place given back (twice: release is idempotent) lets one more in.
	releases[0]()
	releases[0]()
	if total, fromA := g.pending(a); total != 4 || fromA != 1 {
		t.Fatalf("after a release: pending = %d, %d from %s; want 4, 1", total, fromA, a)
	}
	if err := admit(a); err != nil {
		t.Fatalf("after a release: %v", err)
	}
	for _, rel := range releases {
		rel()
	}
	if total, _ := g.pending(a); total != 0 || len(g.bySource) != 0 {
		t.Fatalf("all released: pending %d, sources %v", total, g.bySource)
	}
}

func Test_StartupGate_NoLimit(t *testing.T) {
	g := newStartupGate(-1, 0)
	src := netip.MustParseAddr("192.0.2.1")
	for i := 0; i < 1000; i++ {
		if _, err := g.admit(src); err != nil {
			t.Fatalf("connection %d with no limits: %v", i, err)
		}
	}
}

func Test_SourceAddr_UnmapsIPv4(t *testing.T) {
	mapped := &net.TCPAddr{IP: net.ParseIP("::ffff:192.0.2.7"), Port: 22}
	plain := &net.TCPAddr{IP: net.ParseIP("192.0.2.7").To4(), Port: 23}
	if sourceAddr(mapped) != sourceAddr(plain) || sourceAddr(plain) != netip.MustParseAddr("192.0.2.7") {
		t.Fatalf("source of %v = %v, of %v = %v; want both 192.0.2.7", mapped, sourceAddr(mapped), plain, sourceAddr(plain))
	}
}

func Test_SessionCount_PerUser(t *testing.T) {
	c := newSessionCount(2)
	if !c.acquire("alice") || !c.acquire("alice") {
		t.Fatal("alice's first two sessions refused")
	}
	if c.acquire("alice") {
		t.Fatal("alice's third session admitted with a cap of 2")
	}
	if !c.acquire("bob") {
		t.Fatal("bob refused because of alice")
	}
	c.release("alice")
	if !c.acquire("alice") {
		t.Fatal("alice refused after one of her sessions ended")
	}
	c.release("alice")
	c.release("alice")
	c.release("bob")
	if len(c.n) != 0 {
		t.Fatalf("counts left after every release: %v", c.n)
	}
	unlimited := newSessionCount(-1)
	for i := 0; i < 100; i++ {
		if !unlimited.acquire("alice") {
			t.Fatalf("session %d refused with no limit", i)
		}
	}
}

func Test_LogEvery_CountsWhatItHolds(t *testing.T) {
	l := logEvery{every: 10 * time.Second}
	t0 := time.Unix(1000, 0)
	if ok, held := l.allow(t0); !ok || held != 0 {
		t.Fatalf("first line: %v, %d", ok, held)
	}
	for i := 1; i <= 3; i++ {
		if ok, _ := l.allow(t0.Add(time.Duration(i) * time.Second)); ok {
			t.Fatalf("line %d within the interval let through", i)
		}
	}
	if ok, held := l.allow(t0.Add(10 * time.Second)); !ok || held != 3 {
		t.Fatalf("line after the interval: %v, held %d; want true, 3", ok, held)
	}
}

func Test_RateFloor(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	r := newRateFloor(100, 10*time.Second, t0)

	// Within the first window nothing is judged, however little moves.
	if ok, _ := r.check(at(5), 1, false); !ok {
		t.Fatal("judged before the first window ended")
	}
	// Window 1: 150 bytes moved, above the floor.
	if ok, got := r.check(at(10), 150, false); !ok || got != 150 {
		t.Fatalf("window 1: %v, %d bytes; want ok, 150", ok, got)
	}
	// Window 2: a byte now and then, 3 in all: below the floor.
	r.check(at(13), 151, false)
	r.check(at(17), 152, false)
	if ok, got := r.check(at(20), 153, false); ok || got != 3 {
		t.Fatalf("window 2 (a trickle): %v, %d bytes; want not ok, 3", ok, got)
	}
	// Window 3: nothing moved, but the node was busy for the session (a
	// push replicating) part of the time: it passes.
	r.check(at(22), 153, true)
	if ok, _ := r.check(at(30), 153, false); !ok {
		t.Fatal("window 3, in which the node was busy, failed")
	}
	// Window 4: busy no more, and quiet: it fails; the busy mark does not
	// carry over.
	if ok, got := r.check(at(40), 160, false); ok || got != 7 {
		t.Fatalf("window 4: %v, %d bytes; want not ok, 7", ok, got)
	}
	// Still busy when a window ends: the next window starts busy.
	r.check(at(50), 160, true)
	if ok, _ := r.check(at(60), 160, false); !ok {
		t.Fatal("window 6, which began with the node busy, failed")
	}
}

func Test_Activity_NodeBusy(t *testing.T) {
	a := &activity{}
	if a.busySinceLastLook() {
		t.Fatal("busy before any work")
	}
	done := a.nodeBusy()
	if !a.busySinceLastLook() || !a.busySinceLastLook() {
		t.Fatal("not busy while the node works")
	}
	done()
	if !a.busySinceLastLook() {
		t.Fatal("work that ended since the last look not seen")
	}
	if a.busySinceLastLook() {
		t.Fatal("still busy after the work ended and was seen")
	}
	var none *activity
	none.nodeBusy()() // a proxied session has no activity
}
