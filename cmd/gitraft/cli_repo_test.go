package main

import (
	"bytes"
	"os"
	"strings"
	"testing"

	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
)

func TestConfirmName(t *testing.T) {
	for _, tc := range []struct {
		in      string
		wantErr string
	}{
		{"alpha\n", ""},
		{"  alpha  \n", ""},
		{"alpha", ""}, // no newline before EOF
		{"beta\n", "does not match"},
		{"\n", "does not match"},
		{"", "--yes"}, // stdin closed
	} {
		var prompt bytes.Buffer
		err := confirmName(strings.NewReader(tc.in), &prompt, "alpha")
		switch {
		case tc.wantErr == "" && err != nil:
			t.Errorf("input %q: %v", tc.in, err)
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("input %q: error %v, want one containing %q", tc.in, err, tc.wantErr)
		}
		if !strings.Contains(prompt.String(), "type the repo name to confirm") && !strings.Contains(prompt.String(), "Type the repo name to confirm") {
			t.Errorf("input %q: prompt %q", tc.in, prompt.String())
		}
	}
}

func TestConfirmNameNotATerminal(t *testing.T) {
	// A regular file (or pipe) on stdin is not a person: refuse without
	// reading, even if it holds the name.
	f, err := os.CreateTemp(t.TempDir(), "stdin")
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("alpha\n")
	f.Seek(0, 0)
	defer f.Close()
	var prompt bytes.Buffer
	err = confirmName(f, &prompt, "alpha")
	if err == nil || !strings.Contains(err.Error(), "--yes") {
		t.Fatalf("confirm from a file: %v", err)
	}
	if prompt.Len() != 0 {
		t.Errorf("prompted a non-terminal: %q", prompt.String())
	}
}

func TestWriteHousekeep(t *testing.T) {
	var b bytes.Buffer
	err := writeHousekeep(&b, &repov1.HousekeepRepoResponse{Name: "acme/site", Nodes: []*repov1.NodeHousekeeping{
		{NodeId: "n1", PacksBefore: 1002, PacksAfter: 1, BytesBefore: 5 << 20, BytesAfter: 310 << 10, Pruned: true, LeftoversRemoved: 2, Seconds: 1.2},
		{NodeId: "n2", PacksBefore: 1002, PacksAfter: 3, PruneSkipped: "the copy is at version 9, behind the committed 10"},
		{NodeId: "n3", Error: "connection refused"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"1002 -> 1", "5.0 MiB -> 310.0 KiB", "yes", "removed 2 leftovers", "1.2s",
		"1002 -> 3", "behind the committed 10", "failed: connection refused"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if got := byteSize(512); got != "512 B" {
		t.Errorf("byteSize(512) = %q", got)
	}
}
