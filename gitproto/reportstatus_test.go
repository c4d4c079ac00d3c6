package gitproto

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"
	"testing"
)

func pkt(s string) string { return fmt.Sprintf("%04x%s", len(s)+4, s) }

func band(n byte, s string) string { return fmt.Sprintf("%04x%c%s", len(s)+5, n, s) }

const testAdv = "0000000000000000000000000000000000000000 capabilities^{}\x00report-status side-band-64k\n"

// demux reads a side-band stream and returns band 1's bytes and the
// other bands' text.
func demux(t *testing.T, b []byte) (band1 []byte, other string) {
	t.Helper()
	for len(b) > 0 {
		size, err := strconv.ParseUint(string(b[:4]), 16, 16)
		if err != nil {
			t.Fatalf("bad pkt-line length %q", b[:4])
		}
		if size == 0 {
			b = b[4:]
			continue
		}
		data := b[4:size]
		if data[0] == 1 {
			band1 = append(band1, data[1:]...)
		} else {
			other += string(data[1:])
		}
		b = b[size:]
	}
	return band1, other
}

func Test_ReportFilter(t *testing.T) {
	committed := func() map[string]struct{} { return map[string]struct{}{"refs/heads/a": {}} }
	adv := pkt(testAdv) + "0000"
	report := pkt("unpack ok\n") + pkt("ng refs/heads/a failed to lock\n") + pkt("ng refs/heads/b funny refname\n") + pkt("ok refs/heads/c\n") + "0000"
	want := pkt("unpack ok\n") + pkt("ok refs/heads/a\n") + pkt("ng refs/heads/b funny refname\n") + pkt("ok refs/heads/c\n") + "0000"

	t.Run("plain", func(t *testing.T) {
		for _, chunk := range []int{1, 3, 7, 1 << 20} {
			var out bytes.Buffer
			f := newReportFilter(&out, func() bool { return false }, committed)
			in := []byte(adv + report)
			for len(in) > 0 {
				n := min(chunk, len(in))
				if _, err := f.Write(in[:n]); err != nil {
					t.Fatal(err)
				}
				in = in[n:]
			}
			if err := f.Flush(); err != nil {
				t.Fatal(err)
			}
			if got := out.String(); got != adv+want {
				t.Fatalf("chunk %d: got %q, want %q", chunk, got, adv+want)
			}
			if got := f.Rewritten(); len(got) != 1 || got[0] != "refs/heads/a" {
				t.Fatalf("rewritten = %v", got)
			}
		}
	})

	t.Run("side-band", func(t *testing.T) {
		// git sends the report in band 1, cut wherever its buffer ends,
		// with progress in band 2 around it.
		cut := len(report) / 2
		stream := adv + band(2, "Resolving deltas: 100%\n") + band(1, report[:cut]) + band(2, "remote: hi\n") + band(1, report[cut:]) + "0000"
		for _, chunk := range []int{1, 5, 1 << 20} {
			var out bytes.Buffer
			f := newReportFilter(&out, func() bool { return true }, committed)
			in := []byte(stream)
			for len(in) > 0 {
				n := min(chunk, len(in))
				if _, err := f.Write(in[:n]); err != nil {
					t.Fatal(err)
				}
				in = in[n:]
			}
			got := out.Bytes()
			if !bytes.HasPrefix(got, []byte(adv)) {
				t.Fatalf("advertisement changed: %q", got)
			}
			b1, other := demux(t, got[len(adv):])
			if string(b1) != want {
				t.Fatalf("chunk %d: band 1 = %q, want %q", chunk, b1, want)
			}
			if other != "Resolving deltas: 100%\nremote: hi\n" {
				t.Fatalf("other bands = %q", other)
			}
			if !strings.HasSuffix(string(got), "0000") {
				t.Fatalf("final flush lost: %q", got)
			}
		}
	})

	t.Run("nothing committed", func(t *testing.T) {
		var out bytes.Buffer
		f := newReportFilter(&out, func() bool { return false }, func() map[string]struct{} { return nil })
		if _, err := f.Write([]byte(adv + report)); err != nil {
			t.Fatal(err)
		}
		if out.String() != adv+report {
			t.Fatalf("changed a report with nothing committed: %q", out.String())
		}
	})

	t.Run("not pkt-lines", func(t *testing.T) {
		var out bytes.Buffer
		f := newReportFilter(&out, func() bool { return false }, committed)
		junk := "zzzz ng refs/heads/a\n"
		for _, s := range []string{adv, junk, pkt("ng refs/heads/a x\n")} {
			if _, err := f.Write([]byte(s)); err != nil {
				t.Fatal(err)
			}
		}
		if err := f.Flush(); err != nil {
			t.Fatal(err)
		}
		if want := adv + junk + pkt("ng refs/heads/a x\n"); out.String() != want {
			t.Fatalf("got %q, want it passed through: %q", out.String(), want)
		}
	})

	t.Run("cut short", func(t *testing.T) {
		var out bytes.Buffer
		f := newReportFilter(&out, func() bool { return false }, committed)
		if _, err := f.Write([]byte(adv + "00")); err != nil {
			t.Fatal(err)
		}
		if err := f.Flush(); err != nil {
			t.Fatal(err)
		}
		if out.String() != adv+"00" {
			t.Fatalf("got %q", out.String())
		}
	})
}
