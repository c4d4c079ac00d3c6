package gitproto

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Environment variables that connect git's hook to the session that ran git.
const (
	EnvHookSocket = "GITRAFT_HOOK_SOCKET"
	EnvPushID     = "GITRAFT_PUSH_ID"
)

// hookRequest is what `gitraft hook pre-receive` sends to the node.
type hookRequest struct {
	PushID      string      `json:"push_id"`
	Quarantine  string      `json:"quarantine"`
	Updates     []RefUpdate `json:"updates"`
	PushOptions []string    `json:"push_options,omitempty"`
}

// hookReply is one line the node sends back: progress, then a verdict.
type hookReply struct {
	Progress string `json:"progress,omitempty"`
	Done     bool   `json:"done,omitempty"`
	Error    string `json:"error,omitempty"`
}

// hookServer takes calls from git hooks over a unix socket and routes them
// to the push session that ran git.
type hookServer struct {
	log    *slog.Logger
	ln     net.Listener
	mu     sync.Mutex
	pushes map[string]*pushSession
	wg     sync.WaitGroup
}

type pushSession struct {
	tx       PushTx
	commands *commandList // what the client asked for (atomic)
	maxRefs  int          // most ref updates one push may carry; 0: no limit
	act      *activity    // told while the node commits; nil for a proxied push

	// Set by the hook's call once the push is committed, read by the
	// session once git is done (no Go synchronisation runs between the two
	// but this mutex: git and the hook process sit in between).
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

func newHookServer(path string, logger *slog.Logger) (*hookServer, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	os.Remove(path) // a stale socket from a killed process
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("hook socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	h := &hookServer{log: logger, ln: ln, pushes: map[string]*pushSession{}}
	h.wg.Add(1)
	go h.serve()
	return h, nil
}

func (h *hookServer) register(id string, p *pushSession) {
	h.mu.Lock()
	h.pushes[id] = p
	h.mu.Unlock()
}

func (h *hookServer) unregister(id string) {
	h.mu.Lock()
	delete(h.pushes, id)
	h.mu.Unlock()
}

func (h *hookServer) close() {
	h.ln.Close()
	h.wg.Wait()
}

func (h *hookServer) serve() {
	defer h.wg.Done()
	for {
		c, err := h.ln.Accept()
		if err != nil {
			return
		}
		h.wg.Add(1)
		go func() {
			defer h.wg.Done()
			defer c.Close()
			h.handle(c)
		}()
	}
}

func (h *hookServer) handle(c net.Conn) {
	enc := json.NewEncoder(c)
	var req hookRequest
	if err := json.NewDecoder(io.LimitReader(c, 64<<20)).Decode(&req); err != nil {
		enc.Encode(hookReply{Done: true, Error: "gitraft: malformed hook request"})
		return
	}
	h.mu.Lock()
	p := h.pushes[req.PushID]
	h.mu.Unlock()
	if p == nil {
		enc.Encode(hookReply{Done: true, Error: "gitraft: this push is not known to the node (did the session end?)"})
		return
	}
	var mu sync.Mutex
	progress := func(s string) {
		mu.Lock()
		defer mu.Unlock()
		enc.Encode(hookReply{Progress: s})
	}
	// The hook's connection lives as long as git waits for it; if the client
	// vanishes, git and then the hook die and the context ends with them.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		var b [1]byte
		c.Read(b[:]) // returns when the hook goes away
		cancel()
	}()
	if p.maxRefs > 0 && len(req.Updates) > p.maxRefs {
		enc.Encode(hookReply{Done: true, Error: fmt.Sprintf("this push updates %d refs; a push may update at most %d (git.max_refs_per_push); push them in batches", len(req.Updates), p.maxRefs)})
		return
	}
	atomic := p.commands != nil && p.commands.Has("atomic")
	done := p.act.nodeBusy()
	committed, err := p.tx.Commit(ctx, req.Quarantine, req.Updates, atomic, progress)
	done()
	mu.Lock()
	defer mu.Unlock()
	if err != nil {
		enc.Encode(hookReply{Done: true, Error: err.Error()})
		return
	}
	p.mu.Lock()
	p.pushOptions, p.updates, p.committed = req.PushOptions, committed, len(committed) > 0
	p.mu.Unlock()
	enc.Encode(hookReply{Done: true})
}

// RunHook is the body of `gitraft hook pre-receive`, which git runs inside
// receive-pack with the quarantined objects in place. It hands the ref
// updates to the node and prints the node's progress for the pusher; its
// exit code (0 accept, 1 refuse) is git's verdict.
func RunHook(kind string, stdin io.Reader, stderr io.Writer, getenv func(string) string) int {
	if kind != "pre-receive" {
		fmt.Fprintf(stderr, "gitraft: unknown hook %q\n", kind)
		return 1
	}
	sock, id := getenv(EnvHookSocket), getenv(EnvPushID)
	if sock == "" || id == "" {
		fmt.Fprintln(stderr, "gitraft: this hook only runs inside a gitraft push")
		return 1
	}
	updates, err := ParseRefUpdates(stdin)
	if err != nil {
		fmt.Fprintln(stderr, "gitraft:", err)
		return 1
	}
	req := hookRequest{PushID: id, Quarantine: getenv("GIT_QUARANTINE_PATH"), Updates: updates}
	if n, _ := strconv.Atoi(getenv("GIT_PUSH_OPTION_COUNT")); n > 0 {
		for i := 0; i < n && i < 100; i++ {
			req.PushOptions = append(req.PushOptions, getenv("GIT_PUSH_OPTION_"+strconv.Itoa(i)))
		}
	}
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		fmt.Fprintln(stderr, "gitraft: cannot reach the node:", err)
		return 1
	}
	defer c.Close()
	if err := json.NewEncoder(c).Encode(req); err != nil {
		fmt.Fprintln(stderr, "gitraft: cannot reach the node:", err)
		return 1
	}
	sc := bufio.NewScanner(c)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var r hookReply
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			continue
		}
		if r.Progress != "" {
			fmt.Fprintln(stderr, "gitraft: "+r.Progress)
		}
		if r.Done {
			if r.Error != "" {
				for _, line := range strings.Split(r.Error, "\n") {
					fmt.Fprintln(stderr, "gitraft: "+line)
				}
				return 1
			}
			return 0
		}
	}
	fmt.Fprintln(stderr, "gitraft: the node went away during the push; if it was committed, it shows on the next fetch")
	return 1
}
