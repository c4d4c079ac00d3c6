package gitproto

// git's pre-receive hook and the push session it talks to.
//
// The hook is hookScript, a few lines of sh that use the shell's builtins:
// git starts it (one process; a push of more than 16 refs starts cat as
// well, to pass the rest on, since sh's read takes a byte at a time: 0.7 s
// for 10,000 refs). It talks to the push session over two pipes the
// session gave receive-pack as file descriptors 3 and 4, which git passes
// on to the hooks it runs. No socket, no lookup of the push by id, and no
// Go binary to start: starting gitraft itself (a large binary whose
// runtime starts threads) cost a push more than everything else git does
// for it.
//
// Over fd 3 the hook sends the push (hookRequest), ending with "end":
//
//	quarantine <GIT_QUARANTINE_PATH>
//	option <GIT_PUSH_OPTION_n>          (each push option, at most 100)
//	<old> <new> <ref>                   (what git fed the hook, unchanged)
//	end
//
// Over fd 4 the session answers with lines the hook relays to the pusher
// ("progress <text>", "error <text>"), then "ok" (exit 0: git goes on) or
// "refuse" (exit 1: git refuses every ref). If fd 4 ends without either,
// the node went away and the hook refuses.

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
)

// EnvPushID tells the hook it runs inside a gitraft push (and which, for
// logs); outside one it refuses.
const EnvPushID = "GITRAFT_PUSH_ID"

// hookScript is the pre-receive hook the front end installs.
const hookScript = `#!/bin/sh
# gitraft's pre-receive hook, written by the node at start: do not edit.
# It hands the push to the node over fd 3 and relays the node's answer from
# fd 4 (pipes the node gave git receive-pack). Only sh builtins run here, and
# cat for a push of more than 16 refs.
if [ -z "$` + EnvPushID + `" ]; then
	echo "gitraft: this hook only runs inside a gitraft push" >&2
	exit 1
fi
trap '' PIPE # a node that went away is an error to report, not a signal
if ! {
	printf 'quarantine %s\n' "$GIT_QUARANTINE_PATH"
	i=0
	while [ "$i" -lt "${GIT_PUSH_OPTION_COUNT:-0}" ] && [ "$i" -lt 100 ]; do
		eval "printf 'option %s\n' \"\$GIT_PUSH_OPTION_$i\""
		i=$((i + 1))
	done
	# The ref updates as git wrote them: the first few with sh's read (no
	# process to start), the rest, if any, with cat (read takes a byte at
	# a time: 0.7 s for 10,000 refs).
	n=0
	while [ "$n" -lt 16 ] && IFS= read -r line; do
		printf '%s\n' "$line"
		n=$((n + 1))
	done
	[ "$n" -lt 16 ] || cat
	echo end
} >&3; then
	echo "gitraft: cannot reach the node" >&2
	exit 1
fi
exec 3>&-
while IFS= read -r line; do
	case $line in
	ok) exit 0 ;;
	refuse) exit 1 ;;
	"progress "*) printf 'gitraft: %s\n' "${line#progress }" >&2 ;;
	"error "*) printf 'gitraft: %s\n' "${line#error }" >&2 ;;
	esac
done <&4
echo "gitraft: the node went away during the push; if it was committed, it shows on the next fetch" >&2
exit 1
`

// maxHookRequest bounds what a hook's request may hold (10,000 ref updates
// take about 1 MB).
const maxHookRequest = 64 << 20

// hookRequest is what the pre-receive hook hands the node.
type hookRequest struct {
	Quarantine  string
	Updates     []RefUpdate
	PushOptions []string
}

// readHookRequest reads the hook's request up to its "end". It reports
// ok false when the pipe ended first: git finished (or died) without
// running the hook. A request over maxHookRequest is read to its end, so
// the hook does not block, and refused.
func readHookRequest(r io.Reader) (req hookRequest, ok bool, err error) {
	br := bufio.NewReaderSize(r, 64<<10)
	var updates strings.Builder
	size := 0
	for {
		line, rerr := br.ReadString('\n')
		if rerr != nil {
			if rerr == io.EOF {
				return req, false, nil
			}
			return req, false, rerr
		}
		size += len(line)
		line = strings.TrimSuffix(line, "\n")
		switch {
		case line == "end":
			if size > maxHookRequest {
				return req, true, fmt.Errorf("the push's ref updates exceed %d MB", maxHookRequest>>20)
			}
			req.Updates, err = ParseRefUpdates(strings.NewReader(updates.String()))
			return req, true, err
		case size > maxHookRequest:
			// Drain to the end; refused above.
		case strings.HasPrefix(line, "quarantine "):
			req.Quarantine = strings.TrimPrefix(line, "quarantine ")
		case strings.HasPrefix(line, "option "):
			req.PushOptions = append(req.PushOptions, strings.TrimPrefix(line, "option "))
		default:
			updates.WriteString(line + "\n")
		}
	}
}

// hookReplies writes the node's answer to the hook, one line at a time.
// Writes never block the push for long: the hook, or receive-pack holding
// the pipe's other end, reads them, and a hook that went away leaves them
// to the pipe's buffer, bounded by a deadline.
type hookReplies struct {
	mu sync.Mutex
	w  *os.File
}

func (h *hookReplies) send(kind, text string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var b strings.Builder
	for _, line := range strings.Split(strings.TrimRight(text, "\n"), "\n") {
		b.WriteString(kind + " " + line + "\n")
	}
	h.w.SetWriteDeadline(time.Now().Add(10 * time.Second))
	h.w.WriteString(b.String())
}

func (h *hookReplies) done(ok bool) {
	verdict := "refuse\n"
	if ok {
		verdict = "ok\n"
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.w.SetWriteDeadline(time.Now().Add(10 * time.Second))
	h.w.WriteString(verdict)
}

// hookPipes are the two pipes between a push session and its hook.
type hookPipes struct {
	reqR, reqW         *os.File // the hook writes its request (fd 3)
	verdictR, verdictW *os.File // the node answers (fd 4)
}

func newHookPipes() (*hookPipes, error) {
	reqR, reqW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("hook pipe: %w", err)
	}
	verdictR, verdictW, err := os.Pipe()
	if err != nil {
		reqR.Close()
		reqW.Close()
		return nil, fmt.Errorf("hook pipe: %w", err)
	}
	return &hookPipes{reqR: reqR, reqW: reqW, verdictR: verdictR, verdictW: verdictW}, nil
}

// childFiles are git's fd 3 and 4.
func (h *hookPipes) childFiles() []*os.File { return []*os.File{h.reqW, h.verdictR} }

// closeChildEnds closes this process's copies of the ends git holds, so
// that the request pipe ends once git and its children are gone.
func (h *hookPipes) closeChildEnds() {
	h.reqW.Close()
	h.verdictR.Close()
}

func (h *hookPipes) close() {
	h.closeChildEnds()
	h.reqR.Close()
	h.verdictW.Close()
}

// pushSession is one push's state shared by the session that runs git and
// the goroutine that answers its hook.
type pushSession struct {
	tx       PushTx
	commands *commandList // what the client asked for (atomic)
	maxRefs  int          // most ref updates one push may carry; 0: no limit
	act      *activity    // told while the node commits; nil for a proxied push

	// Set by serveHook once the push is committed; read by the session
	// (and by its report filter, while git still runs) through result.
	mu          sync.Mutex
	pushOptions []string
	updates     []RefUpdate // the committed changes, never more
	committed   bool
}

// result is what the hook's call committed.
func (p *pushSession) result() (committed bool, updates []RefUpdate, pushOptions []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.committed, p.updates, p.pushOptions
}

// serveHook answers the push's pre-receive hook, if git runs it: it reads
// the hook's request from r, commits the push (tx.Commit) and answers on
// w. ctx ends when git has exited; serveHook then returns soon.
func (p *pushSession) serveHook(ctx context.Context, r io.Reader, w *hookReplies) {
	req, ok, err := readHookRequest(r)
	if !ok && err == nil {
		return // git never ran the hook
	}
	if err != nil {
		w.send("error", "malformed hook request: "+err.Error())
		w.done(false)
		return
	}
	if p.maxRefs > 0 && len(req.Updates) > p.maxRefs {
		w.send("error", fmt.Sprintf("this push updates %d refs; a push may update at most %d (git.max_refs_per_push); push them in batches", len(req.Updates), p.maxRefs))
		w.done(false)
		return
	}
	atomic := p.commands != nil && p.commands.Has("atomic")
	done := p.act.nodeBusy()
	committed, err := p.tx.Commit(ctx, req.Quarantine, req.Updates, atomic, func(s string) { w.send("progress", s) })
	done()
	if err != nil {
		w.send("error", err.Error())
		w.done(false)
		return
	}
	p.mu.Lock()
	p.pushOptions, p.updates, p.committed = req.PushOptions, committed, len(committed) > 0
	p.mu.Unlock()
	w.done(true)
}

// writeHook installs hookScript at path: written aside, fsynced, renamed
// into place, so a git starting a push meanwhile runs the old hook or the
// new one, never half of one.
func writeHook(path string) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o700)
	if err != nil {
		return fmt.Errorf("writing the pre-receive hook: %w", err)
	}
	_, err = f.WriteString(hookScript)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing the pre-receive hook: %w", err)
	}
	return nil
}
