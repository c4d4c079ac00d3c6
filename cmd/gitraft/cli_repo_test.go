package main

import (
	"bytes"
	"os"
	"strings"
	"testing"
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
