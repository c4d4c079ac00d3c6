package e2e

import (
	"fmt"
	"sort"
	"strings"
	"testing"

	"github.com/anishathalye/porcupine"
)

// The fault test's history is checked against this sequential model: each
// branch is a register holding a commit id ("" while the branch is absent),
// read with `git ls-remote` and written with a compare-and-swap push
// (`git push --force-with-lease=refs/heads/B:<expected>`). Commit ids are
// never reused, so the successful swaps of a branch form one chain.

// faultOpKind says what a client did.
type faultOpKind int

const (
	faultRead faultOpKind = iota
	faultCAS
)

// faultInput is what a client asked for.
type faultInput struct {
	Kind     faultOpKind
	Branch   string
	Expected string // CAS: the value the client last saw ("" = absent)
	New      string // CAS: a fresh commit
}

// pushOutcome is what git told the pusher.
type pushOutcome int

const (
	// pushAcked: the ref was reported updated; the swap took effect.
	pushAcked pushOutcome = iota
	// pushStale: git refused before sending anything because the node
	// advertised a value other than the expected one. That is an
	// observation: the branch was not at Expected.
	pushStale
	// pushRejected: the node refused the ref ("nothing was changed"); no effect.
	pushRejected
	// pushUnknown: timeout, dropped connection, killed node, or the node
	// said it may or may not have been applied. The op returns at the end
	// of the history and the model lets it take effect or not.
	pushUnknown
)

func (o pushOutcome) String() string {
	return [...]string{"ok", "stale", "rejected", "unknown"}[o]
}

// faultOutput is what came back.
type faultOutput struct {
	Value   string      // read: the branch's commit id, "" when absent
	Outcome pushOutcome // CAS
}

// faultMeta describes an op for the visualization and the report.
type faultMeta struct {
	Node   string
	Detail string // a short reason: the refusal, a stale warning
}

// faultModel is a compare-and-swap register per branch.
var faultModel = porcupine.Model{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		by := map[string][]porcupine.Operation{}
		for _, op := range history {
			b := op.Input.(faultInput).Branch
			by[b] = append(by[b], op)
		}
		return sortedPartitions(by)
	},
	PartitionEvent: func(history []porcupine.Event) [][]porcupine.Event {
		branch := map[int]string{}
		by := map[string][]porcupine.Event{}
		for _, ev := range history {
			if ev.Kind == porcupine.CallEvent {
				branch[ev.Id] = ev.Value.(faultInput).Branch
			}
			b := branch[ev.Id]
			by[b] = append(by[b], ev)
		}
		return sortedPartitions(by)
	},
	Init: func() any { return "" },
	Step: func(state, input, output any) (bool, any) {
		s, in, out := state.(string), input.(faultInput), output.(faultOutput)
		if in.Kind == faultRead {
			return out.Value == s, s
		}
		switch out.Outcome {
		case pushAcked:
			return s == in.Expected, in.New
		case pushStale:
			return s != in.Expected, s
		case pushRejected:
			return true, s
		default: // pushUnknown: took effect if it could; placed last, it did not
			if s == in.Expected {
				return true, in.New
			}
			return true, s
		}
	},
	DescribeOperation: func(input, output any) string {
		in, out := input.(faultInput), output.(faultOutput)
		if in.Kind == faultRead {
			return fmt.Sprintf("read %s -> %s", in.Branch, short(out.Value))
		}
		return fmt.Sprintf("cas %s %s->%s: %s", in.Branch, short(in.Expected), short(in.New), out.Outcome)
	},
	DescribeState: func(state any) string { return short(state.(string)) },
	DescribeOperationMetadata: func(info any) string {
		m, ok := info.(faultMeta)
		if !ok {
			return ""
		}
		if m.Detail == "" {
			return "via " + m.Node
		}
		return "via " + m.Node + ": " + m.Detail
	},
}

func sortedPartitions[E any](by map[string][]E) [][]E {
	keys := make([]string, 0, len(by))
	for k := range by {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var out [][]E
	for _, k := range keys {
		out = append(out, by[k])
	}
	return out
}

func short(oid string) string {
	if oid == "" {
		return "absent"
	}
	if len(oid) > 8 {
		return oid[:8]
	}
	return oid
}

// lostPushes walks each branch's chain of swaps back from its final value
// and returns the acknowledged pushes that are not on it: pushes whose
// commit was overwritten by nobody yet is not the branch's history.
// final maps branch to the value read through every node at the end.
func lostPushes(history []porcupine.Operation, final map[string]string) []faultInput {
	// new value -> the swap that wrote it (acked or maybe applied)
	wrote := map[string]faultInput{}
	for _, op := range history {
		in := op.Input.(faultInput)
		if in.Kind != faultCAS {
			continue
		}
		if o := op.Output.(faultOutput).Outcome; o == pushAcked || o == pushUnknown {
			wrote[in.Branch+" "+in.New] = in
		}
	}
	onChain := map[string]bool{}
	for b, v := range final {
		for seen := 0; v != "" && seen <= len(wrote); seen++ {
			in, ok := wrote[b+" "+v]
			if !ok || onChain[b+" "+v] {
				break
			}
			onChain[b+" "+v] = true
			v = in.Expected
		}
	}
	var lost []faultInput
	for _, op := range history {
		in := op.Input.(faultInput)
		if in.Kind == faultCAS && op.Output.(faultOutput).Outcome == pushAcked && !onChain[in.Branch+" "+in.New] {
			lost = append(lost, in)
		}
	}
	return lost
}

// Test_FaultModel shows the checker accepts a linearizable history and
// rejects a lost acknowledged push, a stale read and a lease not honoured.
func Test_FaultModel(t *testing.T) {
	type op struct {
		call, ret int64
		in        faultInput
		out       faultOutput
	}
	cas := func(call, ret int64, b, exp, nw string, o pushOutcome) op {
		return op{call, ret, faultInput{Kind: faultCAS, Branch: b, Expected: exp, New: nw}, faultOutput{Outcome: o}}
	}
	read := func(call, ret int64, b, v string) op {
		return op{call, ret, faultInput{Kind: faultRead, Branch: b}, faultOutput{Value: v}}
	}
	hist := func(ops ...op) []porcupine.Operation {
		var h []porcupine.Operation
		for i, o := range ops {
			h = append(h, porcupine.Operation{ClientId: i % 3, Call: o.call, Return: o.ret, Input: o.in, Output: o.out})
		}
		return h
	}
	const end = 1000
	cases := []struct {
		name string
		h    []porcupine.Operation
		ok   bool
		lost int
	}{
		{"swaps, reads, a stale lease, an unknown push that did not happen", hist(
			cas(0, 10, "a", "", "c1", pushAcked),
			cas(5, 15, "b", "", "d1", pushAcked),
			read(20, 30, "a", "c1"),
			cas(21, end, "a", "", "c9", pushUnknown), // lost its lease, outcome unknown
			cas(31, 40, "a", "c1", "c2", pushAcked),
			cas(35, 45, "a", "c1", "c3", pushStale), // concurrent with c2: may see either
			cas(41, 50, "b", "zz", "d2", pushRejected),
			read(60, 70, "a", "c2"),
			read(60, 70, "b", "d1"),
		), true, 0},
		{"an unknown push that did happen", hist(
			cas(0, 10, "a", "", "c1", pushAcked),
			cas(11, end, "a", "c1", "c2", pushUnknown),
			read(20, 30, "a", "c2"),
			cas(40, 50, "a", "c2", "c3", pushAcked),
			read(60, 70, "a", "c3"),
		), true, 0},
		{"lost acknowledged push: the final read shows the old value", hist(
			cas(0, 10, "a", "", "c1", pushAcked),
			cas(20, 30, "a", "c1", "c2", pushAcked),
			read(40, 50, "a", "c1"),
		), false, 1},
		{"lost acknowledged push on a new branch", hist(
			cas(0, 10, "a", "", "c1", pushAcked),
			read(40, 50, "a", ""),
		), false, 1},
		{"stale read after an acknowledged push", hist(
			cas(0, 10, "a", "", "c1", pushAcked),
			cas(20, 30, "a", "c1", "c2", pushAcked),
			read(31, 35, "a", "c1"),
			read(40, 50, "a", "c2"),
		), false, 0},
		{"a lease not honoured: two swaps from the same value both acknowledged", hist(
			cas(0, 10, "a", "", "c1", pushAcked),
			cas(20, 30, "a", "c1", "c2", pushAcked),
			cas(22, 32, "a", "c1", "c3", pushAcked),
			read(40, 50, "a", "c3"),
		), false, 1},
		{"a stale refusal while the branch was at the expected value", hist(
			cas(0, 10, "a", "", "c1", pushAcked),
			cas(20, 30, "a", "c1", "c2", pushStale),
			read(40, 50, "a", "c1"),
		), false, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res, info := porcupine.CheckOperationsVerbose(faultModel, tc.h, 0)
			if got := res == porcupine.Ok; got != tc.ok {
				t.Fatalf("linearizable = %v (%s), want %v", got, res, tc.ok)
			}
			if !tc.ok {
				// The visualization must render for a failing history, and
				// the report must name an operation that does not fit.
				if err := porcupine.VisualizePath(faultModel, info, t.TempDir()+"/v.html"); err != nil {
					t.Fatal(err)
				}
				why := (&faultRun{}).explain(info, tc.h)
				if !strings.Contains(why, "none of these fits next: [") {
					t.Fatalf("explanation names no operation: %q", why)
				}
				t.Log(why)
			}
			final := map[string]string{}
			for _, op := range tc.h {
				if in := op.Input.(faultInput); in.Kind == faultRead {
					final[in.Branch] = op.Output.(faultOutput).Value // the last read
				}
			}
			if got := len(lostPushes(tc.h, final)); got != tc.lost {
				t.Fatalf("lost %d acknowledged pushes, want %d", got, tc.lost)
			}
		})
	}
}

// Test_FaultClassifyPush: what git printed decides whether a push happened.
func Test_FaultClassifyPush(t *testing.T) {
	const ref = "refs/heads/b0"
	for _, tc := range []struct {
		name    string
		r       gitResult
		want    pushOutcome
		reached bool
	}{
		{"ok", gitResult{result: result{code: 0, stdout: "To ssh://x/fault.git\n+\tabc:refs/heads/b0\t111...abc (forced update)\nDone\n"}}, pushAcked, true},
		{"stale lease", gitResult{result: result{code: 1, stdout: "To ssh://x/fault.git\n!\tabc:refs/heads/b0\t[rejected] (stale info)\nDone\n"}}, pushStale, true},
		{"refused, nothing changed", gitResult{result: result{code: 1, stdout: "!\tabc:refs/heads/b0\t[remote rejected] (pre-receive hook declined)\n",
			stderr: "remote: gitraft: refused: stale old value; nothing was changed\n"}}, pushRejected, true},
		{"may or may not", gitResult{result: result{code: 1, stdout: "!\tabc:refs/heads/b0\t[remote rejected] (pre-receive hook declined)\n",
			stderr: "remote: gitraft: committing the push failed; it may or may not have been applied: x\n"}}, pushUnknown, true},
		{"node died", gitResult{result: result{code: 128, stderr: "fatal: the remote end hung up unexpectedly\n"}}, pushUnknown, true},
		{"timed out", gitResult{result: result{code: -1, stdout: "!\tabc:refs/heads/b0\t[rejected] (stale info)\n"}, timedOut: true}, pushUnknown, true},
		{"refused before receiving", gitResult{result: result{code: 128, stderr: "gitraft: push to \"fault\" refused: the cluster has lost its quorum\nfatal: Could not read from remote repository.\n"}}, pushRejected, true},
		{"node down", gitResult{result: result{code: 128, stderr: "ssh: connect to host 127.0.0.1 port 4: Connection refused\nfatal: Could not read from remote repository.\n"}}, pushRejected, false},
	} {
		got, why, reached := classifyPush(tc.r, ref)
		if got != tc.want || reached != tc.reached {
			t.Errorf("%s: %s (reached %v, %q), want %s (reached %v)", tc.name, got, reached, why, tc.want, tc.reached)
		}
	}
}
