package lockd

import (
	"errors"
	"reflect"
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

const lease = 10 * time.Second

func mustAcquire(t *testing.T, tb *Table, repo, holder string, now time.Time, index uint64) WriteLock {
	t.Helper()
	l, err := tb.Acquire(repo, holder, now, lease, index)
	if err != nil {
		t.Fatalf("Acquire(%q, %q, %d): %v", repo, holder, index, err)
	}
	return l
}

func Test_Table_AcquireFree(t *testing.T) {
	tb := NewTable()
	l := mustAcquire(t, tb, "acme/site", "node1/push-1", t0, 7)
	want := WriteLock{Repo: "acme/site", Holder: "node1/push-1", Token: 7, AcquiredAt: t0, ExpiresAt: t0.Add(lease)}
	if l != want {
		t.Fatalf("got %+v, want %+v", l, want)
	}
	if got, ok := tb.Get("acme/site"); !ok || got != want {
		t.Fatalf("Get = %+v, %v", got, ok)
	}
	if tb.Len() != 1 {
		t.Fatalf("Len = %d", tb.Len())
	}
	if l.Expired(t0.Add(lease-1)) || !l.Expired(t0.Add(lease)) {
		t.Fatal("WriteLock.Expired boundary wrong")
	}
}

func Test_Table_AcquireHeld(t *testing.T) {
	tb := NewTable()
	first := mustAcquire(t, tb, "acme/site", "node1/push-1", t0, 7)
	for _, holder := range []string{"node2/push-2", "node1/push-1"} {
		_, err := tb.Acquire("acme/site", holder, t0.Add(lease-time.Nanosecond), lease, 8)
		var he *HeldError
		if !errors.As(err, &he) || !errors.Is(err, ErrLockHeld) {
			t.Fatalf("holder %q: err = %v, want *HeldError wrapping ErrLockHeld", holder, err)
		}
		if he.Lock != first {
			t.Fatalf("HeldError.Lock = %+v, want %+v", he.Lock, first)
		}
	}
	if got, _ := tb.Get("acme/site"); got != first {
		t.Fatalf("lock changed to %+v", got)
	}
}

func Test_Table_AcquireExpiredTakeover(t *testing.T) {
	tb := NewTable()
	mustAcquire(t, tb, "acme/site", "node1/push-1", t0, 7)
	now := t0.Add(lease) // exactly at expiry: expired
	l := mustAcquire(t, tb, "acme/site", "node2/push-2", now, 9)
	if l.Token != 9 || l.Holder != "node2/push-2" || !l.AcquiredAt.Equal(now) || !l.ExpiresAt.Equal(now.Add(lease)) {
		t.Fatalf("takeover lock = %+v", l)
	}
	// The old holder's token is now stale.
	if err := tb.Check("acme/site", 7, now); !errors.Is(err, ErrStaleToken) {
		t.Fatalf("Check old token: %v", err)
	}
}

func Test_Table_AcquireInvalid(t *testing.T) {
	tb := NewTable()
	cases := []struct {
		repo, holder string
		lease        time.Duration
		index        uint64
		want         error
	}{
		{"r", "h", 0, 1, ErrBadLease},
		{"r", "h", -time.Second, 1, ErrBadLease},
		{"r", "h", lease, 0, ErrInvalid},
		{"", "h", lease, 1, ErrInvalid},
		{"r", "", lease, 1, ErrInvalid},
	}
	for _, c := range cases {
		if _, err := tb.Acquire(c.repo, c.holder, t0, c.lease, c.index); !errors.Is(err, c.want) {
			t.Errorf("Acquire(%q, %q, %v, %d) = %v, want %v", c.repo, c.holder, c.lease, c.index, err, c.want)
		}
	}
	if tb.Len() != 0 {
		t.Fatalf("Len = %d after invalid acquires", tb.Len())
	}
}

func Test_Table_ZeroValue(t *testing.T) {
	var tb Table
	if tb.Len() != 0 || len(tb.List()) != 0 {
		t.Fatal("zero table not empty")
	}
	mustAcquire(t, &tb, "r", "h", t0, 1)
	if tb.Len() != 1 {
		t.Fatal("zero table acquire failed")
	}
}

func Test_Table_RenewOK(t *testing.T) {
	tb := NewTable()
	mustAcquire(t, tb, "acme/site", "h", t0, 7)
	now := t0.Add(lease / 2)
	l, err := tb.Renew("acme/site", 7, now, 2*lease)
	if err != nil {
		t.Fatal(err)
	}
	if !l.ExpiresAt.Equal(now.Add(2*lease)) || !l.AcquiredAt.Equal(t0) || l.Token != 7 {
		t.Fatalf("renewed lock = %+v", l)
	}
	if got, _ := tb.Get("acme/site"); got != l {
		t.Fatalf("stored %+v, want %+v", got, l)
	}
	if err := tb.Check("acme/site", 7, t0.Add(lease+time.Second)); err != nil {
		t.Fatalf("Check after renew: %v", err)
	}
}

func Test_Table_RenewStale(t *testing.T) {
	tb := NewTable()
	before := mustAcquire(t, tb, "acme/site", "h", t0, 7)
	_, err := tb.Renew("acme/site", 6, t0, lease)
	if !errors.Is(err, ErrStaleToken) {
		t.Fatalf("err = %v", err)
	}
	if got, _ := tb.Get("acme/site"); got != before {
		t.Fatal("stale renew modified lock")
	}
}

func Test_Table_RenewExpired(t *testing.T) {
	tb := NewTable()
	mustAcquire(t, tb, "acme/site", "h", t0, 7)
	_, err := tb.Renew("acme/site", 7, t0.Add(lease), lease)
	if !errors.Is(err, ErrLeaseExpired) {
		t.Fatalf("err = %v", err)
	}
	if _, ok := tb.Get("acme/site"); ok {
		t.Fatal("expired lock not removed by Renew")
	}
}

func Test_Table_RenewNotHeld(t *testing.T) {
	tb := NewTable()
	if _, err := tb.Renew("acme/site", 7, t0, lease); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("err = %v", err)
	}
}

func Test_Table_RenewBadLease(t *testing.T) {
	tb := NewTable()
	mustAcquire(t, tb, "acme/site", "h", t0, 7)
	// Checked first: a bad request must not remove an expired lock.
	if _, err := tb.Renew("acme/site", 7, t0.Add(2*lease), 0); !errors.Is(err, ErrBadLease) {
		t.Fatalf("err = %v", err)
	}
	if _, ok := tb.Get("acme/site"); !ok {
		t.Fatal("bad-lease renew removed lock")
	}
}

func Test_Table_ReleaseOK(t *testing.T) {
	tb := NewTable()
	want := mustAcquire(t, tb, "acme/site", "h", t0, 7)
	got, err := tb.Release("acme/site", 7)
	if err != nil || got != want {
		t.Fatalf("Release = %+v, %v", got, err)
	}
	if tb.Len() != 0 {
		t.Fatal("lock not removed")
	}
	// Free again.
	mustAcquire(t, tb, "acme/site", "h2", t0, 8)
}

func Test_Table_ReleaseStale(t *testing.T) {
	tb := NewTable()
	mustAcquire(t, tb, "acme/site", "h", t0, 7)
	if _, err := tb.Release("acme/site", 8); !errors.Is(err, ErrStaleToken) {
		t.Fatalf("err = %v", err)
	}
	if tb.Len() != 1 {
		t.Fatal("stale release removed lock")
	}
}

func Test_Table_ReleaseNotHeld(t *testing.T) {
	tb := NewTable()
	if _, err := tb.Release("acme/site", 7); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("err = %v", err)
	}
}

func Test_Table_ReleaseExpiredRightToken(t *testing.T) {
	tb := NewTable()
	mustAcquire(t, tb, "acme/site", "h", t0, 7)
	// Release takes no time; the lock is expired by any later entry's time.
	if err := tb.Check("acme/site", 7, t0.Add(time.Hour)); !errors.Is(err, ErrLeaseExpired) {
		t.Fatalf("precondition: %v", err)
	}
	if _, err := tb.Release("acme/site", 7); err != nil {
		t.Fatalf("Release expired: %v", err)
	}
	if tb.Len() != 0 {
		t.Fatal("lock not removed")
	}
}

func Test_Table_ForceRelease(t *testing.T) {
	tb := NewTable()
	want := mustAcquire(t, tb, "acme/site", "h", t0, 7)
	got, err := tb.ForceRelease("acme/site")
	if err != nil || got != want {
		t.Fatalf("ForceRelease = %+v, %v", got, err)
	}
	if _, err := tb.ForceRelease("acme/site"); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("second ForceRelease: %v", err)
	}
	if _, err := tb.Renew("acme/site", 7, t0, lease); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("renew after force release: %v", err)
	}
}

func Test_Table_Check(t *testing.T) {
	tb := NewTable()
	mustAcquire(t, tb, "acme/site", "h", t0, 7)
	cases := []struct {
		name  string
		repo  string
		token uint64
		now   time.Time
		want  error
	}{
		{"current", "acme/site", 7, t0.Add(lease - time.Nanosecond), nil},
		{"stale", "acme/site", 6, t0, ErrStaleToken},
		{"newer", "acme/site", 8, t0, ErrStaleToken},
		{"expired", "acme/site", 7, t0.Add(lease), ErrLeaseExpired},
		{"not held", "other/repo", 7, t0, ErrNotHeld},
	}
	for _, c := range cases {
		err := tb.Check(c.repo, c.token, c.now)
		if c.want == nil && err != nil || c.want != nil && !errors.Is(err, c.want) {
			t.Errorf("%s: Check = %v, want %v", c.name, err, c.want)
		}
	}
	if tb.Len() != 1 {
		t.Fatal("Check modified the table")
	}
}

func Test_Table_ExpiredVsExpire(t *testing.T) {
	tb := NewTable()
	mustAcquire(t, tb, "c/c", "h", t0, 1)
	mustAcquire(t, tb, "a/a", "h", t0, 2)
	mustAcquire(t, tb, "b/b", "h", t0.Add(time.Minute), 3)
	now := t0.Add(lease)

	exp := tb.Expired(now)
	if len(exp) != 2 || exp[0].Repo != "a/a" || exp[1].Repo != "c/c" {
		t.Fatalf("Expired = %+v", exp)
	}
	if tb.Len() != 3 {
		t.Fatal("Expired removed locks")
	}
	if got := tb.Expired(t0); len(got) != 0 {
		t.Fatalf("Expired(t0) = %+v", got)
	}

	removed := tb.Expire(now)
	if !reflect.DeepEqual(removed, exp) {
		t.Fatalf("Expire = %+v, want %+v", removed, exp)
	}
	if l := tb.List(); len(l) != 1 || l[0].Repo != "b/b" {
		t.Fatalf("after Expire List = %+v", l)
	}
	if got := tb.Expire(now); len(got) != 0 {
		t.Fatalf("second Expire = %+v", got)
	}
}

func Test_Table_ListSortedAndDelete(t *testing.T) {
	tb := NewTable()
	for i, r := range []string{"zeta/x", "acme/site", "mid/repo", "acme/api"} {
		mustAcquire(t, tb, r, "h", t0, uint64(i+1))
	}
	var repos []string
	for _, l := range tb.List() {
		repos = append(repos, l.Repo)
	}
	if want := []string{"acme/api", "acme/site", "mid/repo", "zeta/x"}; !reflect.DeepEqual(repos, want) {
		t.Fatalf("List repos = %v, want %v", repos, want)
	}
	tb.Delete("mid/repo")
	tb.Delete("missing/repo")
	if tb.Len() != 3 {
		t.Fatalf("Len after Delete = %d", tb.Len())
	}
	if _, ok := tb.Get("mid/repo"); ok {
		t.Fatal("Delete did not remove")
	}
}

func Test_Table_Restore(t *testing.T) {
	tb := NewTable()
	mustAcquire(t, tb, "b/b", "h1", t0, 1)
	mustAcquire(t, tb, "a/a", "h2", t0, 2)
	snap := tb.List()

	rt := Restore(snap)
	if !reflect.DeepEqual(rt.List(), snap) {
		t.Fatalf("restored %+v, want %+v", rt.List(), snap)
	}
	// Restored table behaves the same.
	if err := rt.Check("a/a", 2, t0); err != nil {
		t.Fatal(err)
	}

	dup := Restore([]WriteLock{
		{Repo: "x/x", Holder: "old", Token: 1, AcquiredAt: t0, ExpiresAt: t0.Add(lease)},
		{Repo: "x/x", Holder: "new", Token: 5, AcquiredAt: t0, ExpiresAt: t0.Add(lease)},
	})
	if l, _ := dup.Get("x/x"); dup.Len() != 1 || l.Holder != "new" || l.Token != 5 {
		t.Fatalf("duplicate restore = %+v", dup.List())
	}
	if Restore(nil).Len() != 0 {
		t.Fatal("Restore(nil) not empty")
	}
}

func Test_Table_HeldErrorMessage(t *testing.T) {
	tb := NewTable()
	mustAcquire(t, tb, "acme/site", "node2/push-1", t0.Add(-lease), 42)
	_, err := tb.Acquire("acme/site", "node1/push-2", t0.Add(-time.Second), lease, 43)
	want := `write lock on "acme/site" held by "node2/push-1" (token 42) until 2026-01-02T03:04:05Z`
	if err == nil || err.Error() != want {
		t.Fatalf("err = %v\nwant  %s", err, want)
	}
	wrapped := errors.Join(errors.New("context"), err)
	var he *HeldError
	if !errors.As(wrapped, &he) || he.Lock.Token != 42 || he.Lock.Holder != "node2/push-1" {
		t.Fatalf("errors.As on wrapped: %+v", he)
	}
	if !errors.Is(wrapped, ErrLockHeld) || errors.Is(err, ErrNotHeld) {
		t.Fatal("errors.Is mismatch")
	}
	// Non-UTC times are printed in UTC.
	he2 := &HeldError{Lock: WriteLock{Repo: "r", Holder: "h", Token: 1,
		ExpiresAt: t0.In(time.FixedZone("X", 3600))}}
	if got := he2.Error(); got != `write lock on "r" held by "h" (token 1) until 2026-01-02T03:04:05Z` {
		t.Fatalf("got %s", got)
	}
}

func Test_Table_Determinism(t *testing.T) {
	type op func(tb *Table) string
	fmtErr := func(l WriteLock, err error) string {
		if err != nil {
			return err.Error()
		}
		return l.Repo + "/" + l.Holder
	}
	errStr := func(err error) string {
		if err != nil {
			return err.Error()
		}
		return "ok"
	}
	ops := []op{
		func(tb *Table) string { return fmtErr(tb.Acquire("a", "h1", t0, lease, 1)) },
		func(tb *Table) string { return fmtErr(tb.Acquire("b", "h2", t0.Add(time.Second), lease, 2)) },
		func(tb *Table) string { return fmtErr(tb.Acquire("a", "h3", t0.Add(2*time.Second), lease, 3)) },
		func(tb *Table) string { return fmtErr(tb.Renew("a", 1, t0.Add(5*time.Second), lease)) },
		func(tb *Table) string { return fmtErr(tb.Acquire("c", "h4", t0.Add(6*time.Second), lease, 4)) },
		func(tb *Table) string { return fmtErr(tb.Renew("b", 2, t0.Add(20*time.Second), lease)) },
		func(tb *Table) string { return fmtErr(tb.Acquire("b", "h5", t0.Add(21*time.Second), lease, 5)) },
		func(tb *Table) string { return errStr(tb.Check("a", 1, t0.Add(14*time.Second))) },
		func(tb *Table) string { return fmtErr(tb.Release("c", 9)) },
		func(tb *Table) string {
			var s string
			for _, l := range tb.Expire(t0.Add(16 * time.Second)) {
				s += l.Repo
			}
			return s
		},
		func(tb *Table) string { return fmtErr(tb.Acquire("d", "h6", t0.Add(17*time.Second), lease, 6)) },
		func(tb *Table) string { return fmtErr(tb.ForceRelease("d")) },
		func(tb *Table) string { return fmtErr(tb.Acquire("e", "h7", t0.Add(18*time.Second), lease, 7)) },
	}
	a, b := NewTable(), NewTable()
	for i, o := range ops {
		if ra, rb := o(a), o(b); ra != rb {
			t.Fatalf("op %d: results differ: %q vs %q", i, ra, rb)
		}
		if !reflect.DeepEqual(a.List(), b.List()) {
			t.Fatalf("op %d: tables differ:\n%+v\n%+v", i, a.List(), b.List())
		}
	}
	// A table restored from a snapshot behaves identically from then on.
	c := Restore(a.List())
	now := t0.Add(22 * time.Second)
	if !reflect.DeepEqual(a.Expire(now), c.Expire(now)) || !reflect.DeepEqual(a.List(), c.List()) {
		t.Fatal("restored table diverged")
	}
	if a.Len() == 0 {
		t.Fatal("expected some locks left")
	}
}

func Test_Table_StripsMonotonic(t *testing.T) {
	now := time.Now() // carries a monotonic reading
	tb := NewTable()
	l, err := tb.Acquire("r", "h", now, lease, 1)
	if err != nil {
		t.Fatal(err)
	}
	if l.AcquiredAt != now.Round(0) || l.ExpiresAt != now.Round(0).Add(lease) {
		t.Fatalf("monotonic reading kept: %v", l)
	}
}
