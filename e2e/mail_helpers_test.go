package e2e

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/smtp"
	"net/textproto"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// postfixInstance is a private Postfix on loopback: its own config,
// queue and data directories in a temporary directory, an smtpd on a free
// port, and every message relayed to relayhost.
type postfixInstance struct {
	t        testing.TB
	root     string // 0755, so that Postfix's own user can reach it
	conf     string // config_directory
	smtpAddr string
}

// startPostfix starts a Postfix instance that relays all mail to relay
// (host:port). Postfix runs as root's children and its postfix user, so it
// needs real directories the postfix user can reach: not t.TempDir, whose
// parent is private to root.
func startPostfix(t testing.TB, relay string) *postfixInstance {
	t.Helper()
	return startPostfixAs(t, relay, "mx2.example.test")
}

// startPostfixAs starts a Postfix instance named myhostname (instances
// that relay to each other need their own names: Postfix refuses to relay
// to a server that greets it with its own).
func startPostfixAs(t testing.TB, relay, myhostname string) *postfixInstance {
	t.Helper()
	postfix, err := exec.LookPath("postfix")
	if err != nil {
		postfix = "/usr/sbin/postfix"
	}
	if _, err := os.Stat(postfix); err != nil {
		t.Fatalf("Postfix is not installed (./e2e/test.sh installs it): %v", err)
	}
	root, err := os.MkdirTemp("", "gitraft-e2e-postfix-")
	if err != nil {
		t.Fatal(err)
	}
	p := &postfixInstance{t: t, root: root, conf: filepath.Join(root, "etc"), smtpAddr: freePort(t)}
	t.Cleanup(func() {
		runCmd(t, root, nil, 30*time.Second, postfix, "-c", p.conf, "stop")
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(root, "maillog"))
			lines := strings.Split(strings.TrimSpace(string(b)), "\n")
			if len(lines) > 40 {
				lines = lines[len(lines)-40:]
			}
			t.Logf("---- last lines of Postfix's maillog (the instance is left in %s) ----\n%s", root, strings.Join(lines, "\n"))
			return
		}
		os.RemoveAll(root)
	})
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"etc", "spool", "data"} {
		if err := os.Mkdir(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	runCmd(t, root, nil, 10*time.Second, "chown", "postfix", filepath.Join(root, "data"))
	host, port, _ := net.SplitHostPort(p.smtpAddr)
	mainCf := fmt.Sprintf(`compatibility_level = 3.6
queue_directory = %[1]s/spool
data_directory = %[1]s/data
mail_owner = postfix
setgid_group = postdrop
myhostname = %[3]s
mydestination =
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
relayhost = %[2]s
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
smtp_dns_support_level = disabled
smtp_connect_timeout = 5s
maillog_file = %[1]s/maillog
maillog_file_prefixes = %[1]s
`, root, relayHost(relay), myhostname)
	masterCf := fmt.Sprintf(`%s:%s inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
`, host, port)
	for name, body := range map[string]string{"main.cf": mainCf, "master.cf": masterCf} {
		f := filepath.Join(p.conf, name)
		if err := os.WriteFile(f, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		// Postfix waits for a config file changed in the last second to
		// settle before it reads it.
		old := time.Now().Add(-time.Minute)
		os.Chtimes(f, old, old)
	}
	if r := runCmd(t, root, nil, 30*time.Second, postfix, "-c", p.conf, "check"); r.code != 0 {
		t.Fatalf("postfix check: %s", r)
	}
	if r := runCmd(t, root, nil, 30*time.Second, postfix, "-c", p.conf, "start"); r.code != 0 {
		t.Fatalf("postfix start: %s", r)
	}
	waitFor(t, "Postfix's smtpd to listen", 30*time.Second, func() bool {
		c, err := net.DialTimeout("tcp", p.smtpAddr, time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return p
}

// relayHost turns host:port into Postfix's [host]:port (no MX lookup).
func relayHost(addr string) string {
	host, port, _ := net.SplitHostPort(addr)
	return "[" + host + "]:" + port
}

// queue counts the messages in Postfix's queue (postqueue -j).
func (p *postfixInstance) queue() int {
	p.t.Helper()
	r := runCmd(p.t, p.root, nil, 30*time.Second, "postqueue", "-c", p.conf, "-j")
	if r.code != 0 {
		p.t.Fatalf("postqueue -j: %s", r)
	}
	return strings.Count(r.stdout, `"queue_id"`)
}

// deferred counts the messages in Postfix's deferred queue: those whose
// delivery failed and that wait for Postfix's retry backoff.
func (p *postfixInstance) deferred() int {
	p.t.Helper()
	r := runCmd(p.t, p.root, nil, 30*time.Second, "postqueue", "-c", p.conf, "-j")
	if r.code != 0 {
		p.t.Fatalf("postqueue -j: %s", r)
	}
	n := 0
	for _, line := range strings.Split(r.stdout, "\n") {
		var m struct {
			Queue string `json:"queue_name"`
		}
		if json.Unmarshal([]byte(line), &m) == nil && m.Queue == "deferred" {
			n++
		}
	}
	return n
}

// overrides lists master.cf's parameter overrides (postconf -P).
func (p *postfixInstance) overrides() string {
	p.t.Helper()
	r := runCmd(p.t, p.root, nil, 30*time.Second, "postconf", "-c", p.conf, "-P")
	if r.code != 0 {
		p.t.Fatalf("postconf -P: %s", r)
	}
	return r.stdout
}

// send submits one message with the given Message-ID over SMTP. It
// returns the SMTP error (a *textproto.Error for a refusal), nil once the
// message is accepted.
func (p *postfixInstance) send(id string) error {
	c, err := smtp.Dial(p.smtpAddr)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Hello("client.example.test"); err != nil {
		return err
	}
	if err := c.Mail("sender@client.example.test"); err != nil {
		return err
	}
	if err := c.Rcpt("user@forge.example.test"); err != nil {
		return err
	}
	w, err := c.Data()
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "From: sender@client.example.test\r\nTo: user@forge.example.test\r\nMessage-ID: <%s>\r\nSubject: %s\r\n\r\nbody of %s\r\n", id, id, id)
	if err := w.Close(); err != nil {
		return err
	}
	return c.Quit()
}

// smtpCode returns the reply code of an SMTP refusal, or 0.
func smtpCode(err error) int {
	var te *textproto.Error
	if errors.As(err, &te) {
		return te.Code
	}
	return 0
}

// smtpSink is a tiny SMTP server standing for the next hop: it refuses
// mail with 451 until told to accept, and records the Message-ID of every
// message it accepts.
type smtpSink struct {
	ln       net.Listener
	mu       sync.Mutex
	accept   bool
	refused  int
	received []string
	wg       sync.WaitGroup
}

func startSink(t testing.TB, accept bool) *smtpSink {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &smtpSink{ln: ln, accept: accept}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				s.serve(c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		s.wg.Wait()
	})
	return s
}

func (s *smtpSink) addr() string { return s.ln.Addr().String() }

func (s *smtpSink) setAccept(on bool) {
	s.mu.Lock()
	s.accept = on
	s.mu.Unlock()
}

// counts returns how many deliveries were refused and the Message-IDs
// received, sorted.
func (s *smtpSink) counts() (refused int, received []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.refused, slices.Sorted(slices.Values(s.received))
}

func (s *smtpSink) serve(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Minute))
	tp := textproto.NewConn(c)
	tp.PrintfLine("220 sink.example.test ESMTP test sink")
	for {
		line, err := tp.ReadLine()
		if err != nil {
			return
		}
		verb, _, _ := strings.Cut(line, " ")
		switch strings.ToUpper(verb) {
		case "EHLO", "HELO":
			tp.PrintfLine("250 sink.example.test")
		case "MAIL":
			s.mu.Lock()
			ok := s.accept
			if !ok {
				s.refused++
			}
			s.mu.Unlock()
			if !ok {
				tp.PrintfLine("451 4.3.0 test sink: not now")
				continue
			}
			tp.PrintfLine("250 2.1.0 ok")
		case "RCPT":
			tp.PrintfLine("250 2.1.5 ok")
		case "DATA":
			tp.PrintfLine("354 go ahead")
			body, err := tp.ReadDotBytes()
			if err != nil {
				return
			}
			id := messageID(string(body))
			s.mu.Lock()
			s.received = append(s.received, id)
			s.mu.Unlock()
			tp.PrintfLine("250 2.0.0 queued as %s", id)
		case "RSET", "NOOP":
			tp.PrintfLine("250 2.0.0 ok")
		case "QUIT":
			tp.PrintfLine("221 2.0.0 bye")
			return
		default:
			tp.PrintfLine("502 5.5.2 not implemented")
		}
	}
}

// messageID finds the Message-ID header's value, without angle brackets.
func messageID(msg string) string {
	sc := bufio.NewScanner(strings.NewReader(msg))
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			break
		}
		if k, v, ok := strings.Cut(line, ":"); ok && strings.EqualFold(k, "Message-ID") {
			return strings.Trim(strings.TrimSpace(v), "<>")
		}
	}
	return "(no Message-ID)"
}
