package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// bin is the gitraft binary built for this test run.
var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "gitraft-e2e-bin-")
	if err != nil {
		panic(err)
	}
	bin = filepath.Join(dir, "gitraft")
	root, err := moduleRoot()
	if err != nil {
		panic(err)
	}
	// GITRAFT_E2E_RACE (test.sh sets it) builds the binary with the race
	// detector; a node's log with a race report fails its test.
	args := []string{"build", "-o", bin}
	if os.Getenv("GITRAFT_E2E_RACE") != "" {
		args = append(args, "-race")
		// A race-built program sleeps 1 s at exit by default, so that
		// other goroutines may still report: every CLI call
		// of a test would pay it. Reports are written as they happen.
		os.Setenv("GORACE", "atexit_sleep_ms=0")
	}
	build := exec.Command("go", append(args, "./cmd/gitraft")...)
	build.Dir = root
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building gitraft:", err)
		os.Exit(2)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func moduleRoot() (string, error) {
	d, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
		parent := filepath.Dir(d)
		if parent == d {
			return "", fmt.Errorf("no go.mod above the test directory")
		}
		d = parent
	}
}

func freePort(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// waitFor polls cond until it holds or the timeout passes.
func waitFor(t testing.TB, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// node is one `gitraft serve` process.
type node struct {
	t                                    testing.TB
	id                                   string
	dir                                  string
	raftAddr, grpcAddr, httpAddr, sshAdr string
	args                                 []string
	env                                  []string
	cmd                                  *exec.Cmd
	log                                  *os.File
	exited                               chan struct{}
	// cgroupFD, when above zero, is an open cgroup v2 directory the process
	// starts in, so that every socket it opens carries that cgroup (the
	// fault test's partitions match on it).
	cgroupFD int
}

// cluster is a set of nodes with their CA, an admin certificate and a git
// user with an SSH key.
type cluster struct {
	t     testing.TB
	dir   string
	ca    string
	nodes []*node
	// the git user: name, key, known_hosts
	user, key, knownHosts string
}

type clusterOpt func(*node)

// startCluster starts size nodes with mutual TLS and waits until every one
// is ready.
func startCluster(t testing.TB, size int, opts ...clusterOpt) *cluster {
	t.Helper()
	c := &cluster{t: t, dir: t.TempDir()}
	c.ca = filepath.Join(c.dir, "ca")
	c.run(nil, "ca", "init", "--dir", c.ca, "--name", "e2e")
	c.run(nil, "ca", "issue", "admin", "admin", "--dir", c.ca)
	// The cluster's SSH host key, made once and given to every node like
	// its TLS files (ca/ssh_host_ed25519_key).
	c.must(nil, "ca", "host-key", "--dir", c.ca)
	t.Cleanup(func() {
		for _, n := range c.nodes {
			n.kill()
		}
		for _, n := range c.nodes {
			n.checkRaces()
		}
		if t.Failed() {
			for _, n := range c.nodes {
				n.dumpLog()
			}
		}
	})
	// Free ports are picked by binding to port 0 and closing, so another
	// process (a test binary running alongside, an outgoing connection) may
	// take one before the node binds it. Then start the cluster again on
	// other ports.
	for attempt := 1; ; attempt++ {
		for i := 1; i <= size; i++ {
			c.addNode(fmt.Sprintf("n%d", i), i == 1, opts...)
		}
		var err error
		for _, n := range c.nodes {
			if err = n.awaitReady(60 * time.Second); err != nil {
				break
			}
		}
		if err == nil {
			// Nodes join as non-voters; tests count on every node voting.
			c.waitVoters(size)
			return c
		}
		if attempt == 3 || !c.portTaken() {
			t.Fatal(err)
		}
		t.Logf("a port was taken (%v); starting the cluster again on other ports", err)
		for _, n := range c.nodes {
			n.kill()
			os.RemoveAll(n.dir)
			os.Remove(n.dir + ".log")
		}
		c.nodes = nil
	}
}

// hostKey is the cluster's SSH host key file, which every node serves.
func (c *cluster) hostKey() string { return filepath.Join(c.ca, "ssh_host_ed25519_key") }

// portTaken reports whether a node failed because its address was in use.
func (c *cluster) portTaken() bool {
	for _, n := range c.nodes {
		if b, _ := os.ReadFile(n.dir + ".log"); bytes.Contains(b, []byte("address already in use")) {
			return true
		}
	}
	return false
}

// addNode issues a certificate and starts a node: the first bootstraps, the
// others join through the first.
func (c *cluster) addNode(id string, bootstrap bool, opts ...clusterOpt) *node {
	c.t.Helper()
	if _, err := os.Stat(filepath.Join(c.ca, id+".crt")); err != nil {
		c.run(nil, "ca", "issue", "node", id, "--dir", c.ca)
	}
	n := &node{
		t: c.t, id: id, dir: filepath.Join(c.dir, id),
		raftAddr: freePort(c.t), grpcAddr: freePort(c.t), httpAddr: freePort(c.t), sshAdr: freePort(c.t),
	}
	n.args = []string{"serve",
		"--node-id", id, "--data-dir", n.dir,
		"--raft-addr", n.raftAddr, "--grpc-addr", n.grpcAddr, "--http-addr", n.httpAddr, "--ssh-addr", n.sshAdr,
		"--tls-ca-file", filepath.Join(c.ca, "ca.crt"),
		"--tls-cert-file", filepath.Join(c.ca, id+".crt"), "--tls-key-file", filepath.Join(c.ca, id+".key"),
		"--git-host-key-files", c.hostKey(),
		"--log-format", "json", "--log-level", "info",
		"--raft-heartbeat-timeout", "500ms", "--raft-election-timeout", "500ms", "--raft-leader-lease-timeout", "250ms",
	}
	switch {
	case bootstrap:
		n.args = append(n.args, "--bootstrap")
	case len(c.nodes) > 0:
		n.args = append(n.args, "--join", c.nodes[0].grpcAddr)
	}
	for _, o := range opts {
		o(n)
	}
	c.nodes = append(c.nodes, n)
	n.start()
	return n
}

func (n *node) start() {
	n.t.Helper()
	if err := os.MkdirAll(filepath.Dir(n.dir), 0o700); err != nil {
		n.t.Fatal(err)
	}
	f, err := os.OpenFile(n.dir+".log", os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		n.t.Fatal(err)
	}
	n.log = f
	n.cmd = exec.Command(bin, n.args...)
	n.cmd.Stdout, n.cmd.Stderr = f, f
	n.cmd.Env = append(os.Environ(), n.env...)
	// Its own process group, so kill reaches git's children too; and killed
	// with the test binary, should that die without running its cleanups (a
	// -timeout panic), so no node outlives its test.
	n.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if n.cgroupFD > 0 {
		n.cmd.SysProcAttr.UseCgroupFD, n.cmd.SysProcAttr.CgroupFD = true, n.cgroupFD
	}
	if err := n.cmd.Start(); err != nil {
		n.t.Fatal(err)
	}
	n.exited = make(chan struct{})
	go func(cmd *exec.Cmd, ch chan struct{}) {
		cmd.Wait()
		close(ch)
	}(n.cmd, n.exited)
}

// kill sends SIGKILL to the node's process group (git children included).
func (n *node) kill() {
	if n.cmd == nil || n.cmd.Process == nil {
		return
	}
	syscall.Kill(-n.cmd.Process.Pid, syscall.SIGKILL)
	<-n.exited
	n.cmd = nil
	n.log.Close()
}

// stop sends SIGTERM and waits for a clean exit.
func (n *node) stop() {
	n.t.Helper()
	if n.cmd == nil {
		return
	}
	n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.exited:
	case <-time.After(20 * time.Second):
		n.t.Errorf("%s did not stop within 20s of SIGTERM", n.id)
		n.kill()
	}
	n.cmd = nil
	n.log.Close()
}

func (n *node) running() bool { return n.cmd != nil }

// checkRaces fails the test when the node's log holds a report of the race
// detector (a binary built with GITRAFT_E2E_RACE).
func (n *node) checkRaces() {
	b, _ := os.ReadFile(n.dir + ".log")
	i := bytes.Index(b, []byte("WARNING: DATA RACE"))
	if i < 0 {
		return
	}
	report := b[i:]
	if j := bytes.Index(report, []byte("==================")); j > 0 {
		report = report[:j]
	}
	n.t.Errorf("%s: the race detector found a data race:\n%s", n.id, report)
}

func (n *node) dumpLog() {
	b, _ := os.ReadFile(n.dir + ".log")
	lines := strings.Split(string(b), "\n")
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	n.t.Logf("---- last log lines of %s ----\n%s", n.id, strings.Join(lines, "\n"))
}

func (n *node) readyz() (int, string) { return httpGet("http://" + n.httpAddr + "/readyz") }

func httpGet(url string) (int, string) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return resp.StatusCode, b.String()
}

func (n *node) waitReady(timeout time.Duration) {
	n.t.Helper()
	if err := n.awaitReady(timeout); err != nil {
		n.t.Fatal(err)
	}
}

// awaitReady polls /readyz until it answers 200; it gives up at once when
// the process exits.
func (n *node) awaitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if code, _ := n.readyz(); code == http.StatusOK {
			return nil
		}
		if n.cmd != nil {
			select {
			case <-n.exited:
				return fmt.Errorf("%s exited before it was ready (%s)", n.id, n.cmd.ProcessState)
			default:
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s waiting for %s /readyz 200", timeout, n.id)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// result of one command.
type result struct {
	stdout, stderr string
	code           int
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
}

// exec runs a command with a timeout and returns what it printed.
func runCmd(t testing.TB, dir string, env []string, timeout time.Duration, name string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	err := cmd.Run()
	r := result{stdout: so.String(), stderr: se.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%s %v: %v", name, args, err)
	}
	return r
}

// adminEnv points the CLI at a node with the admin certificate.
func (c *cluster) adminEnv(n *node) []string {
	return []string{
		"GITRAFT_ADDR=" + n.grpcAddr,
		"GITRAFT_CACERT=" + filepath.Join(c.ca, "ca.crt"),
		"GITRAFT_CLIENT_CERT=" + filepath.Join(c.ca, "admin.crt"),
		"GITRAFT_CLIENT_KEY=" + filepath.Join(c.ca, "admin.key"),
	}
}

// run runs the gitraft CLI (against node n when not nil) and returns its output.
func (c *cluster) run(n *node, args ...string) result {
	c.t.Helper()
	var env []string
	if n != nil {
		env = c.adminEnv(n)
	}
	return runCmd(c.t, c.dir, env, 60*time.Second, bin, args...)
}

// must runs the CLI and fails the test unless it succeeds.
func (c *cluster) must(n *node, args ...string) string {
	c.t.Helper()
	r := c.run(n, args...)
	if r.code != 0 {
		c.t.Fatalf("gitraft %s on %s failed: %s", strings.Join(args, " "), nodeID(n), r)
	}
	return r.stdout
}

// fails runs the CLI, expects it to fail, and returns stderr.
func (c *cluster) fails(n *node, args ...string) string {
	c.t.Helper()
	r := c.run(n, args...)
	if r.code == 0 {
		c.t.Fatalf("gitraft %s on %s succeeded, want an error: %s", strings.Join(args, " "), nodeID(n), r)
	}
	return r.stderr
}

func nodeID(n *node) string {
	if n == nil {
		return "-"
	}
	return n.id
}

// jsonOf runs the CLI with --json and decodes the answer.
func (c *cluster) jsonOf(n *node, v any, args ...string) {
	c.t.Helper()
	out := c.must(n, append(args, "--json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		c.t.Fatalf("decode %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

type statusJSON struct {
	NodeID   string `json:"node_id"`
	State    string `json:"state"`
	LeaderID string `json:"leader_id"`
	Members  []struct {
		ID        string `json:"id"`
		Suffrage  string `json:"suffrage"`
		Leader    bool   `json:"leader"`
		Reachable bool   `json:"reachable"`
		State     string `json:"state"`
		SSHAddr   string `json:"ssh_addr"`
	} `json:"members"`
}

// waitVoters waits until the cluster has size members and every one of
// them votes: a node joins as a non-voter and the leader promotes it once
// it holds every repository.
func (c *cluster) waitVoters(size int) {
	c.t.Helper()
	waitFor(c.t, fmt.Sprintf("%d voters", size), 60*time.Second, func() bool {
		for _, n := range c.nodes {
			if !n.running() {
				continue
			}
			r := c.run(n, "cluster", "status", "--json")
			var st statusJSON
			if r.code != 0 || json.Unmarshal([]byte(r.stdout), &st) != nil {
				continue
			}
			voters := 0
			for _, m := range st.Members {
				if m.Suffrage == "SUFFRAGE_VOTER" {
					voters++
				}
			}
			return voters == size && len(st.Members) == size
		}
		return false
	})
}

// leader returns the leader's node, asking any running node.
func (c *cluster) leader() *node {
	c.t.Helper()
	var lead *node
	waitFor(c.t, "a leader", 30*time.Second, func() bool {
		for _, n := range c.nodes {
			if !n.running() {
				continue
			}
			r := c.run(n, "cluster", "status", "--json")
			if r.code != 0 {
				continue
			}
			var st statusJSON
			if json.Unmarshal([]byte(r.stdout), &st) != nil || st.LeaderID == "" {
				continue
			}
			for _, m := range c.nodes {
				if m.id == st.LeaderID && m.running() {
					lead = m
					return true
				}
			}
		}
		return false
	})
	return lead
}

// running returns a running node other than the given ones.
func (c *cluster) other(not ...*node) *node {
	for _, n := range c.nodes {
		if !n.running() {
			continue
		}
		skip := false
		for _, x := range not {
			skip = skip || x == n
		}
		if !skip {
			return n
		}
	}
	c.t.Fatal("no other running node")
	return nil
}

func (c *cluster) node(id string) *node {
	for _, n := range c.nodes {
		if n.id == id {
			return n
		}
	}
	c.t.Fatalf("no node %s", id)
	return nil
}

func execCommand(name string, args ...string) *exec.Cmd { return exec.Command(name, args...) }

func lookPath(name string) (string, error) { return exec.LookPath(name) }

type netDialer struct{}

func (netDialer) dial(addr string) (net.Conn, error) {
	return net.DialTimeout("tcp", addr, time.Second)
}

func currentUser() string {
	if u := os.Getenv("USER"); u != "" {
		return u
	}
	out, err := exec.Command("id", "-un").Output()
	if err != nil {
		return "root"
	}
	return strings.TrimSpace(string(out))
}
