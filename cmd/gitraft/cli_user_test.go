package main

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"
	gossh "golang.org/x/crypto/ssh"
)

// keyAddRoot is a root command with `gitraft key`, pointed at an address
// where nothing listens: a command that gets as far as connecting fails
// with a connection error.
func keyAddRoot(t *testing.T, stdin string, args ...string) (string, error) {
	t.Helper()
	clearEnv(t)
	t.Setenv(envAddr, "127.0.0.1:1")
	t.Setenv(envInsecure, "true")
	g := &globalOpts{}
	root := &cobra.Command{Use: "gitraft", SilenceErrors: true, SilenceUsage: true}
	kc := newKeyCmd(g)
	g.register(kc.PersistentFlags())
	root.AddCommand(kc)
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetIn(strings.NewReader(stdin))
	root.SetArgs(append(args, "--timeout", "2s"))
	err := root.Execute()
	return out.String(), err
}

func Test_KeyAdd_RefusesAuthorizedKeysOptions(t *testing.T) {
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	sp, _ := gossh.NewPublicKey(pub)
	key := strings.TrimSpace(string(gossh.MarshalAuthorizedKey(sp)))
	line := `from="192.0.2.0/24",no-port-forwarding ` + key + " alice@laptop"
	file := filepath.Join(t.TempDir(), "alice.pub")
	if err := os.WriteFile(file, []byte(line+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for what, args := range map[string][]string{
		"from a file":         {"key", "add", "alice", file},
		"from stdin":          {"key", "add", "alice", "-"},
		"on the command line": {"key", "add", "alice", line},
	} {
		out, err := keyAddRoot(t, line+"\n", args...)
		if err == nil {
			t.Errorf("%s: key with options accepted: %s", what, out)
			continue
		}
		msg := err.Error()
		for _, want := range []string{`add key for "alice"`, "does not apply authorized_keys options", "from=", "no-port-forwarding", "add the key without them"} {
			if !strings.Contains(msg, want) {
				t.Errorf("%s: %q does not say %q", what, msg, want)
			}
		}
	}
	// The same key without options gets as far as the (absent) node.
	_, err = keyAddRoot(t, "", "key", "add", "alice", key)
	t.Logf("plain key: %v", err)
	if err == nil || strings.Contains(err.Error(), "options") {
		t.Fatalf("plain key: %v, want a connection error", err)
	}
}
