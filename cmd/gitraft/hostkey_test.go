package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	gossh "golang.org/x/crypto/ssh"

	"github.com/gitraft/gitraft/gitproto"
)

// `gitraft ca host-key` writes a private key only its owner can read and
// the public key beside it, and never replaces a key.
func TestCAHostKey(t *testing.T) {
	clearEnv(t)
	dir := filepath.Join(t.TempDir(), "ca")
	out, err := run(t, "ca", "host-key", "--dir", dir)
	if err != nil {
		t.Fatalf("ca host-key: %v", err)
	}
	key := filepath.Join(dir, HostKeyFile)
	if !strings.Contains(out, "host_key_files: ["+key+"]") {
		t.Errorf("ca host-key does not say how to configure the key:\n%s", out)
	}
	fi, err := os.Stat(key)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("host key mode %04o, want 0600", fi.Mode().Perm())
	}
	signers, err := loadHostKeys([]string{key})
	if err != nil {
		t.Fatal(err)
	}
	pub, err := readPublicKeyFile(key + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	if signers[0].PublicKey().Type() != gossh.KeyAlgoED25519 || gossh.FingerprintSHA256(pub) != gossh.FingerprintSHA256(signers[0].PublicKey()) {
		t.Fatalf(".pub does not match the key, or not ed25519: %s", signers[0].PublicKey().Type())
	}
	if !strings.Contains(out, gossh.FingerprintSHA256(pub)) {
		t.Errorf("output lacks the fingerprint:\n%s", out)
	}
	before, _ := os.ReadFile(key)
	if _, err := run(t, "ca", "host-key", "--dir", dir); err == nil || !strings.Contains(err.Error(), "not overwriting") {
		t.Fatalf("second ca host-key: %v", err)
	}
	if after, _ := os.ReadFile(key); string(after) != string(before) {
		t.Fatal("the host key was replaced")
	}
	other := filepath.Join(dir, "new", "key")
	if _, err := run(t, "ca", "host-key", "--out", other); err != nil {
		t.Fatalf("ca host-key --out: %v", err)
	}
	if _, err := loadHostKeys([]string{key, other}); err != nil {
		t.Fatal(err)
	}
}

// A node refuses host key files others may read, or one key twice, as
// sshd does, and says what to do.
func TestLoadHostKeysRefuses(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "k")
	if err := ensureHostKeyFile(key, "test"); err != nil {
		t.Fatal(err)
	}
	if _, err := loadHostKeys([]string{key, key}); err == nil || !strings.Contains(err.Error(), "the same key") {
		t.Fatalf("one key twice: %v", err)
	}
	if err := os.Chmod(key, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := loadHostKeys([]string{key}); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("a world-readable key: %v", err)
	}
	if _, err := loadHostKeys([]string{filepath.Join(dir, "missing")}); err == nil {
		t.Fatal("a missing key file loaded")
	}
}

// The server offers the first key of each type; later keys of a type are
// only announced (they reach known_hosts before the nodes serve them).
func TestServedHostKeys(t *testing.T) {
	dir := t.TempDir()
	var files []string
	for _, n := range []string{"old", "new"} {
		files = append(files, filepath.Join(dir, n))
		if err := ensureHostKeyFile(files[len(files)-1], n); err != nil {
			t.Fatal(err)
		}
	}
	keys, err := loadHostKeys(files)
	if err != nil {
		t.Fatal(err)
	}
	served, announced := gitproto.ServedHostKeys(keys)
	if len(served) != 1 || len(announced) != 1 || served[0] != keys[0] || announced[0] != keys[1] {
		t.Fatalf("served %d, announced %d; want the first served and the second announced", len(served), len(announced))
	}
	lines := publicKeyLines(keys)
	if len(lines) != 2 || strings.Count(lines[0], " ") != 1 || !strings.HasPrefix(lines[0], "ssh-ed25519 ") {
		t.Fatalf("public key lines %q, want type and key without a comment", lines)
	}
}
