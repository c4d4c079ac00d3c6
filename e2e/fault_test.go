package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
)

// Test_E2E_FaultInjection checks the consistency contract as a whole under
// faults: pushes are compare-and-swaps, nothing acknowledged is lost and no
// read is stale. Several clients push new commits with
// `git push --force-with-lease=refs/heads/B:<what I last read>` and read
// branches with `git ls-remote`, each through a random node, while the
// nemesis (nemesis_test.go) kills, freezes and partitions nodes. Every
// operation's call and return times and outcome go into a history that
// porcupine checks against a compare-and-swap register per branch
// (fault_model_test.go). At the end the faults are healed and every branch
// is read through every node; those reads are in the history too, so an
// acknowledged push that was lost, on any node, makes it non-linearizable.
//
// The short run takes about a minute. A long one runs with
// GITRAFT_FAULT_OPS (operations) or GITRAFT_FAULT_DURATION (a Go duration)
// set, or from ./e2e/bench.sh Fault. GITRAFT_FAULT_OUT names a directory for
// porcupine's visualization and the history (written on failure, and always
// when set).
func Test_E2E_FaultInjection(t *testing.T) {
	cfg := faultConfig{clients: 5, branches: 3, duration: 70 * time.Second, opTimeout: 25 * time.Second}
	if v := os.Getenv("GITRAFT_FAULT_OPS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			t.Fatalf("GITRAFT_FAULT_OPS=%q: want a number of operations", v)
		}
		cfg.ops, cfg.duration = n, 0
	}
	if v := os.Getenv("GITRAFT_FAULT_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("GITRAFT_FAULT_DURATION=%q: %v", v, err)
		}
		cfg.duration = d
	}
	runFault(t, cfg)
}

type faultConfig struct {
	clients, branches int
	duration          time.Duration // 0: until ops
	ops               int           // 0: until duration
	opTimeout         time.Duration
}

// faultRun is one run: the cluster, the clients and the history.
type faultRun struct {
	t       testing.TB
	cfg     faultConfig
	c       *cluster
	u       *gitUser
	repo    string
	start   time.Time
	stop    chan struct{}
	started atomic.Int64 // operations begun

	mu       sync.Mutex
	history  []porcupine.Operation
	unknown  []int // indexes of pushes that return at the end
	pushes   [pushUnknown + 1]int
	reads    int
	failed   int // reads that failed: not observations
	warned   int // reads served with a "may be stale" warning
	dropped  int // pushes that never reached a node
	detailOf map[string]int
}

func (f *faultRun) now() int64 { return int64(time.Since(f.start)) }

func (f *faultRun) branch(i int) string { return fmt.Sprintf("b%d", i) }

func runFault(t *testing.T, cfg faultConfig) {
	skipWithoutSSH(t)
	part, err := newPartitioner(t)
	var opts []clusterOpt
	if err != nil {
		t.Logf("no partitions in this run: %v", err)
		part = nil
	} else {
		opts = append(opts, part.nodeOpt)
	}
	c := startCluster(t, 3, opts...)
	f := &faultRun{t: t, cfg: cfg, c: c, repo: "fault", stop: make(chan struct{}), detailOf: map[string]int{}}
	c.must(c.nodes[0], "repo", "create", f.repo)
	f.u = c.addGitUser("chaos")
	c.must(c.nodes[0], "repo", "grant", f.repo, "chaos", "write")
	trees := make([]string, cfg.clients)
	for i := range trees {
		trees[i] = f.u.workTree(url(c.nodes[0], f.repo))
	}

	f.start = time.Now()
	m := &nemesis{t: t, c: c, part: part, clock: f.now, rng: rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))}
	nemesisDone := make(chan struct{})
	go func() {
		defer close(nemesisDone)
		m.run(f.stop)
	}()
	stopOnce := sync.OnceFunc(func() { close(f.stop) })
	t.Cleanup(func() {
		stopOnce()
		<-nemesisDone
		m.unfreeze()
	})
	var wg sync.WaitGroup
	for i := range cfg.clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f.client(i, trees[i], rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(i))))
		}()
	}
	if cfg.duration > 0 {
		sleep(f.stop, cfg.duration)
		stopOnce()
	}
	wg.Wait()
	stopOnce()
	<-nemesisDone
	loadEnd := time.Since(f.start)

	// Heal, let the cluster settle, then read every branch through every node.
	for _, n := range c.nodes {
		if !n.running() {
			n.start()
		}
	}
	for _, n := range c.nodes {
		n.waitReady(90 * time.Second)
	}
	c.leader()
	waitFor(t, "every replica of the repository to match the state", 90*time.Second, func() bool {
		return c.run(c.other(), "repo", "verify", f.repo).code == 0
	})
	final := f.finalReads()
	end := f.now() + 1
	f.mu.Lock()
	for _, i := range f.unknown {
		f.history[i].Return = end
	}
	history := append([]porcupine.Operation(nil), f.history...)
	f.mu.Unlock()

	// Every commit a branch ends at is in a fetch through every node.
	f.checkObjects(final)

	res, info := porcupine.CheckOperationsVerbose(faultModel, history, 10*time.Minute)
	info.AddAnnotations(m.annotations())
	lost := lostPushes(history, final)
	verdict := map[porcupine.CheckResult]string{porcupine.Ok: "linearizable", porcupine.Illegal: "NOT linearizable", porcupine.Unknown: "unknown (the checker timed out)"}[res]
	kills, freezes, partitions := m.counts()
	f.mu.Lock()
	pushes := f.pushes[pushAcked] + f.pushes[pushStale] + f.pushes[pushRejected] + f.pushes[pushUnknown]
	summary := fmt.Sprintf("fault run: %d operations (%d pushes: %d acknowledged, %d rejected, %d unknown; %d reads), %d faults (%d kills/%d freezes/%d partitions), lost %d, verdict %s",
		pushes+f.reads, pushes, f.pushes[pushAcked], f.pushes[pushStale]+f.pushes[pushRejected], f.pushes[pushUnknown], f.reads,
		kills+freezes+partitions, kills, freezes, partitions, len(lost), verdict)
	t.Logf("%s", summary)
	t.Logf("fault run details: %s of load, %d clients, %d branches; rejected %d stale lease + %d refused by a node; %d reads served with a stale warning; %d failed reads and %d pushes that reached no node left out; %d history entries",
		loadEnd.Round(time.Second), cfg.clients, cfg.branches, f.pushes[pushStale], f.pushes[pushRejected], f.warned, f.failed, f.dropped, len(history))
	var details []string
	for d, n := range f.detailOf {
		details = append(details, fmt.Sprintf("%5d  %s", n, d))
	}
	f.mu.Unlock()
	sort.Sort(sort.Reverse(sort.StringSlice(details)))
	if len(details) > 15 {
		details = details[:15]
	}
	t.Logf("fault run: most frequent outcomes other than ok:\n%s", strings.Join(details, "\n"))
	fmt.Println(summary) // quotable without -v

	for _, in := range lost {
		t.Errorf("acknowledged push lost: %s %s->%s is not in the chain the branch ends at (%s)", in.Branch, short(in.Expected), short(in.New), short(final[in.Branch]))
	}
	if res != porcupine.Ok || os.Getenv("GITRAFT_FAULT_OUT") != "" {
		dir := os.Getenv("GITRAFT_FAULT_OUT")
		if dir == "" {
			dir, _ = os.MkdirTemp("", "gitraft-fault-")
		}
		f.writeOut(dir, info, history)
	}
	if res != porcupine.Ok {
		t.Errorf("the history is %s: %s", verdict, f.explain(info, history))
	}
}

// writeOut saves porcupine's visualization and the history as JSON.
func (f *faultRun) writeOut(dir string, info porcupine.LinearizationInfo, history []porcupine.Operation) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		f.t.Errorf("GITRAFT_FAULT_OUT: %v", err)
		return
	}
	viz := filepath.Join(dir, "fault-history.html")
	if err := porcupine.VisualizePath(faultModel, info, viz); err != nil {
		f.t.Errorf("visualization: %v", err)
	}
	type entry struct {
		Client      int
		Call, Ret   int64
		Op, Node    string
		Detail      string `json:",omitempty"`
		Description string
	}
	var entries []entry
	for _, op := range history {
		meta, _ := op.Metadata.(faultMeta)
		entries = append(entries, entry{Client: op.ClientId, Call: op.Call, Ret: op.Return, Node: meta.Node, Detail: meta.Detail,
			Description: faultModel.DescribeOperation(op.Input, op.Output)})
	}
	b, _ := json.MarshalIndent(entries, "", " ")
	os.WriteFile(filepath.Join(dir, "fault-history.json"), b, 0o644)
	f.t.Logf("porcupine visualization: %s (history: %s)", viz, filepath.Join(dir, "fault-history.json"))
}

// explain names, for each branch that porcupine could not linearize, the
// longest prefix it could, and the operations that could come next but
// none of which fits: one of them saw or did what the contract forbids.
func (f *faultRun) explain(info porcupine.LinearizationInfo, history []porcupine.Operation) string {
	var out []string
	for _, part := range info.PartialLinearizationsOperations() {
		if len(part) == 0 {
			continue
		}
		longest := part[0]
		for _, l := range part {
			if len(l) > len(longest) {
				longest = l
			}
		}
		if len(longest) == 0 {
			continue
		}
		last := longest[len(longest)-1]
		branch := last.Input.(faultInput).Branch
		placed := map[[2]int64]int{}
		for _, op := range longest {
			placed[[2]int64{op.Call, op.Return}]++
		}
		// The ops left of this branch; the next must be called before the
		// earliest of them returns.
		var rest []porcupine.Operation
		firstReturn := int64(1<<63 - 1)
		for _, op := range history {
			if op.Input.(faultInput).Branch != branch {
				continue
			}
			if k := [2]int64{op.Call, op.Return}; placed[k] > 0 {
				placed[k]--
				continue
			}
			rest = append(rest, op)
			firstReturn = min(firstReturn, op.Return)
		}
		if len(rest) == 0 {
			continue // this branch is linearizable
		}
		var next []string
		for _, op := range rest {
			if op.Call <= firstReturn && len(next) < 4 {
				next = append(next, describeOp(op))
			}
		}
		out = append(out, fmt.Sprintf("%s: porcupine placed %d of its ops, up to %s; none of these fits next: %s",
			branch, len(longest), describeOp(last), strings.Join(next, "; ")))
	}
	return strings.Join(out, "\n")
}

func describeOp(op porcupine.Operation) string {
	meta, _ := op.Metadata.(faultMeta)
	s := fmt.Sprintf("[%s via %s, +%.3fs..+%.3fs]", faultModel.DescribeOperation(op.Input, op.Output), meta.Node,
		time.Duration(op.Call).Seconds(), time.Duration(op.Return).Seconds())
	if meta.Detail != "" {
		s += " (" + meta.Detail + ")"
	}
	return s
}

// client runs operations until the run stops.
func (f *faultRun) client(id int, dir string, rng *rand.Rand) {
	// What this client last saw in each branch; "?" forces a read first.
	last := map[string]string{}
	for b := range f.cfg.branches {
		last[f.branch(b)] = ""
	}
	for seq := 0; ; seq++ {
		select {
		case <-f.stop:
			return
		default:
		}
		if f.cfg.ops > 0 && f.started.Add(1) > int64(f.cfg.ops) {
			return
		}
		n := f.c.nodes[rng.IntN(len(f.c.nodes))]
		b := f.branch(rng.IntN(f.cfg.branches))
		if last[b] == "?" || rng.IntN(2) == 0 {
			if seen, ok := f.read(id, n); ok {
				for k, v := range seen {
					last[k] = v
				}
			}
			continue
		}
		oid, ok := f.newCommit(dir, fmt.Sprintf("client %d op %d", id, seq))
		if !ok {
			return
		}
		switch f.push(id, n, dir, b, last[b], oid) {
		case pushAcked:
			last[b] = oid
		case pushStale, pushUnknown:
			last[b] = "?"
		}
	}
}

// newCommit makes a fresh root commit, so that a push sends three small
// objects whatever the branch holds.
func (f *faultRun) newCommit(dir, msg string) (string, bool) {
	r := f.git(dir, 30*time.Second, "commit-tree", "4b825dc642cb6eb9a060e54bf8d69288fbee4904", "-m", msg)
	if r.code != 0 {
		f.t.Errorf("git commit-tree: %s", r)
		return "", false
	}
	return strings.TrimSpace(r.stdout), true
}

// note counts an outcome, numbers (versions, ports) left out.
func (f *faultRun) note(detail string) {
	f.detailOf[digits.ReplaceAllString(detail, "N")]++
}

var digits = regexp.MustCompile(`[0-9]+`)

// read lists the branches through n. A failed read is not an observation and
// is left out; a read that succeeds is one, stale warning or not.
func (f *faultRun) read(client int, n *node) (map[string]string, bool) {
	call := f.now()
	r := f.git("", f.cfg.opTimeout, "ls-remote", "--heads", url(n, f.repo))
	ret := f.now()
	f.mu.Lock()
	defer f.mu.Unlock()
	if r.code != 0 {
		f.failed++
		f.note("read failed: " + remoteReason(r.stderr))
		return nil, false
	}
	refs := map[string]string{}
	for _, l := range strings.Split(r.stdout, "\n") {
		if oid, ref, ok := strings.Cut(strings.TrimSpace(l), "\t"); ok {
			refs[ref] = oid
		}
	}
	seen := map[string]string{}
	meta := faultMeta{Node: n.id}
	if strings.Contains(r.stderr, "may be stale") {
		f.warned++
		meta.Detail = "served with a stale warning"
		f.note("read served with a warning: " + remoteReason(r.stderr))
	}
	f.reads++
	for b := range f.cfg.branches {
		br := f.branch(b)
		seen[br] = refs["refs/heads/"+br]
		f.history = append(f.history, porcupine.Operation{ClientId: client, Call: call, Return: ret, Metadata: meta,
			Input: faultInput{Kind: faultRead, Branch: br}, Output: faultOutput{Value: seen[br]}})
	}
	return seen, true
}

// push swaps branch b from expected to oid through n.
func (f *faultRun) push(client int, n *node, dir, b, expected, oid string) pushOutcome {
	ref := "refs/heads/" + b
	call := f.now()
	r := f.git(dir, f.cfg.opTimeout, "push", "--porcelain", "--force-with-lease="+ref+":"+expected, url(n, f.repo), oid+":"+ref)
	ret := f.now()
	out, detail, reached := classifyPush(r, ref)
	f.mu.Lock()
	defer f.mu.Unlock()
	if !reached {
		f.dropped++
		f.note("push reached no node: " + detail)
		return pushRejected
	}
	f.pushes[out]++
	if out != pushAcked {
		f.note("push " + out.String() + ": " + detail)
	}
	op := porcupine.Operation{ClientId: client, Call: call, Return: ret, Metadata: faultMeta{Node: n.id, Detail: detail},
		Input: faultInput{Kind: faultCAS, Branch: b, Expected: expected, New: oid}, Output: faultOutput{Outcome: out}}
	if out == pushUnknown {
		f.unknown = append(f.unknown, len(f.history))
	}
	f.history = append(f.history, op)
	return out
}

// gitResult is what a git command printed; timedOut when it was killed.
type gitResult struct {
	result
	timedOut bool
}

// git runs git as the test's user; a command that outlives timeout is
// killed with its children (ssh).
func (f *faultRun) git(dir string, timeout time.Duration, args ...string) gitResult {
	cmd := exec.Command("git", args...)
	if dir == "" {
		dir = f.c.dir
	}
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), f.u.env()...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		return gitResult{result: result{code: -1, stderr: err.Error()}}
	}
	var timedOut atomic.Bool
	timer := time.AfterFunc(timeout, func() {
		timedOut.Store(true)
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	})
	err := cmd.Wait()
	timer.Stop()
	r := gitResult{result: result{stdout: so.String(), stderr: se.String()}, timedOut: timedOut.Load()}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		r.code = -1
		r.stderr += err.Error()
	}
	return r
}

// uncertain phrases: the node cannot say whether the push was committed.
var uncertain = []string{"may or may not", "went away", "if it was committed", "unknown"}

// classifyPush reads `git push --porcelain` for ref. reached is false when
// the push never reached a node (the SSH connection was refused), so it
// cannot have had any effect.
func classifyPush(r gitResult, ref string) (out pushOutcome, detail string, reached bool) {
	if r.timedOut {
		return pushUnknown, "timed out", true
	}
	for _, l := range strings.Split(r.stdout, "\n") {
		fields := strings.SplitN(l, "\t", 3)
		if len(fields) != 3 || !strings.HasSuffix(fields[1], ":"+ref) {
			continue
		}
		flag, summary := fields[0], fields[2]
		switch {
		case (flag == " " || flag == "+" || flag == "*") && r.code == 0:
			return pushAcked, "", true
		case flag == "!" && strings.Contains(summary, "[rejected]") && strings.Contains(summary, "stale info"):
			return pushStale, summary, true
		case flag == "!" && strings.Contains(summary, "[remote rejected]"):
			why := remoteReason(r.stderr)
			for _, u := range uncertain {
				if strings.Contains(why, u) {
					return pushUnknown, why, true
				}
			}
			return pushRejected, why, true
		}
		return pushUnknown, fmt.Sprintf("exit %d, %q", r.code, l), true
	}
	why := remoteReason(r.stderr)
	if strings.Contains(r.stderr, "ssh: connect to host") && strings.Contains(r.stderr, "Connection refused") {
		return pushRejected, why, false
	}
	// Refused before git received anything (no write lock, no quorum): no
	// ref can have changed.
	if strings.Contains(why, "gitraft: push to \"") && strings.Contains(why, "\" refused: ") {
		return pushRejected, why, true
	}
	return pushUnknown, why, true
}

// remoteReason picks gitraft's words out of git's stderr (or its last line).
func remoteReason(stderr string) string {
	var why []string
	for _, l := range strings.Split(stderr, "\n") {
		l = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(l), "remote:"))
		if strings.HasPrefix(l, "gitraft: ") && !strings.Contains(l, "took the push") && !strings.Contains(l, "replicated to") &&
			!strings.Contains(l, "waiting for the write lock") && !strings.Contains(l, "got the write lock") || strings.HasPrefix(l, "fatal:") || strings.HasPrefix(l, "error:") ||
			strings.HasPrefix(l, "ssh:") {
			why = append(why, l)
		}
	}
	if len(why) == 0 {
		return lastLine(stderr)
	}
	return strings.Join(why, " | ")
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// finalReads reads every branch through every node, into the history; each
// node must answer, and all must agree.
func (f *faultRun) finalReads() map[string]string {
	f.t.Helper()
	var first map[string]string
	var from string
	for _, n := range f.c.nodes {
		var seen map[string]string
		waitFor(f.t, "a read through "+n.id, 60*time.Second, func() bool {
			var ok bool
			seen, ok = f.read(f.cfg.clients, n)
			return ok
		})
		if first == nil {
			first, from = seen, n.id
			continue
		}
		for b, v := range first {
			if seen[b] != v {
				f.t.Errorf("after healing, %s reads %s at %s but %s reads %s", n.id, b, short(seen[b]), from, short(v))
			}
		}
	}
	return first
}

// checkObjects fetches every branch through every node and checks that each
// final commit is there.
func (f *faultRun) checkObjects(final map[string]string) {
	f.t.Helper()
	for _, n := range f.c.nodes {
		dir := f.u.workTree(url(n, f.repo))
		if r := f.git(dir, 2*time.Minute, "fetch", "-q", "origin", "+refs/heads/*:refs/remotes/origin/*"); r.code != 0 {
			f.t.Errorf("fetch through %s after healing: %s", n.id, r)
			continue
		}
		for b, oid := range final {
			if oid == "" {
				continue
			}
			if r := f.git(dir, time.Minute, "cat-file", "-e", oid+"^{commit}"); r.code != 0 {
				f.t.Errorf("%s's final commit %s is missing from a fetch through %s", b, oid, n.id)
			}
		}
	}
}
