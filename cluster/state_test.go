package cluster

import (
	"bytes"
	"reflect"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	mailv1 "github.com/gitraft/gitraft/proto/gitraft/mail/v1"
)

var t0 = time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)

const (
	oidA = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	oidB = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
	oidC = "cccccccccccccccccccccccccccccccccccccccc"
	zero = "0000000000000000000000000000000000000000"
)

// machine drives a State the way Raft would: increasing indexes, leader time.
type machine struct {
	t     *testing.T
	s     *State
	index uint64
	now   time.Time
}

func newMachine(t *testing.T) *machine { return &machine{t: t, s: NewState(), now: t0} }

func (m *machine) apply(e *fsmv1.Entry) *fsmv1.Result {
	m.t.Helper()
	m.index++
	e.Format = fsmv1.EntryFormat_ENTRY_FORMAT_V1
	e.LeaderTimeUnixNano = m.now.UnixNano()
	return m.s.Apply(m.index, e)
}

func (m *machine) ok(e *fsmv1.Entry) *fsmv1.Result {
	m.t.Helper()
	r := m.apply(e)
	if r.GetRefusal() != nil {
		m.t.Fatalf("entry %v refused: %v", e, r.GetRefusal())
	}
	return r
}

func (m *machine) refused(e *fsmv1.Entry, reason fsmv1.Reason, msg string) *fsmv1.Result {
	m.t.Helper()
	r := m.apply(e)
	if r.GetRefusal().GetReason() != reason {
		m.t.Fatalf("entry %v: refusal %v, want %v", e, r.GetRefusal(), reason)
	}
	if !strings.Contains(r.GetRefusal().GetMessage(), msg) {
		m.t.Fatalf("refusal message %q does not contain %q", r.GetRefusal().GetMessage(), msg)
	}
	return r
}

func create(name string) *fsmv1.Entry {
	return &fsmv1.Entry{Command: &fsmv1.Entry_CreateRepo{CreateRepo: &fsmv1.CreateRepo{Name: name}}}
}
func del(name string) *fsmv1.Entry {
	return &fsmv1.Entry{Command: &fsmv1.Entry_DeleteRepo{DeleteRepo: &fsmv1.DeleteRepo{Name: name}}}
}
func acquire(repo, holder string, lease time.Duration) *fsmv1.Entry {
	return &fsmv1.Entry{Command: &fsmv1.Entry_AcquireLock{AcquireLock: &fsmv1.AcquireLock{Repo: repo, Holder: holder, LeaseNanos: int64(lease)}}}
}
func renew(repo string, token uint64, lease time.Duration) *fsmv1.Entry {
	return &fsmv1.Entry{Command: &fsmv1.Entry_RenewLock{RenewLock: &fsmv1.RenewLock{Repo: repo, FencingToken: token, LeaseNanos: int64(lease)}}}
}
func release(repo string, token uint64) *fsmv1.Entry {
	return &fsmv1.Entry{Command: &fsmv1.Entry_ReleaseLock{ReleaseLock: &fsmv1.ReleaseLock{Repo: repo, FencingToken: token}}}
}
func update(repo string, token uint64, atomic bool, triples ...string) *fsmv1.Entry {
	u := &fsmv1.UpdateRefs{Repo: repo, FencingToken: token, Atomic: atomic}
	for i := 0; i+2 < len(triples); i += 3 {
		u.Updates = append(u.Updates, &fsmv1.RefUpdate{Ref: triples[i], OldOid: triples[i+1], NewOid: triples[i+2]})
	}
	return &fsmv1.Entry{Command: &fsmv1.Entry_UpdateRefs{UpdateRefs: u}}
}

func refs(t *testing.T, s *State, repo string) map[string]string {
	t.Helper()
	r, ok := s.Repo(repo)
	if !ok {
		t.Fatalf("repo %q missing", repo)
	}
	out := map[string]string{}
	for _, x := range r.GetRefs() {
		out[x.GetName()] = x.GetOid()
	}
	return out
}

func Test_State_CreateDeleteRepo(t *testing.T) {
	m := newMachine(t)
	r := m.ok(create("acme/site"))
	if r.GetRepo().GetVersion() != 1 || r.GetRepo().GetId() != 1 {
		t.Fatalf("new repo = %v, want version 1, id 1", r.GetRepo())
	}
	m.refused(create("acme/site"), fsmv1.Reason_REASON_ALREADY_EXISTS, "already exists")
	m.refused(create("../etc"), fsmv1.Reason_REASON_INVALID, `".." path segment`)
	m.refused(create(""), fsmv1.Reason_REASON_INVALID, "empty")
	m.refused(del("nope"), fsmv1.Reason_REASON_NOT_FOUND, "not found")
	m.ok(del("acme/site"))
	if _, ok := m.s.Repo("acme/site"); ok {
		t.Fatal("deleted repo still there")
	}
	if r := m.ok(create("acme/site")); r.GetRepo().GetId() != m.index {
		t.Fatalf("recreated repo id %d, want the new create index %d", r.GetRepo().GetId(), m.index)
	}
}

func Test_State_UpdateRefs_CAS(t *testing.T) {
	m := newMachine(t)
	m.ok(create("r"))
	tok := m.ok(acquire("r", "n1/p1", time.Minute)).GetLock().GetFencingToken()
	if tok != m.index {
		t.Fatalf("fencing token %d, want the granting index %d", tok, m.index)
	}
	r := m.ok(update("r", tok, false, "refs/heads/main", "", oidA))
	if r.GetRepo().GetVersion() != 2 {
		t.Fatalf("version %d after first update, want 2", r.GetRepo().GetVersion())
	}
	// Stale old value: refused, nothing changes.
	r = m.refused(update("r", tok, false, "refs/heads/main", oidB, oidC), fsmv1.Reason_REASON_STALE_REF, "refs/heads/main")
	if got := r.GetRefResults()[0]; got.GetStatus() != fsmv1.RefStatus_REF_STATUS_STALE || got.GetCurrentOid() != oidA {
		t.Fatalf("stale result %v", got)
	}
	if v, _ := m.s.Repo("r"); v.GetVersion() != 2 {
		t.Fatalf("version changed by a refused update: %d", v.GetVersion())
	}
	// Creating a ref that exists (old "") is stale too; zero oid means absent.
	m.refused(update("r", tok, false, "refs/heads/main", zero, oidB), fsmv1.Reason_REASON_STALE_REF, "stale")
	// Non-atomic: the good ref applies, the stale one is reported.
	r = m.ok(update("r", tok, false, "refs/heads/main", oidA, oidB, "refs/tags/v1", oidC, oidA))
	if r.GetRefResults()[0].GetStatus() != fsmv1.RefStatus_REF_STATUS_OK || r.GetRefResults()[1].GetStatus() != fsmv1.RefStatus_REF_STATUS_STALE {
		t.Fatalf("non-atomic results %v", r.GetRefResults())
	}
	// Atomic with one stale: nothing applies.
	r = m.refused(update("r", tok, true, "refs/heads/main", oidB, oidC, "refs/heads/dev", oidA, oidA), fsmv1.Reason_REASON_STALE_REF, "refs/heads/dev")
	if r.GetRefResults()[0].GetStatus() != fsmv1.RefStatus_REF_STATUS_REJECTED {
		t.Fatalf("atomic results %v", r.GetRefResults())
	}
	if got := refs(t, m.s, "r"); len(got) != 1 || got["refs/heads/main"] != oidB {
		t.Fatalf("refs after atomic refusal = %v", got)
	}
	// Delete a ref with the zero oid.
	m.ok(update("r", tok, false, "refs/heads/main", oidB, zero))
	if got := refs(t, m.s, "r"); len(got) != 0 {
		t.Fatalf("refs after delete = %v", got)
	}
	if v, _ := m.s.Repo("r"); v.GetVersion() != 4 {
		t.Fatalf("version %d, want 4 (create, 3 applied changes)", v.GetVersion())
	}
}

func Test_State_UpdateRefs_Invalid(t *testing.T) {
	m := newMachine(t)
	m.ok(create("r"))
	tok := m.ok(acquire("r", "h", time.Minute)).GetLock().GetFencingToken()
	m.refused(update("r", tok, false, "refs/heads/../x", "", oidA), fsmv1.Reason_REASON_INVALID, `".."`)
	m.refused(update("r", tok, false, "HEAD", "", oidA), fsmv1.Reason_REASON_INVALID, `start with "refs/"`)
	m.refused(update("r", tok, false, "refs/heads/a", "", "xyz"), fsmv1.Reason_REASON_INVALID, "40 or 64")
	m.refused(update("r", tok, false, "refs/heads/a", "", oidA, "refs/heads/a", "", oidB), fsmv1.Reason_REASON_INVALID, "twice")
	m.refused(update("r", tok, false), fsmv1.Reason_REASON_INVALID, "no ref updates")
	m.refused(update("nope", tok, false, "refs/heads/a", "", oidA), fsmv1.Reason_REASON_NOT_FOUND, "not found")
}

func Test_State_Fencing(t *testing.T) {
	m := newMachine(t)
	m.ok(create("r"))
	// No lock at all.
	m.refused(update("r", 1, false, "refs/heads/main", "", oidA), fsmv1.Reason_REASON_LOCK_NOT_HELD, "not held")
	old := m.ok(acquire("r", "n1", time.Second)).GetLock().GetFencingToken()
	// Another holder while the lease runs: refused, naming the holder.
	r := m.refused(acquire("r", "n2", time.Second), fsmv1.Reason_REASON_LOCK_HELD, `"n1"`)
	if r.GetLock().GetHolder() != "n1" {
		t.Fatalf("held refusal carries lock %v", r.GetLock())
	}
	// The lease runs out; n2 takes over with a newer token.
	m.now = m.now.Add(2 * time.Second)
	m.refused(update("r", old, false, "refs/heads/main", "", oidA), fsmv1.Reason_REASON_LEASE_EXPIRED, "expired")
	cur := m.ok(acquire("r", "n2", time.Second)).GetLock().GetFencingToken()
	if cur <= old {
		t.Fatalf("new token %d not above old %d", cur, old)
	}
	// The old holder's late write and renewal are refused.
	m.refused(update("r", old, false, "refs/heads/main", "", oidA), fsmv1.Reason_REASON_STALE_TOKEN, "stale")
	m.refused(renew("r", old, time.Second), fsmv1.Reason_REASON_STALE_TOKEN, "stale")
	m.refused(release("r", old), fsmv1.Reason_REASON_STALE_TOKEN, "stale")
	m.ok(update("r", cur, false, "refs/heads/main", "", oidA))
	if got := refs(t, m.s, "r"); got["refs/heads/main"] != oidA {
		t.Fatalf("refs = %v", got)
	}
}

// An UpdateRefs with release_lock frees the lock in the same entry, ref
// changes applied or refused; with a token that does not check out it
// changes nothing, the lock included; without the field the lock stays.
func Test_State_UpdateRefs_ReleasesLock(t *testing.T) {
	m := newMachine(t)
	m.ok(create("r"))
	tok := m.ok(acquire("r", "n1/p1", time.Minute)).GetLock().GetFencingToken()
	m.ok(update("r", tok, true, "refs/heads/main", "", oidA))
	if len(m.s.Locks()) != 1 {
		t.Fatal("an entry without release_lock released the lock")
	}
	u := update("r", tok, true, "refs/heads/main", oidA, oidB)
	u.GetUpdateRefs().ReleaseLock = true
	m.ok(u)
	if len(m.s.Locks()) != 0 || refs(t, m.s, "r")["refs/heads/main"] != oidB {
		t.Fatalf("locks %v, refs %v after a releasing update", m.s.Locks(), refs(t, m.s, "r"))
	}
	// The token is spent: a second entry with it is refused and frees
	// nobody else's lock.
	other := m.ok(acquire("r", "n2/p2", time.Minute)).GetLock().GetFencingToken()
	m.refused(u, fsmv1.Reason_REASON_STALE_TOKEN, "stale")
	if l := m.s.Locks(); len(l) != 1 || l[0].Token != other {
		t.Fatalf("locks %v, want n2's", l)
	}
	// A stale ref is refused, and the push's lock goes all the same.
	u = update("r", other, true, "refs/heads/main", oidA, oidC)
	u.GetUpdateRefs().ReleaseLock = true
	m.refused(u, fsmv1.Reason_REASON_STALE_REF, "stale")
	if len(m.s.Locks()) != 0 {
		t.Fatalf("locks %v after a refused releasing update", m.s.Locks())
	}
}

func Test_State_LockLifecycle(t *testing.T) {
	m := newMachine(t)
	m.ok(create("a"))
	m.ok(create("b"))
	m.refused(acquire("missing", "h", time.Second), fsmv1.Reason_REASON_NOT_FOUND, "not found")
	m.refused(acquire("a", "", time.Second), fsmv1.Reason_REASON_INVALID, "holder")
	ta := m.ok(acquire("a", "h1", time.Second)).GetLock().GetFencingToken()
	tb := m.ok(acquire("b", "h2", 10*time.Second)).GetLock().GetFencingToken()
	m.now = m.now.Add(500 * time.Millisecond)
	l := m.ok(renew("a", ta, time.Second)).GetLock()
	if want := m.now.Add(time.Second).UnixNano(); l.GetExpiresUnixNano() != want {
		t.Fatalf("renewed expiry %d, want %d", l.GetExpiresUnixNano(), want)
	}
	if len(m.s.ExpiredLocks(m.now)) != 0 {
		t.Fatal("nothing should have expired yet")
	}
	m.now = m.now.Add(2 * time.Second)
	if got := m.s.ExpiredLocks(m.now); len(got) != 1 || got[0].Repo != "a" {
		t.Fatalf("expired = %v, want a", got)
	}
	r := m.ok(&fsmv1.Entry{Command: &fsmv1.Entry_ExpireLocks{ExpireLocks: &fsmv1.ExpireLocks{}}})
	if len(r.GetExpired()) != 1 || r.GetExpired()[0].GetRepo() != "a" {
		t.Fatalf("ExpireLocks removed %v", r.GetExpired())
	}
	if len(m.s.Locks()) != 1 {
		t.Fatalf("locks left %v", m.s.Locks())
	}
	m.refused(release("b", tb+1), fsmv1.Reason_REASON_STALE_TOKEN, "stale")
	m.ok(release("b", tb))
	m.refused(release("b", tb), fsmv1.Reason_REASON_LOCK_NOT_HELD, "not held")
	tb2 := m.ok(acquire("b", "h3", time.Minute)).GetLock().GetFencingToken()
	fr := m.ok(&fsmv1.Entry{Command: &fsmv1.Entry_ForceReleaseLock{ForceReleaseLock: &fsmv1.ForceReleaseLock{Repo: "b"}}})
	if fr.GetLock().GetFencingToken() != tb2 {
		t.Fatalf("force release returned %v", fr.GetLock())
	}
	m.refused(&fsmv1.Entry{Command: &fsmv1.Entry_ForceReleaseLock{ForceReleaseLock: &fsmv1.ForceReleaseLock{Repo: "b"}}}, fsmv1.Reason_REASON_LOCK_NOT_HELD, "not held")
	// Deleting a repo drops its lock.
	m.ok(acquire("a", "h", time.Minute))
	m.ok(del("a"))
	if len(m.s.Locks()) != 0 {
		t.Fatalf("lock survived repo deletion: %v", m.s.Locks())
	}
}

func Test_State_Members(t *testing.T) {
	m := newMachine(t)
	m.ok(&fsmv1.Entry{Command: &fsmv1.Entry_SetMember{SetMember: &fsmv1.SetMember{Member: &fsmv1.Member{Id: "n2", GrpcAddr: "x:2"}}}})
	m.ok(&fsmv1.Entry{Command: &fsmv1.Entry_SetMember{SetMember: &fsmv1.SetMember{Member: &fsmv1.Member{Id: "n1", GrpcAddr: "x:1"}}}})
	m.refused(&fsmv1.Entry{Command: &fsmv1.Entry_SetMember{SetMember: &fsmv1.SetMember{Member: &fsmv1.Member{}}}}, fsmv1.Reason_REASON_INVALID, "id")
	if ms := m.s.Members(); len(ms) != 2 || ms[0].GetId() != "n1" {
		t.Fatalf("members %v", ms)
	}
	m.ok(&fsmv1.Entry{Command: &fsmv1.Entry_RemoveMember{RemoveMember: &fsmv1.RemoveMember{Id: "n1"}}})
	m.refused(&fsmv1.Entry{Command: &fsmv1.Entry_RemoveMember{RemoveMember: &fsmv1.RemoveMember{Id: "n1"}}}, fsmv1.Reason_REASON_NOT_FOUND, "n1")
}

func Test_State_RetriedRequestAppliesOnce(t *testing.T) {
	m := newMachine(t)
	m.ok(create("r"))
	e := acquire("r", "h", time.Minute)
	e.RequestId = "req-1"
	first := m.ok(proto.CloneOf(e))
	second := m.apply(proto.CloneOf(e)) // the same proposal, retried after a lost answer
	if second.GetRefusal() != nil || second.GetLock().GetFencingToken() != first.GetLock().GetFencingToken() {
		t.Fatalf("retry got %v, want the first result %v", second, first)
	}
	if len(m.s.Locks()) != 1 {
		t.Fatalf("locks %v", m.s.Locks())
	}
}

// build a state with some of everything.
func populated(t *testing.T) *machine {
	m := newMachine(t)
	for _, n := range []string{"a", "b/c", "d"} {
		m.ok(create(n))
	}
	tok := m.ok(acquire("a", "n1/p", time.Minute)).GetLock().GetFencingToken()
	m.ok(update("a", tok, false, "refs/heads/main", "", oidA, "refs/tags/v1", "", oidB))
	m.ok(acquire("d", "n2/p", time.Hour))
	m.ok(&fsmv1.Entry{Command: &fsmv1.Entry_SetMember{SetMember: &fsmv1.SetMember{Member: &fsmv1.Member{Id: "n1", GrpcAddr: "127.0.0.1:1"}}}})
	e := create("e")
	e.RequestId = "rid"
	m.ok(e)
	return m
}

func snapshotBytes(t *testing.T, s *State) []byte {
	var buf bytes.Buffer
	if err := writeSnapshot(&buf, s.capture()); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func Test_State_SnapshotRestore(t *testing.T) {
	m := populated(t)
	b := snapshotBytes(t, m.s)
	idx, items, err := readSnapshot(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	s2, err := restoreState(idx, items)
	if err != nil {
		t.Fatal(err)
	}
	if s2.Index() != m.s.Index() {
		t.Fatalf("restored index %d, want %d", s2.Index(), m.s.Index())
	}
	if !bytes.Equal(snapshotBytes(t, s2), b) {
		t.Fatal("restored state differs from the original")
	}
	// The restored state behaves the same: lock still held, refs CAS, request memory.
	m2 := &machine{t: t, s: s2, index: m.index, now: m.now}
	m2.refused(acquire("d", "other", time.Second), fsmv1.Reason_REASON_LOCK_HELD, "n2/p")
	e := create("e")
	e.RequestId = "rid"
	if r := m2.apply(e); r.GetRefusal() != nil {
		t.Fatalf("retried request after restore: %v", r.GetRefusal())
	}
	if got := refs(t, s2, "a"); got["refs/tags/v1"] != oidB {
		t.Fatalf("restored refs %v", got)
	}
}

func Test_State_SnapshotIsolatedFromLaterWrites(t *testing.T) {
	m := populated(t)
	view := m.s.capture()
	before := snapshotBytes(t, m.s)
	tok := m.ok(acquire("b/c", "x", time.Minute)).GetLock().GetFencingToken()
	m.ok(update("b/c", tok, false, "refs/heads/x", "", oidC))
	m.ok(del("a"))
	var buf bytes.Buffer
	if err := writeSnapshot(&buf, view); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf.Bytes(), before) {
		t.Fatal("a captured snapshot changed after later writes")
	}
}

func Test_State_SnapshotCorrupt(t *testing.T) {
	b := snapshotBytes(t, populated(t).s)
	if _, _, err := readSnapshot(bytes.NewReader(b[:len(b)-3])); err == nil {
		t.Fatal("truncated snapshot read without error")
	}
	if _, _, err := readSnapshot(bytes.NewReader([]byte("garbage!"))); err == nil {
		t.Fatal("garbage snapshot read without error")
	}
}

func Test_State_Deterministic(t *testing.T) {
	a, b := populated(t), populated(t)
	if !bytes.Equal(snapshotBytes(t, a.s), snapshotBytes(t, b.s)) {
		t.Fatal("same entries gave different states")
	}
}

func Test_CommandName_DomainEntries(t *testing.T) {
	for _, tc := range []struct {
		e    *fsmv1.Entry
		want string
	}{
		{&fsmv1.Entry{Command: &fsmv1.Entry_Mail{Mail: &mailv1.Command{}}}, "mail_unknown"},
		{&fsmv1.Entry{Command: &fsmv1.Entry_Mail{Mail: &mailv1.Command{Command: &mailv1.Command_Drain{Drain: &mailv1.Drain{}}}}}, "mail_drain"},
		{&fsmv1.Entry{Command: &fsmv1.Entry_Database{Database: &dbv1.Command{}}}, "db_unknown"},
		{&fsmv1.Entry{Command: &fsmv1.Entry_SetGrant{}}, "set_grant"},
	} {
		if got := commandName(tc.e); got != tc.want {
			t.Errorf("commandName(%v) = %q, want %q", tc.e, got, tc.want)
		}
	}
}

// Entries written with git's ref rules refuse what git itself refuses: a
// ref with one component under refs/, and a ref that is a directory of
// another. Entries without the rules (older logs) apply as they did, so a
// replay gives the state it gave before.
func Test_State_UpdateRefs_GitRules(t *testing.T) {
	m := newMachine(t)
	m.ok(create("r"))
	tok := m.ok(acquire("r", "h", time.Minute)).GetLock().GetFencingToken()
	git := func(triples ...string) *fsmv1.Entry {
		e := update("r", tok, true, triples...)
		e.GetUpdateRefs().RefRules = RefRulesGit
		return e
	}
	m.refused(git("refs/foo", "", oidA), fsmv1.Reason_REASON_INVALID, "at least two components")
	m.ok(git("refs/heads/a", "", oidA))
	m.refused(git("refs/heads/a/b", "", oidB), fsmv1.Reason_REASON_INVALID, "ref refs/heads/a exists")
	m.refused(git("refs/heads/x/y", "", oidB, "refs/heads/x", "", oidB), fsmv1.Reason_REASON_INVALID, "directory")
	m.refused(git("refs", "", oidB), fsmv1.Reason_REASON_INVALID, "")
	// Deleting a and creating a/b in one entry is fine: no conflict remains.
	m.ok(git("refs/heads/a", oidA, "", "refs/heads/a/b", "", oidB))
	m.refused(git("refs/heads/a", "", oidA), fsmv1.Reason_REASON_INVALID, "refs under refs/heads/a/ exist")
	if got := refs(t, m.s, "r"); len(got) != 1 || got["refs/heads/a/b"] != oidB {
		t.Fatalf("refs = %v", got)
	}
	// The same one-level ref without the rules: applied, as an old log did.
	m.ok(update("r", tok, true, "refs/foo", "", oidA))
}

// A repair records who changed which refs, from what to what, and why.
func Test_State_UpdateRefs_RepairRecorded(t *testing.T) {
	m := newMachine(t)
	m.ok(create("r"))
	tok := m.ok(acquire("r", "h", time.Minute)).GetLock().GetFencingToken()
	m.ok(update("r", tok, true, "refs/heads/main", "", oidA, "refs/heads/dev", "", oidB))
	e := update("r", tok, true, "refs/heads/main", oidA, oidC, "refs/heads/dev", oidB, "")
	e.GetUpdateRefs().RepairActor, e.GetUpdateRefs().RepairReason = "admin", "disk lost"
	r := m.ok(e)
	got, _ := m.s.Repo("r")
	if len(got.GetRepairs()) != 1 {
		t.Fatalf("repairs = %v", got.GetRepairs())
	}
	rec := got.GetRepairs()[0]
	if rec.GetActor() != "admin" || rec.GetReason() != "disk lost" || rec.GetVersion() != r.GetRepo().GetVersion() || rec.GetIndex() != m.index || len(rec.GetChanges()) != 2 {
		t.Fatalf("repair record %v", rec)
	}
	if c := rec.GetChanges()[1]; c.GetRef() != "refs/heads/dev" || c.GetOldOid() != oidB || c.GetNewOid() != "" {
		t.Fatalf("repair change %v", c)
	}
	// Snapshots keep the record.
	var buf bytes.Buffer
	if err := writeSnapshot(&buf, m.s.capture()); err != nil {
		t.Fatal(err)
	}
	idx, items, err := readSnapshot(&buf)
	if err != nil {
		t.Fatal(err)
	}
	s2, err := restoreState(idx, items)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := s2.Repo("r"); len(got.GetRepairs()) != 1 {
		t.Fatalf("repairs after restore = %v", got.GetRepairs())
	}
}

// A node that starts under a new incarnation frees the write locks its
// earlier process held, in the same entry, and the old holder's ref change
// is refused afterwards; the leader's FreeNodeLocks frees a silent node's
// locks up to the token it names. Entries without incarnations (older
// logs) free nothing.
func Test_State_LocksFreedWhenHolderGone(t *testing.T) {
	s := NewState()
	at := time.Unix(1000, 0)
	idx := uint64(0)
	apply := func(e *fsmv1.Entry) *fsmv1.Result {
		idx++
		at = at.Add(time.Second)
		e.LeaderTimeUnixNano = at.UnixNano()
		return s.Apply(idx, e)
	}
	withLife := func(id, inc string) *fsmv1.Entry {
		return &fsmv1.Entry{Command: &fsmv1.Entry_SetMember{SetMember: &fsmv1.SetMember{Member: &fsmv1.Member{Id: id, Incarnation: inc}}}}
	}
	lockFor := func(repo, holder, node, inc string) *fsmv1.Entry {
		e := acquire(repo, holder, time.Minute)
		a := e.GetAcquireLock()
		a.Node, a.Incarnation, a.WaitLeaseNanos = node, inc, int64(5*time.Second)
		return e
	}
	apply(create("r"))
	apply(create("q"))
	apply(withLife("n1", "a"))
	tok := apply(lockFor("r", "n1/p1", "n1", "a")).GetLock().GetFencingToken()
	if tok == 0 {
		t.Fatal("no lock granted")
	}
	old := apply(acquire("q", "n1/p0", time.Minute)) // no node: an older entry
	if old.GetRefusal() != nil {
		t.Fatal(old.GetRefusal())
	}
	if r := apply(withLife("n1", "a")); len(r.GetFreed()) != 0 {
		t.Fatalf("the same incarnation freed %v", r.GetFreed())
	}
	r := apply(withLife("n1", "b"))
	if len(r.GetFreed()) != 1 || r.GetFreed()[0].GetFencingToken() != tok {
		t.Fatalf("a new incarnation freed %v, want the lock on r", r.GetFreed())
	}
	if _, held := s.locks.Get("q"); !held {
		t.Fatal("a lock without a node was freed")
	}
	if u := apply(update("r", tok, true, "refs/heads/main", "", oidA)); u.GetRefusal().GetReason() != fsmv1.Reason_REASON_LOCK_NOT_HELD {
		t.Fatalf("the old process's ref change: %v, want refused", u)
	}
	tok2 := apply(lockFor("r", "n2/p2", "n2", "x")).GetLock().GetFencingToken()
	if u := apply(update("r", tok, true, "refs/heads/main", "", oidA)); u.GetRefusal().GetReason() != fsmv1.Reason_REASON_STALE_TOKEN {
		t.Fatalf("the old process's ref change after another took the lock: %v, want a stale token", u)
	}
	free := &fsmv1.Entry{Command: &fsmv1.Entry_FreeNodeLocks{FreeNodeLocks: &fsmv1.FreeNodeLocks{Node: "n2", UpToToken: tok2 - 1, Reason: "test"}}}
	if r := apply(free); len(r.GetFreed()) != 0 {
		t.Fatalf("freed %v, a lock granted after the token named", r.GetFreed())
	}
	free.GetFreeNodeLocks().UpToToken = tok2
	if r := apply(free); len(r.GetFreed()) != 1 {
		t.Fatalf("freed %v, want n2's lock", r.GetFreed())
	}
	if r := apply(&fsmv1.Entry{Command: &fsmv1.Entry_FreeNodeLocks{FreeNodeLocks: &fsmv1.FreeNodeLocks{}}}); r.GetRefusal().GetReason() != fsmv1.Reason_REASON_INVALID {
		t.Fatalf("FreeNodeLocks without a node: %v", r)
	}
	// A snapshot keeps what the lock table knows.
	apply(lockFor("r", "n1/p3", "n1", "b"))
	apply(lockFor("r", "n2/p4", "n2", "x")) // queued
	var buf bytes.Buffer
	if err := writeSnapshot(&buf, s.capture()); err != nil {
		t.Fatal(err)
	}
	i, items, err := readSnapshot(&buf)
	if err != nil {
		t.Fatal(err)
	}
	rs, err := restoreState(i, items)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(rs.Locks(), s.Locks()) || !reflect.DeepEqual(rs.LockQueues(), s.LockQueues()) || len(s.LockQueues()) != 1 {
		t.Fatalf("restored locks %+v queues %+v, want %+v %+v", rs.Locks(), rs.LockQueues(), s.Locks(), s.LockQueues())
	}
}
