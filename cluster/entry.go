package cluster

import (
	"errors"
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/reflect/protoreflect"

	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

// Errors about log entries: one refused before it reached the log, and a
// state machine that stopped applying the log.
var (
	// ErrInvalidEntry: a proposal was refused before it reached the log
	// (gRPC InvalidArgument). Nothing was committed.
	ErrInvalidEntry = errors.New("invalid log entry")
	// ErrHalted: this node's state machine met a committed entry it does not
	// know and applies nothing until the node is upgraded (gRPC
	// FailedPrecondition).
	ErrHalted = errors.New("state machine halted")
)

// validateEntry checks a proposal before it goes to the log, so that an
// entry no node can apply never gets there: it must have a format this node
// knows (or none yet: the leader stamps it), carry a command this node knows
// and no field it does not know, and have the fields its command cannot do
// without. Business rules (does the repo exist, is the name allowed) stay
// in the state machine, which refuses with a Refusal.
//
// who names this node in messages ("leader n1", "node n2"); version is the
// binary's version.
func validateEntry(e *fsmv1.Entry, who, version string) error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalidEntry, fmt.Sprintf(format, args...))
	}
	if e == nil {
		return bad("no entry")
	}
	switch f := e.GetFormat(); f {
	case fsmv1.EntryFormat_ENTRY_FORMAT_UNSPECIFIED, fsmv1.EntryFormat_ENTRY_FORMAT_V1:
	default:
		return bad("this %s (gitraft %s) does not know entry format %d; upgrade it before proposing entries in that format", who, version, f)
	}
	if e.Command == nil {
		if num, ok := firstUnknownField(e.ProtoReflect()); ok {
			return bad("this %s (gitraft %s) does not know command %d; upgrade it before proposing entries of that kind (a newer gitraft wrote it)", who, version, num)
		}
		return bad("the entry has no command")
	}
	if path, num, ok := findUnknownField(e.ProtoReflect(), "entry"); ok {
		return bad("this %s (gitraft %s) does not know field %d of %s; upgrade it before proposing entries that use it (a newer gitraft wrote it)", who, version, num, path)
	}
	need := func(what string, ok bool) error {
		if ok {
			return nil
		}
		return bad("%s needs %s", commandName(e), what)
	}
	switch c := e.Command.(type) {
	case *fsmv1.Entry_CreateRepo:
		return need("a name", c.CreateRepo.GetName() != "")
	case *fsmv1.Entry_DeleteRepo:
		return need("a name", c.DeleteRepo.GetName() != "")
	case *fsmv1.Entry_UpdateRefs:
		return need("a repo", c.UpdateRefs.GetRepo() != "")
	case *fsmv1.Entry_AcquireLock:
		return need("a repo", c.AcquireLock.GetRepo() != "")
	case *fsmv1.Entry_RenewLock:
		return need("a repo", c.RenewLock.GetRepo() != "")
	case *fsmv1.Entry_ReleaseLock:
		return need("a repo", c.ReleaseLock.GetRepo() != "")
	case *fsmv1.Entry_ForceReleaseLock:
		return need("a repo", c.ForceReleaseLock.GetRepo() != "")
	case *fsmv1.Entry_SetMember:
		return need("a member with an id", c.SetMember.GetMember().GetId() != "")
	case *fsmv1.Entry_RemoveMember:
		return need("an id", c.RemoveMember.GetId() != "")
	case *fsmv1.Entry_FreeNodeLocks:
		return need("a node", c.FreeNodeLocks.GetNode() != "")
	case *fsmv1.Entry_LeaveLockQueue:
		return need("a repo and a holder", c.LeaveLockQueue.GetRepo() != "" && c.LeaveLockQueue.GetHolder() != "")
	case *fsmv1.Entry_SetHostKey:
		return need("a host key", c.SetHostKey.GetHostKey() != nil)
	case *fsmv1.Entry_AddUser:
		return need("a name", c.AddUser.GetName() != "")
	case *fsmv1.Entry_RemoveUser:
		return need("a name", c.RemoveUser.GetName() != "")
	case *fsmv1.Entry_AddKey:
		return need("a key", c.AddKey.GetKey() != nil)
	case *fsmv1.Entry_RemoveKey:
		return need("a fingerprint", c.RemoveKey.GetFingerprint() != "")
	case *fsmv1.Entry_SetGrant:
		return need("a repo and a user", c.SetGrant.GetRepo() != "" && c.SetGrant.GetUser() != "")
	case *fsmv1.Entry_Database:
		if c.Database.GetCommand() == nil {
			return bad("a database entry needs a database command")
		}
		return nil
	case *fsmv1.Entry_Mail:
		if c.Mail.GetCommand() == nil {
			return bad("a mail entry needs a mail command")
		}
		return nil
	case *fsmv1.Entry_RecordBackup:
		return need("a backup with an index", c.RecordBackup.GetBackup().GetIndex() != 0)
	case *fsmv1.Entry_ExpireLocks, *fsmv1.Entry_LeaderNoop, *fsmv1.Entry_ForgetHostPrivateKey:
		return nil
	}
	// A case of the oneof that the generated code knows and this switch
	// does not: a command added without its checks.
	return bad("%s: this %s has no checks for the command %T", commandName(e), who, e.Command)
}

// cannotApply reports what in a decoded, committed entry this binary does
// not know, or "" when it can apply it: a format other than V1, or a
// command (or a database or mail command) that a newer gitraft wrote and
// that decoded here as unknown fields.
//
// An entry with no command at all and nothing unknown is not reported: no
// gitraft version means anything by it, so every node refuses it the same
// way (see State.apply). Unknown fields beside a known command are ignored
// here (the leader refuses them before they reach the log).
func cannotApply(e *fsmv1.Entry) string {
	if f := e.GetFormat(); f != fsmv1.EntryFormat_ENTRY_FORMAT_V1 {
		return fmt.Sprintf("entry format %d", f)
	}
	var m protoreflect.Message
	what := "command"
	switch c := e.Command.(type) {
	case nil:
		m = e.ProtoReflect()
	case *fsmv1.Entry_Database:
		if c.Database.GetCommand() != nil {
			return ""
		}
		m, what = c.Database.ProtoReflect(), "database command"
	case *fsmv1.Entry_Mail:
		if c.Mail.GetCommand() != nil {
			return ""
		}
		m, what = c.Mail.ProtoReflect(), "mail command"
	default:
		return ""
	}
	if num, ok := firstUnknownField(m); ok {
		return fmt.Sprintf("%s %d", what, num)
	}
	return ""
}

// firstUnknownField returns the number of the first field in m's unknown
// fields (fields the binary's schema does not have).
func firstUnknownField(m protoreflect.Message) (protowire.Number, bool) {
	b := m.GetUnknown()
	if len(b) == 0 {
		return 0, false
	}
	num, _, n := protowire.ConsumeTag(b)
	if n < 0 {
		return 0, true // unknown bytes that are not even a field: report them
	}
	return num, true
}

// findUnknownField walks m and every message in it for a field this binary
// does not know, and returns where it is.
func findUnknownField(m protoreflect.Message, path string) (string, protowire.Number, bool) {
	if num, ok := firstUnknownField(m); ok {
		return path, num, true
	}
	var (
		where string
		num   protowire.Number
		found bool
	)
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		sub := path + "." + string(fd.Name())
		switch {
		case fd.IsList() && fd.Message() != nil:
			l := v.List()
			for i := 0; i < l.Len() && !found; i++ {
				where, num, found = findUnknownField(l.Get(i).Message(), sub)
			}
		case fd.IsMap() && fd.MapValue().Message() != nil:
			v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
				where, num, found = findUnknownField(mv.Message(), sub)
				return !found
			})
		case fd.Message() != nil && !fd.IsList() && !fd.IsMap():
			where, num, found = findUnknownField(v.Message(), sub)
		}
		return !found
	})
	return where, num, found
}

// Halt says why a node's state machine stopped applying the log.
type Halt struct {
	// Index is the committed entry it could not apply.
	Index uint64
	// Unknown is what in the entry this binary does not know ("command 99",
	// "entry format 2"); empty when the entry did not decode.
	Unknown string
	// DecodeErr is set when the entry did not decode at all.
	DecodeErr string
	// Version is this binary's version.
	Version string
}

// Message tells a person what happened and what to do.
func (h *Halt) Message() string {
	if h.DecodeErr != "" {
		return fmt.Sprintf("upgrade this node, or restore its data dir from a healthy peer: the entry at index %d does not decode with this binary (version %s): %s (a newer gitraft wrote it, or the log is damaged)",
			h.Index, h.Version, h.DecodeErr)
	}
	return fmt.Sprintf("upgrade this node: the entry at index %d has %s, which this binary (version %s) does not know", h.Index, h.Unknown, h.Version)
}

func (h *Halt) err() error { return fmt.Errorf("%w: %s", ErrHalted, h.Message()) }
