package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	clusterv1 "github.com/gitraft/gitraft/proto/gitraft/cluster/v1"
	lockv1 "github.com/gitraft/gitraft/proto/gitraft/lock/v1"
	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
)

var testNow = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func ts(t time.Time) *timestamppb.Timestamp { return timestamppb.New(t) }

func TestHumanDuration(t *testing.T) {
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{0, "0ms"},
		{12 * time.Millisecond, "12ms"},
		{999 * time.Millisecond, "999ms"},
		{time.Second, "1s"},
		{12*time.Second + 400*time.Millisecond, "12s"},
		{time.Minute, "1m"},
		{4*time.Minute + 5*time.Second, "4m05s"},
		{time.Hour, "1h"},
		{3*time.Hour + 5*time.Minute + 10*time.Second, "3h05m"},
		{48 * time.Hour, "2d"},
		{50 * time.Hour, "2d2h"},
		{-3 * time.Second, "3s"},
	} {
		if got := humanDuration(tc.d); got != tc.want {
			t.Errorf("humanDuration(%v) = %q, want %q", tc.d, got, tc.want)
		}
	}
}

func TestRelativeTimes(t *testing.T) {
	if got := ago(testNow, ts(testNow.Add(-12*time.Millisecond))); got != "12ms ago" {
		t.Errorf("ago = %q, want 12ms ago", got)
	}
	if got := ago(testNow, ts(testNow.Add(-90*time.Second))); got != "1m30s ago" {
		t.Errorf("ago = %q, want 1m30s ago", got)
	}
	if got := ago(testNow, ts(testNow.Add(time.Second))); got != "just now" {
		t.Errorf("ago(future) = %q, want just now", got)
	}
	if got := ago(testNow, nil); got != "-" {
		t.Errorf("ago(nil) = %q, want -", got)
	}
	if got := ago(testNow, ts(time.Unix(0, 0))); got != "-" {
		t.Errorf("ago(epoch) = %q, want -", got)
	}
	if got := expiresIn(testNow, ts(testNow.Add(12*time.Second))); got != "in 12s" {
		t.Errorf("expiresIn = %q, want in 12s", got)
	}
	if got := expiresIn(testNow, ts(testNow.Add(-time.Second))); got != "expired" {
		t.Errorf("expiresIn(past) = %q, want expired", got)
	}
	if got := expiresIn(testNow, ts(testNow)); got != "expired" {
		t.Errorf("expiresIn(now) = %q, want expired", got)
	}
	if got := when(testNow, ts(testNow.Add(-3*time.Minute))); !strings.HasSuffix(got, "(3m ago)") {
		t.Errorf("when = %q, want a (3m ago) suffix", got)
	}
}

// lines splits output into lines with trailing spaces removed.
func lines(s string) []string {
	var out []string
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		out = append(out, strings.TrimRight(l, " "))
	}
	return out
}

func TestWriteRepoList(t *testing.T) {
	resp := &repov1.ListReposResponse{Index: 42, Repos: []*repov1.Repo{
		{Name: "alpha", Version: 3, RefCount: 2, UpdatedAt: ts(testNow.Add(-5 * time.Second))},
		{Name: "team/a-much-longer-name", Version: 12, RefCount: 0},
	}}
	var buf bytes.Buffer
	if err := writeRepoList(&buf, resp, testNow); err != nil {
		t.Fatal(err)
	}
	want := []string{
		"NAME                     VERSION  REFS  UPDATED",
		"alpha                    3        2     5s ago",
		"team/a-much-longer-name  12       0     -",
	}
	if got := lines(buf.String()); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("writeRepoList:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	buf.Reset()
	if err := writeRepoList(&buf, &repov1.ListReposResponse{Index: 1}, testNow); err != nil {
		t.Fatal(err)
	}
	if buf.String() != "no repositories\n" {
		t.Errorf("empty list printed %q", buf.String())
	}
}

func TestWriteRepo(t *testing.T) {
	resp := &repov1.GetRepoResponse{Index: 77, Repo: &repov1.Repo{
		Name: "alpha", Version: 3, UpdatedIndex: 70,
		CreatedAt: ts(testNow.Add(-time.Hour)), UpdatedAt: ts(testNow.Add(-time.Minute)),
		Refs: []*repov1.Ref{{Name: "refs/heads/main", Oid: "0123456789abcdef0123456789abcdef01234567"}},
		Replicas: []*repov1.Replica{
			{NodeId: "n1", Version: 3, State: repov1.ReplicaState_REPLICA_STATE_CURRENT},
			{NodeId: "n2", Version: 2, State: repov1.ReplicaState_REPLICA_STATE_BEHIND},
		},
	}}
	var buf bytes.Buffer
	if err := writeRepo(&buf, resp, testNow); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	for _, want := range []string{
		"name:          alpha\n",
		"version:       3\n",
		"updated index: 70\n",
		"(1h ago)",
		"REF              OID\n",
		"refs/heads/main  0123456789abcdef0123456789abcdef01234567\n",
		"NODE  VERSION  STATE\n",
		"n2    2        behind\n",
		"as of raft index 77\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("writeRepo output lacks %q:\n%s", want, out)
		}
	}

	// No replicas: no replicas table; no refs: says so.
	resp.Repo.Replicas, resp.Repo.Refs = nil, nil
	buf.Reset()
	if err := writeRepo(&buf, resp, testNow); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(buf.String(), "NODE") || !strings.Contains(buf.String(), "no refs") {
		t.Errorf("writeRepo without refs and replicas:\n%s", buf.String())
	}
}

func TestWriteLockList(t *testing.T) {
	resp := &lockv1.ListLocksResponse{Locks: []*lockv1.WriteLock{
		{Repo: "alpha", Holder: "n1/push-7", FencingToken: 57, ExpiresAt: ts(testNow.Add(12 * time.Second))},
		{Repo: "beta", Holder: "n2/push-1", FencingToken: 9, ExpiresAt: ts(testNow.Add(-time.Second))},
	}}
	var buf bytes.Buffer
	if err := writeLockList(&buf, resp, testNow); err != nil {
		t.Fatal(err)
	}
	want := []string{
		"REPO   HOLDER     TOKEN  EXPIRES",
		"alpha  n1/push-7  57     in 12s",
		"beta   n2/push-1  9      expired",
	}
	if got := lines(buf.String()); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("writeLockList:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// Waiters, in the order they are served.
	resp.Queues = []*lockv1.LockQueue{{Repo: "alpha", Waiters: []*lockv1.LockWaiter{
		{Holder: "n2/push-9", Node: "n2", Since: ts(testNow.Add(-1500 * time.Millisecond))},
		{Holder: "n3/push-4", Node: "n3", Since: ts(testNow.Add(-200 * time.Millisecond))},
	}}}
	buf.Reset()
	if err := writeLockList(&buf, resp, testNow); err != nil {
		t.Fatal(err)
	}
	want = append(want, "", "waiting, first served first:",
		"REPO   #  WAITER     WAITING",
		"alpha  1  n2/push-9  1.5s",
		"alpha  2  n3/push-4  200ms")
	if got := lines(buf.String()); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("writeLockList with waiters:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	buf.Reset()
	writeLockList(&buf, &lockv1.ListLocksResponse{}, testNow)
	if buf.String() != "no locks\n" {
		t.Errorf("no locks printed %q", buf.String())
	}
}

func TestWriteClusterStatus(t *testing.T) {
	resp := &clusterv1.GetStatusResponse{
		NodeId: "n1", State: "Leader", LeaderId: "n1", LeaderAddr: "127.0.0.1:7101",
		Term: 4, CommitIndex: 57, AppliedIndex: 57, LastLogIndex: 57,
		Members: []*clusterv1.Member{
			{Id: "n1", RaftAddr: "127.0.0.1:7101", GrpcAddr: "127.0.0.1:7102", Suffrage: clusterv1.Suffrage_SUFFRAGE_VOTER, Leader: true, Reachable: true, State: "Leader", AppliedIndex: 57, Version: "1.4.0"},
			{Id: "n2", RaftAddr: "127.0.0.1:7201", GrpcAddr: "127.0.0.1:7202", Suffrage: clusterv1.Suffrage_SUFFRAGE_VOTER, Reachable: true, State: "Follower", AppliedIndex: 56, Version: "1.3.2", LastContact: ts(testNow.Add(-12 * time.Millisecond))},
			{Id: "n3", RaftAddr: "127.0.0.1:7301", GrpcAddr: "127.0.0.1:7302", Suffrage: clusterv1.Suffrage_SUFFRAGE_NONVOTER, Error: `connection error: desc = "transport: Error while dialing: dial tcp 127.0.0.1:7302: connect: connection refused"`},
		},
	}
	var buf bytes.Buffer
	if err := writeClusterStatus(&buf, resp, testNow); err != nil {
		t.Fatal(err)
	}
	got := lines(buf.String())
	want := []string{
		"answered by n1 (Leader); leader n1 (raft 127.0.0.1:7101); term 4, commit index 57, applied index 57",
		"",
		"ID  ADDRESS         GRPC            STATE        VOTER  APPLIED  VERSION  LAST CONTACT  ERROR",
		"n1  127.0.0.1:7101  127.0.0.1:7102  Leader       yes    57       1.4.0    -             -",
		"n2  127.0.0.1:7201  127.0.0.1:7202  Follower     yes    56       1.3.2    12ms ago      -",
		"n3  127.0.0.1:7301  127.0.0.1:7302  unreachable  no     -        -        -             dial tcp 127.0.0.1:7302: connect: connection refused",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("writeClusterStatus:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	// A halted member says "upgrade this node", in its row and in full below.
	const halt = "upgrade this node: the entry at index 58 has command 99, which this binary (version 1.0) does not know"
	resp.Members[1].Halted, resp.Members[1].HaltedIndex, resp.Members[1].Version = halt, 58, "1.0"
	buf.Reset()
	if err := writeClusterStatus(&buf, resp, testNow); err != nil {
		t.Fatal(err)
	}
	got = lines(buf.String())
	if len(got) != 8 || !strings.Contains(got[4], "Follower HALTED") || !strings.Contains(got[4], "upgrade this node (halted at index 58)") ||
		got[7] != "n2 (gitraft 1.0) applies nothing from index 58 on: "+halt {
		t.Errorf("halted member:\n%s", buf.String())
	}

	// A non-voter that fills its disk shows how far it got, and what its
	// promotion waits for.
	resp.Members[1].Halted = ""
	resp.Members[2] = &clusterv1.Member{Id: "n4", RaftAddr: "127.0.0.1:7401", GrpcAddr: "127.0.0.1:7402", Suffrage: clusterv1.Suffrage_SUFFRAGE_NONVOTER,
		Reachable: true, State: "Follower", AppliedIndex: 57, Fill: &clusterv1.Fill{ReposCurrent: 120, ReposTotal: 10001, AppliedIndex: 57, WaitingFor: "9881 of 10001 repos"}}
	buf.Reset()
	if err := writeClusterStatus(&buf, resp, testNow); err != nil {
		t.Fatal(err)
	}
	got = lines(buf.String())
	if len(got) != 8 || !strings.Contains(got[5], "no (filling: 120/10001 repos)") ||
		got[7] != "n4 is not a voter yet: it becomes one once it holds every repository at its committed version; waiting for 9881 of 10001 repos" {
		t.Errorf("filling non-voter:\n%s", buf.String())
	}

	// A follower without a leader says so.
	buf.Reset()
	writeClusterStatus(&buf, &clusterv1.GetStatusResponse{NodeId: "n2", State: "Candidate"}, testNow)
	if !strings.Contains(buf.String(), "leader none") {
		t.Errorf("no-leader status:\n%s", buf.String())
	}
}

func TestPrintProtoJSON(t *testing.T) {
	var buf bytes.Buffer
	if err := printProtoJSON(&buf, &repov1.ListReposResponse{Index: 9, Repos: []*repov1.Repo{{Name: "alpha", RefCount: 1}}}); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	for _, want := range []string{`"ref_count"`, `"alpha"`, `"index"`, "\n  "} {
		if !strings.Contains(out, want) {
			t.Errorf("JSON lacks %q:\n%s", want, out)
		}
	}
	// Empty lists are present, for scripts.
	buf.Reset()
	printProtoJSON(&buf, &repov1.ListReposResponse{})
	if !strings.Contains(buf.String(), `"repos"`) {
		t.Errorf("empty JSON lacks repos: %s", buf.String())
	}
}
