package mail

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

const testMasterCf = `smtp      inet  n       -       n       -       -       smtpd
submission inet n       -       n       -       -       smtpd
  -o syslog_name=postfix/submission
  -o smtpd_client_restrictions=permit_sasl_authenticated,reject
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
smtp      unix  -       -       n       -       -       smtp
`

// postconfDir makes a Postfix config dir that the real postconf reads; no
// Postfix runs (reloads are skipped with a warning).
func postconfDir(t *testing.T) (*Postfix, string) {
	t.Helper()
	if _, err := exec.LookPath("postconf"); err != nil {
		if _, err := os.Stat("/usr/sbin/postconf"); err != nil {
			t.Fatal("Postfix is not installed: these tests run the real postconf (Debian: apt-get install postfix; ./e2e/test.sh installs it)")
		}
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "main.cf"), []byte("compatibility_level = 3.6\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "master.cf"), []byte(testMasterCf), 0o644); err != nil {
		t.Fatal(err)
	}
	// Postfix waits for a config file changed in the last second to settle.
	old := time.Now().Add(-time.Hour)
	for _, f := range []string{"main.cf", "master.cf"} {
		if err := os.Chtimes(filepath.Join(dir, f), old, old); err != nil {
			t.Fatal(err)
		}
	}
	p, err := NewPostfix(PostfixConfig{ConfigDir: dir, StateFile: filepath.Join(dir, "state", "overrides.json")}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	return p, dir
}

func overridesOf(t *testing.T, p *Postfix) map[string]string {
	t.Helper()
	m, err := p.overrides(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func Test_Postfix_DeferSavesAndRestores(t *testing.T) {
	p, dir := postconfDir(t)
	ctx := context.Background()
	before := overridesOf(t, p)
	if before["submission/inet/smtpd_client_restrictions"] != "permit_sasl_authenticated,reject" {
		t.Fatalf("test master.cf not read as expected: %v", before)
	}
	svcs, err := p.Check(ctx)
	if err != nil || strings.Join(svcs, " ") != "smtp/inet submission/inet" {
		t.Fatalf("Check: %v %v", svcs, err)
	}
	if err := p.SetDefer(ctx, true); err != nil {
		t.Fatal(err)
	}
	on := overridesOf(t, p)
	for _, svc := range []string{"smtp/inet", "submission/inet"} {
		if on[svc+"/smtpd_client_restrictions"] != "defer" {
			t.Fatalf("%s not deferring: %v", svc, on)
		}
	}
	if on["submission/inet/syslog_name"] != "postfix/submission" {
		t.Fatalf("other overrides lost: %v", on)
	}
	cf, _ := os.ReadFile(filepath.Join(dir, "master.cf"))
	if err := p.SetDefer(ctx, true); err != nil {
		t.Fatal(err)
	}
	if again, _ := os.ReadFile(filepath.Join(dir, "master.cf")); string(again) != string(cf) {
		t.Fatalf("setting it again changed master.cf:\n%s\n%s", cf, again)
	}
	if err := p.SetDefer(ctx, false); err != nil {
		t.Fatal(err)
	}
	if after := overridesOf(t, p); !equalMaps(after, before) {
		t.Fatalf("not restored:\n got %v\nwant %v", after, before)
	}
	if b, _ := os.ReadFile(p.cfg.StateFile); strings.TrimSpace(string(b)) != "{}" {
		t.Fatalf("state file keeps %s", b)
	}
}

// If the state file is lost, the agent still removes its own override.
func Test_Postfix_LostStateFile(t *testing.T) {
	p, _ := postconfDir(t)
	ctx := context.Background()
	if err := p.SetDefer(ctx, true); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(p.cfg.StateFile); err != nil {
		t.Fatal(err)
	}
	if err := p.SetDefer(ctx, false); err != nil {
		t.Fatal(err)
	}
	if v, ok := overridesOf(t, p)["smtp/inet/smtpd_client_restrictions"]; ok {
		t.Fatalf("override left behind: %q", v)
	}
}

func Test_Postfix_Handoff(t *testing.T) {
	p, _ := postconfDir(t)
	ctx := context.Background()
	before := overridesOf(t, p)
	if err := p.SetHandoff(ctx, "[127.0.0.1]:2526"); err != nil {
		t.Fatal(err)
	}
	on := overridesOf(t, p)
	for _, param := range []string{"default_transport", "relay_transport", "local_transport", "virtual_transport"} {
		if on["rewrite/unix/"+param] != "smtp:[127.0.0.1]:2526" {
			t.Fatalf("%s not handed off: %v", param, on)
		}
	}
	if v, ok := on["rewrite/unix/transport_maps"]; !ok || v != "" {
		t.Fatalf("transport_maps not emptied: %v", on)
	}
	if err := p.SetHandoff(ctx, "[127.0.0.1]:2527"); err != nil {
		t.Fatal(err)
	}
	if v := overridesOf(t, p)["rewrite/unix/default_transport"]; v != "smtp:[127.0.0.1]:2527" {
		t.Fatalf("second peer: %q", v)
	}
	if err := p.SetHandoff(ctx, ""); err != nil {
		t.Fatal(err)
	}
	if after := overridesOf(t, p); !equalMaps(after, before) {
		t.Fatalf("not restored:\n got %v\nwant %v", after, before)
	}
}

func equalMaps(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func Test_Postfix_Parse(t *testing.T) {
	svcs := parseMasterServices("smtp inet n - y - - smtpd\n  -o a=b\n# comment\n\n127.0.0.1:2525 inet n - n - - smtpd\nsmtpd pass - - y - - smtpd\nrewrite unix - - y - - trivial-rewrite\nbad line\n")
	var got []string
	for _, s := range svcs {
		got = append(got, s.name+"/"+s.typ+"="+s.command)
	}
	want := "smtp/inet=smtpd 127.0.0.1:2525/inet=smtpd smtpd/pass=smtpd rewrite/unix=trivial-rewrite"
	if strings.Join(got, " ") != want {
		t.Fatalf("services %q, want %q", strings.Join(got, " "), want)
	}
	n, err := countQueueJSON(`{"queue_name": "deferred", "queue_id": "A1", "recipients": []}
{"queue_name": "hold", "queue_id": "B2", "recipients": []}
`)
	if err != nil || n != 2 {
		t.Fatalf("count: %d %v", n, err)
	}
	if n, err := countQueueJSON(""); err != nil || n != 0 {
		t.Fatalf("empty queue: %d %v", n, err)
	}
	if _, err := countQueueJSON("postqueue: warning: something\n"); err == nil {
		t.Fatal("a line that is no message counted")
	}
	if _, err := NewPostfix(PostfixConfig{StateFile: "x", Services: []string{"smtp"}}, slog.Default()); err == nil {
		t.Fatal("a service without a type accepted")
	}
}

// fakeProc builds a process table: pid -> comm, ppid and fd links.
func fakeProc(t *testing.T, procs map[int]struct {
	comm string
	ppid int
	fds  map[int]string
}) string {
	t.Helper()
	root := t.TempDir()
	for pid, p := range procs {
		dir := filepath.Join(root, strconv.Itoa(pid))
		if err := os.MkdirAll(filepath.Join(dir, "fd"), 0o755); err != nil {
			t.Fatal(err)
		}
		stat := fmt.Sprintf("%d (%s) S %d %d 0 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 1234 0", pid, p.comm, p.ppid, pid)
		if err := os.WriteFile(filepath.Join(dir, "stat"), []byte(stat), 0o644); err != nil {
			t.Fatal(err)
		}
		for fd, target := range p.fds {
			if err := os.Symlink(target, filepath.Join(dir, "fd", strconv.Itoa(fd))); err != nil {
				t.Fatal(err)
			}
		}
	}
	return root
}

// An smtpd whose status channel the master no longer holds began before
// the last reload; smtpd processes of another master, and other daemons,
// do not count.
func Test_Postfix_OldSessions(t *testing.T) {
	type proc = struct {
		comm string
		ppid int
		fds  map[int]string
	}
	root := fakeProc(t, map[int]proc{
		100: {"master", 1, map[int]string{12: "socket:[10]", 14: "socket:[20]", 15: "socket:[21]", 9: "/x/master.pid"}},
		200: {"smtpd", 100, map[int]string{5: "socket:[21]", 6: "socket:[10]"}}, // current
		201: {"smtpd", 100, map[int]string{5: "socket:[11]", 6: "socket:[10]"}}, // old
		202: {"smtpd", 100, map[int]string{5: "socket:[12]", 6: "socket:[10]"}}, // old
		203: {"cleanup", 100, map[int]string{5: "socket:[13]"}},                 // old, but no smtpd
		300: {"smtpd", 999, map[int]string{5: "socket:[11]"}},                   // another instance
		400: {"a (smtpd) b", 100, map[int]string{5: "socket:[11]"}},
	})
	qdir := t.TempDir()
	os.MkdirAll(filepath.Join(qdir, "pid"), 0o755)
	os.WriteFile(filepath.Join(qdir, "pid", "master.pid"), []byte("       100\n"), 0o644)
	p, err := NewPostfix(PostfixConfig{StateFile: filepath.Join(t.TempDir(), "s.json"), Proc: root}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	p.queueDir = qdir
	n, err := p.OldSessions(context.Background())
	if err != nil || n != 2 {
		t.Fatalf("old sessions: %d, %v; want 2", n, err)
	}
	// No master running (stale pid file): no sessions.
	os.WriteFile(filepath.Join(qdir, "pid", "master.pid"), []byte("200\n"), 0o644)
	if n, err := p.OldSessions(context.Background()); err != nil || n != 0 {
		t.Fatalf("with a stale pid file: %d, %v", n, err)
	}
	st, err := parseStat("400 (a (smtpd) b) S 100 400")
	if err != nil || st.comm != "a (smtpd) b" || st.ppid != 100 {
		t.Fatalf("parseStat: %+v %v", st, err)
	}
}
