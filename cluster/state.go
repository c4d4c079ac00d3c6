package cluster

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/gitraft/gitraft/cluster/dbtarget"
	"github.com/gitraft/gitraft/cluster/mail"
	"github.com/gitraft/gitraft/lockd"
	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	mailv1 "github.com/gitraft/gitraft/proto/gitraft/mail/v1"
	"github.com/gitraft/gitraft/storage"
)

// requestMemory is how many recent proposals the state remembers by request
// id, so that a proposal retried after a lost answer is not applied twice.
const requestMemory = 4096

// repoState is one repository in the replicated state. Values are never
// changed in place: an update builds a new one, so a snapshot can share them.
type repoState struct {
	name         string
	id           uint64
	version      uint64
	refs         map[string]string
	created      int64
	updated      int64
	updatedIndex uint64
	head         string
	repairs      []*fsmv1.Repair // newest last, at most maxRepairs
}

// maxRepairs is how many operator repairs a repository remembers.
const maxRepairs = 20

// DefaultHead is HEAD's target in a new repository.
const DefaultHead = "refs/heads/main"

// State is gitraft's replicated state: repositories with their versions and
// refs, write locks and the members' addresses. Apply is deterministic: the
// same entries in the same order give the same State on every node, because
// time comes from the entries and nothing else is consulted.
//
// State is not safe for concurrent use; the FSM serialises access.
type State struct {
	index   uint64
	repos   map[string]*repoState
	locks   *lockd.Table
	members map[string]*fsmv1.Member

	requests     map[string]*fsmv1.Result
	requestOrder []string

	hostKey *fsmv1.HostKey // older gitraft's key (SetHostKey); private part until forgotten
	users   map[string]*fsmv1.User
	keys    map[string]*fsmv1.SSHKey           // by fingerprint
	grants  map[string]map[string]fsmv1.Access // repo -> user -> access

	db   *dbtarget.State // the PostgreSQL failover target
	mail *mail.State     // mail hosts and their drain state

	backup *fsmv1.BackupRecord // the last backup that finished; nil before the first
}

// NewState returns an empty state.
func NewState() *State {
	return &State{
		repos:    map[string]*repoState{},
		locks:    lockd.NewTable(),
		members:  map[string]*fsmv1.Member{},
		requests: map[string]*fsmv1.Result{},
		users:    map[string]*fsmv1.User{},
		keys:     map[string]*fsmv1.SSHKey{},
		grants:   map[string]map[string]fsmv1.Access{},
		db:       dbtarget.NewState(),
		mail:     mail.NewState(),
	}
}

// Index is the Raft index of the last entry applied.
func (s *State) Index() uint64 { return s.index }

// Apply applies one committed entry at a Raft index and returns its result.
// A refusal (stale ref, lock held, ...) is part of the result, never an error:
// the entry was committed and changed nothing.
func (s *State) Apply(index uint64, e *fsmv1.Entry) *fsmv1.Result {
	s.index = index
	if id := e.GetRequestId(); id != "" {
		if r, ok := s.requests[id]; ok {
			return r
		}
	}
	now := time.Unix(0, e.GetLeaderTimeUnixNano())
	r := s.apply(index, now, e)
	r.Index = index
	if id := e.GetRequestId(); id != "" {
		s.remember(id, r)
	}
	return r
}

func (s *State) remember(id string, r *fsmv1.Result) {
	s.requests[id] = r
	s.requestOrder = append(s.requestOrder, id)
	if len(s.requestOrder) > requestMemory {
		delete(s.requests, s.requestOrder[0])
		s.requestOrder = s.requestOrder[1:]
	}
}

func refuse(reason fsmv1.Reason, format string, args ...any) *fsmv1.Result {
	return &fsmv1.Result{Refusal: &fsmv1.Refusal{Reason: reason, Message: fmt.Sprintf(format, args...)}}
}

func (s *State) apply(index uint64, now time.Time, e *fsmv1.Entry) *fsmv1.Result {
	switch c := e.Command.(type) {
	case *fsmv1.Entry_CreateRepo:
		return s.createRepo(index, now, c.CreateRepo)
	case *fsmv1.Entry_DeleteRepo:
		name := c.DeleteRepo.GetName()
		if _, ok := s.repos[name]; !ok {
			return refuse(fsmv1.Reason_REASON_NOT_FOUND, "repository %q not found", name)
		}
		delete(s.repos, name)
		delete(s.grants, name)
		s.locks.Delete(name)
		return &fsmv1.Result{}
	case *fsmv1.Entry_UpdateRefs:
		return s.updateRefs(index, now, c.UpdateRefs)
	case *fsmv1.Entry_AcquireLock:
		a := c.AcquireLock
		if _, ok := s.repos[a.GetRepo()]; !ok {
			return refuse(fsmv1.Reason_REASON_NOT_FOUND, "repository %q not found", a.GetRepo())
		}
		if a.GetHolder() == "" {
			return refuse(fsmv1.Reason_REASON_INVALID, "a write lock needs a holder")
		}
		l, err := s.locks.AcquireFor(lockd.Request{
			Repo: a.GetRepo(), Holder: a.GetHolder(), Node: a.GetNode(), Incarnation: a.GetIncarnation(),
			Lease: time.Duration(a.GetLeaseNanos()), WaitLease: time.Duration(a.GetWaitLeaseNanos()),
		}, now, index)
		if err != nil {
			return lockRefusal(err)
		}
		return &fsmv1.Result{Lock: lockToProto(l)}
	case *fsmv1.Entry_RenewLock:
		rl := c.RenewLock
		l, err := s.locks.Renew(rl.GetRepo(), rl.GetFencingToken(), now, time.Duration(rl.GetLeaseNanos()))
		if err != nil {
			return lockRefusal(err)
		}
		return &fsmv1.Result{Lock: lockToProto(l)}
	case *fsmv1.Entry_ReleaseLock:
		l, err := s.locks.Release(c.ReleaseLock.GetRepo(), c.ReleaseLock.GetFencingToken())
		if err != nil {
			return lockRefusal(err)
		}
		return &fsmv1.Result{Lock: lockToProto(l)}
	case *fsmv1.Entry_ForceReleaseLock:
		l, err := s.locks.ForceRelease(c.ForceReleaseLock.GetRepo())
		if err != nil {
			return lockRefusal(err)
		}
		return &fsmv1.Result{Lock: lockToProto(l)}
	case *fsmv1.Entry_ExpireLocks:
		r := &fsmv1.Result{}
		for _, l := range s.locks.Expire(now) {
			r.Expired = append(r.Expired, lockToProto(l))
		}
		return r
	case *fsmv1.Entry_SetMember:
		m := c.SetMember.GetMember()
		if m.GetId() == "" {
			return refuse(fsmv1.Reason_REASON_INVALID, "a member needs an id")
		}
		for _, k := range m.GetSshHostKeys() {
			if strings.TrimSpace(k) == "" {
				return refuse(fsmv1.Reason_REASON_INVALID, "member %q announces an empty SSH host key", m.GetId())
			}
		}
		r := &fsmv1.Result{}
		// A new incarnation: the node's process restarted, and whatever
		// it held before is held by nobody (old entries carry none).
		if inc := m.GetIncarnation(); inc != "" && inc != s.members[m.GetId()].GetIncarnation() {
			for _, l := range s.locks.FreeNode(m.GetId(), inc, 0) {
				r.Freed = append(r.Freed, lockToProto(l))
			}
		}
		s.members[m.GetId()] = m
		return r
	case *fsmv1.Entry_FreeNodeLocks:
		f := c.FreeNodeLocks
		if f.GetNode() == "" {
			return refuse(fsmv1.Reason_REASON_INVALID, "free node locks: which node?")
		}
		r := &fsmv1.Result{}
		for _, l := range s.locks.FreeNode(f.GetNode(), "", f.GetUpToToken()) {
			r.Freed = append(r.Freed, lockToProto(l))
		}
		return r
	case *fsmv1.Entry_LeaveLockQueue:
		l := c.LeaveLockQueue
		if !s.locks.Leave(l.GetRepo(), l.GetHolder()) {
			return refuse(fsmv1.Reason_REASON_NOT_FOUND, "%q has no place in the write lock queue of %q", l.GetHolder(), l.GetRepo())
		}
		return &fsmv1.Result{}
	case *fsmv1.Entry_LeaderNoop:
		return &fsmv1.Result{}
	case *fsmv1.Entry_SetHostKey:
		if s.hostKey != nil {
			return refuse(fsmv1.Reason_REASON_ALREADY_EXISTS, "the cluster already has an SSH host key (%s)", s.hostKey.GetFingerprint())
		}
		if len(c.SetHostKey.GetHostKey().GetPrivateKey()) == 0 {
			return refuse(fsmv1.Reason_REASON_INVALID, "empty host key")
		}
		s.hostKey = c.SetHostKey.GetHostKey()
		return &fsmv1.Result{}
	case *fsmv1.Entry_ForgetHostPrivateKey:
		return s.forgetHostPrivateKey(c.ForgetHostPrivateKey.GetForce())
	case *fsmv1.Entry_RecordBackup:
		return s.recordBackup(now, c.RecordBackup.GetBackup())
	case *fsmv1.Entry_AddUser:
		return s.addUser(now, c.AddUser.GetName())
	case *fsmv1.Entry_RemoveUser:
		name := c.RemoveUser.GetName()
		if _, ok := s.users[name]; !ok {
			return refuse(fsmv1.Reason_REASON_NOT_FOUND, "user %q not found", name)
		}
		delete(s.users, name)
		for fp, k := range s.keys {
			if k.GetUser() == name {
				delete(s.keys, fp)
			}
		}
		for repo, g := range s.grants {
			delete(g, name)
			if len(g) == 0 {
				delete(s.grants, repo)
			}
		}
		return &fsmv1.Result{}
	case *fsmv1.Entry_AddKey:
		k := proto.CloneOf(c.AddKey.GetKey())
		if _, ok := s.users[k.GetUser()]; !ok {
			return refuse(fsmv1.Reason_REASON_NOT_FOUND, "user %q not found", k.GetUser())
		}
		if !strings.HasPrefix(k.GetFingerprint(), "SHA256:") || k.GetPublicKey() == "" {
			return refuse(fsmv1.Reason_REASON_INVALID, "a key needs its public key and SHA256 fingerprint")
		}
		if old, ok := s.keys[k.GetFingerprint()]; ok {
			return refuse(fsmv1.Reason_REASON_ALREADY_EXISTS, "key %s is already registered to user %q", k.GetFingerprint(), old.GetUser())
		}
		k.AddedUnixNano = now.UnixNano()
		s.keys[k.GetFingerprint()] = k
		return &fsmv1.Result{}
	case *fsmv1.Entry_RemoveKey:
		fp := c.RemoveKey.GetFingerprint()
		if _, ok := s.keys[fp]; !ok {
			return refuse(fsmv1.Reason_REASON_NOT_FOUND, "key %s not found", fp)
		}
		delete(s.keys, fp)
		return &fsmv1.Result{}
	case *fsmv1.Entry_SetGrant:
		return s.setGrant(c.SetGrant)
	case *fsmv1.Entry_RemoveMember:
		if _, ok := s.members[c.RemoveMember.GetId()]; !ok {
			return refuse(fsmv1.Reason_REASON_NOT_FOUND, "member %q not found", c.RemoveMember.GetId())
		}
		delete(s.members, c.RemoveMember.GetId())
		return &fsmv1.Result{}
	case *fsmv1.Entry_Database:
		if c.Database.GetCommand() == nil {
			return refuse(fsmv1.Reason_REASON_INVALID, "the database entry has no command")
		}
		return s.db.Apply(index, now, c.Database)
	case *fsmv1.Entry_Mail:
		if c.Mail.GetCommand() == nil {
			return refuse(fsmv1.Reason_REASON_INVALID, "the mail entry has no command")
		}
		return s.mail.Apply(index, now, c.Mail)
	case nil:
		// No command, and (the FSM checked) none from a newer gitraft
		// either: no version means anything by such an entry, so every node
		// refuses it alike. The leader refuses to log one (validateEntry);
		// logs written before it did may hold some.
		return refuse(fsmv1.Reason_REASON_INVALID, "the entry has no command")
	default:
		// A command the generated code knows and this switch does not: a
		// bug (Test_State_EveryCommandApplies). Commands from a newer
		// gitraft decode as unknown fields and halt the FSM before this.
		panic(fmt.Sprintf("gitraft: bug: no case for command %T (entry at index %d)", e.Command, index))
	}
}

// forgetHostPrivateKey keeps only the public part of SetHostKey's key.
func (s *State) forgetHostPrivateKey(force bool) *fsmv1.Result {
	if len(s.hostKey.GetPrivateKey()) == 0 {
		return refuse(fsmv1.Reason_REASON_NOT_FOUND, "the replicated state holds no private SSH host key")
	}
	if !force {
		var without []string
		for _, id := range slices.Sorted(maps.Keys(s.members)) {
			if len(s.members[id].GetSshHostKeys()) == 0 {
				without = append(without, id)
			}
		}
		if len(without) > 0 {
			return refuse(fsmv1.Reason_REASON_PRECONDITION, "member(s) %s announce no host key file of their own and may still serve the key in the state; give them git.host_key_files first (or force)", strings.Join(without, ", "))
		}
	}
	s.hostKey = &fsmv1.HostKey{PublicKey: s.hostKey.GetPublicKey(), Fingerprint: s.hostKey.GetFingerprint()}
	return &fsmv1.Result{}
}

// ValidateUserName checks a user name: 1-39 lowercase letters, digits, '-',
// '_' or '.', starting with a letter or digit.
func ValidateUserName(name string) error {
	if name == "" || len(name) > 39 {
		return fmt.Errorf("user name %q: use 1 to 39 characters", name)
	}
	for i, r := range name {
		ok := r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || (i > 0 && (r == '-' || r == '_' || r == '.'))
		if !ok {
			return fmt.Errorf("user name %q: use lowercase letters, digits, '-', '_' and '.', starting with a letter or digit", name)
		}
	}
	return nil
}

func (s *State) addUser(now time.Time, name string) *fsmv1.Result {
	if err := ValidateUserName(name); err != nil {
		return refuse(fsmv1.Reason_REASON_INVALID, "%s", err.Error())
	}
	if _, ok := s.users[name]; ok {
		return refuse(fsmv1.Reason_REASON_ALREADY_EXISTS, "user %q already exists", name)
	}
	s.users[name] = &fsmv1.User{Name: name, CreatedUnixNano: now.UnixNano()}
	return &fsmv1.Result{}
}

func (s *State) setGrant(g *fsmv1.SetGrant) *fsmv1.Result {
	if _, ok := s.repos[g.GetRepo()]; !ok {
		return refuse(fsmv1.Reason_REASON_NOT_FOUND, "repository %q not found", g.GetRepo())
	}
	if _, ok := s.users[g.GetUser()]; !ok {
		return refuse(fsmv1.Reason_REASON_NOT_FOUND, "user %q not found", g.GetUser())
	}
	switch g.GetAccess() {
	case fsmv1.Access_ACCESS_NONE:
		if m := s.grants[g.GetRepo()]; m != nil {
			delete(m, g.GetUser())
			if len(m) == 0 {
				delete(s.grants, g.GetRepo())
			}
		}
	case fsmv1.Access_ACCESS_READ, fsmv1.Access_ACCESS_WRITE, fsmv1.Access_ACCESS_ADMIN:
		if s.grants[g.GetRepo()] == nil {
			s.grants[g.GetRepo()] = map[string]fsmv1.Access{}
		}
		s.grants[g.GetRepo()][g.GetUser()] = g.GetAccess()
	default:
		return refuse(fsmv1.Reason_REASON_INVALID, "access must be read, write, admin or none")
	}
	return &fsmv1.Result{}
}

func (s *State) createRepo(index uint64, now time.Time, c *fsmv1.CreateRepo) *fsmv1.Result {
	name := c.GetName()
	if err := storage.ValidateName(name); err != nil {
		return refuse(fsmv1.Reason_REASON_INVALID, "%s", err.Error())
	}
	if _, ok := s.repos[name]; ok {
		return refuse(fsmv1.Reason_REASON_ALREADY_EXISTS, "repository %q already exists", name)
	}
	r := &repoState{name: name, id: index, version: 1, refs: map[string]string{}, created: now.UnixNano(), updated: now.UnixNano(), updatedIndex: index, head: DefaultHead}
	s.repos[name] = r
	return &fsmv1.Result{Repo: r.toProto(true)}
}

func (s *State) updateRefs(index uint64, now time.Time, u *fsmv1.UpdateRefs) *fsmv1.Result {
	repo, ok := s.repos[u.GetRepo()]
	if !ok {
		return refuse(fsmv1.Reason_REASON_NOT_FOUND, "repository %q not found", u.GetRepo())
	}
	if err := s.locks.Check(u.GetRepo(), u.GetFencingToken(), now); err != nil {
		return lockRefusal(err)
	}
	if u.GetReleaseLock() {
		// The push is over whatever becomes of its refs: its lock goes
		// with this entry (the token was just checked, so this frees it).
		defer s.locks.Release(u.GetRepo(), u.GetFencingToken())
	}
	if len(u.GetUpdates()) == 0 {
		return refuse(fsmv1.Reason_REASON_INVALID, "no ref updates")
	}
	strict := u.GetRefRules() >= RefRulesGit
	seen := map[string]bool{}
	for _, ru := range u.GetUpdates() {
		check := ValidateRefName
		if strict {
			check = ValidateGitRefName
		}
		if err := check(ru.GetRef()); err != nil {
			return refuse(fsmv1.Reason_REASON_INVALID, "%s", err.Error())
		}
		if seen[ru.GetRef()] {
			return refuse(fsmv1.Reason_REASON_INVALID, "ref %q appears twice in one update", ru.GetRef())
		}
		seen[ru.GetRef()] = true
		for _, oid := range []string{ru.GetOldOid(), ru.GetNewOid()} {
			if err := validateOID(oid); err != nil {
				return refuse(fsmv1.Reason_REASON_INVALID, "ref %q: %s", ru.GetRef(), err.Error())
			}
		}
	}
	results := make([]*fsmv1.RefResult, len(u.GetUpdates()))
	stale := 0
	for i, ru := range u.GetUpdates() {
		cur := repo.refs[ru.GetRef()]
		st := fsmv1.RefStatus_REF_STATUS_OK
		if cur != normOID(ru.GetOldOid()) {
			st = fsmv1.RefStatus_REF_STATUS_STALE
			stale++
		}
		results[i] = &fsmv1.RefResult{Ref: ru.GetRef(), Status: st, CurrentOid: cur}
	}
	if stale > 0 && (u.GetAtomic() || stale == len(results)) {
		var names []string
		for _, rr := range results {
			if rr.Status == fsmv1.RefStatus_REF_STATUS_STALE {
				names = append(names, rr.Ref)
			} else {
				rr.Status = fsmv1.RefStatus_REF_STATUS_REJECTED
			}
		}
		r := refuse(fsmv1.Reason_REASON_STALE_REF, "stale old value for %s (changed by another push)", strings.Join(names, ", "))
		r.RefResults = results
		r.Repo = repo.toProto(false)
		return r
	}
	next := *repo
	next.refs = maps.Clone(repo.refs)
	changed := false
	for i, ru := range u.GetUpdates() {
		if results[i].Status != fsmv1.RefStatus_REF_STATUS_OK {
			continue
		}
		nv := normOID(ru.GetNewOid())
		if next.refs[ru.GetRef()] != nv {
			changed = true
		}
		if nv == "" {
			delete(next.refs, ru.GetRef())
		} else {
			next.refs[ru.GetRef()] = nv
		}
		results[i].CurrentOid = nv
	}
	if changed && strict {
		if err := refConflicts(next.refs, u.GetUpdates()); err != nil {
			r := refuse(fsmv1.Reason_REASON_INVALID, "%s", err.Error())
			r.Repo = repo.toProto(false)
			return r
		}
	}
	if changed && u.GetRepairActor() != "" {
		rec := &fsmv1.Repair{Index: index, UnixNano: now.UnixNano(), Actor: u.GetRepairActor(), Reason: u.GetRepairReason(), Version: next.version + 1}
		for i, ru := range u.GetUpdates() {
			if results[i].Status == fsmv1.RefStatus_REF_STATUS_OK {
				rec.Changes = append(rec.Changes, &fsmv1.RefUpdate{Ref: ru.GetRef(), OldOid: repo.refs[ru.GetRef()], NewOid: normOID(ru.GetNewOid())})
			}
		}
		next.repairs = append(slices.Clone(repo.repairs), rec)
		if len(next.repairs) > maxRepairs {
			next.repairs = next.repairs[len(next.repairs)-maxRepairs:]
		}
	}
	if changed {
		next.head = chooseHead(next.head, next.refs, u.GetUpdates())
		next.version++
		next.updated = now.UnixNano()
		next.updatedIndex = index
		s.repos[repo.name] = &next
	}
	return &fsmv1.Result{Repo: s.repos[repo.name].toProto(false), RefResults: results}
}

// chooseHead keeps HEAD's target while it exists. When it does not (a new
// repository, or its branch was deleted), HEAD moves to the first branch
// this update created, else to main, master, or the first branch by name, so
// that a clone checks out what was pushed, as on any git host.
func chooseHead(head string, refs map[string]string, updates []*fsmv1.RefUpdate) string {
	if _, ok := refs[head]; ok {
		return head
	}
	for _, u := range updates {
		if strings.HasPrefix(u.GetRef(), "refs/heads/") && refs[u.GetRef()] != "" {
			return u.GetRef()
		}
	}
	for _, h := range []string{"refs/heads/main", "refs/heads/master"} {
		if _, ok := refs[h]; ok {
			return h
		}
	}
	for _, name := range slices.Sorted(maps.Keys(refs)) {
		if strings.HasPrefix(name, "refs/heads/") {
			return name
		}
	}
	return head
}

// ErrInvalidRef is wrapped by ref-name rule violations.
var ErrInvalidRef = storage.ErrInvalidRef

// ValidateRefName applies git's check-ref-format rules to a full ref name,
// which must start with "refs/".
func ValidateRefName(ref string) error { return storage.ValidateRefName(ref) }

// ValidateGitRefName applies git's own rules for a ref a push may create
// (receive-pack's "funny refname" check); see storage.ValidateGitRefName.
func ValidateGitRefName(ref string) error { return storage.ValidateGitRefName(ref) }

// refConflicts refuses refs where a ref this update creates is also a
// directory of another (storage.RefConflicts).
func refConflicts(refs map[string]string, updates []*fsmv1.RefUpdate) error {
	var created []string
	for _, u := range updates {
		if normOID(u.GetNewOid()) != "" && normOID(u.GetOldOid()) == "" {
			if _, ok := refs[u.GetRef()]; ok {
				created = append(created, u.GetRef())
			}
		}
	}
	return storage.RefConflicts(refs, created)
}

// normOID maps git's all-zero object id (an absent ref) to "".
func normOID(oid string) string {
	if strings.Trim(oid, "0") == "" {
		return ""
	}
	return oid
}

func validateOID(oid string) error {
	if oid == "" {
		return nil
	}
	if len(oid) != 40 && len(oid) != 64 {
		return fmt.Errorf("object id %q is not 40 or 64 hex digits", oid)
	}
	for _, r := range oid {
		if !(r >= '0' && r <= '9' || r >= 'a' && r <= 'f') {
			return fmt.Errorf("object id %q is not lowercase hex", oid)
		}
	}
	return nil
}

func lockRefusal(err error) *fsmv1.Result {
	reason := fsmv1.Reason_REASON_INVALID
	switch {
	case errors.Is(err, lockd.ErrLockHeld):
		reason = fsmv1.Reason_REASON_LOCK_HELD
	case errors.Is(err, lockd.ErrStaleToken):
		reason = fsmv1.Reason_REASON_STALE_TOKEN
	case errors.Is(err, lockd.ErrNotHeld):
		reason = fsmv1.Reason_REASON_LOCK_NOT_HELD
	case errors.Is(err, lockd.ErrLeaseExpired):
		reason = fsmv1.Reason_REASON_LEASE_EXPIRED
	}
	r := refuse(reason, "%s", err.Error())
	var held *lockd.HeldError
	if errors.As(err, &held) {
		r.Lock = lockToProto(held.Lock)
	}
	return r
}

func lockToProto(l lockd.WriteLock) *fsmv1.WriteLock {
	return &fsmv1.WriteLock{
		Repo:             l.Repo,
		Holder:           l.Holder,
		FencingToken:     l.Token,
		AcquiredUnixNano: l.AcquiredAt.UnixNano(),
		ExpiresUnixNano:  l.ExpiresAt.UnixNano(),
		Node:             l.Node,
		Incarnation:      l.Incarnation,
	}
}

func lockFromProto(l *fsmv1.WriteLock) lockd.WriteLock {
	return lockd.WriteLock{
		Repo:        l.GetRepo(),
		Holder:      l.GetHolder(),
		Token:       l.GetFencingToken(),
		AcquiredAt:  time.Unix(0, l.GetAcquiredUnixNano()),
		ExpiresAt:   time.Unix(0, l.GetExpiresUnixNano()),
		Node:        l.GetNode(),
		Incarnation: l.GetIncarnation(),
	}
}

func queueToProto(q lockd.Queue) *fsmv1.LockQueue {
	p := &fsmv1.LockQueue{Repo: q.Repo}
	for _, w := range q.Waiters {
		p.Waiters = append(p.Waiters, &fsmv1.LockWaiter{
			Holder: w.Holder, Node: w.Node, Incarnation: w.Incarnation,
			SinceUnixNano: w.Since.UnixNano(), ExpiresUnixNano: w.ExpiresAt.UnixNano(),
		})
	}
	return p
}

func queueFromProto(p *fsmv1.LockQueue) lockd.Queue {
	q := lockd.Queue{Repo: p.GetRepo()}
	for _, w := range p.GetWaiters() {
		q.Waiters = append(q.Waiters, lockd.Waiter{
			Holder: w.GetHolder(), Node: w.GetNode(), Incarnation: w.GetIncarnation(),
			Since: time.Unix(0, w.GetSinceUnixNano()), ExpiresAt: time.Unix(0, w.GetExpiresUnixNano()),
		})
	}
	return q
}

func (r *repoState) toProto(withRefs bool) *fsmv1.Repo {
	p := &fsmv1.Repo{
		Name: r.name, Id: r.id, Version: r.version,
		CreatedUnixNano: r.created, UpdatedUnixNano: r.updated, UpdatedIndex: r.updatedIndex,
		Head: r.head, Repairs: r.repairs,
	}
	if withRefs {
		for _, name := range slices.Sorted(maps.Keys(r.refs)) {
			p.Refs = append(p.Refs, &fsmv1.Ref{Name: name, Oid: r.refs[name]})
		}
	}
	return p
}

func repoFromProto(p *fsmv1.Repo) *repoState {
	r := &repoState{
		name: p.GetName(), id: p.GetId(), version: p.GetVersion(), refs: make(map[string]string, len(p.GetRefs())),
		created: p.GetCreatedUnixNano(), updated: p.GetUpdatedUnixNano(), updatedIndex: p.GetUpdatedIndex(),
		head: p.GetHead(), repairs: p.GetRepairs(),
	}
	for _, ref := range p.GetRefs() {
		r.refs[ref.GetName()] = ref.GetOid()
	}
	return r
}

// ----- reads -----

// Repo returns one repository with its refs.
func (s *State) Repo(name string) (*fsmv1.Repo, bool) {
	r, ok := s.repos[name]
	if !ok {
		return nil, false
	}
	return r.toProto(true), true
}

// Repos lists repositories (without refs), sorted by name, with ref counts.
func (s *State) Repos() ([]*fsmv1.Repo, []int) {
	names := slices.Sorted(maps.Keys(s.repos))
	out := make([]*fsmv1.Repo, len(names))
	counts := make([]int, len(names))
	for i, n := range names {
		out[i] = s.repos[n].toProto(false)
		counts[i] = len(s.repos[n].refs)
	}
	return out, counts
}

// Locks lists the write locks, sorted by repo.
func (s *State) Locks() []lockd.WriteLock { return s.locks.List() }

// RepoLock is a repository's write lock, if it is held.
func (s *State) RepoLock(repo string) (lockd.WriteLock, bool) { return s.locks.Get(repo) }

// LocksKnowNodes reports whether every member has recorded an incarnation,
// so every node runs a gitraft that knows the lock entries and fields that
// came with it (AcquireLock's node, incarnation and wait lease,
// FreeNodeLocks, LeaveLockQueue). Until then nodes propose none of them:
// an older node would ignore the fields, or halt on the entries.
func (s *State) LocksKnowNodes() bool {
	if len(s.members) == 0 {
		return false
	}
	for _, m := range s.members {
		if m.GetIncarnation() == "" {
			return false
		}
	}
	return true
}

// LockQueues lists the repositories' lock waiters, sorted by repo.
func (s *State) LockQueues() []lockd.Queue { return s.locks.Queues() }

// NodeLocks lists the locks a node holds (by AcquireLock.node).
func (s *State) NodeLocks(node string) []lockd.WriteLock { return s.locks.NodeLocks(node) }

// ExpiredLocks lists locks whose lease has run out by now (not yet removed).
func (s *State) ExpiredLocks(now time.Time) []lockd.WriteLock { return s.locks.Expired(now) }

// Members lists the members' addresses, sorted by id.
func (s *State) Members() []*fsmv1.Member {
	out := make([]*fsmv1.Member, 0, len(s.members))
	for _, id := range slices.Sorted(maps.Keys(s.members)) {
		out = append(out, s.members[id])
	}
	return out
}

// Member returns one member's addresses.
func (s *State) Member(id string) (*fsmv1.Member, bool) {
	m, ok := s.members[id]
	return m, ok
}

// HostKey is the SSH host key an older gitraft kept in the state
// (SetHostKey), nil if none. Its private part is empty once forgotten.
func (s *State) HostKey() *fsmv1.HostKey { return s.hostKey }

// stateHostPublicKey is the public part of the state's own host key while
// its private part is there (nodes without files serve it), else "".
func (s *State) stateHostPublicKey() string {
	if len(s.hostKey.GetPrivateKey()) == 0 {
		return ""
	}
	return s.hostKey.GetPublicKey()
}

// HostPublicKey is one public SSH host key the cluster serves.
type HostPublicKey struct {
	PublicKey string   // authorized_keys form, without a comment
	Members   []string // ids of the members announcing it, sorted
	InState   bool     // the state's own key (SetHostKey), private part still there
}

// HostPublicKeys lists the public SSH host keys the cluster serves: every
// key a member announces, and the state's own key while its private part
// is there (nodes without host key files serve it). Keys come in the order
// the members list them (members by id), the state's key first.
func (s *State) HostPublicKeys() []HostPublicKey {
	var out []HostPublicKey
	at := map[string]int{}
	add := func(key string) *HostPublicKey {
		key = NormalizePublicKey(key)
		i, ok := at[key]
		if !ok {
			i = len(out)
			at[key] = i
			out = append(out, HostPublicKey{PublicKey: key})
		}
		return &out[i]
	}
	if k := s.stateHostPublicKey(); k != "" {
		add(k).InState = true
	}
	for _, id := range slices.Sorted(maps.Keys(s.members)) {
		for _, k := range s.members[id].GetSshHostKeys() {
			hk := add(k)
			if !slices.Contains(hk.Members, id) {
				hk.Members = append(hk.Members, id)
			}
		}
	}
	return out
}

// NormalizePublicKey is an authorized_keys line's type and base64 key,
// without options or comment, so that two lines of one key compare equal.
func NormalizePublicKey(line string) string {
	f := strings.Fields(line)
	if len(f) < 2 {
		return strings.TrimSpace(line)
	}
	return f[0] + " " + f[1]
}

// Users lists users by name.
func (s *State) Users() []*fsmv1.User {
	out := make([]*fsmv1.User, 0, len(s.users))
	for _, n := range slices.Sorted(maps.Keys(s.users)) {
		out = append(out, s.users[n])
	}
	return out
}

// User returns one user.
func (s *State) User(name string) (*fsmv1.User, bool) {
	u, ok := s.users[name]
	return u, ok
}

// Keys lists SSH keys (of one user, or all when user is ""), by fingerprint.
func (s *State) Keys(user string) []*fsmv1.SSHKey {
	var out []*fsmv1.SSHKey
	for _, fp := range slices.Sorted(maps.Keys(s.keys)) {
		if k := s.keys[fp]; user == "" || k.GetUser() == user {
			out = append(out, k)
		}
	}
	return out
}

// KeyByFingerprint finds a registered SSH key.
func (s *State) KeyByFingerprint(fp string) (*fsmv1.SSHKey, bool) {
	k, ok := s.keys[fp]
	return k, ok
}

// Access is a user's access to a repository.
func (s *State) Access(repo, user string) fsmv1.Access {
	if a, ok := s.grants[repo][user]; ok {
		return a
	}
	return fsmv1.Access_ACCESS_NONE
}

// Grants lists a repository's grants, by user.
func (s *State) Grants(repo string) []*fsmv1.Grant {
	var out []*fsmv1.Grant
	g := s.grants[repo]
	for _, u := range slices.Sorted(maps.Keys(g)) {
		out = append(out, &fsmv1.Grant{Repo: repo, User: u, Access: g[u]})
	}
	return out
}

// ----- snapshots -----

// snapshotView is an immutable capture of the state, cheap to take.
type snapshotView struct {
	index    uint64
	repos    []*repoState
	locks    []lockd.WriteLock
	queues   []lockd.Queue
	members  []*fsmv1.Member
	requests []*fsmv1.AppliedRequest
	hostKey  *fsmv1.HostKey
	users    []*fsmv1.User
	keys     []*fsmv1.SSHKey
	grants   []*fsmv1.Grant
	db       *dbv1.Snapshot
	mail     *mailv1.Snapshot
	backup   *fsmv1.BackupRecord
}

func (s *State) capture() *snapshotView {
	v := &snapshotView{index: s.index, locks: s.locks.List(), queues: s.locks.Queues(), members: s.Members()}
	for _, n := range slices.Sorted(maps.Keys(s.repos)) {
		v.repos = append(v.repos, s.repos[n])
	}
	for _, id := range s.requestOrder {
		v.requests = append(v.requests, &fsmv1.AppliedRequest{RequestId: id, Result: s.requests[id]})
	}
	v.hostKey, v.users, v.keys = s.hostKey, s.Users(), s.Keys("")
	v.db, v.mail, v.backup = s.db.Snapshot(), s.mail.Snapshot(), s.backup
	for _, repo := range slices.Sorted(maps.Keys(s.grants)) {
		v.grants = append(v.grants, s.Grants(repo)...)
	}
	return v
}

func (v *snapshotView) items(yield func(*fsmv1.SnapshotItem) bool) {
	for _, r := range v.repos {
		if !yield(&fsmv1.SnapshotItem{Item: &fsmv1.SnapshotItem_Repo{Repo: r.toProto(true)}}) {
			return
		}
	}
	for _, l := range v.locks {
		if !yield(&fsmv1.SnapshotItem{Item: &fsmv1.SnapshotItem_Lock{Lock: lockToProto(l)}}) {
			return
		}
	}
	for _, q := range v.queues {
		if !yield(&fsmv1.SnapshotItem{Item: &fsmv1.SnapshotItem_LockQueue{LockQueue: queueToProto(q)}}) {
			return
		}
	}
	for _, m := range v.members {
		if !yield(&fsmv1.SnapshotItem{Item: &fsmv1.SnapshotItem_Member{Member: m}}) {
			return
		}
	}
	for _, a := range v.requests {
		if !yield(&fsmv1.SnapshotItem{Item: &fsmv1.SnapshotItem_AppliedRequest{AppliedRequest: a}}) {
			return
		}
	}
	if v.hostKey != nil && !yield(&fsmv1.SnapshotItem{Item: &fsmv1.SnapshotItem_HostKey{HostKey: v.hostKey}}) {
		return
	}
	for _, u := range v.users {
		if !yield(&fsmv1.SnapshotItem{Item: &fsmv1.SnapshotItem_User{User: u}}) {
			return
		}
	}
	for _, k := range v.keys {
		if !yield(&fsmv1.SnapshotItem{Item: &fsmv1.SnapshotItem_Key{Key: k}}) {
			return
		}
	}
	for _, g := range v.grants {
		if !yield(&fsmv1.SnapshotItem{Item: &fsmv1.SnapshotItem_Grant{Grant: g}}) {
			return
		}
	}
	if !yield(&fsmv1.SnapshotItem{Item: &fsmv1.SnapshotItem_Database{Database: v.db}}) {
		return
	}
	if !yield(&fsmv1.SnapshotItem{Item: &fsmv1.SnapshotItem_Mail{Mail: v.mail}}) {
		return
	}
	if v.backup != nil {
		yield(&fsmv1.SnapshotItem{Item: &fsmv1.SnapshotItem_Backup{Backup: v.backup}})
	}
}

// restoreState builds a State from snapshot items.
func restoreState(index uint64, items []*fsmv1.SnapshotItem) (*State, error) {
	s := NewState()
	s.index = index
	var locks []lockd.WriteLock
	var queues []lockd.Queue
	for _, it := range items {
		switch x := it.Item.(type) {
		case *fsmv1.SnapshotItem_Repo:
			s.repos[x.Repo.GetName()] = repoFromProto(x.Repo)
		case *fsmv1.SnapshotItem_Lock:
			locks = append(locks, lockFromProto(x.Lock))
		case *fsmv1.SnapshotItem_LockQueue:
			queues = append(queues, queueFromProto(x.LockQueue))
		case *fsmv1.SnapshotItem_Member:
			s.members[x.Member.GetId()] = x.Member
		case *fsmv1.SnapshotItem_AppliedRequest:
			s.remember(x.AppliedRequest.GetRequestId(), x.AppliedRequest.GetResult())
		case *fsmv1.SnapshotItem_HostKey:
			s.hostKey = x.HostKey
		case *fsmv1.SnapshotItem_User:
			s.users[x.User.GetName()] = x.User
		case *fsmv1.SnapshotItem_Key:
			s.keys[x.Key.GetFingerprint()] = x.Key
		case *fsmv1.SnapshotItem_Grant:
			g := x.Grant
			if s.grants[g.GetRepo()] == nil {
				s.grants[g.GetRepo()] = map[string]fsmv1.Access{}
			}
			s.grants[g.GetRepo()][g.GetUser()] = g.GetAccess()
		case *fsmv1.SnapshotItem_Database:
			db, err := dbtarget.Restore(x.Database)
			if err != nil {
				return nil, fmt.Errorf("restore database state: %w", err)
			}
			s.db = db
		case *fsmv1.SnapshotItem_Mail:
			m, err := mail.Restore(x.Mail)
			if err != nil {
				return nil, fmt.Errorf("restore mail state: %w", err)
			}
			s.mail = m
		case *fsmv1.SnapshotItem_Backup:
			s.backup = x.Backup
		default:
			return nil, fmt.Errorf("snapshot item of unknown kind %T; upgrade gitraft on this node", it.Item)
		}
	}
	s.locks = lockd.Restore(locks, queues...)
	return s, nil
}

// Database returns the PostgreSQL failover-target state. Callers hold the
// FSM's lock (Node reads go through fsm.Read) and must not keep it.
func (s *State) Database() *dbtarget.State { return s.db }

// Mail returns the mail-drain state, under the same rules as Database.
func (s *State) Mail() *mail.State { return s.mail }

// recordBackup keeps a finished backup, stamped with the entry's leader
// time. An older backup (of a lower index) than the one kept is refused, so
// that a slow CLI cannot move the record back.
func (s *State) recordBackup(now time.Time, b *fsmv1.BackupRecord) *fsmv1.Result {
	if b.GetIndex() == 0 {
		return refuse(fsmv1.Reason_REASON_INVALID, "a backup record needs the index of the state it holds")
	}
	if s.backup != nil && b.GetIndex() < s.backup.GetIndex() {
		return refuse(fsmv1.Reason_REASON_PRECONDITION, "a backup of index %d is already recorded; this one holds the older index %d", s.backup.GetIndex(), b.GetIndex())
	}
	rec := proto.Clone(b).(*fsmv1.BackupRecord)
	rec.FinishedUnixNano = now.UnixNano()
	s.backup = rec
	return &fsmv1.Result{}
}

// LastBackup returns the last backup that finished, or nil. The record is
// never changed in place.
func (s *State) LastBackup() *fsmv1.BackupRecord { return s.backup }
