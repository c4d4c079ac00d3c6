package gitproto

import (
	"bytes"
	"context"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"
	"testing/iotest"
)

var (
	tip       = strings.Repeat("1", 40)
	reachable = strings.Repeat("2", 40) // reachable, not a tip
	gone      = strings.Repeat("d", 40) // a deleted branch's commit
)

// fakeReach knows which objects the refs reach and records what it is asked.
type fakeReach struct {
	asked [][]string
	err   error
}

func (r *fakeReach) check(_ context.Context, oids []string) ([]string, error) {
	r.asked = append(r.asked, slices.Clone(oids))
	if r.err != nil {
		return nil, r.err
	}
	var bad []string
	for _, o := range oids {
		if o != tip && o != reachable {
			bad = append(bad, o)
		}
	}
	return bad, nil
}

// request encodes one protocol v2 request: its command, capability lines,
// and arguments after a delimiter.
func request(command string, args ...string) string {
	var b strings.Builder
	b.Write(pktLine("command=" + command + "\n"))
	b.Write(pktLine("agent=git/2.39.5\n"))
	b.Write(pktLine("object-format=sha1\n"))
	if args != nil {
		b.WriteString("0001")
		for _, a := range args {
			b.Write(pktLine(a + "\n"))
		}
	}
	b.WriteString("0000")
	return b.String()
}

// filtered runs input through a wantFilter, as git would read it, one byte
// at a time and in one go. It returns what git got and the refusal.
func filtered(t *testing.T, input string) (string, *wantRefusal, *fakeReach) {
	t.Helper()
	var results []string
	var refusals []*wantRefusal
	var reach *fakeReach
	for _, r := range []io.Reader{strings.NewReader(input), iotest.OneByteReader(strings.NewReader(input))} {
		reach = &fakeReach{}
		stopped := 0
		f := newWantFilter(context.Background(), r, reach.check, func() { stopped++ })
		got, err := io.ReadAll(f)
		refused := f.refusal()
		switch {
		case refused == nil && err != nil:
			t.Fatalf("read error without a refusal: %v", err)
		case refused != nil && !errors.Is(err, refused):
			t.Fatalf("refused (%v), but the read error is %v", refused, err)
		case refused != nil && stopped != 1, refused == nil && stopped != 0:
			t.Fatalf("git stopped %d times; refused: %v", stopped, refused)
		}
		results = append(results, string(got))
		refusals = append(refusals, refused)
	}
	if (refusals[0] == nil) != (refusals[1] == nil) || refusals[0] != nil && *refusals[0] != *refusals[1] {
		t.Fatalf("byte by byte refused %v, all at once %v", refusals[1], refusals[0])
	}
	if refusals[0] == nil {
		if results[0] != results[1] {
			t.Fatalf("byte by byte git got %q, all at once %q", results[1], results[0])
		}
		return results[0], nil, reach
	}
	// Refused: git got some of the input (what it had read before), at
	// most as much byte by byte as all at once.
	for _, r := range results {
		if !strings.HasPrefix(input, r) {
			t.Fatalf("git got %q, not a beginning of the input", r)
		}
	}
	return results[1], refusals[1], reach
}

func Test_WantFilter_PassesReachableWants(t *testing.T) {
	in := request("ls-refs", "peel", "symrefs", "ref-prefix HEAD") +
		request("fetch", "thin-pack", "ofs-delta", "want "+tip, "want-ref refs/heads/main", "have "+gone) +
		request("fetch", "want "+tip, "want "+reachable, "filter blob:none", "done") +
		request("fetch", "want "+reachable, "done") + // approved before: not asked again
		request("fetch") + // no arguments
		"0000" // the client is done
	got, refused, reach := filtered(t, in)
	if refused != nil {
		t.Fatalf("refused: %v", refused)
	}
	if got != in {
		t.Fatalf("git got\n%q\nwant\n%q", got, in)
	}
	if want := [][]string{{tip}, {reachable}}; !slices.EqualFunc(reach.asked, want, slices.Equal) {
		t.Fatalf("asked %v, want %v (haves and want-refs are not checked; approved wants not again)", reach.asked, want)
	}
}

func Test_WantFilter_RefusesUnreachableWant(t *testing.T) {
	first := request("ls-refs") + request("fetch", "want "+tip, "done")
	bad := request("fetch", "want "+tip, "want "+gone, "done")
	got, refused, _ := filtered(t, first+bad+request("ls-refs"))
	if refused == nil {
		t.Fatal("a want no ref reaches passed")
	}
	if refused.msg != "upload-pack: not our ref "+gone || !strings.Contains(refused.why, gone) {
		t.Fatalf("refusal = %q / %q", refused.msg, refused.why)
	}
	// git never sees the refused request end (nor anything after it).
	if !strings.HasPrefix(got, first) || len(got) >= len(first+bad) {
		t.Fatalf("git got %q", got)
	}
	if want := first + strings.TrimSuffix(bad, "0000"); got != want {
		t.Fatalf("git got %q, want %q", got, want)
	}
	if strings.Count(got[len(first):], "0000") != 0 {
		t.Fatalf("git got the end of the refused request: %q", got[len(first):])
	}
}

func Test_WantFilter_ObjectIDsReadAsGitReadsThem(t *testing.T) {
	for _, line := range []string{
		"want " + strings.ToUpper(gone),             // git takes any case
		"want " + gone + " trailing",                // and ignores what follows
		"want " + gone + "xyz",                      //
		"want " + gone + strings.Repeat("0", 24),    // 64 digits: a sha256 id, never the sha1 one
		"want " + strings.ToUpper(gone)[:39] + "0g", // not a whole id
	} {
		_, refused, _ := filtered(t, request("fetch", line, "done"))
		if refused == nil {
			t.Errorf("%q passed", line)
		}
	}
	_, refused, reach := filtered(t, request("fetch", "want "+strings.ToUpper(tip)+"\tx", "done"))
	if refused != nil || !slices.Equal(reach.asked[0], []string{tip}) {
		t.Fatalf("upper-case tip: refused %v, asked %v", refused, reach.asked)
	}
}

func Test_WantFilter_ShallowsCheckedWhenUnshallowing(t *testing.T) {
	// A shallow client's boundary may since have been force-pushed away;
	// only an infinite deepen (--unshallow) makes git send its parents.
	for _, deepen := range []string{"deepen 1", "deepen-since 1700000000", "deepen-relative", "deepen 2147483646"} {
		if _, refused, _ := filtered(t, request("fetch", "want "+tip, "shallow "+gone, deepen, "done")); refused != nil {
			t.Errorf("%s: refused: %v", deepen, refused)
		}
	}
	for _, deepen := range []string{"deepen 2147483647", "deepen 0x7fffffff", "deepen 6442450943"} {
		_, refused, _ := filtered(t, request("fetch", "want "+tip, "shallow "+gone, deepen, "done"))
		if refused == nil || !strings.Contains(refused.msg, gone) {
			t.Errorf("%s with an unreachable shallow: refused %v", deepen, refused)
		}
	}
	if _, refused, _ := filtered(t, request("fetch", "want "+tip, "shallow "+reachable, "deepen 2147483647", "done")); refused != nil {
		t.Errorf("--unshallow from a reachable boundary refused: %v", refused)
	}
}

func Test_WantFilter_ObjectInfo(t *testing.T) {
	if _, refused, _ := filtered(t, request("object-info", "size", "oid "+reachable)); refused != nil {
		t.Fatalf("refused: %v", refused)
	}
	if _, refused, _ := filtered(t, request("object-info", "size", "oid "+gone)); refused == nil {
		t.Fatal("object-info of an unreachable object passed")
	}
}

func Test_WantFilter_RefusesMalformed(t *testing.T) {
	for name, in := range map[string]string{
		"bad length":          "zzzz",
		"length 3":            "0003",
		"length too large":    "fff5" + strings.Repeat("x", 0xfff5),
		"unknown command":     request("frobnicate", "want "+tip),
		"two commands":        string(pktLine("command=ls-refs\n")) + request("fetch", "want "+gone),
		"short want":          request("fetch", "want 1234"),
		"delimiter in args":   strings.TrimSuffix(request("fetch", "want "+gone), "0000") + "0001" + "0000",
		"response end in req": string(pktLine("command=fetch\n")) + "0002",
	} {
		_, refused, _ := filtered(t, in)
		if refused == nil {
			t.Errorf("%s: passed", name)
		}
	}
	// An oversized request is refused before it ends.
	var b bytes.Buffer
	b.Write(pktLine("command=fetch\n"))
	b.WriteString("0001")
	for b.Len() <= maxRequestBytes {
		b.Write(pktLine("have " + tip + "\n"))
	}
	reach := &fakeReach{}
	f := newWantFilter(context.Background(), &b, reach.check, func() {})
	io.Copy(io.Discard, f)
	if refused := f.refusal(); refused == nil || !strings.Contains(refused.msg, "too large") || len(reach.asked) != 0 {
		t.Fatalf("oversized request: refused %v, asked %v", refused, reach.asked)
	}
}

func Test_WantFilter_CheckFails(t *testing.T) {
	f := newWantFilter(context.Background(), strings.NewReader(request("fetch", "want "+tip, "done")),
		(&fakeReach{err: errors.New("disk on fire")}).check, func() {})
	if _, err := io.ReadAll(f); f.refusal() == nil || !strings.Contains(err.Error(), "disk on fire") {
		t.Fatalf("a failed check: %v, %v", f.refusal(), err)
	}
}

func Test_ProtocolVersion(t *testing.T) {
	for in, want := range map[string]int{
		"": 0, "version=0": 0, "version=1": 1, "version=2": 2,
		"version=2:version=1": 2, "version=1:version=2": 2, "foo=bar:version=2": 2,
		"version=3": 0, "version=02": 0, "version=2 ": 0,
	} {
		if got := protocolVersion(in); got != want {
			t.Errorf("protocolVersion(%q) = %d, want %d", in, got, want)
		}
	}
}
