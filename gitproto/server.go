package gitproto

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gliderlabs/ssh"
	gossh "golang.org/x/crypto/ssh"

	"github.com/gitraft/gitraft/storage"
)

// Config configures the SSH front end.
type Config struct {
	NodeID string
	// Addr is the SSH listen address, unless Listener is given.
	Addr     string
	Listener net.Listener
	// StateDir holds the hooks.
	StateDir string
	// Git runs git (default: "git" from PATH, storage's environment
	// policy); a node passes its store's runner.
	Git *storage.Git

	// KeysCommand, if set, is asked whose key an unknown key is, like
	// OpenSSH's AuthorizedKeysCommand: it gets the key type, the base64 key
	// and the SHA256 fingerprint as arguments and prints the gitraft user
	// name (nothing, or a non-zero exit, for nobody).
	KeysCommand string
	// PostReceive, if set, runs once per accepted push on the node that took
	// it, after the commit, with GITRAFT_REPO, GITRAFT_USER, GITRAFT_NODE,
	// GITRAFT_PUSH_ID, GITRAFT_VERSION and the ref changes on stdin.
	PostReceive string

	MaxPackBytes int64 // receive.maxInputSize; 0: no limit
	// MaxRefsPerPush is the most ref updates one push may carry; 0: no
	// limit. A larger push is refused whole, before anything is replicated.
	MaxRefsPerPush int
	MaxSessions    int           // concurrent sessions per node; 0: 64
	IdleTimeout    time.Duration // no data in either direction; 0: 5m
	MaxTimeout     time.Duration // whole session; 0: 1h

	// MaxStartups and PerSourceMaxStartups cap the connections that have
	// not finished authenticating, in all and per source IP address, like
	// OpenSSH's settings of those names: a connection past either is closed
	// at once, before any SSH work. 0: 100 and 10; below 0: no limit.
	MaxStartups          int
	PerSourceMaxStartups int
	// LoginGraceTime closes a connection that has not authenticated within
	// it, like OpenSSH's. 0: 30s; below 0: no limit.
	LoginGraceTime time.Duration
	// MaxSessionsPerUser caps one user's concurrent sessions on this node,
	// over all their connections. 0: 16; below 0: no limit.
	MaxSessionsPerUser int
	// MaxSessionsPerConnection caps the sessions open at once on one SSH
	// connection, like OpenSSH's MaxSessions. 0: 10; below 0: no limit.
	MaxSessionsPerConnection int
	// MinRateBytes must move, client to node and node to client together,
	// in every MinRateWindow of a session, or the session ends; a window in
	// which the node itself worked for the session (write lock, catching
	// up, replicating) always passes. 0: 128 bytes per 5m; below 0: no floor.
	MinRateBytes  int64
	MinRateWindow time.Duration

	// AllowAnySHA1InWant lets clients fetch any object the node has by its
	// id, reachable from a ref or not (say, the commits of a deleted
	// branch). Off: a client gets only what the refs reach, with every
	// protocol version. Nodes catching up from each other always fetch by id.
	AllowAnySHA1InWant bool
}

func (c *Config) setDefaults() {
	if c.Git == nil {
		c.Git = storage.DefaultGit()
	}
	if c.MaxSessions == 0 {
		c.MaxSessions = 64
	}
	if c.IdleTimeout == 0 {
		c.IdleTimeout = 5 * time.Minute
	}
	if c.MaxTimeout == 0 {
		c.MaxTimeout = time.Hour
	}
	if c.MaxStartups == 0 {
		c.MaxStartups = 100
	}
	if c.PerSourceMaxStartups == 0 {
		c.PerSourceMaxStartups = 10
	}
	if c.LoginGraceTime == 0 {
		c.LoginGraceTime = 30 * time.Second
	}
	if c.MaxSessionsPerUser == 0 {
		c.MaxSessionsPerUser = 16
	}
	if c.MaxSessionsPerConnection == 0 {
		c.MaxSessionsPerConnection = 10
	}
	if c.MinRateBytes == 0 {
		c.MinRateBytes = 128
	}
	if c.MinRateWindow <= 0 {
		c.MinRateWindow = 5 * time.Minute
	}
}

// sessionLimits are the time and rate limits of each session.
func (c *Config) sessionLimits() sessionLimits {
	return sessionLimits{idle: c.IdleTimeout, total: c.MaxTimeout, minRate: max(c.MinRateBytes, 0), minRateWindow: c.MinRateWindow}
}

// Server is a node's SSH front end.
type Server struct {
	cfg     Config
	backend Backend
	log     *slog.Logger
	srv     *ssh.Server
	ln      net.Listener
	slots   chan struct{}
	wg      sync.WaitGroup

	startups     *startupGate
	userSessions *sessionCount
	refusedLog   logEvery // connections refused by the startup caps
	graceLog     logEvery // connections closed by the login grace time

	// readAheadStarted, if set (by tests), is told of each receive-pack
	// started ahead of BeginPush, before BeginPush is called.
	readAheadStarted func(*receivePack)
}

type ctxKey string

const (
	userKey ctxKey = "gitraft-user"
	// startupKey holds a connection's *startup until it authenticates.
	startupKey ctxKey = "gitraft-startup"
	// connSessionsKey holds the *atomic.Int32 count of a connection's open
	// sessions.
	connSessionsKey ctxKey = "gitraft-conn-sessions"
	authErrKey      ctxKey = "gitraft-auth-error"
)

// New prepares the SSH server and its hooks; Serve starts it.
func New(cfg Config, backend Backend, logger *slog.Logger) (*Server, error) {
	cfg.setDefaults()
	s := &Server{
		cfg: cfg, backend: backend, log: logger.With("node", cfg.NodeID), slots: make(chan struct{}, cfg.MaxSessions),
		startups:     newStartupGate(cfg.MaxStartups, cfg.PerSourceMaxStartups),
		userSessions: newSessionCount(cfg.MaxSessionsPerUser),
		refusedLog:   logEvery{every: 10 * time.Second},
		graceLog:     logEvery{every: 10 * time.Second},
	}
	hooksDir := filepath.Join(cfg.StateDir, "hooks")
	if err := os.MkdirAll(hooksDir, 0o700); err != nil {
		return nil, err
	}
	if err := writeHook(filepath.Join(hooksDir, "pre-receive")); err != nil {
		return nil, err
	}
	s.ln = cfg.Listener
	s.srv = &ssh.Server{
		Handler:          s.handle,
		PublicKeyHandler: s.authenticate,
		// Idle and total limits are enforced per session by watch, which
		// tells the client why; these only catch connections that never
		// start a session.
		IdleTimeout: cfg.IdleTimeout + time.Minute,
		MaxTimeout:  cfg.MaxTimeout + time.Minute,
		Version:     "gitraft",
		PtyCallback: func(ssh.Context, ssh.Pty) bool { return false },
		// Unauthenticated connections are capped and timed by admitConn
		// and serverConfig; sessions per connection by openSession.
		ConnCallback:         s.admitConn,
		ServerConfigCallback: s.serverConfig,
		ChannelHandlers:      map[string]ssh.ChannelHandler{"session": s.openSession},
	}
	return s, nil
}

// Listen binds the SSH address (before the host key is known).
func (s *Server) Listen() error {
	ln, err := net.Listen("tcp", s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("ssh listen: %w", err)
	}
	s.ln = ln
	return nil
}

// Addr is the address the server listens on.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Serve waits for the node's host keys (HostSigners), then serves until Close.
func (s *Server) Serve(ctx context.Context) error {
	if s.ln == nil {
		if err := s.Listen(); err != nil {
			return err
		}
	}
	signers, err := s.backend.HostSigners(ctx)
	if err == nil && len(signers) == 0 {
		err = errors.New("none")
	}
	if err != nil {
		s.ln.Close()
		return fmt.Errorf("ssh host key: %w", err)
	}
	served, announced := ServedHostKeys(signers)
	for _, k := range served {
		s.srv.AddHostKey(k)
	}
	s.log.Info("serving git over ssh", "ssh_addr", s.Addr(), "host_keys", fingerprints(served), "announced_only", fingerprints(announced))
	err = s.srv.Serve(s.ln)
	if errors.Is(err, ssh.ErrServerClosed) {
		return nil
	}
	return err
}

// ServedHostKeys splits host keys, in the order configured, into those the
// server offers (the first of each key type, as OpenSSH's sshd does: a
// client is shown one key per type) and the rest, which are only announced
// for known_hosts.
func ServedHostKeys(keys []gossh.Signer) (served, announced []gossh.Signer) {
	seen := map[string]bool{}
	for _, k := range keys {
		t := k.PublicKey().Type()
		if seen[t] {
			announced = append(announced, k)
			continue
		}
		seen[t] = true
		served = append(served, k)
	}
	return served, announced
}

func fingerprints(keys []gossh.Signer) []string {
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = gossh.FingerprintSHA256(k.PublicKey())
	}
	return out
}

// Close stops the server; sessions under way end.
func (s *Server) Close() error {
	err := s.srv.Close()
	if s.ln != nil {
		s.ln.Close()
	}
	s.wg.Wait()
	return err
}

func (s *Server) authenticate(ctx ssh.Context, key ssh.PublicKey) bool {
	actx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	user, err := s.backend.UserForKey(actx, key)
	if errors.Is(err, ErrUnknownKey) && s.cfg.KeysCommand != "" {
		user, err = s.keysCommand(actx, key)
	}
	if errors.Is(err, ErrNotCurrent) && user != "" {
		// The key is known here, but this node cannot confirm it still
		// is: let the session start only to refuse it with the reason.
		ctx.SetValue(authErrKey, err)
		ctx.SetValue(userKey, user)
		return true
	}
	if err != nil {
		s.log.Info("ssh key refused", "fingerprint", gossh.FingerprintSHA256(key), "remote", ctx.RemoteAddr().String(), "err", err)
		return false
	}
	ctx.SetValue(userKey, user)
	return true
}

func (s *Server) keysCommand(ctx context.Context, key ssh.PublicKey) (string, error) {
	b64 := strings.Fields(string(gossh.MarshalAuthorizedKey(key)))[1]
	cmd := exec.CommandContext(ctx, s.cfg.KeysCommand, key.Type(), b64, gossh.FingerprintSHA256(key))
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%w: keys_command: %v", ErrUnknownKey, err)
	}
	user := strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	if user == "" {
		return "", ErrUnknownKey
	}
	return user, nil
}

// startup is a connection's place among those authenticating: given back
// when it authenticates, closes or runs out of grace, whichever is first.
type startup struct {
	once    sync.Once
	release func()
	timer   *time.Timer // nil without a login grace time
}

// finish gives the place back; it reports whether this call did.
func (st *startup) finish() bool {
	first := false
	st.once.Do(func() {
		first = true
		st.release()
	})
	return first
}

// done gives the place back and stops the grace timer. It is called only
// after admitConn has returned (the timer itself calls finish).
func (st *startup) done() {
	st.finish()
	if st.timer != nil {
		st.timer.Stop()
	}
}

// pendingConn gives its startup place back when it closes, and
// acknowledges what it reads at once (quickAck).
type pendingConn struct {
	net.Conn
	st  *startup
	ack func()
}

func (c *pendingConn) Close() error {
	c.st.done()
	return c.Conn.Close()
}

func (c *pendingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.ack()
	}
	return n, err
}

// admitConn runs first for every new connection: past the startup caps it
// is closed at once, before the SSH version exchange; otherwise it has
// LoginGraceTime to authenticate.
func (s *Server) admitConn(ctx ssh.Context, c net.Conn) net.Conn {
	src := sourceAddr(c.RemoteAddr())
	release, err := s.startups.admit(src)
	if err != nil {
		if ok, held := s.refusedLog.allow(time.Now()); ok {
			s.log.Warn("ssh connection refused", "remote", c.RemoteAddr().String(), "err", err,
				"max_startups", s.cfg.MaxStartups, "per_source_max_startups", s.cfg.PerSourceMaxStartups,
				"refused_unlogged", held)
		}
		return nil
	}
	st := &startup{release: release}
	if grace := s.cfg.LoginGraceTime; grace > 0 {
		st.timer = time.AfterFunc(grace, func() {
			if !st.finish() {
				return
			}
			if ok, held := s.graceLog.allow(time.Now()); ok {
				s.log.Info("ssh connection closed: not authenticated in time", "remote", c.RemoteAddr().String(),
					"login_grace_time", grace, "closed_unlogged", held)
			}
			c.Close()
		})
	}
	ctx.SetValue(startupKey, st)
	ctx.SetValue(connSessionsKey, new(atomic.Int32))
	return &pendingConn{Conn: c, st: st, ack: quickAck(c)}
}

// serverConfig gives each connection's handshake a callback that frees its
// startup place once a key has really authenticated (a signature, not a
// query).
func (s *Server) serverConfig(ctx ssh.Context) *gossh.ServerConfig {
	st, _ := ctx.Value(startupKey).(*startup)
	return &gossh.ServerConfig{
		AuthLogCallback: func(_ gossh.ConnMetadata, _ string, err error) {
			if err == nil && st != nil {
				st.done()
			}
		},
	}
}

// openSession caps the sessions open on one connection, then serves the
// session as gliderlabs/ssh does.
func (s *Server) openSession(srv *ssh.Server, conn *gossh.ServerConn, ch gossh.NewChannel, ctx ssh.Context) {
	if open, _ := ctx.Value(connSessionsKey).(*atomic.Int32); open != nil && s.cfg.MaxSessionsPerConnection > 0 {
		if open.Add(1) > int32(s.cfg.MaxSessionsPerConnection) {
			open.Add(-1)
			ch.Reject(gossh.ResourceShortage, fmt.Sprintf("gitraft: this connection already has %d sessions open, the most one connection may (git.max_sessions_per_connection); open another connection", s.cfg.MaxSessionsPerConnection))
			return
		}
		defer open.Add(-1)
	}
	ssh.DefaultSessionHandler(srv, conn, ch, ctx)
}

// refuse ends a session with one line a person can act on.
func refuse(sess ssh.Session, format string, args ...any) {
	fmt.Fprintf(sess.Stderr(), "gitraft: "+format+"\n", args...)
	sess.Exit(1)
}

func newPushID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (s *Server) handle(sess ssh.Session) {
	user, _ := sess.Context().Value(userKey).(string)
	// The key that authenticated must be the key of this session's
	// connection (gliderlabs keeps them together; check anyway).
	if user == "" || sess.PublicKey() == nil {
		refuse(sess, "not authenticated")
		return
	}
	if err, _ := sess.Context().Value(authErrKey).(error); err != nil {
		refuse(sess, "%v", err)
		return
	}
	if !s.userSessions.acquire(user) {
		refuse(sess, "%s already has %d sessions open on this node, the most one user may (git.max_sessions_per_user); let some finish, or use another node", user, s.cfg.MaxSessionsPerUser)
		return
	}
	defer s.userSessions.release(user)
	select {
	case s.slots <- struct{}{}:
		defer func() { <-s.slots }()
	default:
		refuse(sess, "this node is serving its maximum of %d sessions; try again shortly or use another node", s.cfg.MaxSessions)
		return
	}
	cmd, err := ParseCommand(sess.Command())
	if err != nil {
		refuse(sess, "%v", err)
		return
	}
	repo, err := storage.CanonicalName(cmd.Repo)
	if err != nil {
		refuse(sess, "%v", err)
		return
	}
	var ctx context.Context = sess.Context()
	log := s.log.With("repo", repo, "user", user, "service", string(cmd.Service))
	access, err := s.backend.Access(ctx, repo, user)
	if errors.Is(err, ErrRepoNotFound) {
		refuse(sess, "repository %q not found", repo)
		return
	}
	if err != nil {
		log.Warn("access check failed", "err", err)
		refuse(sess, "%v", err)
		return
	}
	need := AccessRead
	if cmd.Service == ReceivePack {
		need = AccessWrite
	}
	if access < need {
		// Like GitHub: a user who may not read does not learn the repo exists.
		if access == AccessNone {
			refuse(sess, "repository %q not found", repo)
		} else {
			refuse(sess, "%s may read but not push to %q; ask an admin: gitraft repo grant %s %s write", user, repo, repo, user)
		}
		return
	}
	gitProtocol := ""
	for _, kv := range sess.Environ() {
		if v, ok := strings.CutPrefix(kv, "GIT_PROTOCOL="); ok {
			gitProtocol = v
		}
	}
	start := time.Now()
	act := &activity{}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := watch(s.cfg.sessionLimits(), act, sess.Stderr(), func(limit string) {
		log.Info("session ended by a limit", "limit", limit)
		cancel()
		sess.Close()
	})
	defer stop()
	in, out, errOut := activeReader{sess, act}, activeWriter{sess, act}, activeWriter{sess.Stderr(), act}
	var code int
	after := func() {}
	publicKey := sess.PublicKey().Marshal()
	if cmd.Service == ReceivePack {
		code, after = s.push(ctx, act, in, out, errOut, repo, user, publicKey, gitProtocol, log)
	} else {
		code = s.read(ctx, act, in, out, errOut, cmd.Service, repo, user, publicKey, gitProtocol, log)
	}
	log.Info("session done", "exit", code, "took", time.Since(start).Round(time.Millisecond))
	sess.Exit(code)
	// The client has its answer and goes; what is left of the push is
	// this node's own bookkeeping.
	after()
}

// ServeProxied serves a session that another node took and proxied here.
// That node may be behind or cut off, so this one checks the client's key
// and the user's access again against its own state.
func (s *Server) ServeProxied(ctx context.Context, service, repo, user string, publicKey []byte, gitProtocol string, stdin io.Reader, stdout, stderr io.Writer) int {
	log := s.log.With("repo", repo, "user", user, "service", service, "proxied", true)
	progress := func(msg string) { fmt.Fprintf(stderr, "gitraft: %s\n", msg) }
	if err := s.recheck(ctx, Service(service), repo, user, publicKey); err != nil {
		log.Info("proxied session refused", "err", err)
		progress(err.Error())
		return 1
	}
	switch Service(service) {
	case UploadPack, UploadArchive:
		plan, err := s.backend.PrepareRead(ctx, repo, progress)
		if err == nil && plan.Peer != "" {
			err = fmt.Errorf("%s is not current either", s.cfg.NodeID)
		}
		if err != nil {
			progress(fmt.Sprintf("cannot serve %q: %v", repo, err))
			return 1
		}
		return RunGit(ctx, s.cfg.Git, Service(service), plan.Path, gitProtocol, s.wantCheck(repo), stdin, stdout, stderr)
	case ReceivePack:
		code, after := s.push(withProxied(ctx), nil, stdin, stdout, stderr, repo, user, publicKey, gitProtocol, log)
		after()
		return code
	}
	progress(fmt.Sprintf("unsupported service %q", service))
	return 1
}

// recheck is the authentication and authorisation of a proxied session.
func (s *Server) recheck(ctx context.Context, svc Service, repo, user string, publicKey []byte) error {
	key, err := gossh.ParsePublicKey(publicKey)
	if err != nil {
		return fmt.Errorf("the proxied session carries no valid key: %v", err)
	}
	owner, err := s.backend.UserForKey(ctx, key)
	if errors.Is(err, ErrUnknownKey) && s.cfg.KeysCommand != "" {
		owner, err = s.keysCommand(ctx, key)
	}
	if err != nil {
		if errors.Is(err, ErrUnknownKey) {
			return fmt.Errorf("key %s is not (or no longer) known", gossh.FingerprintSHA256(key))
		}
		return err
	}
	if owner != user {
		return fmt.Errorf("key %s is not %s's", gossh.FingerprintSHA256(key), user)
	}
	access, err := s.backend.Access(ctx, repo, user)
	if errors.Is(err, ErrRepoNotFound) {
		return fmt.Errorf("repository %q not found", repo)
	}
	if err != nil {
		return err
	}
	need := AccessRead
	if svc == ReceivePack {
		need = AccessWrite
	}
	if access < need {
		if access == AccessNone {
			return fmt.Errorf("repository %q not found", repo)
		}
		return fmt.Errorf("%s may read but not push to %q", user, repo)
	}
	return nil
}

func (s *Server) read(ctx context.Context, act *activity, stdin io.Reader, stdout, stderr io.Writer, svc Service, repo, user string, publicKey []byte, gitProtocol string, log *slog.Logger) int {
	progress := func(msg string) { fmt.Fprintf(stderr, "gitraft: %s\n", msg) }
	done := act.nodeBusy()
	plan, err := s.backend.PrepareRead(ctx, repo, progress)
	done()
	if err != nil {
		fmt.Fprintf(stderr, "gitraft: cannot serve %q: %v\n", repo, err)
		return 1
	}
	if plan.Peer != "" {
		log.Info("proxying read", "peer", plan.Peer)
		code, err := s.backend.Proxy(ctx, plan.Peer, svc, repo, user, publicKey, gitProtocol, stdin, stdout, stderr)
		if err != nil {
			fmt.Fprintf(stderr, "gitraft: proxy to %s: %v\n", plan.Peer, err)
			return 1
		}
		return code
	}
	return RunGit(ctx, s.cfg.Git, svc, plan.Path, gitProtocol, s.wantCheck(repo), stdin, stdout, stderr)
}

// wantCheck is what a client may fetch of repo by id: nil (anything) when
// the operator allows it, else what the refs reach.
func (s *Server) wantCheck(repo string) WantCheck {
	if s.cfg.AllowAnySHA1InWant {
		return nil
	}
	return func(ctx context.Context, oids []string) ([]string, error) {
		bad, err := s.backend.Unreachable(ctx, repo, oids)
		if len(bad) > 0 {
			s.log.Info("fetch of unreachable objects refused", "repo", repo, "oids", firstFewIDs(bad))
		}
		return bad, err
	}
}

// RunGit runs one git service in a local repository, wired to the client.
// With wants not nil, an upload-pack serves only objects the refs reach:
// git is told so for protocol v0 and v1 (reachableOnly), and a protocol v2
// session's requests are checked with wants on their way to git
// (wantFilter); a refused one ends the session with git's own "not our
// ref" error. Node-to-node fetches, which take any object by id, do not
// come through here.
func RunGit(ctx context.Context, git *storage.Git, svc Service, path, gitProtocol string, wants WantCheck, stdin io.Reader, stdout, stderr io.Writer) int {
	var args []string
	var filter *wantFilter
	restrict := svc == UploadPack && wants != nil
	if restrict {
		args = append(args, reachableOnly...)
		// git is given the version this decides on, whatever else the
		// client's GIT_PROTOCOL says.
		switch protocolVersion(gitProtocol) {
		case 2:
			gitProtocol = "version=2"
		case 1:
			gitProtocol = "version=1"
		default:
			gitProtocol = ""
		}
	}
	args = append(args, string(svc))
	if svc == UploadPack {
		args = append(args, "--strict")
	}
	args = append(args, path)
	var env []string
	if gitProtocol != "" {
		env = append(env, "GIT_PROTOCOL="+gitProtocol)
	}
	c := git.Command(ctx, "", env, args...)
	if restrict && gitProtocol == "version=2" {
		// The filter reads only once git has started (exec copies stdin
		// from its own goroutine), so c.Process is set when stop runs.
		filter = newWantFilter(ctx, stdin, wants, func() { c.Process.Kill() })
		stdin = filter
	}
	c.Stdin, c.Stdout, c.Stderr = stdin, stdout, stderr
	c.WaitDelay = 5 * time.Second
	err := git.Run(c)
	if refused := filter.refusal(); refused != nil {
		// git is gone and its output written: the client's next read is
		// the reason, as git would have sent it.
		fmt.Fprintf(stderr, "gitraft: %s\n", refused.why)
		stdout.Write(pktLine("ERR " + refused.msg + "\n"))
		return 1
	}
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) && ee.ExitCode() > 0 {
			return ee.ExitCode()
		}
		fmt.Fprintf(stderr, "gitraft: git %s: %v\n", svc, err)
		return 1
	}
	return 0
}

// push runs one push; act, if not nil, is told while the node works for it.
// It returns git's exit code for the client once git is done, and what is
// left of the push (Finish: the copy records its version and the write
// lock goes, unless the commit released it); the caller runs that after it
// has sent the client the exit code.
func (s *Server) push(ctx context.Context, act *activity, stdin io.Reader, stdout, stderr io.Writer, repo, user string, publicKey []byte, gitProtocol string, log *slog.Logger) (int, func()) {
	id := newPushID()
	log = log.With("push_id", id)
	progress := func(msg string) { fmt.Fprintf(stderr, "gitraft: %s\n", msg) }
	// Read ahead: git starts on the copy while the lock is taken, and the
	// client sees what it read only if the copy was not changed meanwhile.
	var rp *receivePack
	var mark uint64
	if ra, ok := s.backend.(ReadAhead); ok {
		if path, m, ok := ra.PushCopy(repo); ok {
			var err error
			if rp, err = s.startReceivePack(ctx, path, id, gitProtocol); err != nil {
				log.Warn("starting git receive-pack ahead of the lock failed", "err", err)
				rp = nil
			} else if s.readAheadStarted != nil {
				s.readAheadStarted(rp)
			}
			mark = m
		}
	}
	done := act.nodeBusy()
	tx, err := s.backend.BeginPush(ctx, repo, user, id, progress)
	done()
	if rp != nil {
		if ra, ok := tx.(ReadAheadTx); err != nil || !ok || tx.Path() != rp.path || !ra.UnchangedSince(mark) {
			rp.discard()
			rp = nil
		}
	}
	var redirect *Redirect
	if errors.As(err, &redirect) && !isProxied(ctx) {
		progress(redirect.Error())
		log.Info("handing push to a peer", "peer", redirect.PeerID, "reason", redirect.Reason)
		code, err := s.backend.Proxy(ctx, redirect.Peer, ReceivePack, repo, user, publicKey, gitProtocol, stdin, stdout, stderr)
		if err != nil {
			fmt.Fprintf(stderr, "gitraft: proxy to %s: %v\n", redirect.PeerID, err)
			return 1, nop
		}
		return code, nop
	}
	if err != nil {
		log.Info("push refused before receiving", "err", err)
		fmt.Fprintf(stderr, "gitraft: push to %q refused: %v\n", repo, err)
		return 1, nop
	}
	if rp == nil {
		if rp, err = s.startReceivePack(ctx, tx.Path(), id, gitProtocol); err != nil {
			tx.Finish(false)
			fmt.Fprintf(stderr, "gitraft: push to %q refused: %v\n", repo, err)
			return 1, nop
		}
	}
	cmds := newCommandList(stdin)
	p := &pushSession{tx: tx, commands: cmds, maxRefs: s.cfg.MaxRefsPerPush, act: act}
	report := newReportFilter(stdout,
		func() bool { return cmds.Has("side-band-64k") || cmds.Has("side-band") },
		func() map[string]struct{} {
			_, updates, _ := p.result()
			refs := make(map[string]struct{}, len(updates))
			for _, u := range updates {
				refs[u.Ref] = struct{}{}
			}
			return refs
		})
	// The hook's call is answered while git runs; it ends once git has
	// (its context, then the request pipe, end with git).
	hookCtx, stopHook := context.WithCancel(ctx)
	hookDone := make(chan struct{})
	go func() {
		defer close(hookDone)
		p.serveHook(hookCtx, rp.hook.reqR, &hookReplies{w: rp.hook.verdictW})
	}()
	rp.release(cmds, report, stderr)
	runErr := rp.wait(stopHook, hookDone)
	if err := report.Flush(); err != nil && runErr == nil {
		runErr = err
	}
	if refs := report.Rewritten(); len(refs) > 0 {
		log.Warn("git could not write refs the cluster committed; the client is told they were applied, and the copy is set from the state", "refs", refs)
	}
	committed, updates, pushOptions := p.result()
	ok := runErr == nil && committed
	if committed {
		log.Info("push accepted", "version", tx.Version(), "refs", len(updates))
	}
	after := func() {
		tx.Finish(ok)
		if committed {
			s.postReceive(repo, user, id, tx.Version(), updates, pushOptions, log)
		}
	}
	if runErr != nil {
		var ee *exec.ExitError
		if errors.As(runErr, &ee) && ee.ExitCode() > 0 {
			return ee.ExitCode(), after
		}
		return 1, after
	}
	return 0, after
}

func nop() {}

func (s *Server) postReceive(repo, user, id string, version uint64, updates []RefUpdate, pushOptions []string, log *slog.Logger) {
	if s.cfg.PostReceive == "" {
		return
	}
	var in strings.Builder
	for _, u := range updates {
		fmt.Fprintf(&in, "%s %s %s\n", orZero(u.Old), orZero(u.New), u.Ref)
	}
	env := append(os.Environ(),
		"GITRAFT_REPO="+repo, "GITRAFT_USER="+user, "GITRAFT_NODE="+s.cfg.NodeID,
		"GITRAFT_PUSH_ID="+id, "GITRAFT_VERSION="+strconv.FormatUint(version, 10),
		"GIT_PUSH_OPTION_COUNT="+strconv.Itoa(len(pushOptions)))
	for i, o := range pushOptions {
		env = append(env, fmt.Sprintf("GIT_PUSH_OPTION_%d=%s", i, o))
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		c := exec.CommandContext(ctx, "/bin/sh", "-c", s.cfg.PostReceive)
		c.Env, c.Stdin = env, strings.NewReader(in.String())
		out, err := c.CombinedOutput()
		if err != nil {
			log.Warn("post-receive command failed", "err", err, "output", strings.TrimSpace(string(out)))
		}
	}()
}

type proxiedKey struct{}

func withProxied(ctx context.Context) context.Context {
	return context.WithValue(ctx, proxiedKey{}, true)
}

func isProxied(ctx context.Context) bool { v, _ := ctx.Value(proxiedKey{}).(bool); return v }

func orZero(oid string) string {
	if oid == "" {
		return strings.Repeat("0", 40)
	}
	return oid
}
