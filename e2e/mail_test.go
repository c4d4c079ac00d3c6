package e2e

import (
	"fmt"
	"net"
	"net/smtp"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	mailv1 "github.com/gitraft/gitraft/proto/gitraft/mail/v1"
)

func (c *cluster) mailHost(n *node, name string) *mailv1.Host {
	c.t.Helper()
	var l mailv1.ListHostsResponse
	c.protoOf(n, &l, "mail", "ls")
	for _, h := range l.GetHosts() {
		if h.GetName() == name {
			return h
		}
	}
	return nil
}

func (c *cluster) mailHistory(n *node, host string) []*mailv1.HistoryEntry {
	c.t.Helper()
	var h mailv1.GetHistoryResponse
	c.protoOf(n, &h, "mail", "history", host, "--limit", "0")
	return h.GetEntries()
}

func countEvents(entries []*mailv1.HistoryEntry, ev mailv1.Event) int {
	n := 0
	for _, e := range entries {
		if e.GetEvent() == ev {
			n++
		}
	}
	return n
}

func fileHas(path, s string) bool {
	b, err := os.ReadFile(path)
	return err == nil && strings.Contains(string(b), s)
}

// Test_E2E_MailDrain drains a real Postfix whose queue holds mail for a
// relay that is down: the host leaves the MX set at once, answers new mail
// with 4xx, stays draining while the relay refuses (through a SIGKILL of the
// gitraft leader), and is drained only once every message reached the
// relay. Undrain puts it back. Then a drain past its deadline hands the
// leftover mail to the active peer. Refusals (the last active host, an
// unknown host) give a reason and change nothing.
func Test_E2E_MailDrain(t *testing.T) {
	relay := startSink(t, false) // the next hop of mx2's mail, down at first
	peer := startSink(t, true)   // mx1's SMTP, which takes leftover mail at a deadline
	pf := startPostfix(t, relay.addr())
	out := t.TempDir()

	// Mail for a relay that is down sits in mx2's queue.
	var sent []string
	for i := 1; i <= 5; i++ {
		id := fmt.Sprintf("before-drain-%d@e2e.test", i)
		if err := pf.send(id); err != nil {
			t.Fatalf("queue %s: %v", id, err)
		}
		sent = append(sent, id)
	}
	waitFor(t, "5 messages in the queue", 30*time.Second, func() bool { return pf.queue() == 5 })

	peerHost, peerPort, _ := net.SplitHostPort(peer.addr())
	c := startCluster(t, 3, func(n *node) {
		n.args = append(n.args,
			"--mail-mx-zone-file", filepath.Join(out, n.id+".zone"),
			"--mail-on-change", `cp "$1" `+filepath.Join(out, n.id+".pushed"))
		if n.id == "n3" { // the node on mail host mx2
			n.args = append(n.args, "--mail-host", "mx2", "--mail-address", "mx2.example.test", "--mail-priority", "20",
				"--mail-postfix-config-dir", pf.conf, "--mail-handoff-peers", "mx1=["+peerHost+"]:"+peerPort,
				"--mail-flush-interval", "1s", "--mail-queue-interval", "250ms", "--mail-report-interval", "10s", "--mail-settle", "1s")
		}
	})
	agentNode := c.node("n3")
	// The agent must outlive the leader we kill later.
	if c.leader() == agentNode {
		c.must(agentNode, "cluster", "transfer-leader", "n1")
		waitFor(t, "n3 to hand over leadership", 30*time.Second, func() bool { return c.leader() != agentNode })
	}
	c.must(c.nodes[0], "mail", "add", "mx1", "--address", "mx1.example.test", "--priority", "10")
	waitFor(t, "mx2 registered by its agent, its queue reported", 30*time.Second, func() bool {
		h := c.mailHost(agentNode, "mx2")
		return h.GetState() == mailv1.HostState_HOST_STATE_ACTIVE && h.GetQueueSize() == 5 && h.GetQueueReportedBy() == "agent:n3"
	})
	for _, n := range c.nodes {
		zone := filepath.Join(out, n.id+".zone")
		waitFor(t, n.id+"'s MX fragment with both hosts", 10*time.Second, func() bool {
			return fileHas(zone, "MX\t10\tmx1.example.test.") && fileHas(zone, "MX\t20\tmx2.example.test.") &&
				fileHas(filepath.Join(out, n.id+".pushed"), "mx2.example.test.")
		})
	}
	if got := c.must(c.nodes[1], "mail", "mx"); !strings.Contains(got, "MX\t10\tmx1.example.test.") || !strings.Contains(got, "MX\t20\tmx2.example.test.") {
		t.Fatalf("gitraft mail mx:\n%s", got)
	}

	// Refusals with a reason, changing nothing.
	history := len(c.mailHistory(agentNode, ""))
	if s := c.fails(c.nodes[1], "mail", "drain", "mx9"); !strings.Contains(s, `mail host "mx9" not found; known hosts: mx1, mx2`) {
		t.Fatalf("drain of an unknown host: %q", s)
	}
	c.must(c.nodes[1], "mail", "drain", "mx1", "--reason", "only to test the last-host rule")
	history++
	s := c.fails(c.nodes[1], "mail", "drain", "mx2")
	if !strings.Contains(s, "mx2 is the last active mail host") || !strings.Contains(s, "--force") {
		t.Fatalf("drain of the last active host: %q", s)
	}
	if h := c.mailHost(agentNode, "mx2"); h.GetState() != mailv1.HostState_HOST_STATE_ACTIVE {
		t.Fatalf("a refused drain changed mx2: %v", h)
	}
	c.must(c.nodes[1], "mail", "undrain", "mx1")
	history++
	if got := len(c.mailHistory(agentNode, "")); got != history {
		t.Fatalf("history has %d entries, want %d: refusals must not be recorded as changes", got, history)
	}

	// Drain mx2: out of the MX set at once, on every node.
	outText := c.must(c.nodes[0], "mail", "drain", "mx2", "--deadline", "10m", "--reason", "kernel update")
	if !strings.Contains(outText, "mx2 is draining") {
		t.Fatalf("drain said: %q", outText)
	}
	for _, n := range c.nodes {
		zone := filepath.Join(out, n.id+".zone")
		waitFor(t, "mx2 out of "+n.id+"'s MX fragment", 5*time.Second, func() bool {
			return fileHas(zone, "mx1.example.test.") && !fileHas(zone, "mx2")
		})
	}
	// Draining again changes nothing, and says so.
	if s := c.must(c.nodes[2], "mail", "drain", "mx2"); !strings.Contains(s, "already draining") {
		t.Fatalf("second drain: %q", s)
	}
	// New mail gets 4xx, so senders try the next MX. A message accepted
	// before the agent applied the drain is queued like the others.
	waitFor(t, "new mail to mx2 refused with 4xx", 15*time.Second, func() bool {
		id := fmt.Sprintf("during-drain-%d@e2e.test", time.Now().UnixNano())
		err := pf.send(id)
		if err == nil {
			sent = append(sent, id)
			return false
		}
		if code := smtpCode(err); code < 400 || code > 499 {
			t.Fatalf("new mail while draining: %v, want a 4xx reply", err)
		}
		return true
	})
	// While the relay refuses, the agent flushes again and again, and mx2
	// stays draining.
	refusedAtDrain, _ := relay.counts()
	waitFor(t, "flushes that the relay refuses", 30*time.Second, func() bool {
		refused, _ := relay.counts()
		return refused >= refusedAtDrain+2*len(sent)
	})
	// The agent reports the queue when its count changes, every
	// queue_interval: the last message queued may not be counted yet.
	var h *mailv1.Host
	waitFor(t, fmt.Sprintf("mx2 draining with all %d messages reported queued", len(sent)), 15*time.Second, func() bool {
		h = c.mailHost(agentNode, "mx2")
		if h.GetState() != mailv1.HostState_HOST_STATE_DRAINING {
			t.Fatalf("with the relay down: %v, want draining", h)
		}
		return h.GetQueueSize() == uint64(len(sent))
	})

	// The leader dies mid-drain; the drain goes on under the next one.
	old := c.leader()
	old.kill()
	next := c.leader()
	t.Logf("killed leader %s mid-drain; new leader %s", old.id, next.id)
	relay.setAccept(true)
	waitFor(t, "mx2 drained under the new leader", 60*time.Second, func() bool {
		return c.mailHost(agentNode, "mx2").GetState() == mailv1.HostState_HOST_STATE_DRAINED
	})
	if q := pf.queue(); q != 0 {
		t.Fatalf("mx2 is drained with %d messages queued", q)
	}
	_, got := relay.counts()
	if want := slices.Sorted(slices.Values(sent)); !slices.Equal(got, want) {
		t.Fatalf("the relay received\n%v\nwant every message sent to mx2\n%v", got, want)
	}
	hist := c.mailHistory(next, "mx2")
	last := hist[len(hist)-1]
	if last.GetEvent() != mailv1.Event_EVENT_DRAINED || last.GetBy() != "agent:n3" {
		t.Fatalf("last history entry: %v", last)
	}

	// Undrain: back in the MX set, and taking mail again.
	c.must(agentNode, "mail", "undrain", "mx2")
	waitFor(t, "mx2 back in the MX fragment", 5*time.Second, func() bool {
		return fileHas(filepath.Join(out, agentNode.id+".zone"), "MX\t20\tmx2.example.test.")
	})
	waitFor(t, "mx2 to take mail again", 15*time.Second, func() bool {
		err := pf.send("after-undrain@e2e.test")
		if err != nil && smtpCode(err) < 400 {
			t.Fatalf("mail after undrain: %v", err)
		}
		return err == nil
	})
	sent = append(sent, "after-undrain@e2e.test")
	waitFor(t, "the message after the undrain at the relay", 30*time.Second, func() bool {
		_, got := relay.counts()
		return len(got) == len(sent)
	})

	// A drain past its deadline: marked overdue once, and the leftover mail
	// goes to the active peer (mx1).
	relay.setAccept(false)
	for i := 1; i <= 2; i++ {
		if err := pf.send(fmt.Sprintf("leftover-%d@e2e.test", i)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "2 messages in the queue", 30*time.Second, func() bool { return pf.queue() == 2 })
	c.must(agentNode, "mail", "drain", "mx2", "--deadline", "2s", "--reason", "deadline test")
	waitFor(t, "mx2 drained through its peer", 60*time.Second, func() bool {
		return c.mailHost(agentNode, "mx2").GetState() == mailv1.HostState_HOST_STATE_DRAINED
	})
	if _, got := peer.counts(); !slices.Equal(got, []string{"leftover-1@e2e.test", "leftover-2@e2e.test"}) {
		t.Fatalf("the peer received %v", got)
	}
	hist = c.mailHistory(agentNode, "mx2")
	hist = hist[slices.IndexFunc(hist, func(e *mailv1.HistoryEntry) bool { return e.GetReason() == "deadline test" }):]
	if countEvents(hist, mailv1.Event_EVENT_OVERDUE) != 1 || countEvents(hist, mailv1.Event_EVENT_HANDOFF) != 1 || countEvents(hist, mailv1.Event_EVENT_DRAINED) != 1 {
		t.Fatalf("history of the overdue drain: %v", hist)
	}
	if o := pf.overrides(); !strings.Contains(o, "default_transport = smtp:["+peerHost+"]:"+peerPort) {
		t.Fatalf("no handoff in master.cf while drained:\n%s", o)
	}
	c.must(agentNode, "mail", "undrain", "mx2")
	waitFor(t, "Postfix's normal routing and smtpd settings again", 15*time.Second, func() bool {
		return strings.TrimSpace(pf.overrides()) == ""
	})
	if ls := c.must(agentNode, "mail", "ls"); !strings.Contains(ls, "mx2") || !strings.Contains(ls, "active") {
		t.Fatalf("mail ls:\n%s", ls)
	}
}

// startMailCluster starts three nodes with the agent of mail host mx2 on
// n3, driving pf, and registers mx1 (no agent) as the other MX.
func startMailCluster(t *testing.T, pf *postfixInstance, extra ...string) *cluster {
	t.Helper()
	c := startCluster(t, 3, func(n *node) {
		if n.id == "n3" {
			n.args = append(n.args, "--mail-host", "mx2", "--mail-address", "mx2.example.test", "--mail-priority", "20",
				"--mail-postfix-config-dir", pf.conf,
				"--mail-flush-interval", "1s", "--mail-queue-interval", "250ms", "--mail-report-interval", "2s", "--mail-settle", "1s")
			n.args = append(n.args, extra...)
		}
	})
	c.must(c.nodes[0], "mail", "add", "mx1", "--address", "mx1.example.test", "--priority", "10")
	waitFor(t, "mx2 registered by its agent", 30*time.Second, func() bool {
		return c.mailHost(c.nodes[0], "mx2").GetQueueReportedBy() == "agent:n3"
	})
	return c
}

// Test_E2E_MailOldSessionAcrossDrain opens an SMTP session before a drain
// and keeps it open across it: Postfix's reload leaves that session alone,
// so it can still queue mail. The host stays draining while it is open,
// the message it sends afterwards is accepted and reaches the relay, and
// only then is the host drained.
func Test_E2E_MailOldSessionAcrossDrain(t *testing.T) {
	relay := startSink(t, true)
	pf := startPostfix(t, relay.addr())
	c := startMailCluster(t, pf)

	old, err := smtp.Dial(pf.smtpAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if err := old.Hello("old-session.example.test"); err != nil {
		t.Fatal(err)
	}

	c.must(c.nodes[0], "mail", "drain", "mx2", "--deadline", "10m")
	var probes []string
	waitFor(t, "new mail to mx2 refused with 4xx", 15*time.Second, func() bool {
		id := fmt.Sprintf("probe-%d@e2e.test", time.Now().UnixNano())
		err := pf.send(id)
		if err == nil {
			probes = append(probes, id)
			return false
		}
		if code := smtpCode(err); code < 400 || code > 499 {
			t.Fatalf("new mail while draining: %v, want a 4xx reply", err)
		}
		return true
	})
	// Well past settle (1s) and a few queue counts: the queue is empty, but
	// the old session is open.
	until := time.Now().Add(5 * time.Second)
	for time.Now().Before(until) {
		h := c.mailHost(c.nodes[0], "mx2")
		if h.GetState() != mailv1.HostState_HOST_STATE_DRAINING {
			t.Fatalf("mx2 is %s with an SMTP session from before the drain open: %v", h.GetState(), h)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if h := c.mailHost(c.nodes[0], "mx2"); h.GetOldSessions() != 1 {
		t.Fatalf("mx2 reports %d old sessions, want 1: %v", h.GetOldSessions(), h)
	}
	if ls := c.must(c.nodes[1], "mail", "ls"); !strings.Contains(ls, "1 SMTP session from before the drain") {
		t.Fatalf("mail ls does not say why mx2 is not drained:\n%s", ls)
	}

	// The old session still gets its message accepted.
	const id = "old-session@e2e.test"
	if err := old.Mail("sender@client.example.test"); err != nil {
		t.Fatalf("MAIL in the old session: %v", err)
	}
	if err := old.Rcpt("user@forge.example.test"); err != nil {
		t.Fatalf("RCPT in the old session: %v", err)
	}
	w, err := old.Data()
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(w, "Message-ID: <%s>\r\nSubject: old session\r\n\r\nqueued after the drain\r\n", id)
	if err := w.Close(); err != nil {
		t.Fatalf("the old session's message was not accepted: %v", err)
	}
	time.Sleep(time.Second)
	if h := c.mailHost(c.nodes[0], "mx2"); h.GetState() != mailv1.HostState_HOST_STATE_DRAINING {
		t.Fatalf("mx2 is %s while the old session is still open", h.GetState())
	}
	if err := old.Quit(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "mx2 drained once the old session ended", 30*time.Second, func() bool {
		return c.mailHost(c.nodes[0], "mx2").GetState() == mailv1.HostState_HOST_STATE_DRAINED
	})
	_, got := relay.counts()
	if want := slices.Sorted(slices.Values(append(probes, id))); !slices.Equal(got, want) {
		t.Fatalf("mx2 is drained, and the relay received\n%v\nwant\n%v", got, want)
	}
	if q := pf.queue(); q != 0 {
		t.Fatalf("drained with %d messages queued", q)
	}
}

// Test_E2E_MailAgentDown drains and undrains a host while its agent's node
// is down: the state changes, Postfix there cannot, and the CLI, mail ls
// and the metrics say so. When the node comes back, its agent applies the
// state and the flag clears.
func Test_E2E_MailAgentDown(t *testing.T) {
	relay := startSink(t, true)
	pf := startPostfix(t, relay.addr())
	c := startMailCluster(t, pf)
	agentNode := c.node("n3")
	other := c.node("n1")
	metric := func() string {
		_, body := httpGet("http://" + other.httpAddr + "/metrics")
		for _, l := range strings.Split(body, "\n") {
			if strings.HasPrefix(l, `gitraft_mail_agent_silent{host="mx2"}`) {
				return l
			}
		}
		return "(no gitraft_mail_agent_silent for mx2)"
	}
	if m := metric(); !strings.HasSuffix(m, " 0") {
		t.Fatalf("agent up: %s", m)
	}
	if r := c.run(other, "mail", "drain", "mx2", "--deadline", "10m"); r.code != 0 || strings.Contains(r.stderr, "warning") {
		t.Fatalf("drain with the agent up: %s", r)
	}
	c.must(other, "mail", "undrain", "mx2")

	agentNode.kill()
	// The agent reports every 2s: silent after 3 intervals.
	waitFor(t, "mx2's agent flagged silent by mail ls", 20*time.Second, func() bool {
		return strings.Contains(c.must(other, "mail", "ls"), "SILENT")
	})
	if m := metric(); !strings.HasSuffix(m, " 1") {
		t.Fatalf("agent down: %s", m)
	}
	const warn = "has not reported for"
	const unchanged = "Postfix there is unchanged until it comes back"
	r := c.run(other, "mail", "drain", "mx2", "--deadline", "10m", "--reason", "agent down")
	if r.code != 0 || !strings.Contains(r.stderr, "recorded, but the agent on mx2 "+warn) || !strings.Contains(r.stderr, unchanged) {
		t.Fatalf("drain with the agent down: %s", r)
	}
	// Postfix there did not follow: it still takes mail.
	if err := pf.send("while-agent-down@e2e.test"); err != nil {
		t.Fatalf("mx2's Postfix changed without its agent: %v", err)
	}
	r = c.run(other, "mail", "undrain", "mx2")
	if r.code != 0 || !strings.Contains(r.stderr, warn) || !strings.Contains(r.stderr, unchanged) {
		t.Fatalf("undrain with the agent down: %s", r)
	}
	r = c.run(other, "mail", "drain", "mx2", "--deadline", "10m")
	if r.code != 0 || !strings.Contains(r.stderr, warn) {
		t.Fatalf("second drain with the agent down: %s", r)
	}

	// The node comes back: its agent applies the drain.
	agentNode.start()
	agentNode.waitReady(60 * time.Second)
	waitFor(t, "mx2's Postfix refusing new mail with 4xx", 30*time.Second, func() bool {
		err := pf.send(fmt.Sprintf("after-return-%d@e2e.test", time.Now().UnixNano()))
		return err != nil && smtpCode(err) >= 400 && smtpCode(err) < 500
	})
	waitFor(t, "mx2 drained by its returned agent", 30*time.Second, func() bool {
		return c.mailHost(other, "mx2").GetState() == mailv1.HostState_HOST_STATE_DRAINED
	})
	if ls := c.must(other, "mail", "ls"); strings.Contains(ls, "SILENT") {
		t.Fatalf("still flagged after the agent came back:\n%s", ls)
	}
	if m := metric(); !strings.HasSuffix(m, " 0") {
		t.Fatalf("agent back: %s", m)
	}
}

// Test_E2E_MailHandoffFlushesPeer hands an overdue drain's leftover mail to
// a peer whose next hop refuses it: once the next hop takes mail again, the
// peer delivers it at once (its agent flushes while it is handed mail),
// not after Postfix's retry backoff (5 minutes and more). The drain's
// deadline is moved on the command line, and --wait blocks until drained.
func Test_E2E_MailHandoffFlushesPeer(t *testing.T) {
	relay := startSink(t, false)
	pf1 := startPostfixAs(t, relay.addr(), "mx1.example.test")
	pf2 := startPostfix(t, relay.addr())
	c := startCluster(t, 3, func(n *node) {
		common := []string{"--mail-flush-interval", "1s", "--mail-queue-interval", "250ms", "--mail-report-interval", "2s", "--mail-settle", "1s"}
		switch n.id {
		case "n2":
			n.args = append(n.args, "--mail-host", "mx1", "--mail-address", "mx1.example.test", "--mail-priority", "10", "--mail-postfix-config-dir", pf1.conf)
			n.args = append(n.args, common...)
		case "n3":
			n.args = append(n.args, "--mail-host", "mx2", "--mail-address", "mx2.example.test", "--mail-priority", "20", "--mail-postfix-config-dir", pf2.conf,
				"--mail-handoff-peers", "mx1="+relayHost(pf1.smtpAddr))
			n.args = append(n.args, common...)
		}
	})
	n1 := c.node("n1")
	waitFor(t, "both agents registered", 30*time.Second, func() bool {
		return c.mailHost(n1, "mx1").GetQueueReportedBy() == "agent:n2" && c.mailHost(n1, "mx2").GetQueueReportedBy() == "agent:n3"
	})
	want := []string{"handed-1@e2e.test", "handed-2@e2e.test"}
	for _, id := range want {
		if err := pf2.send(id); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "2 messages queued on mx2", 30*time.Second, func() bool { return pf2.queue() == 2 })

	c.must(n1, "mail", "drain", "mx2", "--deadline", "1h")
	if s := c.must(n1, "mail", "drain", "mx2"); !strings.Contains(s, "already draining") {
		t.Fatalf("drain again without --deadline: %q", s)
	}
	// Move the deadline: 2s from now, so that the drain is overdue and its
	// mail goes to mx1. --wait returns once mx2 is drained.
	s := c.must(n1, "mail", "drain", "mx2", "--deadline", "2s", "--wait", "--wait-timeout", "60s")
	if !strings.Contains(s, "deadline of the drain of mx2 moved to") || !strings.Contains(s, "mx2 is drained") {
		t.Fatalf("drain --deadline 2s --wait said:\n%s", s)
	}
	h := c.mailHost(n1, "mx2")
	if h.GetState() != mailv1.HostState_HOST_STATE_DRAINED || h.GetHandoffPeer() != "mx1" || pf2.queue() != 0 {
		t.Fatalf("after --wait: %v, mx2's queue %d", h, pf2.queue())
	}
	if countEvents(c.mailHistory(n1, "mx2"), mailv1.Event_EVENT_UPDATED) != 1 {
		t.Fatalf("the deadline's move is not in the history: %v", c.mailHistory(n1, "mx2"))
	}
	// The handed mail waits on mx1, its next hop refusing.
	waitFor(t, "the handed mail deferred on mx1", 30*time.Second, func() bool {
		return pf1.deferred() == 2
	})
	relay.setAccept(true)
	waitFor(t, "the handed mail delivered by mx1 without waiting for its backoff", 30*time.Second, func() bool {
		_, got := relay.counts()
		return slices.Equal(got, want)
	})
}
