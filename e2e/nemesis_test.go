package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
)

// The nemesis of the fault test: one fault at a time, chosen at random among
// a SIGKILL of a node (restarted on its data dir a few seconds later), a
// freeze (SIGSTOP of its process group, SIGCONT a few seconds later) and a
// network partition that cuts one node, often the leader, off from its two
// peers.
//
// A partition drops the node-to-node traffic of the test's own nodes with
// iptables on loopback, and nothing else. The nodes all listen on 127.0.0.1,
// so a port alone cannot tell which node sent a packet (a connection from
// n1 to n2's Raft port comes from an ephemeral port). Each node therefore
// starts in its own cgroup v2, and every socket it opens carries that cgroup.
// Cutting node X off marks every connection to X's Raft and gRPC ports from
// outside X, and every connection from X to a peer's Raft and gRPC ports,
// then drops every packet of a marked connection, both directions. The SSH
// ports stay open: clients still reach the cut-off node, which must refuse
// them or serve them correctly.

// partitioner cuts nodes off with iptables rules on loopback. Every rule it
// adds carries the comment "gitraft-fault-<pid>", and cleanup removes exactly
// the rules with that comment.
type partitioner struct {
	t       testing.TB
	tag     string // rule comment and cgroup name prefix
	cgroot  string // where cgroup v2 is mounted
	mu      sync.Mutex
	fds     map[string]int // node id -> cgroup directory fd
	rules   [][]string     // rules in place, as added
	counter uint32
}

// newPartitioner checks that partitions can be made here (root, iptables
// that works on loopback, cgroup v2) and says why not otherwise.
func newPartitioner(t testing.TB) (*partitioner, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("not root")
	}
	if _, err := exec.LookPath("iptables"); err != nil {
		return nil, errors.New("iptables is not installed (./e2e/test.sh installs it)")
	}
	if out, err := exec.Command("iptables", "-w", "-S", "OUTPUT").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("iptables does not work here: %v: %s", err, out)
	}
	root, err := cgroup2Mount()
	if err != nil {
		return nil, err
	}
	p := &partitioner{t: t, tag: fmt.Sprintf("gitraft-fault-%d", os.Getpid()), cgroot: root, fds: map[string]int{}}
	probe := filepath.Join(root, p.tag+"-probe")
	if err := os.Mkdir(probe, 0o755); err != nil {
		return nil, fmt.Errorf("cannot make a cgroup under %s: %v", root, err)
	}
	os.Remove(probe)
	t.Cleanup(p.cleanup)
	return p, nil
}

func cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) >= 3 && fields[2] == "cgroup2" {
			return fields[1], nil
		}
	}
	return "", errors.New("no cgroup v2 mount")
}

func (p *partitioner) cgroup(id string) string { return p.tag + "-" + id }

// nodeOpt starts each node in its own cgroup.
func (p *partitioner) nodeOpt(n *node) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if fd, ok := p.fds[n.id]; ok {
		n.cgroupFD = fd
		return
	}
	dir := filepath.Join(p.cgroot, p.cgroup(n.id))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		p.t.Fatal(err)
	}
	fd, err := syscall.Open(dir, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
	if err != nil {
		p.t.Fatal(err)
	}
	p.fds[n.id] = fd
	n.cgroupFD = fd
}

func port(addr string) string {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		panic(err)
	}
	return p
}

// cut drops all Raft and gRPC traffic between x and its peers.
func (p *partitioner) cut(x *node, peers []*node) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.counter++
	// A mark of our own per cut: a connection marked by an earlier cut
	// keeps its mark, and must not be dropped by a later one.
	mark := fmt.Sprintf("0x%08x", uint32(os.Getpid()&0x7fff)<<16|p.counter&0xffff)
	var peerPorts []string
	for _, n := range peers {
		peerPorts = append(peerPorts, port(n.raftAddr), port(n.grpcAddr))
	}
	base := []string{"OUTPUT", "-o", "lo", "-s", "127.0.0.0/8", "-d", "127.0.0.0/8", "-p", "tcp"}
	tagged := func(rule ...string) []string {
		r := append(append([]string{}, base...), rule...)
		return append(r, "-m", "comment", "--comment", p.tag)
	}
	withTarget := func(r []string, target ...string) []string { return append(r, append([]string{"-j"}, target...)...) }
	// In chain order: mark connections into x and out of x, drop marked.
	rules := [][]string{
		withTarget(tagged("-m", "multiport", "--dports", port(x.raftAddr)+","+port(x.grpcAddr), "-m", "cgroup", "!", "--path", p.cgroup(x.id)), "CONNMARK", "--set-mark", mark),
		withTarget(tagged("-m", "multiport", "--dports", strings.Join(peerPorts, ","), "-m", "cgroup", "--path", p.cgroup(x.id)), "CONNMARK", "--set-mark", mark),
		withTarget(tagged("-m", "connmark", "--mark", mark), "DROP"),
	}
	for i := len(rules) - 1; i >= 0; i-- {
		r := rules[i]
		args := append([]string{"-w", "-I", r[0], "1"}, r[1:]...)
		if out, err := exec.Command("iptables", args...).CombinedOutput(); err != nil {
			p.healLocked()
			return fmt.Errorf("iptables %s: %v: %s", strings.Join(args, " "), err, out)
		}
		p.rules = append(p.rules, r)
	}
	return nil
}

// heal removes the rules of the current cut.
func (p *partitioner) heal() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.healLocked()
}

func (p *partitioner) healLocked() error {
	var errs []error
	for _, r := range p.rules {
		if out, err := exec.Command("iptables", append([]string{"-w", "-D"}, r...)...).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("iptables -D %s: %v: %s", strings.Join(r, " "), err, out))
		}
	}
	p.rules = nil
	return errors.Join(errs...)
}

// cleanup removes every rule carrying this test's comment, whatever
// happened, then the cgroups (once their nodes are gone).
func (p *partitioner) cleanup() {
	p.heal()
	out, _ := exec.Command("iptables", "-w", "-S", "OUTPUT").Output()
	for _, line := range strings.Split(string(out), "\n") {
		if !strings.HasPrefix(line, "-A OUTPUT ") || !strings.Contains(line, "--comment "+p.tag+" ") && !strings.HasSuffix(line, "--comment "+p.tag) {
			continue
		}
		// iptables -S prints rules in a form -D takes back.
		args := append([]string{"-w", "-D"}, strings.Fields(strings.TrimPrefix(line, "-A "))...)
		if o, err := exec.Command("iptables", args...).CombinedOutput(); err != nil {
			p.t.Errorf("removing a leftover rule %q: %v: %s", line, err, o)
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for id, fd := range p.fds {
		syscall.Close(fd)
		dir := filepath.Join(p.cgroot, p.cgroup(id))
		// The cluster's own cleanup kills the nodes after this one runs; a
		// cgroup with processes in it cannot be removed, so kill them here.
		if b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs")); err == nil {
			for _, pid := range strings.Fields(string(b)) {
				var n int
				fmt.Sscan(pid, &n)
				if n > 0 {
					syscall.Kill(n, syscall.SIGKILL)
				}
			}
		}
		for i := 0; i < 50 && os.Remove(dir) != nil; i++ {
			time.Sleep(100 * time.Millisecond)
		}
	}
	p.fds = map[string]int{}
}

// faultEvent is one fault the nemesis caused, for the log and the
// visualization.
type faultEvent struct {
	kind       string // kill, freeze, partition
	node       string
	start, end int64 // history clock
}

// nemesis injects faults into c until stopped.
type nemesis struct {
	t     testing.TB
	c     *cluster
	part  *partitioner // nil: no partitions here
	clock func() int64
	rng   *rand.Rand

	mu     sync.Mutex
	events []faultEvent
	frozen *node // SIGSTOPped now, for cleanup
}

func (m *nemesis) counts() (kills, freezes, partitions int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, e := range m.events {
		switch e.kind {
		case "kill":
			kills++
		case "freeze":
			freezes++
		case "partition":
			partitions++
		}
	}
	return
}

// annotations puts the faults into porcupine's visualization.
func (m *nemesis) annotations() []porcupine.Annotation {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []porcupine.Annotation
	for _, e := range m.events {
		out = append(out, porcupine.Annotation{Tag: "nemesis", Start: e.start, End: e.end,
			Description: e.kind + " " + e.node, BackgroundColor: "#f8d7da"})
	}
	return out
}

// sleep waits d, or less when stop closes; it reports whether it slept it all.
func sleep(stop <-chan struct{}, d time.Duration) bool {
	select {
	case <-stop:
		return false
	case <-time.After(d):
		return true
	}
}

func (m *nemesis) between(lo, hi time.Duration) time.Duration {
	return lo + time.Duration(m.rng.Int64N(int64(hi-lo)))
}

// run injects one fault after another until stop closes; a fault under way
// when it closes is healed at once.
func (m *nemesis) run(stop <-chan struct{}) {
	for sleep(stop, m.between(time.Second, 3*time.Second)) {
		kinds := []string{"kill", "freeze"}
		if m.part != nil {
			kinds = append(kinds, "partition", "partition")
		}
		kind := kinds[m.rng.IntN(len(kinds))]
		lead := m.leader()
		target := lead
		if target == nil || m.rng.IntN(2) == 0 {
			target = m.c.nodes[m.rng.IntN(len(m.c.nodes))]
		}
		ev := faultEvent{kind: kind, node: target.id, start: m.clock()}
		if target == lead {
			ev.node += " (leader)"
		}
		switch kind {
		case "kill":
			target.kill()
			sleep(stop, m.between(2*time.Second, 5*time.Second))
			target.start()
		case "freeze":
			pid := target.cmd.Process.Pid
			m.mu.Lock()
			m.frozen = target
			m.mu.Unlock()
			syscall.Kill(-pid, syscall.SIGSTOP)
			sleep(stop, m.between(2*time.Second, 6*time.Second))
			syscall.Kill(-pid, syscall.SIGCONT)
			m.mu.Lock()
			m.frozen = nil
			m.mu.Unlock()
		case "partition":
			var peers []*node
			for _, n := range m.c.nodes {
				if n != target {
					peers = append(peers, n)
				}
			}
			if err := m.part.cut(target, peers); err != nil {
				m.t.Errorf("nemesis: %v", err)
				return
			}
			sleep(stop, m.between(4*time.Second, 9*time.Second))
			// Evidence that the cut works: the peers elect one of their own.
			if l := clusterLeader(m.c, peers...); l != nil {
				ev.node += ", peers led by " + l.id
			} else {
				ev.node += ", peers without a leader"
			}
			if err := m.part.heal(); err != nil {
				m.t.Errorf("nemesis: %v", err)
			}
		}
		ev.end = m.clock()
		m.mu.Lock()
		m.events = append(m.events, ev)
		m.mu.Unlock()
		m.t.Logf("nemesis: %s %s for %.1fs from +%.1fs", kind, ev.node, time.Duration(ev.end-ev.start).Seconds(), time.Duration(ev.start).Seconds())
		// One fault at a time: the next waits until every node is ready.
		for _, n := range m.c.nodes {
			if err := n.awaitReady(60 * time.Second); err != nil {
				m.t.Logf("nemesis: after the %s: %v", kind, err)
			}
		}
	}
}

// unfreeze resumes a node left stopped (cleanup after a failure).
func (m *nemesis) unfreeze() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.frozen != nil && m.frozen.cmd != nil {
		syscall.Kill(-m.frozen.cmd.Process.Pid, syscall.SIGCONT)
	}
}

// leader asks the running nodes who leads, without failing the test; nil
// when none answers.
func (m *nemesis) leader() *node { return clusterLeader(m.c) }

// clusterLeader is like cluster.leader, but one try and no t.Fatal, so a
// goroutine other than the test's may call it. It asks the given nodes, or
// all.
func clusterLeader(c *cluster, ask ...*node) *node {
	if len(ask) == 0 {
		ask = c.nodes
	}
	for _, n := range ask {
		if !n.running() {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		cmd := exec.CommandContext(ctx, bin, "cluster", "status", "--json")
		cmd.Env = append(os.Environ(), c.adminEnv(n)...)
		out, err := cmd.Output()
		cancel()
		var st statusJSON
		if err != nil || json.Unmarshal(out, &st) != nil || st.LeaderID == "" {
			continue
		}
		for _, l := range c.nodes {
			if l.id == st.LeaderID {
				return l
			}
		}
	}
	return nil
}
