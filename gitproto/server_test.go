package gitproto

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"io"
	"log/slog"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	gossh "golang.org/x/crypto/ssh"
)

// fakeBackend serves one user, alice, read access to one empty repository.
type fakeBackend struct {
	host  gossh.Signer
	alice gossh.PublicKey
	repo  string
}

func (b *fakeBackend) HostSigners(context.Context) ([]gossh.Signer, error) {
	return []gossh.Signer{b.host}, nil
}

func (b *fakeBackend) UserForKey(_ context.Context, key gossh.PublicKey) (string, error) {
	if bytes.Equal(key.Marshal(), b.alice.Marshal()) {
		return "alice", nil
	}
	return "", ErrUnknownKey
}

func (b *fakeBackend) Access(context.Context, string, string) (Access, error) {
	return AccessRead, nil
}

func (b *fakeBackend) PrepareRead(context.Context, string, func(string)) (ReadPlan, error) {
	return ReadPlan{Path: b.repo}, nil
}

func (b *fakeBackend) BeginPush(context.Context, string, string, string, func(string)) (PushTx, error) {
	return nil, errors.New("read-only test backend")
}

func (b *fakeBackend) Proxy(context.Context, string, Service, string, string, []byte, string, io.Reader, io.Writer, io.Writer) (int, error) {
	return 1, errors.New("no peers")
}

func newSigner(t *testing.T) gossh.Signer {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s, err := gossh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// testServer is a Server on loopback with a fake backend, and alice's
// client configuration.
type testServer struct {
	addr  string
	alice *gossh.ClientConfig
}

func startTestServer(t *testing.T, cfg Config) *testServer {
	t.Helper()
	if _, err := exec.LookPath("git"); err != nil {
		t.Fatal("git is not installed")
	}
	dir := t.TempDir()
	repo := filepath.Join(dir, "r.git")
	if out, err := exec.Command("git", "init", "-q", "--bare", repo).CombinedOutput(); err != nil {
		t.Fatalf("git init: %v %s", err, out)
	}
	aliceKey := newSigner(t)
	host := newSigner(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.NodeID, cfg.Listener, cfg.StateDir = "t1", ln, filepath.Join(dir, "state")
	srv, err := New(cfg, &fakeBackend{host: host, alice: aliceKey.PublicKey(), repo: repo}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(context.Background()) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return &testServer{addr: ln.Addr().String(), alice: &gossh.ClientConfig{
		User:            "git",
		Auth:            []gossh.AuthMethod{gossh.PublicKeys(aliceKey)},
		HostKeyCallback: gossh.FixedHostKey(host.PublicKey()),
		Timeout:         30 * time.Second,
	}}
}

// dialFrom opens a TCP connection to the server from a loopback address.
func (ts *testServer) dialFrom(t *testing.T, src string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 10 * time.Second}
	c, err := d.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// login dials from src and authenticates as alice.
func (ts *testServer) login(t *testing.T, src string) *gossh.Client {
	t.Helper()
	c := ts.dialFrom(t, src)
	sc, chans, reqs, err := gossh.NewClientConn(c, ts.addr, ts.alice)
	if err != nil {
		t.Fatalf("ssh login from %s: %v", src, err)
	}
	client := gossh.NewClient(sc, chans, reqs)
	t.Cleanup(func() { client.Close() })
	return client
}

// firstBytes reads what the server sends first on a fresh connection: its
// SSH version line, or nothing when it closes the connection at once.
func firstBytes(t *testing.T, c net.Conn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	var got []byte
	buf := make([]byte, 64)
	for !bytes.Contains(got, []byte("\n")) {
		n, err := c.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("no version line and no close: %q", got)
			}
			break
		}
	}
	return string(got)
}

// holdUploadPack starts an upload-pack session and waits until git has
// advertised its refs, so the session is being served.
func holdUploadPack(t *testing.T, client *gossh.Client) (*gossh.Session, error) {
	t.Helper()
	sess, err := client.NewSession()
	if err != nil {
		return nil, err
	}
	out, _ := sess.StdoutPipe()
	var stderr bytes.Buffer
	sess.Stderr = &stderr
	if _, err := sess.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := sess.Start("git-upload-pack 'r'"); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(out, make([]byte, 4)); err != nil {
		t.Fatalf("upload-pack session: %v (%s)", err, stderr.String())
	}
	go io.Copy(io.Discard, out)
	t.Cleanup(func() { sess.Close() })
	return sess, nil
}

func Test_Server_StartupCapsCloseExcessBeforeTheBanner(t *testing.T) {
	ts := startTestServer(t, Config{MaxStartups: 3, PerSourceMaxStartups: 2, LoginGraceTime: time.Hour})
	// Two silent connections from 127.0.0.1 fill its share: they get the
	// server's version line, and are held.
	for i := 0; i < 2; i++ {
		if got := firstBytes(t, ts.dialFrom(t, "127.0.0.1")); !strings.HasPrefix(got, "SSH-2.0-gitraft") {
			t.Fatalf("held connection %d got %q", i+1, got)
		}
	}
	// A third from the same address is closed before any SSH byte.
	if got := firstBytes(t, ts.dialFrom(t, "127.0.0.1")); got != "" {
		t.Fatalf("connection past per_source_max_startups got %q, want a close", got)
	}
	// Another address gets the last place of the total, then the total is
	// full for everyone.
	if got := firstBytes(t, ts.dialFrom(t, "127.0.0.2")); !strings.HasPrefix(got, "SSH-2.0-gitraft") {
		t.Fatalf("connection from another address got %q", got)
	}
	if got := firstBytes(t, ts.dialFrom(t, "127.0.0.3")); got != "" {
		t.Fatalf("connection past max_startups got %q, want a close", got)
	}
}

func Test_Server_AuthenticatedConnectionsFreeTheirStartupPlace(t *testing.T) {
	ts := startTestServer(t, Config{PerSourceMaxStartups: 1, LoginGraceTime: time.Hour})
	// Each login holds its connection open; with one startup place per
	// address, the second login works only if the first gave its place back
	// when it authenticated.
	for i := 0; i < 3; i++ {
		ts.login(t, "127.0.0.1")
	}
}

func Test_Server_LoginGraceTimeClosesSilentConnections(t *testing.T) {
	ts := startTestServer(t, Config{PerSourceMaxStartups: 1, LoginGraceTime: 200 * time.Millisecond})
	c := ts.dialFrom(t, "127.0.0.1")
	if got := firstBytes(t, c); !strings.HasPrefix(got, "SSH-2.0-gitraft") {
		t.Fatalf("first connection got %q", got)
	}
	// The server closes it (read returns EOF) instead of waiting for a
	// version line that never comes.
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.ReadAll(c); err != nil {
		t.Fatalf("silent connection not closed by the server: %v", err)
	}
	// Its place is free again.
	ts.login(t, "127.0.0.1")
}

func Test_Server_SessionsPerConnection(t *testing.T) {
	ts := startTestServer(t, Config{MaxSessionsPerConnection: 2, MaxSessionsPerUser: -1})
	client := ts.login(t, "127.0.0.1")
	first, err := holdUploadPack(t, client)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := holdUploadPack(t, client); err != nil {
		t.Fatal(err)
	}
	_, err = client.NewSession()
	var oce *gossh.OpenChannelError
	if !errors.As(err, &oce) || oce.Reason != gossh.ResourceShortage || !strings.Contains(oce.Message, "git.max_sessions_per_connection") {
		t.Fatalf("third session on one connection: %v; want a resource-shortage refusal naming git.max_sessions_per_connection", err)
	}
	// A second connection of the same user is not held back by the first.
	if _, err := holdUploadPack(t, ts.login(t, "127.0.0.1")); err != nil {
		t.Fatalf("session on a second connection: %v", err)
	}
	// Once a session ends, its connection may open another.
	first.Close()
	deadline := time.Now().Add(30 * time.Second)
	for {
		s, err := client.NewSession()
		if err == nil {
			s.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no session after one ended: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func Test_Server_SessionsPerUser(t *testing.T) {
	ts := startTestServer(t, Config{MaxSessionsPerUser: 2})
	for i := 0; i < 2; i++ {
		if _, err := holdUploadPack(t, ts.login(t, "127.0.0.1")); err != nil {
			t.Fatal(err)
		}
	}
	sess, err := ts.login(t, "127.0.0.1").NewSession()
	if err != nil {
		t.Fatal(err)
	}
	out, err := sess.CombinedOutput("git-upload-pack 'r'")
	if err == nil || !strings.Contains(string(out), "alice already has 2 sessions open on this node") || !strings.Contains(string(out), "git.max_sessions_per_user") {
		t.Fatalf("alice's third session: %v, %q", err, out)
	}
}

func (b *fakeBackend) Unreachable(context.Context, string, []string) ([]string, error) {
	return nil, nil
}
