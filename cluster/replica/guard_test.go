package replica

import (
	"context"
	"errors"
	"testing"
	"time"
)

func Test_Guard(t *testing.T) {
	g := newGuard()
	if err := g.Lock(context.Background()); err != nil {
		t.Fatal(err)
	}
	if g.TryLock() {
		t.Fatal("TryLock took a held guard")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := g.Lock(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Lock of a held guard: %v, want the context's error", err)
	}
	got := make(chan error)
	go func() { got <- g.Lock(context.Background()) }()
	g.Unlock()
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	g.Unlock()
	if !g.TryLock() {
		t.Fatal("TryLock of a free guard failed")
	}
}

// A holder whose Lock follows the mark knows nobody held the guard since;
// a guard's counts never match another guard's marks.
func Test_Guard_Mark(t *testing.T) {
	g, other := newGuard(), newGuard()
	m, free := g.mark()
	if !free {
		t.Fatal("a new guard is not free")
	}
	g.TryLock()
	if g.held() != m+1 {
		t.Fatalf("held %d after mark %d, want the next", g.held(), m)
	}
	if _, free := g.mark(); free {
		t.Fatal("a held guard marks free")
	}
	g.Unlock()
	m, _ = g.mark()
	g.TryLock()
	g.Unlock()
	g.TryLock()
	if g.held() == m+1 {
		t.Fatal("the guard was taken twice since the mark, yet held says once")
	}
	g.Unlock()
	om, _ := other.mark()
	g.TryLock()
	if g.held() == om+1 {
		t.Fatal("one guard's count matches another guard's mark")
	}
	g.Unlock()
}
