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
