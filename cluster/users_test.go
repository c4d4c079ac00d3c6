package cluster

import (
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"strings"
	"testing"

	"golang.org/x/crypto/ssh"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func newPublicKeyLine(t *testing.T) string {
	t.Helper()
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	sp, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sp)))
}

func Test_ParseAuthorizedKey(t *testing.T) {
	key := newPublicKeyLine(t)
	k, err := ParseAuthorizedKey(key + " alice@laptop\n")
	if err != nil {
		t.Fatal(err)
	}
	if k.GetPublicKey() != key || k.GetComment() != "alice@laptop" || !strings.HasPrefix(k.GetFingerprint(), "SHA256:") {
		t.Fatalf("parsed %+v", k)
	}
	if _, err := ParseAuthorizedKey("ssh-ed25519 notbase64"); !errors.Is(err, ErrNotAKey) {
		t.Fatalf("garbage: %v, want ErrNotAKey", err)
	}
}

func Test_ParseAuthorizedKey_RefusesOptions(t *testing.T) {
	key := newPublicKeyLine(t)
	for opts, names := range map[string][]string{
		`from="10.0.0.0/8"`:                    {"from="},
		`from="10.0.0.0/8",no-port-forwarding`: {"from=", "no-port-forwarding"},
		`restrict`:                             {"restrict"},
		`command="/usr/bin/git-shell -c \"$SSH_ORIGINAL_COMMAND\""`: {"command="},
		`environment="A=B",no-pty,no-agent-forwarding`:              {"environment=", "no-pty", "no-agent-forwarding"},
	} {
		_, err := ParseAuthorizedKey(opts + " " + key + " alice@laptop")
		if !errors.Is(err, ErrKeyOptions) {
			t.Errorf("options %s: %v, want ErrKeyOptions", opts, err)
			continue
		}
		msg := err.Error()
		for _, n := range names {
			if !strings.Contains(msg, n) {
				t.Errorf("options %s: %q does not name %s", opts, msg, n)
			}
		}
		if !strings.Contains(msg, "add the key without them") || !strings.Contains(msg, "ssh-ed25519") {
			t.Errorf("options %s: %q does not say what to do", opts, msg)
		}
		if strings.Contains(msg, "10.0.0.0/8") || strings.Contains(msg, "git-shell") {
			t.Errorf("options %s: %q repeats option values", opts, msg)
		}
		if st := toStatus(err); status.Code(st) != codes.InvalidArgument {
			t.Errorf("options %s: gRPC code %s, want InvalidArgument", opts, status.Code(st))
		}
	}
}
