package gitproto

import (
	"io"
	"strconv"
	"strings"
	"sync"
)

// commandList watches the bytes a pushing client sends to receive-pack and
// reads the capabilities of its command list (the pkt-lines before the
// first flush: "<old> <new> <ref>\0<capabilities>", then one command per
// line). The pre-receive hook does not learn them from git; the push path
// needs to know whether the client asked for an atomic push.
//
// It only watches: every byte goes to git unchanged, and it stops looking
// at the first flush, the first malformed length, or after maxCommandBytes.
type commandList struct {
	r    io.Reader
	mu   sync.Mutex
	buf  []byte
	done bool
	caps []string
	cmds int
}

// maxCommandBytes bounds what commandList buffers; a command list longer
// than this is not inspected further (its capabilities come first anyway).
const maxCommandBytes = 1 << 20

func newCommandList(r io.Reader) *commandList { return &commandList{r: r} }

func (c *commandList) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if n > 0 {
		c.mu.Lock()
		if !c.done {
			c.buf = append(c.buf, p[:n]...)
			c.parse()
		}
		c.mu.Unlock()
	}
	return n, err
}

func (c *commandList) parse() {
	for !c.done {
		if len(c.buf) > maxCommandBytes {
			c.done, c.buf = true, nil
			return
		}
		if len(c.buf) < 4 {
			return
		}
		size, err := strconv.ParseUint(string(c.buf[:4]), 16, 16)
		if err != nil || size != 0 && size < 4 {
			c.done, c.buf = true, nil
			return
		}
		if size == 0 {
			c.done, c.buf = true, nil
			return
		}
		if len(c.buf) < int(size) {
			return
		}
		line := string(c.buf[4:size])
		c.buf = c.buf[size:]
		if strings.HasPrefix(line, "shallow ") {
			continue
		}
		if _, caps, ok := strings.Cut(line, "\x00"); ok && c.cmds == 0 {
			c.caps = strings.Fields(caps)
		}
		c.cmds++
	}
}

// Has reports whether the client asked for a capability (such as "atomic").
func (c *commandList) Has(capability string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, k := range c.caps {
		if k == capability {
			return true
		}
	}
	return false
}
