package cluster

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"strings"
	"testing"

	"golang.org/x/crypto/ssh"

	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

// testHostKey makes a real ed25519 host key: its OpenSSH PEM and its
// authorized_keys line (with a comment, as a .pub file has it).
func testHostKey(t *testing.T) (pemBytes []byte, line string) {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	blk, err := ssh.MarshalPrivateKey(priv, "test host key")
	if err != nil {
		t.Fatal(err)
	}
	s, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(blk), strings.TrimSpace(string(ssh.MarshalAuthorizedKey(s.PublicKey()))) + " host@example"
}

func setMember(id string, hostKeys ...string) *fsmv1.Entry {
	return &fsmv1.Entry{Command: &fsmv1.Entry_SetMember{SetMember: &fsmv1.SetMember{Member: &fsmv1.Member{Id: id, SshAddr: id + ":22", SshHostKeys: hostKeys}}}}
}

func setHostKey(pemBytes []byte, line string) *fsmv1.Entry {
	return &fsmv1.Entry{Command: &fsmv1.Entry_SetHostKey{SetHostKey: &fsmv1.SetHostKey{HostKey: &fsmv1.HostKey{PrivateKey: pemBytes, PublicKey: NormalizePublicKey(line), Fingerprint: fingerprintOf(line)}}}}
}

var forgetHostKey = &fsmv1.Entry{Command: &fsmv1.Entry_ForgetHostPrivateKey{ForgetHostPrivateKey: &fsmv1.ForgetHostPrivateKey{}}}

// holdsPrivateKey reports whether b contains the private key: a base64
// line of its PEM, or its decoded bytes.
func holdsPrivateKey(b, pemBytes []byte) bool {
	blk, _ := pem.Decode(pemBytes)
	if bytes.Contains(b, blk.Bytes) {
		return true
	}
	for _, l := range bytes.Split(pemBytes, []byte("\n")) {
		if len(l) >= 40 && !bytes.HasPrefix(l, []byte("-----")) && bytes.Contains(b, l) {
			return true
		}
	}
	return false
}

func restored(t *testing.T, b []byte) *State {
	t.Helper()
	idx, items, err := readSnapshot(bytesReader(b))
	if err != nil {
		t.Fatal(err)
	}
	s, err := restoreState(idx, items)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// Members announce only public host keys; the state lists each key once,
// with the members serving it, and a snapshot carries them and nothing
// private.
func Test_State_HostKeysArePublicAndPerMember(t *testing.T) {
	_, oldKey := testHostKey(t)
	_, newKey := testHostKey(t)
	m := newMachine(t)
	m.ok(setMember("n1", oldKey, newKey))
	m.ok(setMember("n2", NormalizePublicKey(oldKey), newKey))
	m.ok(setMember("n3", oldKey))
	m.refused(setMember("n4", " "), fsmv1.Reason_REASON_INVALID, "empty SSH host key")
	check := func(s *State) {
		t.Helper()
		keys := s.HostPublicKeys()
		if len(keys) != 2 || keys[0].PublicKey != NormalizePublicKey(oldKey) || keys[1].PublicKey != NormalizePublicKey(newKey) {
			t.Fatalf("host keys %+v, want the old then the new key, once each, without comments", keys)
		}
		if got := strings.Join(keys[0].Members, ","); got != "n1,n2,n3" {
			t.Fatalf("old key served by %s", got)
		}
		if got := strings.Join(keys[1].Members, ","); got != "n1,n2" {
			t.Fatalf("new key served by %s", got)
		}
		if keys[0].InState || keys[1].InState {
			t.Fatal("a member's key is marked as the state's own")
		}
		if msg := hostKeyMismatch(s.Members(), s.stateHostPublicKey()); !strings.Contains(msg, "n3: "+fingerprintOf(oldKey)) || !strings.Contains(msg, "n1,n2: ") {
			t.Fatalf("mismatch = %q, want n3 named apart from n1,n2", msg)
		}
	}
	check(m.s)
	b := snapshotBytes(t, m.s)
	if bytes.Contains(b, []byte("PRIVATE KEY")) {
		t.Fatal("the snapshot holds a private key")
	}
	check(restored(t, b))

	// Once n3 has the same files, nothing differs.
	m.ok(setMember("n3", oldKey, newKey))
	if msg := hostKeyMismatch(m.s.Members(), m.s.stateHostPublicKey()); msg != "" {
		t.Fatalf("mismatch with equal keys: %q", msg)
	}
	// A member record written by an older gitraft (no host keys) still
	// decodes and applies; it serves no announced key.
	m.ok(&fsmv1.Entry{Command: &fsmv1.Entry_SetMember{SetMember: &fsmv1.SetMember{Member: &fsmv1.Member{Id: "n4", GrpcAddr: "x"}}}})
	if msg := hostKeyMismatch(m.s.Members(), m.s.stateHostPublicKey()); !strings.Contains(msg, "n4: none") {
		t.Fatalf("mismatch = %q, want n4 without keys named", msg)
	}
}

// A state written by an older gitraft holds the private host key
// (SetHostKey). It still applies and is listed; nodes without files serve
// it; ForgetHostPrivateKey, once every member has files of its own, drops
// the private part from the state and from every later snapshot, and a late
// SetHostKey cannot bring a key back.
func Test_State_OldHostKeyForgotten(t *testing.T) {
	pemBytes, line := testHostKey(t)
	m := newMachine(t)
	m.ok(setMember("n1"))
	m.ok(setMember("n2"))
	m.ok(setHostKey(pemBytes, line))
	if hk := m.s.HostKey(); !bytes.Equal(hk.GetPrivateKey(), pemBytes) {
		t.Fatal("an old SetHostKey entry did not apply")
	}
	keys := m.s.HostPublicKeys()
	if len(keys) != 1 || !keys[0].InState || keys[0].PublicKey != NormalizePublicKey(line) {
		t.Fatalf("host keys %+v, want the state's key", keys)
	}
	if msg := hostKeyMismatch(m.s.Members(), m.s.stateHostPublicKey()); msg != "" {
		t.Fatalf("members serving the state's key differ: %q", msg)
	}
	before := snapshotBytes(t, m.s)
	if !holdsPrivateKey(before, pemBytes) {
		t.Fatal("the private key is not found in a snapshot that holds it: the checks below prove nothing")
	}
	// An old snapshot, with the private key, restores as it was.
	if !bytes.Equal(restored(t, before).HostKey().GetPrivateKey(), pemBytes) {
		t.Fatal("an old snapshot lost its host key")
	}

	// n2 has no file yet: refused, naming it.
	m.ok(setMember("n1", line))
	m.refused(forgetHostKey, fsmv1.Reason_REASON_PRECONDITION, "n2")
	if len(m.s.HostKey().GetPrivateKey()) == 0 {
		t.Fatal("a refused forget dropped the key")
	}
	// n1 serves the exported key from its file, n2 from the state: the same key.
	if msg := hostKeyMismatch(m.s.Members(), m.s.stateHostPublicKey()); msg != "" {
		t.Fatalf("the file and the state's copy of one key count as different: %q", msg)
	}
	m.ok(setMember("n2", line))
	m.ok(forgetHostKey)
	m.refused(forgetHostKey, fsmv1.Reason_REASON_NOT_FOUND, "no private")
	if len(m.s.HostKey().GetPrivateKey()) != 0 || m.s.HostKey().GetPublicKey() != NormalizePublicKey(line) {
		t.Fatalf("after forget the state holds %v", m.s.HostKey())
	}
	keys = m.s.HostPublicKeys()
	if len(keys) != 1 || keys[0].InState || strings.Join(keys[0].Members, ",") != "n1,n2" {
		t.Fatalf("host keys after forget %+v, want the key the members announce", keys)
	}
	after := snapshotBytes(t, m.s)
	if holdsPrivateKey(after, pemBytes) || bytes.Contains(after, []byte("PRIVATE KEY")) {
		t.Fatal("a snapshot after forget still holds the private key")
	}
	s2 := restored(t, after)
	if len(s2.HostKey().GetPrivateKey()) != 0 || !bytes.Equal(snapshotBytes(t, s2), after) {
		t.Fatal("restoring the snapshot after forget does not give the same state")
	}
	// An older leader's SetHostKey cannot put a private key back.
	other, otherLine := testHostKey(t)
	m.refused(setHostKey(other, otherLine), fsmv1.Reason_REASON_ALREADY_EXISTS, "already has")
}

// force forgets the key even while a member has no file.
func Test_State_ForgetHostKeyForced(t *testing.T) {
	pemBytes, line := testHostKey(t)
	m := newMachine(t)
	m.refused(forgetHostKey, fsmv1.Reason_REASON_NOT_FOUND, "no private")
	m.ok(setMember("n1"))
	m.ok(setHostKey(pemBytes, line))
	m.ok(&fsmv1.Entry{Command: &fsmv1.Entry_ForgetHostPrivateKey{ForgetHostPrivateKey: &fsmv1.ForgetHostPrivateKey{Force: true}}})
	if len(m.s.HostKey().GetPrivateKey()) != 0 || len(m.s.HostPublicKeys()) != 0 {
		t.Fatalf("forced forget left %v, %v", m.s.HostKey(), m.s.HostPublicKeys())
	}
}
