package gitproto

import (
	"bytes"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
)

// reportFilter sits between receive-pack's stdout and the client. It
// passes every byte through, except the report-status lines of refs the
// push committed to the replicated state: git writes a ref only after the
// pre-receive hook has committed it, and when that local write fails (a
// stale ref lock, a full disk) git reports "ng <ref> failed to lock" for a
// ref the cluster has already applied, and which every node serves. The
// client must be told the result that was applied, so such a line becomes
// "ok <ref>"; the node's own copy is made to match the state by Finish (or
// by the reconciler).
//
// The stream is read as git writes it: the ref advertisement up to its
// flush, then the response, where the report is pkt-lines either bare or,
// with side-band(-64k), carried in band 1 (progress and errors in bands 2
// and 3 pass through as they come). Anything it cannot parse is passed
// through unchanged from then on.
type reportFilter struct {
	w         io.Writer
	sideband  func() bool                // whether the client asked for side-band(-64k)
	committed func() map[string]struct{} // refs the push committed
	mu        sync.Mutex
	buf       []byte // unparsed outer bytes
	inner     []byte // unparsed band-1 bytes
	advDone   bool   // past the advertisement's flush
	raw       bool   // gave up parsing: pass everything through
	rewritten []string
}

func newReportFilter(w io.Writer, sideband func() bool, committed func() map[string]struct{}) *reportFilter {
	return &reportFilter{w: w, sideband: sideband, committed: committed}
}

func (f *reportFilter) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.raw {
		return f.w.Write(p)
	}
	f.buf = append(f.buf, p...)
	if err := f.drain(); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Rewritten lists the refs whose "ng" line was turned into "ok".
func (f *reportFilter) Rewritten() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.rewritten...)
}

// Flush writes whatever is still held (a partial pkt-line at the end of a
// stream cut short), unchanged.
func (f *reportFilter) Flush() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.buf) == 0 {
		return nil
	}
	_, err := f.w.Write(f.buf)
	f.buf = nil
	return err
}

func (f *reportFilter) drain() error {
	for len(f.buf) >= 4 {
		size, err := strconv.ParseUint(string(f.buf[:4]), 16, 16)
		if err != nil || size != 0 && size < 4 {
			return f.giveUp()
		}
		n := int(size)
		if n == 0 || n < 4 {
			n = 4 // flush (0000), delim (0001), response-end (0002)
		}
		if len(f.buf) < n {
			return nil
		}
		pkt := f.buf[:n]
		if err := f.packet(pkt, size); err != nil {
			return err
		}
		f.buf = f.buf[n:]
	}
	return nil
}

func (f *reportFilter) giveUp() error {
	f.raw = true
	b := f.buf
	f.buf = nil
	_, err := f.w.Write(b)
	return err
}

func (f *reportFilter) packet(pkt []byte, size uint64) error {
	if !f.advDone {
		if size == 0 {
			f.advDone = true
		}
		_, err := f.w.Write(pkt)
		return err
	}
	if size < 4 || !f.sideband() {
		if size >= 4 {
			pkt = f.rewrite(pkt)
		}
		_, err := f.w.Write(pkt)
		return err
	}
	if len(pkt) < 5 || pkt[4] != 1 {
		_, err := f.w.Write(pkt) // progress, error, or an empty packet
		return err
	}
	f.inner = append(f.inner, pkt[5:]...)
	for len(f.inner) >= 4 {
		isize, err := strconv.ParseUint(string(f.inner[:4]), 16, 16)
		if err != nil || isize != 0 && isize < 4 {
			// Not pkt-lines inside band 1: send what is held as it came.
			out := f.inner
			f.inner = nil
			f.raw = true
			return f.band1(out)
		}
		n := int(isize)
		if n < 4 {
			n = 4
		}
		if len(f.inner) < n {
			return nil
		}
		line := f.inner[:n]
		if isize >= 4 {
			line = f.rewrite(line)
		}
		f.inner = f.inner[n:]
		if err := f.band1(line); err != nil {
			return err
		}
	}
	return nil
}

// band1 sends data on side band 1.
func (f *reportFilter) band1(data []byte) error {
	if len(data) == 0 {
		return nil
	}
	hdr := fmt.Sprintf("%04x\x01", len(data)+5)
	_, err := f.w.Write(append([]byte(hdr), data...))
	return err
}

// rewrite turns the pkt-line "ng <ref> <reason>" into "ok <ref>" when the
// push committed ref; any other line is returned as it is.
func (f *reportFilter) rewrite(pkt []byte) []byte {
	payload := pkt[4:]
	if !bytes.HasPrefix(payload, []byte("ng ")) {
		return pkt
	}
	ref, _, _ := strings.Cut(strings.TrimSuffix(string(payload[3:]), "\n"), " ")
	if _, ok := f.committed()[ref]; !ok {
		return pkt
	}
	f.rewritten = append(f.rewritten, ref)
	line := "ok " + ref + "\n"
	return []byte(fmt.Sprintf("%04x%s", len(line)+4, line))
}
