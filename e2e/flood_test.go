package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	lockv1 "github.com/gitraft/gitraft/proto/gitraft/lock/v1"
)

// startGitNode starts a one-node cluster and waits until it has announced
// its SSH host key (it registers it a moment after /readyz).
func startGitNode(t *testing.T, args ...string) (*cluster, *node) {
	t.Helper()
	c := startCluster(t, 1, withArgs(args...))
	n1 := c.nodes[0]
	waitFor(t, "the cluster's SSH host key", 30*time.Second, func() bool {
		return c.run(n1, "cluster", "known-hosts").code == 0
	})
	return c, n1
}

// dialFrom opens a raw TCP connection to addr from a loopback source
// address (all of 127.0.0.0/8 is loopback on Linux), closed at the end of
// the test.
func dialFrom(t *testing.T, src, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 10 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %s from %s: %v", addr, src, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// greeting is what the server sends first on a fresh connection: its SSH
// version line, or "" when it closes the connection without a word.
func greeting(t *testing.T, c net.Conn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	var got []byte
	buf := make([]byte, 64)
	for !bytes.Contains(got, []byte("\n")) {
		n, err := c.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("neither a version line nor a close from the server: %q", got)
			}
			break
		}
	}
	return string(got)
}

// sshCommand is the ssh command line of a user, from a source address.
func (u *gitUser) sshCommand(src string) string {
	return fmt.Sprintf("ssh -i %s -o IdentitiesOnly=yes -o UserKnownHostsFile=%s -o StrictHostKeyChecking=yes -o BatchMode=yes -o BindAddress=%s", u.key, u.knownHosts, src)
}

// gitFrom runs git as the user with ssh bound to a source address.
func (u *gitUser) gitFrom(src, dir string, args ...string) result {
	u.c.t.Helper()
	return runCmd(u.c.t, dir, append(u.env(), "GIT_SSH_COMMAND="+u.sshCommand(src)), 2*time.Minute, "git", args...)
}

// heldSession is an upload-pack session run by the stock ssh client and
// kept open by the test.
type heldSession struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stderr *syncBuffer
	done   chan error
}

// holdSession starts `git-upload-pack 'repo'` over ssh as u and returns once
// the node serves it (git has advertised its refs).
func (u *gitUser) holdSession(n *node, repo string) *heldSession {
	t := u.c.t
	t.Helper()
	host, port, _ := strings.Cut(n.sshAdr, ":")
	args := strings.Fields(u.sshCommand("127.0.0.1"))
	cmd := exec.Command(args[0], append(args[1:], "-p", port, "git@"+host, "git-upload-pack", "'"+repo+"'")...)
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	h := &heldSession{cmd: cmd, stdin: stdin, stderr: &syncBuffer{}, done: make(chan error, 1)}
	cmd.Stderr = h.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-h.done
	})
	first := make([]byte, 4)
	_, err := io.ReadFull(stdout, first)
	go io.Copy(io.Discard, stdout)
	go func() { h.done <- cmd.Wait() }()
	if err != nil {
		t.Fatalf("held session: %v (%s)", err, h.stderr.String())
	}
	return h
}

// ended waits for the session to end and returns what it printed on stderr.
func (h *heldSession) ended(t *testing.T, within time.Duration, why string) string {
	t.Helper()
	select {
	case err := <-h.done:
		h.done <- err // for the cleanup
	case <-time.After(within):
		t.Fatalf("%s: the session was not ended within %s (stderr so far: %q)", why, within, h.stderr.String())
	}
	return h.stderr.String()
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// Test_E2E_SSHFloods: connections that do not authenticate are capped in
// all and per source address, the excess is closed before any SSH work,
// and the rest are closed after the login grace time, while people with
// keys keep getting in.
func Test_E2E_SSHFloods(t *testing.T) {
	skipWithoutSSH(t)
	const perSource, total = 3, 6
	c, n1 := startGitNode(t, "--git-max-startups", fmt.Sprint(total), "--git-per-source-max-startups", fmt.Sprint(perSource), "--git-login-grace-time", "3s")
	c.must(n1, "repo", "create", "r")
	u := c.addGitUser("alice")
	c.must(n1, "repo", "grant", "r", "alice", "read")
	want := u.lsRemote(url(n1, "r"))

	// A flood from 127.0.0.1 that never says a word: its first connections
	// are held (they get the server's version line), the rest are closed at
	// once, before the server sends anything.
	var held []net.Conn
	for i := 0; i < perSource; i++ {
		conn := dialFrom(t, "127.0.0.1", n1.sshAdr)
		if g := greeting(t, conn); !strings.HasPrefix(g, "SSH-2.0-gitraft") {
			t.Fatalf("flood connection %d got %q, want the version line", i+1, g)
		}
		held = append(held, conn)
	}
	const excess = 40
	for i := 0; i < excess; i++ {
		if g := greeting(t, dialFrom(t, "127.0.0.1", n1.sshAdr)); g != "" {
			t.Fatalf("connection %d past git.per_source_max_startups got %q, want a close", perSource+i+1, g)
		}
	}
	// Someone else, from another address, gets in with the stock client.
	if r := u.gitFrom("127.0.0.2", c.dir, "ls-remote", url(n1, "r")); r.code != 0 {
		t.Fatalf("ls-remote from 127.0.0.2 during a flood from 127.0.0.1: %s", r)
	}
	// A second flooding address takes the rest of the total; then the node
	// is full for every address.
	for i := 0; i < total-perSource; i++ {
		conn := dialFrom(t, "127.0.0.3", n1.sshAdr)
		if g := greeting(t, conn); !strings.HasPrefix(g, "SSH-2.0-gitraft") {
			t.Fatalf("connection %d from 127.0.0.3 got %q, want the version line", i+1, g)
		}
		held = append(held, conn)
	}
	if g := greeting(t, dialFrom(t, "127.0.0.4", n1.sshAdr)); g != "" {
		t.Fatalf("connection past git.max_startups got %q, want a close", g)
	}

	// The login grace time (3s) closes the silent connections.
	for i, conn := range held {
		conn.SetReadDeadline(time.Now().Add(60 * time.Second))
		if _, err := io.ReadAll(conn); err != nil {
			t.Fatalf("silent connection %d was not closed by the node: %v", i+1, err)
		}
	}
	// Their places are free again: the flooded address gets in.
	if r := u.gitFrom("127.0.0.1", c.dir, "ls-remote", url(n1, "r")); r.code != 0 {
		t.Fatalf("ls-remote from 127.0.0.1 after the flood: %s", r)
	}
	if got := u.lsRemote(url(n1, "r")); got != want {
		t.Fatalf("refs after the flood: %s, want %s", got, want)
	}
	// The refusals were logged, but not one line each.
	log, _ := os.ReadFile(n1.dir + ".log")
	refusedLines := bytes.Count(log, []byte(`"msg":"ssh connection refused"`))
	if refusedLines == 0 || refusedLines >= excess {
		t.Errorf("%d log lines for %d refused connections; want some, rate-limited", refusedLines, excess+1)
	}
	if !bytes.Contains(log, []byte("not authenticated in time")) {
		t.Errorf("the login grace time closed connections without a log line")
	}
}

// Test_E2E_SSHSessionsPerUser: one user cannot take more than their share
// of a node's sessions, and is told why; others still get in.
func Test_E2E_SSHSessionsPerUser(t *testing.T) {
	skipWithoutSSH(t)
	c, n1 := startGitNode(t, "--git-max-sessions-per-user", "1")
	c.must(n1, "repo", "create", "r")
	alice, bob := c.addGitUser("alice"), c.addGitUser("bob")
	c.must(n1, "repo", "grant", "r", "alice", "read")
	c.must(n1, "repo", "grant", "r", "bob", "read")

	h := alice.holdSession(n1, "r")
	s := alice.failGit(c.dir, "ls-remote", url(n1, "r"))
	if !strings.Contains(s, "alice already has 1 sessions open on this node") || !strings.Contains(s, "git.max_sessions_per_user") {
		t.Errorf("alice's second session: %q", s)
	}
	bob.lsRemote(url(n1, "r"))

	// Once her session ends, alice gets in again.
	h.stdin.Close()
	h.ended(t, 60*time.Second, "stdin closed")
	waitFor(t, "alice's next session", 30*time.Second, func() bool {
		return alice.git(c.dir, "ls-remote", url(n1, "r")).code == 0
	})
}

// Test_E2E_SSHMinRate: a session that trickles a byte now and then is
// ended by the rate floor, though it never goes idle; a push that waits on
// the node (here for a write lock) is not.
func Test_E2E_SSHMinRate(t *testing.T) {
	skipWithoutSSH(t)
	c, n1 := startGitNode(t, "--git-idle-timeout", "60s", "--git-min-rate-window", "4s", "--git-min-rate-bytes", "4000")
	c.must(n1, "repo", "create", "r")
	u := c.addGitUser("alice")
	c.must(n1, "repo", "grant", "r", "alice", "write")
	wt := u.workTree(url(n1, "r"))
	u.commit(wt, "a", "a\n")
	u.mustGit(wt, "push", "-q", "origin", "main")

	// The trickler: the start of one long pkt-line, then a byte every half
	// second, well inside the idle timeout.
	h := u.holdSession(n1, "r")
	stop := make(chan struct{})
	go func() {
		h.stdin.Write([]byte("fff0"))
		tick := time.NewTicker(500 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				if _, err := h.stdin.Write([]byte("a")); err != nil {
					return
				}
			}
		}
	}()
	stderr := h.ended(t, 50*time.Second, "trickling a byte every 500ms")
	close(stop)
	if !strings.Contains(stderr, "git.min_rate_bytes") {
		t.Errorf("the trickler was ended without saying why: %q", stderr)
	}

	// A push that waits for the write lock moves next to nothing for
	// several windows; the node is the one busy, so it goes through.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	locks := lockv1.NewLockServiceClient(c.grpcConn(n1, "admin"))
	l, err := locks.AcquireLock(ctx, &lockv1.AcquireLockRequest{Repo: "r", Holder: "e2e", Lease: durationpb.New(time.Minute)})
	if err != nil {
		t.Fatal(err)
	}
	next := u.commit(wt, "b", "b\n")
	push := exec.Command("git", "push", "origin", "main")
	push.Dir, push.Env = wt, append(os.Environ(), u.env()...)
	var pushErr syncBuffer
	push.Stderr, push.Stdout = &pushErr, &pushErr
	if err := push.Start(); err != nil {
		t.Fatal(err)
	}
	pushed := make(chan error, 1)
	go func() { pushed <- push.Wait() }()
	defer push.Process.Kill()
	waitFor(t, "the push to wait for the write lock", 60*time.Second, func() bool {
		return strings.Contains(pushErr.String(), "waiting for the write lock")
	})
	// Hold the lock for more than two rate windows (this wait is the
	// point of the test, not a guess at how long something takes).
	time.Sleep(10 * time.Second)
	if _, err := locks.ReleaseLock(ctx, &lockv1.ReleaseLockRequest{Repo: "r", FencingToken: l.GetLock().GetFencingToken()}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-pushed:
		if err != nil {
			t.Fatalf("the push that waited for the lock failed: %v\n%s", err, pushErr.String())
		}
	case <-ctx.Done():
		t.Fatalf("the push did not finish: %s", pushErr.String())
	}
	if got := u.lsRemote(url(n1, "r")); !strings.Contains(got, next+"\trefs/heads/main") {
		t.Fatalf("refs after the push: %s, want main at %s", got, next)
	}
}
