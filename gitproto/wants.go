package gitproto

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync/atomic"
)

// WantCheck says which of oids (full, lowercase object ids) no ref of the
// repository reaches: what a client may not fetch.
type WantCheck func(ctx context.Context, oids []string) (unreachable []string, err error)

// reachableOnly is the configuration of an upload-pack that serves a client
// only what the refs reach, as GitHub does. Git honours it with protocol v0
// and v1; with v2 it serves any object it has whatever these say, which is
// why wantFilter checks v2 requests itself.
var reachableOnly = []string{
	"-c", "uploadpack.allowAnySHA1InWant=false",
	"-c", "uploadpack.allowTipSHA1InWant=true",
	"-c", "uploadpack.allowReachableSHA1InWant=true",
}

// protocolVersion is the git protocol version upload-pack speaks given the
// GIT_PROTOCOL a client sent: the highest "version=N" among its
// colon-separated keys that git knows, as git itself decides.
func protocolVersion(gitProtocol string) int {
	v := 0
	for _, kv := range strings.Split(gitProtocol, ":") {
		switch kv {
		case "version=1":
			v = max(v, 1)
		case "version=2":
			v = 2
		}
	}
	return v
}

// maxRequestBytes bounds one protocol v2 request (its capability lines and
// arguments); a larger one is refused. 16 MiB is some 300,000 want lines.
const maxRequestBytes = 16 << 20

// infiniteDepth is git's INFINITE_DEPTH, what `git fetch --unshallow` sends.
const infiniteDepth = 1<<31 - 1

// wantRefusal ends a session whose request asked for what it may not have.
type wantRefusal struct {
	// msg goes to the client in an ERR pkt-line, as git words its own.
	msg string
	// why is one line for the client's stderr and the log.
	why string
}

func (r *wantRefusal) Error() string { return r.why }

// wantFilter reads a protocol v2 client's requests to upload-pack and passes
// them on, but not the end of a request's arguments until every object the
// request would have git send by id is one the refs reach: its `want` lines
// (and, for `fetch --unshallow`, its `shallow` lines, whose parents git
// would send) for `fetch`, its `oid` lines for `object-info`. Only the
// object ids of the request under way are held, never pack data; the
// request itself is bounded by maxRequestBytes. Commands other than ls-refs,
// fetch, object-info and bundle-uri are refused.
//
// git acts on a v2 request only once it has read the flush that ends it, so
// holding back that flush is enough. When a request is refused, stop is
// called (it kills git), and Read returns the *wantRefusal: the caller
// then tells the client.
type wantFilter struct {
	ctx   context.Context
	r     io.Reader
	check WantCheck
	stop  func()

	buf      []byte
	in, out  []byte // read from the client and not parsed; parsed, for git
	rerr     error  // the client's read error, once in is drained
	refused  *wantRefusal
	result   atomic.Pointer[wantRefusal] // refused, for other goroutines
	state    int
	command  string
	reqBytes int
	wants    []string
	shallows []string
	infinite bool                // the request deepens to infinite depth
	approved map[string]struct{} // checked in an earlier request
}

const (
	stateIdle = iota // between requests
	stateKeys        // the command and capability lines
	stateArgs        // the arguments, after the delimiter
)

func newWantFilter(ctx context.Context, r io.Reader, check WantCheck, stop func()) *wantFilter {
	return &wantFilter{ctx: ctx, r: r, check: check, stop: stop, approved: map[string]struct{}{}}
}

func (f *wantFilter) Read(p []byte) (int, error) {
	for len(f.out) == 0 {
		if f.refused != nil {
			return 0, f.refused
		}
		if f.rerr != nil {
			return 0, f.rerr
		}
		if f.buf == nil {
			f.buf = make([]byte, 32<<10)
		}
		n, err := f.r.Read(f.buf)
		f.in = append(f.in, f.buf[:n]...)
		f.parse()
		if err != nil {
			// A pkt-line cut short is dropped: git would only fail on it.
			f.rerr = err
		}
	}
	n := copy(p, f.out)
	f.out = f.out[n:]
	return n, nil
}

// refuse ends the session: git is stopped before it reads another byte.
func (f *wantFilter) refuse(msg, why string) {
	if f.refused == nil {
		f.refused = &wantRefusal{msg: msg, why: why}
		f.result.Store(f.refused)
		f.stop()
	}
	f.in, f.out = nil, nil
}

func (f *wantFilter) protocolError(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	f.refuse("upload-pack: "+msg, "protocol error: "+msg)
}

// refusal is why the session was refused, or nil; any goroutine may ask.
func (f *wantFilter) refusal() *wantRefusal {
	if f == nil {
		return nil
	}
	return f.result.Load()
}

// parse moves every whole pkt-line of in to out, checking requests as they
// end.
func (f *wantFilter) parse() {
	for f.refused == nil && len(f.in) >= 4 {
		size, err := strconv.ParseUint(string(f.in[:4]), 16, 16)
		if err != nil {
			f.protocolError("bad pkt-line length %q", f.in[:4])
			return
		}
		if size == 3 || size > 65520 {
			f.protocolError("bad pkt-line length %d", size)
			return
		}
		if size < 4 {
			f.special(int(size))
			continue
		}
		if len(f.in) < int(size) {
			return
		}
		f.reqBytes += int(size)
		if f.reqBytes > maxRequestBytes {
			f.refuse("upload-pack: request too large", fmt.Sprintf("a request of more than %d bytes", maxRequestBytes))
			return
		}
		line := strings.TrimSuffix(string(f.in[4:size]), "\n")
		f.line(line)
		if f.refused == nil {
			f.out = append(f.out, f.in[:size]...)
			f.in = f.in[size:]
		}
	}
}

// special handles a flush (0), delimiter (1) or response end (2).
func (f *wantFilter) special(kind int) {
	switch {
	case f.state == stateIdle:
		// A flush alone ends the session; anything else git refuses.
	case f.state == stateKeys && kind == 1:
		f.state = stateArgs
	case kind == 0:
		// The end of a request: check it before git may act on it.
		if !f.approve() {
			return
		}
		f.state, f.command, f.reqBytes = stateIdle, "", 0
		f.wants, f.shallows, f.infinite = nil, nil, false
	default:
		f.protocolError("unexpected pkt-line %04x in a request", kind)
		return
	}
	f.out = append(f.out, f.in[:4]...)
	f.in = f.in[4:]
}

// line looks at one line of a request.
func (f *wantFilter) line(line string) {
	switch f.state {
	case stateIdle, stateKeys:
		f.state = stateKeys
		cmd, ok := strings.CutPrefix(line, "command=")
		if !ok {
			return // a capability; git checks it
		}
		if f.command != "" {
			f.protocolError("a second command in one request")
			return
		}
		switch cmd {
		case "ls-refs", "fetch", "object-info", "bundle-uri":
			f.command = cmd
		default:
			f.protocolError("command %q is not served", cmd)
		}
	case stateArgs:
		var prefix string
		switch f.command {
		case "fetch":
			if v, ok := strings.CutPrefix(line, "deepen "); ok {
				if n, err := strconv.ParseInt(v, 10, 32); err != nil || n >= infiniteDepth {
					f.infinite = true
				}
				return
			}
			if strings.HasPrefix(line, "shallow ") {
				prefix = "shallow "
			} else {
				prefix = "want "
			}
		case "object-info":
			prefix = "oid "
		default:
			return
		}
		arg, ok := strings.CutPrefix(line, prefix)
		if !ok {
			return
		}
		oid, ok := oidPrefix(arg)
		if !ok {
			f.protocolError("expected an object id, not %q", line)
			return
		}
		if prefix == "shallow " {
			f.shallows = append(f.shallows, oid)
		} else {
			f.wants = append(f.wants, oid)
		}
	}
}

// oidPrefix reads an object id at the start of s as git does (it takes the
// first 40 hex digits and ignores what follows, any case): the first 64
// digits when there are that many (so that no sha1 git reads is ever one
// this approves), else the first 40, lower-cased.
func oidPrefix(s string) (string, bool) {
	n := 0
	for n < len(s) && n < 64 && isHex(s[n]) {
		n++
	}
	switch {
	case n == 64:
	case n >= 40:
		n = 40
	default:
		return "", false
	}
	return strings.ToLower(s[:n]), true
}

func isHex(c byte) bool { return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F' }

// approve checks the request that has just ended; false: it was refused.
func (f *wantFilter) approve() bool {
	asked := f.wants
	if f.infinite {
		asked = append(asked, f.shallows...)
	}
	var todo []string
	for _, o := range asked {
		if _, ok := f.approved[o]; !ok {
			todo = append(todo, o)
		}
	}
	if len(todo) == 0 {
		return true
	}
	bad, err := f.check(f.ctx, todo)
	if err != nil {
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			f.refuse("upload-pack: session ended", "session ended")
		} else {
			f.refuse("upload-pack: cannot check the objects asked for", "checking the objects asked for: "+err.Error())
		}
		return false
	}
	if len(bad) > 0 {
		f.refuse("upload-pack: not our ref "+bad[0],
			fmt.Sprintf("%s is not reachable from any ref; only what branches and tags reach may be fetched (git.allow_any_sha1_in_want)", firstFewIDs(bad)))
		return false
	}
	for _, o := range todo {
		f.approved[o] = struct{}{}
	}
	return true
}

func firstFewIDs(oids []string) string {
	if len(oids) > 3 {
		return strings.Join(oids[:3], ", ") + fmt.Sprintf(" and %d more", len(oids)-3)
	}
	return strings.Join(oids, ", ")
}

// pktLine encodes one pkt-line.
func pktLine(s string) []byte { return fmt.Appendf(nil, "%04x%s", len(s)+4, s) }
