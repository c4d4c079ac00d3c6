package cluster

import (
	"testing"
	"time"

	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

func addUser(name string) *fsmv1.Entry {
	return &fsmv1.Entry{Command: &fsmv1.Entry_AddUser{AddUser: &fsmv1.AddUser{Name: name}}}
}
func addKey(user, fp string) *fsmv1.Entry {
	return &fsmv1.Entry{Command: &fsmv1.Entry_AddKey{AddKey: &fsmv1.AddKey{Key: &fsmv1.SSHKey{User: user, PublicKey: "ssh-ed25519 AAAA" + fp, Fingerprint: fp}}}}
}
func grant(repo, user string, a fsmv1.Access) *fsmv1.Entry {
	return &fsmv1.Entry{Command: &fsmv1.Entry_SetGrant{SetGrant: &fsmv1.SetGrant{Repo: repo, User: user, Access: a}}}
}

func Test_State_UsersKeysGrants(t *testing.T) {
	m := newMachine(t)
	m.ok(addUser("alice"))
	m.ok(addUser("bob"))
	m.refused(addUser("alice"), fsmv1.Reason_REASON_ALREADY_EXISTS, "already exists")
	m.refused(addUser("Bad Name"), fsmv1.Reason_REASON_INVALID, "lowercase")
	m.refused(addUser(""), fsmv1.Reason_REASON_INVALID, "1 to 39")
	m.ok(addKey("alice", "SHA256:aaa"))
	m.refused(addKey("bob", "SHA256:aaa"), fsmv1.Reason_REASON_ALREADY_EXISTS, `registered to user "alice"`)
	m.refused(addKey("carol", "SHA256:ccc"), fsmv1.Reason_REASON_NOT_FOUND, "carol")
	m.refused(addKey("bob", "MD5:xx"), fsmv1.Reason_REASON_INVALID, "fingerprint")
	m.ok(addKey("bob", "SHA256:bbb"))
	if k, ok := m.s.KeyByFingerprint("SHA256:bbb"); !ok || k.GetUser() != "bob" {
		t.Fatalf("key lookup = %v, %v", k, ok)
	}
	m.ok(create("r"))
	m.refused(grant("nope", "alice", fsmv1.Access_ACCESS_READ), fsmv1.Reason_REASON_NOT_FOUND, "repository")
	m.refused(grant("r", "carol", fsmv1.Access_ACCESS_READ), fsmv1.Reason_REASON_NOT_FOUND, "user")
	m.refused(grant("r", "alice", fsmv1.Access_ACCESS_UNSPECIFIED), fsmv1.Reason_REASON_INVALID, "access")
	m.ok(grant("r", "alice", fsmv1.Access_ACCESS_WRITE))
	m.ok(grant("r", "bob", fsmv1.Access_ACCESS_READ))
	if a := m.s.Access("r", "alice"); a != fsmv1.Access_ACCESS_WRITE {
		t.Fatalf("alice access %v", a)
	}
	m.ok(grant("r", "bob", fsmv1.Access_ACCESS_NONE))
	if a := m.s.Access("r", "bob"); a != fsmv1.Access_ACCESS_NONE {
		t.Fatalf("revoked access %v", a)
	}
	// Removing a user takes their keys and grants along.
	m.ok(&fsmv1.Entry{Command: &fsmv1.Entry_RemoveUser{RemoveUser: &fsmv1.RemoveUser{Name: "alice"}}})
	if _, ok := m.s.KeyByFingerprint("SHA256:aaa"); ok {
		t.Fatal("key of a removed user survived")
	}
	if len(m.s.Grants("r")) != 0 {
		t.Fatalf("grants of a removed user survived: %v", m.s.Grants("r"))
	}
	// Deleting a repo drops its grants.
	m.ok(grant("r", "bob", fsmv1.Access_ACCESS_ADMIN))
	m.ok(del("r"))
	m.ok(create("r"))
	if a := m.s.Access("r", "bob"); a != fsmv1.Access_ACCESS_NONE {
		t.Fatalf("a recreated repo inherited a grant: %v", a)
	}
	m.ok(&fsmv1.Entry{Command: &fsmv1.Entry_RemoveKey{RemoveKey: &fsmv1.RemoveKey{Fingerprint: "SHA256:bbb"}}})
	m.refused(&fsmv1.Entry{Command: &fsmv1.Entry_RemoveKey{RemoveKey: &fsmv1.RemoveKey{Fingerprint: "SHA256:bbb"}}}, fsmv1.Reason_REASON_NOT_FOUND, "SHA256:bbb")
}

func Test_State_HostKeyFirstWins(t *testing.T) {
	m := newMachine(t)
	hk := func(fp string) *fsmv1.Entry {
		return &fsmv1.Entry{Command: &fsmv1.Entry_SetHostKey{SetHostKey: &fsmv1.SetHostKey{HostKey: &fsmv1.HostKey{PrivateKey: []byte("k" + fp), Fingerprint: fp}}}}
	}
	m.refused(&fsmv1.Entry{Command: &fsmv1.Entry_SetHostKey{SetHostKey: &fsmv1.SetHostKey{HostKey: &fsmv1.HostKey{}}}}, fsmv1.Reason_REASON_INVALID, "empty")
	m.ok(hk("SHA256:one"))
	m.refused(hk("SHA256:two"), fsmv1.Reason_REASON_ALREADY_EXISTS, "SHA256:one")
	if m.s.HostKey().GetFingerprint() != "SHA256:one" {
		t.Fatalf("host key %v", m.s.HostKey())
	}
}

func Test_State_HeadFollowsFirstBranch(t *testing.T) {
	m := newMachine(t)
	r := m.ok(create("r"))
	if r.GetRepo().GetHead() != DefaultHead {
		t.Fatalf("new repo head %q", r.GetRepo().GetHead())
	}
	tok := m.ok(acquire("r", "h", time.Minute)).GetLock().GetFencingToken()
	r = m.ok(update("r", tok, false, "refs/tags/v1", "", oidA, "refs/heads/master", "", oidA))
	if r.GetRepo().GetHead() != "refs/heads/master" {
		t.Fatalf("head after first push of master = %q", r.GetRepo().GetHead())
	}
	r = m.ok(update("r", tok, false, "refs/heads/main", "", oidB))
	if r.GetRepo().GetHead() != "refs/heads/master" {
		t.Fatalf("head moved while its branch exists: %q", r.GetRepo().GetHead())
	}
	r = m.ok(update("r", tok, false, "refs/heads/master", oidA, ""))
	if r.GetRepo().GetHead() != "refs/heads/main" {
		t.Fatalf("head after deleting master = %q, want main", r.GetRepo().GetHead())
	}
}

func Test_State_SnapshotKeepsUsers(t *testing.T) {
	m := populated(t)
	m.ok(addUser("alice"))
	m.ok(addKey("alice", "SHA256:aaa"))
	m.ok(grant("a", "alice", fsmv1.Access_ACCESS_WRITE))
	m.ok(&fsmv1.Entry{Command: &fsmv1.Entry_SetHostKey{SetHostKey: &fsmv1.SetHostKey{HostKey: &fsmv1.HostKey{PrivateKey: []byte("k"), Fingerprint: "SHA256:h"}}}})
	b := snapshotBytes(t, m.s)
	idx, items, err := readSnapshot(bytesReader(b))
	if err != nil {
		t.Fatal(err)
	}
	s2, err := restoreState(idx, items)
	if err != nil {
		t.Fatal(err)
	}
	if s2.Access("a", "alice") != fsmv1.Access_ACCESS_WRITE || s2.HostKey().GetFingerprint() != "SHA256:h" || len(s2.Keys("alice")) != 1 {
		t.Fatal("users, keys, grants or host key lost in a snapshot")
	}
	if string(snapshotBytes(t, s2)) != string(b) {
		t.Fatal("restored state differs")
	}
}
