package cluster

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/durationpb"

	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	mailv1 "github.com/gitraft/gitraft/proto/gitraft/mail/v1"
)

// Golden data: log entries and a snapshot as this gitraft wrote them,
// committed under testdata/golden, so that a change that can no longer read
// old data (a renumbered field, a changed type, a snapshot item read
// differently, a command dropped) fails here rather than on an operator's
// node in the middle of a rolling upgrade. See testdata/golden/README.md.
//
//	go test ./cluster -run Test_Golden -update
//
// writes what is missing: the set named goldenSet (built by goldenEntries)
// if its .bin files are not there, and the renderings (.log.txt,
// .state.json) of any set whose renderings are not there, from its .bin
// files. It never rewrites a .bin file: old data is kept as it was written.
var updateGolden = flag.Bool("update", false, "write missing golden files under testdata/golden (see golden_test.go)")

// goldenSet is the set goldenEntries builds. Bump it (and run -update) when
// the format gains a command or field: the new set is written beside the
// old ones, which stay and must still decode and apply.
const goldenSet = "set3"

const goldenDir = "testdata/golden"

var goldenStart = time.Date(2026, 1, 5, 9, 0, 0, 0, time.UTC)

// goldenEntries is a log with every kind of entry: each command of
// fsmv1.Entry and each database and mail command, most of them applying
// and a few refused (refusals must replay the same way), with every field
// of every command set somewhere. The state it leaves has every kind of
// snapshot item.
func goldenEntries() []*fsmv1.Entry {
	now := goldenStart
	var out []*fsmv1.Entry
	add := func(e *fsmv1.Entry) uint64 {
		now = now.Add(time.Second)
		e.Format = fsmv1.EntryFormat_ENTRY_FORMAT_V1
		e.LeaderTimeUnixNano = now.UnixNano()
		e.Proposer = "n1"
		e.RequestId = fmt.Sprintf("golden-%03d", len(out)+1)
		out = append(out, e)
		return uint64(len(out))
	}
	wait := func(d time.Duration) { now = now.Add(d) }
	db := func(c *dbv1.Command) *fsmv1.Entry { return &fsmv1.Entry{Command: &fsmv1.Entry_Database{Database: c}} }
	ml := func(c *mailv1.Command) *fsmv1.Entry { return &fsmv1.Entry{Command: &fsmv1.Entry_Mail{Mail: c}} }
	member := func(id string, keys ...string) *fsmv1.Entry {
		return &fsmv1.Entry{Command: &fsmv1.Entry_SetMember{SetMember: &fsmv1.SetMember{Member: &fsmv1.Member{
			Id: id, RaftAddr: "10.0.0." + id[1:] + ":7101", GrpcAddr: "10.0.0." + id[1:] + ":7102",
			HttpAddr: "10.0.0." + id[1:] + ":7103", SshAddr: "10.0.0." + id[1:] + ":22", SshHostKeys: keys,
			FeatureLevel: FeatureLevel,
		}}}}
	}
	const hostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGdvbGRlbiBob3N0IGtleSwgbm90IGEgcmVhbCBvbmU"

	// Raft and membership.
	add(&fsmv1.Entry{Command: &fsmv1.Entry_LeaderNoop{LeaderNoop: &fsmv1.LeaderNoop{Term: 2}}})
	add(member("n1", hostKey))
	add(member("n2", hostKey))
	add(member("n3"))
	add(&fsmv1.Entry{Command: &fsmv1.Entry_RemoveMember{RemoveMember: &fsmv1.RemoveMember{Id: "n3"}}})
	add(&fsmv1.Entry{}) // no command: an older leader let such entries in; refused alike everywhere

	// Repositories, locks and ref updates.
	add(create("acme/site"))
	add(create("acme/old"))
	add(del("acme/old"))
	tok := add(acquire("acme/site", "n1/push-1", 15*time.Second))
	add(renew("acme/site", tok, 15*time.Second))
	u := update("acme/site", tok, true, "refs/heads/main", "", oidA, "refs/tags/v1", zero, oidB)
	u.GetUpdateRefs().RefRules, u.GetUpdateRefs().PushId = RefRulesGit, "n1/push-1"
	add(u)
	u = update("acme/site", tok, false, "refs/heads/main", oidA, oidC, "refs/heads/dev", oidB, oidA) // dev is stale: main alone applies
	u.GetUpdateRefs().RefRules = RefRulesGit
	add(u)
	add(update("acme/site", tok, true, "refs/heads/main", oidC, oidA, "refs/heads/x", oidA, oidB)) // atomic, one stale: refused (ref_rules 0)
	u = update("acme/site", tok, false, "refs/tags/v1", oidB, oidC)
	u.GetUpdateRefs().RefRules, u.GetUpdateRefs().RepairActor, u.GetUpdateRefs().RepairReason = RefRulesGit, "admin:alice", "objects of v1 lost on a majority"
	add(u)
	add(release("acme/site", tok))
	add(acquire("acme/site", "n2/push-2", 5*time.Second))
	wait(10 * time.Second)
	add(&fsmv1.Entry{Command: &fsmv1.Entry_ExpireLocks{ExpireLocks: &fsmv1.ExpireLocks{}}})
	add(acquire("acme/site", "n3/push-3", 15*time.Second))
	add(&fsmv1.Entry{Command: &fsmv1.Entry_ForceReleaseLock{ForceReleaseLock: &fsmv1.ForceReleaseLock{Repo: "acme/site"}}})
	tok = add(acquire("acme/site", "n1/push-5", 15*time.Second))
	u = update("acme/site", tok, true, "refs/heads/main", oidC, oidB) // the push's lock goes with its refs
	u.GetUpdateRefs().RefRules, u.GetUpdateRefs().PushId, u.GetUpdateRefs().ReleaseLock = RefRulesGit, "n1/push-5", true
	add(u)
	add(create("acme/docs"))
	add(acquire("acme/docs", "n1/push-4", time.Hour)) // still held when the snapshot is taken

	// The SSH host key older gitraft kept in the state.
	add(&fsmv1.Entry{Command: &fsmv1.Entry_SetHostKey{SetHostKey: &fsmv1.SetHostKey{HostKey: &fsmv1.HostKey{
		PrivateKey:  []byte("-----BEGIN OPENSSH PRIVATE KEY-----\ngolden test data, not a key\n-----END OPENSSH PRIVATE KEY-----\n"),
		PublicKey:   hostKey,
		Fingerprint: "SHA256:Z29sZGVuIGhvc3Qga2V5IGZpbmdlcnByaW50IGhlcmU",
	}}}})
	add(&fsmv1.Entry{Command: &fsmv1.Entry_ForgetHostPrivateKey{ForgetHostPrivateKey: &fsmv1.ForgetHostPrivateKey{Force: true}}})

	// Users, keys and grants.
	add(addUser("alice"))
	add(addUser("bob"))
	add(&fsmv1.Entry{Command: &fsmv1.Entry_AddKey{AddKey: &fsmv1.AddKey{Key: &fsmv1.SSHKey{
		User: "alice", PublicKey: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGFsaWNlJ3MgZ29sZGVuIGtleQ", Fingerprint: "SHA256:YWxpY2UncyBnb2xkZW4ga2V5IGZpbmdlcnByaW50", Comment: "alice@laptop",
	}}}})
	add(addKey("bob", "SHA256:Ym9iJ3MgZ29sZGVuIGtleSBmaW5nZXJwcmludCBoZXJl"))
	add(grant("acme/site", "alice", fsmv1.Access_ACCESS_WRITE))
	add(grant("acme/site", "bob", fsmv1.Access_ACCESS_READ))
	add(grant("acme/docs", "alice", fsmv1.Access_ACCESS_ADMIN))
	add(&fsmv1.Entry{Command: &fsmv1.Entry_RemoveKey{RemoveKey: &fsmv1.RemoveKey{Fingerprint: "SHA256:Ym9iJ3MgZ29sZGVuIGtleSBmaW5nZXJwcmludCBoZXJl"}}})
	add(&fsmv1.Entry{Command: &fsmv1.Entry_RemoveUser{RemoveUser: &fsmv1.RemoveUser{Name: "bob"}}})

	// The PostgreSQL failover target: members, a bootstrap, a switchover
	// run to its end, an automatic failover rolled back, a pause, and a
	// scheduled switchover still waiting when the snapshot is taken.
	reg := func(name string, prio int32, node string, noFailover bool) *fsmv1.Entry {
		return db(&dbv1.Command{Command: &dbv1.Command_RegisterMember{RegisterMember: &dbv1.RegisterMember{Member: &dbv1.Member{
			Name: name, Host: name + ".db.example.org", Port: 5432, Priority: prio, NoFailover: noFailover, Node: node,
		}}}})
	}
	add(reg("pg1", 10, "n1", false))
	add(reg("pg2", 5, "n2", false))
	add(reg("pg3", 0, "n3", true))
	add(db(&dbv1.Command{Command: &dbv1.Command_RegisterBouncer{RegisterBouncer: &dbv1.RegisterBouncer{Bouncer: &dbv1.Bouncer{Name: "pgb1", Node: "n1"}}}}))
	add(db(&dbv1.Command{Command: &dbv1.Command_RegisterBouncer{RegisterBouncer: &dbv1.RegisterBouncer{Bouncer: &dbv1.Bouncer{Name: "pgb2", Node: "n2"}}}}))
	add(db(&dbv1.Command{Command: &dbv1.Command_Forget{Forget: &dbv1.Forget{Name: "pgb2"}}}))
	add(db(&dbv1.Command{Command: &dbv1.Command_SetPrimary{SetPrimary: &dbv1.SetPrimary{Name: "pg1"}}}))
	op := add(db(&dbv1.Command{Command: &dbv1.Command_Begin{Begin: &dbv1.BeginOperation{
		Kind: dbv1.Kind_KIND_SWITCHOVER, Target: "pg2", ExpectedGeneration: 1, RequestedBy: "admin:alice", TimeoutNanos: int64(30 * time.Second),
		Checkpoint: true,
	}}}))
	advance := func(from, to dbv1.Phase, lsn uint64, note string) *fsmv1.Entry {
		return db(&dbv1.Command{Command: &dbv1.Command_Advance{Advance: &dbv1.AdvancePhase{
			OpId: op, From: from, To: to, TimeoutNanos: int64(20 * time.Second), WaitLsn: lsn, Note: note,
		}}})
	}
	add(advance(dbv1.Phase_PHASE_CHECKPOINTING, dbv1.Phase_PHASE_PAUSING, 0, "pg1 checkpointed"))
	add(advance(dbv1.Phase_PHASE_PAUSING, dbv1.Phase_PHASE_STOPPING_OLD, 0, "every pgbouncer paused"))
	add(advance(dbv1.Phase_PHASE_STOPPING_OLD, dbv1.Phase_PHASE_PROMOTING, 0x3000060, "pg1 stopped at 0/3000060"))
	add(db(&dbv1.Command{Command: &dbv1.Command_SetPrimary{SetPrimary: &dbv1.SetPrimary{OpId: op, Name: "pg2", ExpectedGeneration: 1, TimeoutNanos: int64(20 * time.Second), SynchronousStandbyNames: "*"}}}))
	add(advance(dbv1.Phase_PHASE_REPOINTING, dbv1.Phase_PHASE_DEMOTING, 0, ""))
	add(db(&dbv1.Command{Command: &dbv1.Command_Finish{Finish: &dbv1.FinishOperation{OpId: op, From: dbv1.Phase_PHASE_DEMOTING, Outcome: dbv1.Outcome_OUTCOME_DONE, Reason: "pg1 follows pg2"}}}))
	// Synchronous mode: name pg1 on the primary, then record it.
	add(db(&dbv1.Command{Command: &dbv1.Command_SetSynchronous{SetSynchronous: &dbv1.SetSynchronous{Names: "pg1", ExpectedGeneration: 2}}}))
	add(db(&dbv1.Command{Command: &dbv1.Command_SetSynchronous{SetSynchronous: &dbv1.SetSynchronous{Names: "pg1", Standby: "pg1", ExpectedGeneration: 2}}}))
	op = add(db(&dbv1.Command{Command: &dbv1.Command_Begin{Begin: &dbv1.BeginOperation{
		Kind: dbv1.Kind_KIND_FAILOVER, Target: "pg1", ExpectedGeneration: 2, Automatic: true, RequestedBy: "node:n1", TimeoutNanos: int64(10 * time.Second),
	}}}))
	add(db(&dbv1.Command{Command: &dbv1.Command_Abort{Abort: &dbv1.AbortOperation{Reason: "pg2 answers again", RequestedBy: "admin:alice", TimeoutNanos: int64(10 * time.Second)}}}))
	add(db(&dbv1.Command{Command: &dbv1.Command_Finish{Finish: &dbv1.FinishOperation{OpId: op, From: dbv1.Phase_PHASE_ROLLING_BACK, Outcome: dbv1.Outcome_OUTCOME_ABORTED, Reason: "rolled back"}}}))
	add(db(&dbv1.Command{Command: &dbv1.Command_SetPaused{SetPaused: &dbv1.SetPaused{Paused: true, Reason: "storage maintenance", RequestedBy: "admin:alice"}}}))
	add(db(&dbv1.Command{Command: &dbv1.Command_Begin{Begin: &dbv1.BeginOperation{ // refused: automatic failover is paused
		Kind: dbv1.Kind_KIND_FAILOVER, Target: "pg1", ExpectedGeneration: 2, Automatic: true, RequestedBy: "node:n1",
	}}}))
	add(db(&dbv1.Command{Command: &dbv1.Command_Begin{Begin: &dbv1.BeginOperation{
		Kind: dbv1.Kind_KIND_SWITCHOVER, Target: "pg1", ExpectedGeneration: 2, AtUnixNano: now.Add(time.Hour).UnixNano(), RequestedBy: "admin:alice",
	}}}))

	// Mail hosts: a drain that went overdue, was handed off, extended,
	// finished and undone, and a second drain under way at the end.
	host := func(name string, prio uint32, ifAbsent bool) *fsmv1.Entry {
		return ml(&mailv1.Command{Command: &mailv1.Command_AddHost{AddHost: &mailv1.AddHost{
			Name: name, Address: name + ".example.org", Priority: prio, By: "admin:alice", IfAbsent: ifAbsent,
		}}})
	}
	drain := func(d time.Duration, reason string, force, update bool) *fsmv1.Entry {
		return ml(&mailv1.Command{Command: &mailv1.Command_Drain{Drain: &mailv1.Drain{
			Name: "mx2", Deadline: durationpb.New(d), Reason: reason, By: "admin:alice", Force: force, UpdateDeadline: update,
		}}})
	}
	report := func(id, queue uint64, old uint32) *fsmv1.Entry {
		return ml(&mailv1.Command{Command: &mailv1.Command_ReportQueue{ReportQueue: &mailv1.ReportQueue{
			Name: "mx2", DrainId: id, QueueSize: queue, By: "node:n2", OldSessions: old, ReportInterval: durationpb.New(time.Minute),
		}}})
	}
	add(host("mx1", 10, false))
	add(host("mx2", 20, false))
	add(host("mx2", 30, true)) // registered already: unchanged
	add(host("mx3", 30, false))
	add(ml(&mailv1.Command{Command: &mailv1.Command_RemoveHost{RemoveHost: &mailv1.RemoveHost{Name: "mx3", By: "admin:alice", Force: true}}}))
	drainID := add(drain(time.Hour, "kernel upgrade", false, false))
	add(report(drainID, 3, 1))
	wait(2 * time.Hour)
	add(ml(&mailv1.Command{Command: &mailv1.Command_MarkOverdue{MarkOverdue: &mailv1.MarkOverdue{Name: "mx2", DrainId: drainID, By: "node:n1"}}}))
	add(ml(&mailv1.Command{Command: &mailv1.Command_ReportHandoff{ReportHandoff: &mailv1.ReportHandoff{Name: "mx2", DrainId: drainID, Peer: "mx1", By: "node:n2"}}}))
	add(drain(30*time.Minute, "give it more time", false, true))
	add(report(drainID, 0, 0))
	add(ml(&mailv1.Command{Command: &mailv1.Command_Undrain{Undrain: &mailv1.Undrain{Name: "mx2", By: "admin:alice", Reason: "kernel upgraded"}}}))
	drainID = add(drain(30*time.Minute, "disk swap", true, false))
	add(report(drainID, 2, 1))

	// Backups: one recorded, an older one refused.
	backup := func(index uint64) *fsmv1.Entry {
		return &fsmv1.Entry{Command: &fsmv1.Entry_RecordBackup{RecordBackup: &fsmv1.RecordBackup{Backup: &fsmv1.BackupRecord{
			Index: index, FinishedUnixNano: 1, DurationNanos: int64(90 * time.Second), Bytes: 5 << 20, BytesWritten: 1 << 20,
			Repos: 2, Packs: 7, PacksWritten: 2, Node: "n2",
		}}}}
	}
	add(backup(uint64(len(out))))
	add(backup(3))
	// Locks that know their node's incarnation, served in order of
	// arrival: a restart frees what the node held, the leader frees a
	// silent node's locks, and a waiter is still queued at the end.
	life := func(id, inc string) *fsmv1.Entry {
		e := member(id)
		e.GetSetMember().GetMember().Incarnation = inc
		return e
	}
	queued := func(repo, holder, node, inc string, lease time.Duration) *fsmv1.Entry {
		e := acquire(repo, holder, lease)
		a := e.GetAcquireLock()
		a.Node, a.Incarnation, a.WaitLeaseNanos = node, inc, int64(time.Hour)
		return e
	}
	add(life("n1", "n1-life-1"))
	add(life("n2", "n2-life-1"))
	add(create("acme/wiki"))
	add(queued("acme/wiki", "n2/push-5", "n2", "n2-life-1", 15*time.Second))
	add(queued("acme/wiki", "n1/push-6", "n1", "n1-life-1", 15*time.Second)) // held: n1 is queued
	add(life("n2", "n2-life-2"))                                             // n2 restarted: push-5's lock is freed
	tok6 := add(queued("acme/wiki", "n1/push-6", "n1", "n1-life-1", 15*time.Second))
	add(queued("acme/wiki", "n2/push-7", "n2", "n2-life-2", 15*time.Second)) // held: queued until the end
	add(&fsmv1.Entry{Command: &fsmv1.Entry_FreeNodeLocks{FreeNodeLocks: &fsmv1.FreeNodeLocks{
		Node: "n1", UpToToken: tok6, Reason: "no answer to the leader's heartbeats for 2s",
	}}})
	add(queued("acme/wiki", "n1/push-9", "n1", "n1-life-1", 15*time.Second)) // lock free, n2/push-7 first: queued
	add(&fsmv1.Entry{Command: &fsmv1.Entry_LeaveLockQueue{LeaveLockQueue: &fsmv1.LeaveLockQueue{Repo: "acme/wiki", Holder: "n1/push-9"}}})
	add(&fsmv1.Entry{Command: &fsmv1.Entry_LeaveLockQueue{LeaveLockQueue: &fsmv1.LeaveLockQueue{Repo: "acme/wiki", Holder: "n1/push-9"}}}) // gone already: refused
	add(create("acme/blog"))
	add(queued("acme/blog", "n2/push-8", "n2", "n2-life-2", time.Hour)) // still held at the end
	return out
}

// ----- files -----

func goldenPath(set, suffix string) string { return filepath.Join(goldenDir, set+suffix) }

// encodeLog writes entries as the log file: each entry's bytes (what Raft
// stores as the log's data) after its length as a uvarint. The first entry
// has index 1.
func encodeLog(entries [][]byte) []byte {
	var b []byte
	for _, e := range entries {
		b = binary.AppendUvarint(b, uint64(len(e)))
		b = append(b, e...)
	}
	return b
}

func decodeLog(b []byte) ([][]byte, error) {
	var out [][]byte
	for len(b) > 0 {
		n, k := binary.Uvarint(b)
		if k <= 0 || uint64(len(b)-k) < n {
			return nil, fmt.Errorf("log file cut off at entry %d", len(out)+1)
		}
		out = append(out, b[k:k+int(n)])
		b = b[k+int(n):]
	}
	return out, nil
}

// writeGoldenSet builds goldenSet from goldenEntries and writes its .bin
// files, unless they exist; existing ones must hold what goldenEntries
// builds now, or the set has changed and needs a new name.
func writeGoldenSet(t *testing.T) {
	t.Helper()
	var raw [][]byte
	for _, e := range goldenEntries() {
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		raw = append(raw, b)
	}
	logBytes := encodeLog(raw)
	f := newFSM(testLogger(t), "golden")
	for i, b := range raw {
		if res := f.Apply(&raft.Log{Index: uint64(i + 1), Type: raft.LogCommand, Data: b}); res == nil {
			t.Fatalf("golden entry %d: no result", i+1)
		} else if _, ok := res.(*fsmv1.Result); !ok {
			t.Fatalf("golden entry %d did not apply: %v", i+1, res)
		}
	}
	var snap bytes.Buffer
	if err := writeSnapshot(&snap, f.state.capture()); err != nil {
		t.Fatal(err)
	}
	for suffix, want := range map[string][]byte{".log.bin": logBytes, ".snapshot.bin": snap.Bytes()} {
		p := goldenPath(goldenSet, suffix)
		old, err := os.ReadFile(p)
		switch {
		case err == nil && !bytes.Equal(old, want):
			t.Fatalf("%s exists and differs from what goldenEntries builds now. Old data is kept as it was written: to record a new format, bump goldenSet and run -update again", p)
		case err == nil:
		case errors.Is(err, os.ErrNotExist):
			if err := os.MkdirAll(goldenDir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, want, 0o644); err != nil {
				t.Fatal(err)
			}
			t.Logf("wrote %s (%d bytes)", p, len(want))
		default:
			t.Fatal(err)
		}
	}
}

var goldenUpdateOnce sync.Once

// goldenSets lists the committed sets, after writing what is missing when
// -update is given.
func goldenSets(t *testing.T) []string {
	t.Helper()
	if *updateGolden {
		goldenUpdateOnce.Do(func() { writeGoldenSet(t) })
	}
	logs, err := filepath.Glob(filepath.Join(goldenDir, "*.log.bin"))
	if err != nil {
		t.Fatal(err)
	}
	var sets []string
	for _, p := range logs {
		sets = append(sets, strings.TrimSuffix(filepath.Base(p), ".log.bin"))
	}
	if len(sets) == 0 {
		t.Fatalf("no golden data in %s: run go test ./cluster -run Test_Golden -update", goldenDir)
	}
	if !slices.Contains(sets, goldenSet) {
		t.Fatalf("golden set %s (goldenSet) is missing from %s: run go test ./cluster -run Test_Golden -update", goldenSet, goldenDir)
	}
	return sets
}

// compareGolden compares a rendering with its committed file, writing the
// file when it is missing and -update is given.
func compareGolden(t *testing.T, path, got string) {
	t.Helper()
	want, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) && *updateGolden {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %s", path)
		return
	}
	if err != nil {
		t.Fatalf("%v (run with -update to write a missing rendering from the .bin files)", err)
	}
	if string(want) == got {
		return
	}
	wl, gl := strings.Split(string(want), "\n"), strings.Split(got, "\n")
	for i := 0; i < max(len(wl), len(gl)); i++ {
		var w, g string
		if i < len(wl) {
			w = wl[i]
		}
		if i < len(gl) {
			g = gl[i]
		}
		if w != g {
			t.Fatalf("%s: old data no longer reads as it did. First difference at line %d:\n committed: %s\n now:       %s\n"+
				"A change to the format or to how entries and snapshots are read must keep old data readable (see testdata/golden/README.md)", path, i+1, w, g)
		}
	}
}

// ----- renderings -----

// canonicalJSON renders a message as JSON with sorted keys (protojson's own
// output varies its spacing on purpose), one line.
func canonicalJSON(t *testing.T, m proto.Message) string {
	t.Helper()
	b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		t.Fatal(err)
	}
	out, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// dumpState renders a state: its index and every item a snapshot of it
// would hold, one item a line.
func dumpState(t *testing.T, s *State) string {
	t.Helper()
	var b strings.Builder
	v := s.capture()
	fmt.Fprintf(&b, "index %d\n", v.index)
	v.items(func(it *fsmv1.SnapshotItem) bool {
		b.WriteString(canonicalJSON(t, it))
		b.WriteByte('\n')
		return true
	})
	return b.String()
}

// ----- the tests -----

// Old log entries decode, with nothing in them unknown to this binary, and
// apply through the FSM (no halt) to the same results and the same state
// as when they were written; old snapshots restore to that same state.
func Test_Golden_OldDataDecodesAndApplies(t *testing.T) {
	for _, set := range goldenSets(t) {
		t.Run(set, func(t *testing.T) {
			data, err := os.ReadFile(goldenPath(set, ".log.bin"))
			if err != nil {
				t.Fatal(err)
			}
			raw, err := decodeLog(data)
			if err != nil {
				t.Fatal(err)
			}
			f := newFSM(testLogger(t), "golden")
			var desc strings.Builder
			fmt.Fprintf(&desc, "# %s: %d log entries as written; each decoded and applied by this binary\n", set, len(raw))
			for i, b := range raw {
				index := uint64(i + 1)
				e := &fsmv1.Entry{}
				if err := proto.Unmarshal(b, e); err != nil {
					t.Fatalf("entry %d does not decode: %v", index, err)
				}
				if path, num, ok := findUnknownField(e.ProtoReflect(), "entry"); ok {
					t.Errorf("entry %d (%s): field %d of %s is unknown to this binary: was a field renumbered or removed?", index, commandName(e), num, path)
				}
				res := f.Apply(&raft.Log{Index: index, Type: raft.LogCommand, Data: b})
				r, ok := res.(*fsmv1.Result)
				if !ok {
					t.Fatalf("entry %d (%s) did not apply: %v", index, commandName(e), res)
				}
				fmt.Fprintf(&desc, "\n%d %s\nentry  %s\nresult %s\n", index, commandName(e), canonicalJSON(t, e), canonicalJSON(t, r))
			}
			compareGolden(t, goldenPath(set, ".log.txt"), desc.String())
			state := dumpState(t, f.state)
			compareGolden(t, goldenPath(set, ".state.txt"), state)

			snap, err := os.ReadFile(goldenPath(set, ".snapshot.bin"))
			if err != nil {
				t.Fatal(err)
			}
			idx, items, err := readSnapshot(bytes.NewReader(snap))
			if err != nil {
				t.Fatalf("snapshot does not read: %v", err)
			}
			for i, it := range items {
				if path, num, ok := findUnknownField(it.ProtoReflect(), "item"); ok {
					t.Errorf("snapshot item %d: field %d of %s is unknown to this binary: was a field renumbered or removed?", i, num, path)
				}
			}
			if idx != uint64(len(raw)) {
				t.Errorf("snapshot at index %d, want %d (the end of the log)", idx, len(raw))
			}
			g := newFSM(testLogger(t), "golden")
			if err := g.Restore(io.NopCloser(bytes.NewReader(snap))); err != nil {
				t.Fatalf("snapshot does not restore: %v", err)
			}
			if got := dumpState(t, g.state); got != state {
				compareGolden(t, goldenPath(set, ".state.txt"), got)
				t.Fatal("the restored snapshot differs from the state the log gives")
			}
			// The restored state goes on: a retried request is answered
			// from memory, and the held lock still fences.
			again, _ := g.Apply(&raft.Log{Index: idx + 1, Type: raft.LogCommand, Data: raw[len(raw)-1]}).(*fsmv1.Result)
			if again.GetIndex() != idx {
				t.Errorf("a retried request after restore answered %v, want the remembered result of index %d", again, idx)
			}
		})
	}
}

// The golden data holds every kind of entry (each command of fsmv1.Entry,
// each database and mail command) and every kind of snapshot item, and
// sets every field they can carry somewhere, so that renumbering any of
// them changes how old data reads. A command or field added later must be
// added to goldenEntries, as a new set.
func Test_Golden_CoversEveryKind(t *testing.T) {
	seen := map[protoreflect.FullName]bool{}
	var walk func(m protoreflect.Message)
	walk = func(m protoreflect.Message) {
		m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
			seen[fd.FullName()] = true
			switch {
			case fd.IsList() && fd.Message() != nil:
				for i := 0; i < v.List().Len(); i++ {
					walk(v.List().Get(i).Message())
				}
			case fd.IsMap():
			case fd.Message() != nil:
				walk(v.Message())
			}
			return true
		})
	}
	for _, set := range goldenSets(t) {
		data, err := os.ReadFile(goldenPath(set, ".log.bin"))
		if err != nil {
			t.Fatal(err)
		}
		raw, err := decodeLog(data)
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range raw {
			e := &fsmv1.Entry{}
			if err := proto.Unmarshal(b, e); err != nil {
				t.Fatal(err)
			}
			walk(e.ProtoReflect())
		}
		snap, err := os.ReadFile(goldenPath(set, ".snapshot.bin"))
		if err != nil {
			t.Fatal(err)
		}
		_, items, err := readSnapshot(bytes.NewReader(snap))
		if err != nil {
			t.Fatal(err)
		}
		// Every snapshot ends with an end item, which readSnapshot checks
		// (its count included) and takes off.
		seen["gitraft.fsm.v1.SnapshotItem.end"], seen["gitraft.fsm.v1.SnapshotEnd.items"] = true, true
		for _, it := range items {
			walk(it.ProtoReflect())
		}
	}

	// Every field reachable from an entry or a snapshot item.
	want := map[protoreflect.FullName]bool{}
	visited := map[protoreflect.FullName]bool{}
	var reach func(md protoreflect.MessageDescriptor)
	reach = func(md protoreflect.MessageDescriptor) {
		if visited[md.FullName()] || strings.HasPrefix(string(md.FullName()), "google.protobuf.") {
			return
		}
		visited[md.FullName()] = true
		for i := 0; i < md.Fields().Len(); i++ {
			fd := md.Fields().Get(i)
			want[fd.FullName()] = true
			if fd.Message() != nil {
				reach(fd.Message())
			}
		}
	}
	reach((&fsmv1.Entry{}).ProtoReflect().Descriptor())
	reach((&fsmv1.SnapshotItem{}).ProtoReflect().Descriptor())
	var missing []string
	for _, name := range slices.Sorted(maps.Keys(want)) {
		if !seen[name] {
			missing = append(missing, string(name))
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("the golden data never sets %d fields, so a change to them would go unnoticed; set them in goldenEntries (as a new set: bump goldenSet, run -update):\n  %s",
			len(missing), strings.Join(missing, "\n  "))
	}
}
