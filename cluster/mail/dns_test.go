package mail

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func readFile(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

func Test_Output_WritesFragmentAndRunsCommand(t *testing.T) {
	dir := t.TempDir()
	zone := filepath.Join(dir, "mx.zone")
	runs := filepath.Join(dir, "runs")
	gate := filepath.Join(dir, "gate")
	c := &fakeCluster{s: NewState(), now: time.Now}
	c.apply(t, add("mx1", "mx1.example.org", 10))
	c.apply(t, add("mx2", "mx2.example.org", 20))
	// The command fails until the gate file exists; each success appends
	// a copy of the fragment it was given.
	cmd := `test -e ` + gate + ` || { echo "DNS API down" >&2; exit 1; }; cat "$1" >> ` + runs + `; echo "$GITRAFT_MX_ZONE_FILE" >> ` + runs
	o, err := NewOutput(OutputConfig{ZoneFile: zone, OnChange: cmd, Poll: 10 * time.Millisecond}, c, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { o.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	waitUntil(t, "the fragment", func() bool { return strings.Contains(readFile(zone), "mx2.example.org.") })
	if got := readFile(zone); strings.Index(got, "mx1.example.org.") > strings.Index(got, "mx2.example.org.") {
		t.Fatalf("not by priority:\n%s", got)
	}
	if readFile(runs) != "" {
		t.Fatal("the failing command left output")
	}
	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the command's retry", func() bool { return strings.Contains(readFile(runs), zone) })

	c.apply(t, drain("mx2", time.Hour, "", false))
	waitUntil(t, "mx2 out of the fragment", func() bool { return !strings.Contains(readFile(zone), "mx2") })
	waitUntil(t, "the command after the change", func() bool { return strings.Count(readFile(runs), zone) == 2 })
	if got := readFile(runs); strings.Count(got, "mx2.example.org") != 1 || strings.Count(got, "mx1.example.org") != 2 {
		t.Fatalf("the command saw:\n%s", got)
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Fatalf("temporary file left: %s", e.Name())
		}
	}
}

// A restarted node with the fragment already in place does not push it
// again.
func Test_Output_NoCommandWhenUnchanged(t *testing.T) {
	dir := t.TempDir()
	zone := filepath.Join(dir, "mx.zone")
	c := &fakeCluster{s: NewState(), now: time.Now}
	c.apply(t, add("mx1", "mx1.example.org", 10))
	if err := os.WriteFile(zone, []byte(ZoneFragment(c.s.MXSet())), 0o644); err != nil {
		t.Fatal(err)
	}
	marker := filepath.Join(dir, "ran")
	o, err := NewOutput(OutputConfig{ZoneFile: zone, OnChange: "touch " + marker, Poll: 10 * time.Millisecond}, c, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { o.Run(ctx); close(done) }()
	c.apply(t, add("mx2", "mx2.example.org", 10))
	waitUntil(t, "the command after a change", func() bool { _, err := os.Stat(marker); return err == nil })
	cancel()
	<-done
	os.Remove(marker)
	// Again, with nothing changed: a few polls, no command.
	ctx, cancel = context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	o.Run(ctx)
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("the command ran though the fragment had not changed")
	}
	if _, err := NewOutput(OutputConfig{ZoneFile: "relative.zone"}, c, slog.Default()); err == nil {
		t.Fatal("a relative zone file was accepted")
	}
}

// mail.on_change as the README has it: a script's path, which gets the
// zone file as $1; and a plain command with arguments.
func Test_Output_OnChangeScriptPath(t *testing.T) {
	dir := t.TempDir()
	zone := filepath.Join(dir, "mx.zone")
	got := filepath.Join(dir, "got")
	script := filepath.Join(dir, "push-dns")
	body := "#!/bin/sh\nset -eu\necho \"args=$# first=$1 last=${2:-}\" > " + got + "\nfor a; do z=$a; done\ncp \"$z\" " + got + ".zone\n"
	if err := os.WriteFile(script, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ cmd, want string }{
		{script, "args=1 first=" + zone + " last="},
		{script + "  --verbose ", "args=2 first=--verbose last=" + zone},
	} {
		os.Remove(zone)
		os.Remove(got)
		os.Remove(got + ".zone")
		c := &fakeCluster{s: NewState(), now: time.Now}
		c.apply(t, add("mx1", "mx1.example.org", 10))
		o, err := NewOutput(OutputConfig{ZoneFile: zone, OnChange: tc.cmd, Poll: 10 * time.Millisecond}, c, slog.New(slog.NewTextHandler(io.Discard, nil)))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { o.Run(ctx); close(done) }()
		waitUntil(t, "the script's run", func() bool { return strings.Contains(readFile(got+".zone"), "mx1.example.org.") })
		cancel()
		<-done
		if g := strings.TrimSpace(readFile(got)); g != tc.want {
			t.Errorf("on_change %q: the script saw %q, want %q", tc.cmd, g, tc.want)
		}
	}
	for cmd, direct := range map[string]bool{
		"/usr/local/bin/push-dns":      true,
		"push-dns --zone example.org":  true,
		`cp "$1" /srv/dns/`:            false,
		"push-dns; rndc reload":        false,
		"ZONE=x push-dns":              false,
		"push-dns > /var/log/push.log": false,
	} {
		argv := onChangeArgv(cmd, "/z")
		if (argv[0] != "sh") != direct || argv[len(argv)-1] != "/z" {
			t.Errorf("%q runs as %q", cmd, argv)
		}
	}
}
