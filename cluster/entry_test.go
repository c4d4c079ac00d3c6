package cluster

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	mailv1 "github.com/gitraft/gitraft/proto/gitraft/mail/v1"
)

// futureCommand is a command number this binary does not have in Entry's
// oneof. In the "newer gitraft" of these tests it adds a user (it carries an
// AddUser message).
const futureCommand protowire.Number = 99

// futureEntryBytes builds, by hand, the bytes a newer gitraft would write
// for its command 99: this binary decodes them with no command and field 99
// among the unknown fields.
func futureEntryBytes(t *testing.T, user string) []byte {
	t.Helper()
	head, err := proto.Marshal(&fsmv1.Entry{Format: fsmv1.EntryFormat_ENTRY_FORMAT_V1, LeaderTimeUnixNano: t0.UnixNano(), RequestId: "future-" + user})
	if err != nil {
		t.Fatal(err)
	}
	inner, err := proto.Marshal(&fsmv1.AddUser{Name: user})
	if err != nil {
		t.Fatal(err)
	}
	b := protowire.AppendTag(head, futureCommand, protowire.BytesType)
	return protowire.AppendBytes(b, inner)
}

// withUnknownField appends field num (a string) to m's unknown fields, as
// if a newer gitraft had set a field this binary does not have.
func withUnknownField[M proto.Message](m M, num protowire.Number) M {
	r := m.ProtoReflect()
	b := protowire.AppendTag(r.GetUnknown(), num, protowire.BytesType)
	r.SetUnknown(protowire.AppendString(b, "from the future"))
	return m
}

// knowFutureCommand makes this binary behave as the newer gitraft that
// knows command 99 (fsm.newer / Config.newerCommands).
func knowFutureCommand(e *fsmv1.Entry) {
	if e.Command != nil {
		return
	}
	b := e.ProtoReflect().GetUnknown()
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return
		}
		m := protowire.ConsumeFieldValue(num, typ, b[n:])
		if m < 0 {
			return
		}
		if num == futureCommand && typ == protowire.BytesType {
			v, _ := protowire.ConsumeBytes(b[n:])
			au := &fsmv1.AddUser{}
			if proto.Unmarshal(v, au) != nil {
				return
			}
			e.Command = &fsmv1.Entry_AddUser{AddUser: au}
			e.ProtoReflect().SetUnknown(nil)
			return
		}
		b = b[n+m:]
	}
}

func entryBytes(t *testing.T, e *fsmv1.Entry) []byte {
	t.Helper()
	e = proto.CloneOf(e)
	e.Format = fsmv1.EntryFormat_ENTRY_FORMAT_V1
	e.LeaderTimeUnixNano = t0.UnixNano()
	b, err := proto.Marshal(e)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func cmdLog(index uint64, data []byte) *raft.Log {
	return &raft.Log{Index: index, Term: 1, Type: raft.LogCommand, Data: data}
}

// memSink is a raft.SnapshotSink in memory.
type memSink struct{ bytes.Buffer }

func (s *memSink) ID() string    { return "mem" }
func (s *memSink) Cancel() error { return nil }
func (s *memSink) Close() error  { return nil }

func snapshotFSM(t *testing.T, f *fsm) ([]byte, error) {
	t.Helper()
	snap, err := f.Snapshot()
	if err != nil {
		return nil, err
	}
	defer snap.Release()
	var sink memSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	return sink.Bytes(), nil
}

func userExists(f *fsm, name string) (ok bool) {
	f.Read(func(s *State) { _, ok = s.User(name) })
	return ok
}

func repoExists(f *fsm, name string) (ok bool) {
	f.Read(func(s *State) { _, ok = s.Repo(name) })
	return ok
}

// An entry with a command this binary does not know halts the FSM: no
// panic, nothing later applied, every later entry answered with ErrHalted,
// no snapshot. A newer binary restored from the last snapshot and replaying
// the same log applies everything.
func Test_FSM_UnknownCommandHaltsAndUpgradeReplays(t *testing.T) {
	logEntries := [][]byte{
		entryBytes(t, create("a")),
		entryBytes(t, addUser("alice")),
		futureEntryBytes(t, "bob"), // index 3
		entryBytes(t, create("b")),
		entryBytes(t, addUser("carol")),
	}
	const snapAt, haltAt = 2, 3

	old := newFSM(testLogger(t), "1.0")
	var snap []byte
	for i, data := range logEntries {
		idx := uint64(i + 1)
		r := old.Apply(cmdLog(idx, data))
		if idx < haltAt {
			if _, ok := r.(*fsmv1.Result); !ok {
				t.Fatalf("index %d: %v", idx, r)
			}
		} else {
			err, ok := r.(error)
			if !ok || !errors.Is(err, ErrHalted) {
				t.Fatalf("index %d applied on a halted FSM: %v", idx, r)
			}
			if !strings.Contains(err.Error(), "upgrade this node") {
				t.Errorf("index %d: %v", idx, err)
			}
		}
		if idx == snapAt {
			var err error
			if snap, err = snapshotFSM(t, old); err != nil {
				t.Fatal(err)
			}
		}
	}
	h := old.Halted()
	if h == nil || h.Index != haltAt || h.Unknown != "command 99" {
		t.Fatalf("halt = %+v", h)
	}
	if msg := h.Message(); !strings.Contains(msg, "upgrade this node") || !strings.Contains(msg, "index 3") || !strings.Contains(msg, "command 99") || !strings.Contains(msg, "version 1.0") {
		t.Errorf("message %q", msg)
	}
	if old.Index() != haltAt-1 {
		t.Errorf("applied index %d, want %d", old.Index(), haltAt-1)
	}
	if userExists(old, "bob") || repoExists(old, "b") || userExists(old, "carol") {
		t.Error("entries from the halt on were applied")
	}
	if _, err := snapshotFSM(t, old); !errors.Is(err, ErrHalted) {
		t.Fatalf("snapshot while halted: %v", err)
	}
	// A configuration entry does not move the applied index past the halt,
	// and a reader waiting for a later index fails at once.
	old.StoreConfiguration(6, raft.Configuration{})
	if old.Index() != haltAt-1 {
		t.Errorf("configuration entry moved the applied index to %d", old.Index())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := old.WaitApplied(ctx, 5); !errors.Is(err, ErrHalted) || ctx.Err() != nil {
		t.Fatalf("WaitApplied on a halted FSM: %v", err)
	}
	if err := old.WaitApplied(ctx, 1); err != nil {
		t.Fatalf("WaitApplied for an index applied before the halt: %v", err)
	}

	// The newer binary: the last snapshot, then the same log from there on.
	upgraded := newFSM(testLogger(t), "1.1")
	upgraded.newer = knowFutureCommand
	if err := upgraded.Restore(io.NopCloser(bytes.NewReader(snap))); err != nil {
		t.Fatal(err)
	}
	for i := snapAt; i < len(logEntries); i++ {
		if r, ok := upgraded.Apply(cmdLog(uint64(i+1), logEntries[i])).(*fsmv1.Result); !ok || r.GetRefusal() != nil {
			t.Fatalf("upgraded index %d: %v", i+1, r)
		}
	}
	if upgraded.Halted() != nil {
		t.Fatalf("upgraded FSM halted: %+v", upgraded.Halted())
	}
	for _, u := range []string{"alice", "bob", "carol"} {
		if !userExists(upgraded, u) {
			t.Errorf("upgraded FSM is missing user %s", u)
		}
	}
	if !repoExists(upgraded, "a") || !repoExists(upgraded, "b") {
		t.Error("upgraded FSM is missing a repo")
	}
	if _, err := snapshotFSM(t, upgraded); err != nil {
		t.Fatalf("upgraded FSM cannot snapshot: %v", err)
	}

	// And it holds what a node that knew command 99 all along holds.
	all := newFSM(testLogger(t), "1.1")
	all.newer = knowFutureCommand
	for i, data := range logEntries {
		all.Apply(cmdLog(uint64(i+1), data))
	}
	var a, b []byte
	all.Read(func(s *State) { a = snapshotBytesAt(t, s) })
	upgraded.Read(func(s *State) { b = snapshotBytesAt(t, s) })
	if !bytes.Equal(a, b) {
		t.Error("the upgraded FSM differs from one that applied the whole log")
	}
}

// Every kind of entry this binary cannot apply halts it, none panics.
func Test_FSM_HaltsOnWhatItCannotApply(t *testing.T) {
	for _, tc := range []struct {
		name, want string
		data       []byte
	}{
		{"garbage", "does not decode", []byte("\xff\xff\xff garbage, or a damaged log")},
		{"unknown format", "entry format 7", func() []byte {
			b, _ := proto.Marshal(&fsmv1.Entry{Format: 7, Command: &fsmv1.Entry_CreateRepo{CreateRepo: &fsmv1.CreateRepo{Name: "x"}}})
			return b
		}()},
		{"no format", "entry format 0", func() []byte {
			b, _ := proto.Marshal(create("x"))
			return b
		}()},
		{"unknown command", "command 99", futureEntryBytes(t, "bob")},
		{"unknown database command", "database command 42", entryBytes(t, &fsmv1.Entry{Command: &fsmv1.Entry_Database{Database: withUnknownField(&dbv1.Command{}, 42)}})},
		{"unknown mail command", "mail command 42", entryBytes(t, &fsmv1.Entry{Command: &fsmv1.Entry_Mail{Mail: withUnknownField(&mailv1.Command{}, 42)}})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFSM(testLogger(t), "1.0")
			f.Apply(cmdLog(1, entryBytes(t, create("before"))))
			r := f.Apply(cmdLog(2, tc.data))
			err, ok := r.(error)
			if !ok || !errors.Is(err, ErrHalted) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "upgrade this node") {
				t.Fatalf("apply = %v; want ErrHalted about %q", r, tc.want)
			}
			if h := f.Halted(); h == nil || h.Index != 2 {
				t.Fatalf("halt %+v", h)
			}
			if _, err := snapshotFSM(t, f); err == nil {
				t.Fatal("snapshot while halted")
			}
			if !repoExists(f, "before") || f.Index() != 1 {
				t.Fatal("state before the halt is gone")
			}
		})
	}
}

// A restored snapshot replaces the halted state, and ends the halt.
func Test_FSM_RestoreEndsHalt(t *testing.T) {
	good := newFSM(testLogger(t), "1.1")
	good.newer = knowFutureCommand
	f := newFSM(testLogger(t), "1.0")
	for i, data := range [][]byte{entryBytes(t, create("a")), futureEntryBytes(t, "bob")} {
		good.Apply(cmdLog(uint64(i+1), data))
		f.Apply(cmdLog(uint64(i+1), data))
	}
	if f.Halted() == nil {
		t.Fatal("not halted")
	}
	snap, err := snapshotFSM(t, good)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Restore(io.NopCloser(bytes.NewReader(snap))); err != nil {
		t.Fatal(err)
	}
	if f.Halted() != nil || !userExists(f, "bob") {
		t.Fatal("restore did not replace the halted state")
	}
	if r, ok := f.Apply(cmdLog(3, entryBytes(t, create("c")))).(*fsmv1.Result); !ok || r.GetRefusal() != nil {
		t.Fatalf("apply after restore: %v", r)
	}
}

// An entry with no command and nothing unknown (as an old leader let in)
// means nothing in any version: every node refuses it alike and goes on.
func Test_State_EntryWithoutCommandIsRefused(t *testing.T) {
	m := newMachine(t)
	m.refused(&fsmv1.Entry{}, fsmv1.Reason_REASON_INVALID, "no command")
	m.refused(&fsmv1.Entry{Command: &fsmv1.Entry_Database{Database: &dbv1.Command{}}}, fsmv1.Reason_REASON_INVALID, "no command")
	m.refused(&fsmv1.Entry{Command: &fsmv1.Entry_Mail{Mail: &mailv1.Command{}}}, fsmv1.Reason_REASON_INVALID, "no command")
	m.ok(create("after"))

	// Through the FSM, from the log bytes, too.
	f := newFSM(testLogger(t), "1.0")
	r, ok := f.Apply(cmdLog(1, entryBytes(t, &fsmv1.Entry{}))).(*fsmv1.Result)
	if !ok || r.GetRefusal().GetReason() != fsmv1.Reason_REASON_INVALID || f.Halted() != nil {
		t.Fatalf("apply = %v, halt %+v", r, f.Halted())
	}
}

// Every command the generated code knows has a case in the state machine
// (database and mail commands included), so only commands from a newer
// gitraft, which decode as unknown fields, can halt an FSM.
func Test_State_EveryCommandApplies(t *testing.T) {
	m := newMachine(t)
	apply := func(e *fsmv1.Entry, what string) {
		t.Helper()
		defer func() {
			if p := recover(); p != nil {
				t.Errorf("%s: %v", what, p)
			}
		}()
		if why := cannotApply(proto.CloneOf(e)); why != "" && e.Format == fsmv1.EntryFormat_ENTRY_FORMAT_V1 {
			t.Errorf("%s: cannotApply says %s", what, why)
		}
		m.apply(e)
	}
	eachCase := func(msg protoreflect.Message, fn func(fd protoreflect.FieldDescriptor)) {
		oo := msg.Descriptor().Oneofs()
		for i := 0; i < oo.Len(); i++ {
			fields := oo.Get(i).Fields()
			for j := 0; j < fields.Len(); j++ {
				fn(fields.Get(j))
			}
		}
	}
	eachCase((&fsmv1.Entry{}).ProtoReflect(), func(fd protoreflect.FieldDescriptor) {
		switch fd.Name() {
		case "database", "mail":
			cmd := (&fsmv1.Entry{}).ProtoReflect().NewField(fd).Message()
			eachCase(cmd, func(inner protoreflect.FieldDescriptor) {
				c := cmd.New()
				c.Set(inner, c.NewField(inner))
				e := &fsmv1.Entry{Format: fsmv1.EntryFormat_ENTRY_FORMAT_V1}
				e.ProtoReflect().Set(fd, protoreflect.ValueOfMessage(c))
				apply(e, string(fd.Name())+"."+string(inner.Name()))
			})
		default:
			e := &fsmv1.Entry{Format: fsmv1.EntryFormat_ENTRY_FORMAT_V1}
			e.ProtoReflect().Set(fd, e.ProtoReflect().NewField(fd))
			apply(e, string(fd.Name()))
			if err := validateEntry(e, "node n1", "test"); err != nil && strings.Contains(err.Error(), "has no checks") {
				t.Errorf("%s: %v", fd.Name(), err)
			}
		}
	})
}

func Test_ValidateEntry(t *testing.T) {
	future := &fsmv1.Entry{}
	if err := proto.Unmarshal(futureEntryBytes(t, "bob"), future); err != nil {
		t.Fatal(err)
	}
	future.Format = 0
	for _, tc := range []struct {
		name string
		e    *fsmv1.Entry
		want string // "" = valid
	}{
		{"create", create("r"), ""},
		{"stamped create", func() *fsmv1.Entry { e := create("r"); e.Format = fsmv1.EntryFormat_ENTRY_FORMAT_V1; return e }(), ""},
		{"noop", &fsmv1.Entry{Command: &fsmv1.Entry_LeaderNoop{LeaderNoop: &fsmv1.LeaderNoop{}}}, ""},
		{"expire", &fsmv1.Entry{Command: &fsmv1.Entry_ExpireLocks{ExpireLocks: &fsmv1.ExpireLocks{}}}, ""},
		{"nil", nil, "no entry"},
		{"no command", &fsmv1.Entry{}, "no command"},
		{"unknown command", future, "leader n1 (gitraft 1.0) does not know command 99; upgrade it before"},
		{"unknown format", &fsmv1.Entry{Format: 2, Command: &fsmv1.Entry_CreateRepo{CreateRepo: &fsmv1.CreateRepo{Name: "r"}}}, "does not know entry format 2"},
		{"unknown field in a command", &fsmv1.Entry{Command: &fsmv1.Entry_CreateRepo{CreateRepo: withUnknownField(&fsmv1.CreateRepo{Name: "r"}, 7)}}, "does not know field 7 of entry.create_repo"},
		{"unknown field in a ref update", update("r", 1, true, "refs/heads/main", "", oidA), ""},
		{"unknown field deep", func() *fsmv1.Entry {
			e := update("r", 1, true, "refs/heads/main", "", oidA)
			withUnknownField(e.GetUpdateRefs().GetUpdates()[0], 9)
			return e
		}(), "field 9 of entry.update_refs.updates"},
		{"empty database command", &fsmv1.Entry{Command: &fsmv1.Entry_Database{Database: &dbv1.Command{}}}, "a database entry needs a database command"},
		{"unknown database command", &fsmv1.Entry{Command: &fsmv1.Entry_Database{Database: withUnknownField(&dbv1.Command{}, 42)}}, "does not know field 42 of entry.database"},
		{"empty mail command", &fsmv1.Entry{Command: &fsmv1.Entry_Mail{Mail: &mailv1.Command{}}}, "a mail entry needs a mail command"},
		{"create without name", create(""), "create_repo needs a name"},
		{"delete without name", del(""), "needs a name"},
		{"update without repo", update("", 1, true, "refs/heads/main", "", oidA), "needs a repo"},
		{"lock without repo", acquire("", "h", time.Second), "needs a repo"},
		{"member without id", &fsmv1.Entry{Command: &fsmv1.Entry_SetMember{SetMember: &fsmv1.SetMember{}}}, "set_member needs a member with an id"},
		{"host key without key", &fsmv1.Entry{Command: &fsmv1.Entry_SetHostKey{SetHostKey: &fsmv1.SetHostKey{}}}, "needs a host key"},
		{"user without name", addUser(""), "needs a name"},
		{"grant without user", grant("r", "", fsmv1.Access_ACCESS_READ), "set_grant needs a repo and a user"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := validateEntry(tc.e, "leader n1", "1.0")
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("valid entry refused: %v", err)
			case tc.want != "" && (!errors.Is(err, ErrInvalidEntry) || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("got %v, want ErrInvalidEntry with %q", err, tc.want)
			}
		})
	}
}
