package storage

import (
	"context"
	"os"
	"testing"
)

// Benchmark_CatchUpOneVersion measures what a follower does per committed
// push once the pack is in: Missing on the tips, SetRefs, SetVersion.
func Benchmark_CatchUpOneVersion(b *testing.B) {
	ctx := context.Background()
	s, err := Open(Config{Root: b.TempDir()}, nil)
	if err != nil {
		b.Fatal(err)
	}
	s.Init(ctx, "r", 1)
	work, oids := scratch(b, 30)
	pp, ip := packOf(b, work, oids[len(oids)-1])
	pf, _ := os.Open(pp)
	xf, _ := os.Open(ip)
	s.InstallPack(ctx, "r", pf, xf)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		tip := oids[i%len(oids)]
		want := map[string]string{"refs/heads/main": tip}
		if m, err := s.Missing(ctx, "r", []string{tip}); err != nil || len(m) != 0 {
			b.Fatal(m, err)
		}
		if err := s.SetRefs(ctx, "r", want, "refs/heads/main"); err != nil {
			b.Fatal(err)
		}
		if err := s.SetVersion("r", 1, uint64(i+2)); err != nil {
			b.Fatal(err)
		}
	}
}
