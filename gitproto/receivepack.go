package gitproto

// git receive-pack for one push, started with its input and output held:
// the front end may start it while BeginPush still waits for the write
// lock (reading ahead), and either lets it go once the push may proceed
// or discards it.

import (
	"bytes"
	"context"
	"io"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/gitraft/gitraft/storage"
)

// ReadAhead is a Backend that lets git start on a push's copy while
// BeginPush waits for the write lock: git receive-pack starts and reads
// the refs it advertises, and the client sees them only if the push's
// transaction says the copy is still as it was (ReadAheadTx). Starting git
// and taking the lock cost about the same; one waits for the other.
type ReadAhead interface {
	// PushCopy names the copy a push to repo would run in and marks it as
	// it stands; ok is false when reading it ahead is not worth it (the
	// copy is behind or being changed, or another push holds the lock).
	PushCopy(repo string) (path string, mark uint64, ok bool)
}

// ReadAheadTx is a PushTx that can tell whether its copy is as it was at a
// mark PushCopy gave: nothing changed it since, so what git read from it
// then is what the push's base says.
type ReadAheadTx interface {
	UnchangedSince(mark uint64) bool
}

// maxHeldOutput is how much of git's output is kept while it is held (a
// ref advertisement of about 10,000 refs); past it git waits.
const maxHeldOutput = 1 << 20

// receivePack is one git receive-pack whose stdin, stdout and stderr are
// held until release.
type receivePack struct {
	path     string
	cmd      *exec.Cmd
	hook     *hookPipes
	in       *heldReader
	out, err *heldWriter
}

// startReceivePack starts git receive-pack in path, held.
func (s *Server) startReceivePack(ctx context.Context, path, pushID, gitProtocol string) (*receivePack, error) {
	hook, err := newHookPipes()
	if err != nil {
		return nil, err
	}
	args := []string{
		"-c", "core.hooksPath=" + filepath.Join(s.cfg.StateDir, "hooks"),
		"-c", "receive.advertisePushOptions=true",
		// Check every object received, as GitHub and Gitaly do: broken
		// commits, trees with ".git" or ".." entries and the like are
		// refused before anything is replicated.
		"-c", "receive.fsckObjects=true",
		// HEAD follows the replicated state, which moves it when its
		// branch is deleted (git refuses that by default).
		"-c", "receive.denyDeleteCurrent=ignore",
		// No `git gc --auto` after every push: housekeeping is the node's
		// job, not the pusher's wait.
		"-c", "receive.autogc=false",
	}
	if s.cfg.MaxPackBytes > 0 {
		args = append(args, "-c", "receive.maxInputSize="+strconv.FormatInt(s.cfg.MaxPackBytes, 10))
	}
	env := []string{EnvPushID + "=" + pushID}
	if gitProtocol != "" {
		env = append(env, "GIT_PROTOCOL="+gitProtocol)
	}
	rp := &receivePack{path: path, hook: hook, in: newHeldReader(), out: newHeldWriter(), err: newHeldWriter()}
	c := s.cfg.Git.Command(ctx, "", env, append(args, "receive-pack", path)...)
	c.Stdin, c.Stdout, c.Stderr = rp.in, rp.out, rp.err
	c.ExtraFiles = hook.childFiles() // the hook's fd 3 and 4
	c.WaitDelay = 5 * time.Second
	if err := storage.StartNice(c); err != nil {
		hook.close()
		return nil, err
	}
	hook.closeChildEnds()
	rp.cmd = c
	return rp, nil
}

// release connects git to the client: what it wrote so far goes out first.
func (rp *receivePack) release(stdin io.Reader, stdout, stderr io.Writer) {
	rp.err.release(stderr)
	rp.out.release(stdout)
	rp.in.release(stdin)
}

// wait waits for git and closes the hook's pipes. The hook's call is
// answered by serveHook meanwhile; stopHook ends it once git is gone.
func (rp *receivePack) wait(stopHook func(), hookDone <-chan struct{}) error {
	runErr := rp.cmd.Wait()
	stopHook()
	rp.hook.closeChildEnds()
	if hookDone != nil {
		select {
		case <-hookDone:
		case <-time.After(10 * time.Second):
			// A hook that outlived a killed git still holds the request
			// pipe; stop waiting for it.
			rp.hook.reqR.Close()
			<-hookDone
		}
	}
	rp.hook.close()
	return runErr
}

// discard kills a receive-pack the client never saw and waits for it.
func (rp *receivePack) discard() {
	_ = rp.cmd.Process.Kill() // fails only if it is gone already
	rp.in.release(eofReader{})
	rp.out.release(io.Discard)
	rp.err.release(io.Discard)
	_ = rp.cmd.Wait() // killed: its error says so, and nobody is told
	rp.hook.close()
}

type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }

// heldReader blocks reads until release gives it its source.
type heldReader struct {
	ready chan struct{}
	r     io.Reader
}

func newHeldReader() *heldReader { return &heldReader{ready: make(chan struct{})} }

func (h *heldReader) Read(p []byte) (int, error) {
	<-h.ready
	return h.r.Read(p)
}

func (h *heldReader) release(r io.Reader) {
	h.r = r
	close(h.ready)
}

// heldWriter keeps what is written (up to maxHeldOutput, then the writer
// waits) until release gives it its destination.
type heldWriter struct {
	mu       sync.Mutex
	buf      bytes.Buffer
	w        io.Writer
	released chan struct{}
}

func newHeldWriter() *heldWriter { return &heldWriter{released: make(chan struct{})} }

func (h *heldWriter) Write(p []byte) (int, error) {
	h.mu.Lock()
	for h.w == nil && h.buf.Len()+len(p) > maxHeldOutput {
		h.mu.Unlock()
		<-h.released
		h.mu.Lock()
	}
	defer h.mu.Unlock()
	if h.w == nil {
		return h.buf.Write(p)
	}
	return h.w.Write(p)
}

// heldSoFar is a copy of what is held.
func (h *heldWriter) heldSoFar() []byte {
	h.mu.Lock()
	defer h.mu.Unlock()
	return bytes.Clone(h.buf.Bytes())
}

func (h *heldWriter) release(w io.Writer) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.w = w
	if h.buf.Len() > 0 {
		if _, err := w.Write(h.buf.Bytes()); err != nil {
			// git learns it on its next write, as it would have.
			h.w = failedWriter{err}
		}
		h.buf.Reset()
	}
	close(h.released)
}

type failedWriter struct{ err error }

func (f failedWriter) Write([]byte) (int, error) { return 0, f.err }
