package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/gitraft/gitraft/cluster/pki"
	"github.com/gitraft/gitraft/lockd"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	nodev1 "github.com/gitraft/gitraft/proto/gitraft/node/v1"
	"github.com/gitraft/gitraft/storage"
)

// Errors of the git paths.
var (
	ErrRepoNotFound = errors.New("repository not found")
	ErrUnknownKey   = errors.New("unknown key")
	ErrNoGit        = errors.New("this node serves no repositories")
)

// pushLease is the write lock's lease during a push; it is renewed every
// third of it while the push runs.
const pushLease = 15 * time.Second

// ErrNotCurrent says this node cannot confirm that its state is current:
// it reaches no leader (no quorum, or cut off from the majority). What it
// would answer may be stale, so by default it refuses.
var ErrNotCurrent = errors.New("this node cannot confirm it is current")

// notCurrentError is a refusal wrapping ErrNotCurrent whose message is the
// whole explanation.
type notCurrentError struct{ msg string }

func (e *notCurrentError) Error() string { return e.msg }
func (e *notCurrentError) Unwrap() error { return ErrNotCurrent }

// readMode is what a read barrier found out about this node.
type readMode int

const (
	readCurrent     readMode = iota // applied what the leader had committed
	readLagging                     // a leader answered, but this node cannot apply that far in time
	readUnconfirmed                 // no leader answered: this node may be cut off
)

// freshRead runs a read barrier, but not for long (3 s).
//
// readLagging means a leader answered but this node could not apply its
// commit index in time (its log is stuck, for example on a full disk): its
// state must not be used, and sessions go to the leader instead.
// readUnconfirmed means no leader could be reached.
func (n *Node) freshRead(ctx context.Context) (readMode, error) {
	bctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if _, err := n.ReadBarrier(bctx); err != nil {
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		if errors.Is(err, ErrNoLeader) {
			return readUnconfirmed, nil
		}
		return readLagging, nil
	}
	return readCurrent, nil
}

// notCurrent is the refusal of a node that cannot confirm it is current,
// naming the other nodes a client can use instead.
func (n *Node) notCurrent(what string) error {
	var others []string
	n.fsm.Read(func(s *State) {
		for _, m := range s.Members() {
			if m.GetId() != n.cfg.NodeID && m.GetSshAddr() != "" {
				others = append(others, fmt.Sprintf("%s (%s)", m.GetId(), m.GetSshAddr()))
			}
		}
	})
	hint := ""
	if len(others) > 0 {
		hint = "; try another node: " + strings.Join(others, ", ")
	}
	return &notCurrentError{fmt.Sprintf("%s cannot reach the cluster's leader (no quorum from here), so it refuses to %s from a copy that may be stale%s", n.cfg.NodeID, what, hint)}
}

// UserForKey says whose SSH key (by SHA256 fingerprint) this is, from the
// current state.
//
// A node that cannot confirm it is current answers from what it has, with
// an error wrapping ErrNotCurrent (unless git.serve_stale_reads is set):
// the front end then refuses the session with that message, instead of a
// bare "permission denied". A lagging node answers from what it has: its
// sessions are served by the leader, which checks the key again.
func (n *Node) UserForKey(ctx context.Context, fingerprint string) (string, error) {
	mode, err := n.freshRead(ctx)
	if err != nil {
		return "", err
	}
	var user string
	n.fsm.Read(func(s *State) {
		if k, ok := s.KeyByFingerprint(fingerprint); ok {
			user = k.GetUser()
		}
	})
	if user == "" {
		return "", fmt.Errorf("%w %s", ErrUnknownKey, fingerprint)
	}
	if mode == readUnconfirmed && !n.serveStale() {
		return user, n.notCurrent("check keys")
	}
	return user, nil
}

func (n *Node) serveStale() bool { return n.git != nil && n.git.cfg.ServeStaleReads }

// RedirectError says this node should not take a session, and which peer
// should.
type RedirectError struct {
	PeerID, PeerAddr, Reason string
}

func (e *RedirectError) Error() string {
	return fmt.Sprintf("%s; %s can take it", e.Reason, e.PeerID)
}

// leaderPeer returns the leader as a redirect target, when it is not us.
func (n *Node) leaderPeer(reason string) error {
	addr, id := n.leaderGRPC()
	if addr == "" || id == n.cfg.NodeID {
		return fmt.Errorf("%s, and no other node is known to take over", reason)
	}
	return &RedirectError{PeerID: id, PeerAddr: addr, Reason: reason}
}

// RepoAccess returns a user's access to a repository after a read barrier.
//
// A node that cannot confirm it is current refuses (ErrNotCurrent), unless
// git.serve_stale_reads is set. A lagging node judges from what it has
// applied; the session is then served by the leader, which judges again.
func (n *Node) RepoAccess(ctx context.Context, repo, user string) (fsmv1.Access, error) {
	mode, err := n.freshRead(ctx)
	if err != nil {
		return 0, err
	}
	if mode == readUnconfirmed && !n.serveStale() {
		return 0, n.notCurrent("check access")
	}
	var a fsmv1.Access
	var found bool
	n.fsm.Read(func(s *State) {
		_, found = s.repos[repo]
		a = s.Access(repo, user)
	})
	if !found {
		return 0, fmt.Errorf("%w: %q", ErrRepoNotFound, repo)
	}
	return a, nil
}

// PrepareRead makes a read of repo not stale: it returns the local path once
// this node's copy is at the committed version, or the gRPC address of a
// current peer to proxy to when catching up takes too long.
func (n *Node) PrepareRead(ctx context.Context, repo string, progress func(string)) (path, peer string, err error) {
	if n.git == nil {
		return "", "", ErrNoGit
	}
	mode, err := n.freshRead(ctx)
	if err != nil {
		return "", "", err
	}
	if mode == readUnconfirmed && !n.serveStale() {
		return "", "", n.notCurrent("serve " + strconv.Quote(repo))
	}
	if mode == readLagging {
		addr, id := n.leaderGRPC()
		if addr == "" || id == n.cfg.NodeID {
			return "", "", fmt.Errorf("%s is behind the Raft log and cannot catch up", n.cfg.NodeID)
		}
		progress(fmt.Sprintf("%s is behind the Raft log; serving %q through the leader %s", n.cfg.NodeID, repo, id))
		return "", addr, nil
	}
	t, ok := n.git.target(repo)
	if !ok {
		return "", "", fmt.Errorf("%w: %q", ErrRepoNotFound, repo)
	}
	path, err = n.git.st.Path(repo)
	if err != nil {
		return "", "", err
	}
	rs := n.git.get(repo)
	if mode == readUnconfirmed {
		rs.mu.Lock()
		v := rs.version
		rs.mu.Unlock()
		if v == 0 {
			return "", "", fmt.Errorf("%w: no quorum, and %s has no copy of %q", ErrNoLeader, n.cfg.NodeID, repo)
		}
		progress(fmt.Sprintf("warning: %s cannot reach the cluster's leader; serving its copy at version %d, which may be stale (git.serve_stale_reads is on)", n.cfg.NodeID, v))
		return path, "", nil
	}
	// The copy is current: serve it. (A push or a catch-up at work on it
	// holds its guard; then it is not known to be current.)
	if rs.mu.TryLock() {
		current := rs.id == t.id && rs.version >= t.version
		rs.mu.Unlock()
		if current {
			return path, "", nil
		}
	}
	// Behind: a current peer serves the read at once, and this copy catches
	// up in the background.
	n.git.poke()
	if peers := n.currentPeers(ctx, repo, t.version); len(peers) > 0 {
		progress(fmt.Sprintf("%s is behind on %q (version %d committed); serving it through %s, which is current", n.cfg.NodeID, repo, t.version, peers[0].GetId()))
		return "", peers[0].GetGrpcAddr(), nil
	}
	// No peer is current either (a repository just created, or every copy
	// catching up): catch up here, for a while.
	progress(fmt.Sprintf("%s is behind on %q (version %d committed); catching up", n.cfg.NodeID, repo, t.version))
	deadline := time.Now().Add(n.git.cfg.ReadCatchUp)
	for {
		rs.mu.Lock()
		current := rs.id == t.id && rs.version >= t.version
		if !current {
			cctx, cancel := context.WithDeadline(ctx, deadline)
			err := n.git.syncLocked(cctx, rs, repo)
			cancel()
			current = err == nil && rs.version >= t.version
		}
		rs.mu.Unlock()
		if current {
			return path, "", nil
		}
		if time.Now().After(deadline) {
			break
		}
		select {
		case <-ctx.Done():
			return "", "", ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	if peers := n.currentPeers(ctx, repo, t.version); len(peers) > 0 {
		progress(fmt.Sprintf("serving %q through %s, which is current", repo, peers[0].GetId()))
		return "", peers[0].GetGrpcAddr(), nil
	}
	return "", "", fmt.Errorf("%s cannot catch up on %q and no peer holds version %d", n.cfg.NodeID, repo, t.version)
}

// RefChange is one ref change of a push ("" is an absent ref).
type RefChange struct{ Ref, Old, New string }

// Push is one push holding its repository's write lock on this node.
type Push struct {
	n       *Node
	repo    string
	user    string
	id      string
	path    string
	held    *lockd.Held
	rs      *replicaState
	base    target
	version uint64
	done    sync.Once
}

// BeginPush takes the repository's write lock for this node and brings the
// local copy to the committed version, so git advertises the true refs.
func (n *Node) BeginPush(ctx context.Context, repo, user, pushID string, progress func(string)) (*Push, error) {
	if n.git == nil {
		return nil, ErrNoGit
	}
	if free, err := n.git.st.FreeBytes(); err == nil && free < n.git.cfg.MinFreeBytes {
		return nil, n.pushPeer(ctx, repo, fmt.Sprintf("%s has only %d MB free on its data disk", n.cfg.NodeID, free>>20))
	}
	progress(fmt.Sprintf("%s took the push", n.cfg.NodeID))
	waited := false
	held, err := n.locks.Acquire(ctx, repo, n.cfg.NodeID+"/"+pushID, func(l lockd.WriteLock) {
		waited = true
		progress(fmt.Sprintf("waiting for the write lock on %q, held by %s", repo, l.Holder))
	})
	if err != nil {
		var re *RefusalError
		if errors.As(err, &re) && re.Reason == fsmv1.Reason_REASON_NOT_FOUND {
			return nil, fmt.Errorf("%w: %q", ErrRepoNotFound, repo)
		}
		if errors.Is(err, ErrNoLeader) {
			return nil, fmt.Errorf("the cluster has lost its quorum (no leader): %v", err)
		}
		return nil, fmt.Errorf("write lock: %w", err)
	}
	if waited {
		progress("got the write lock")
	}
	p := &Push{n: n, repo: repo, user: user, id: pushID, held: held, rs: n.git.get(repo)}
	p.rs.mu.Lock()
	fail := func(err error) (*Push, error) {
		p.rs.mu.Unlock()
		rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		held.Release(rctx)
		cancel()
		return nil, err
	}
	// The lock was granted at some index; make sure this node has applied
	// it (and so every earlier push) before judging whether it is current.
	bctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	_, err = n.ReadBarrier(bctx)
	cancel()
	if errors.Is(err, ErrNoLeader) {
		return fail(fmt.Errorf("the cluster has lost its quorum (no leader): %v", err))
	}
	if err != nil {
		return fail(n.leaderPeer(n.cfg.NodeID + " is behind the Raft log"))
	}
	t, ok := n.git.target(repo)
	if !ok {
		return fail(fmt.Errorf("%w: %q", ErrRepoNotFound, repo))
	}
	if p.rs.id != t.id || p.rs.version < t.version {
		progress(fmt.Sprintf("%s is behind on %q; catching up to version %d first", n.cfg.NodeID, repo, t.version))
		if err := n.git.syncLocked(ctx, p.rs, repo); err != nil {
			return fail(n.pushPeer(ctx, repo, fmt.Sprintf("%s could not catch up (%v)", n.cfg.NodeID, err)))
		}
	}
	p.base = t
	if p.path, err = n.git.st.Path(repo); err != nil {
		return fail(err)
	}
	// This node holds the write lock and the copy's guard: a ref lock file
	// now is a leftover of a killed git, and would make git refuse refs
	// that are about to be committed.
	if k, err := n.git.st.RemoveStaleLocks(repo); err != nil {
		return fail(err)
	} else if k > 0 {
		n.log.Warn("removed lock files an interrupted git left behind", "repo", repo, "count", k)
	}
	return p, nil
}

// pushPeer picks a current peer to hand a push to.
func (n *Node) pushPeer(ctx context.Context, repo, reason string) error {
	t, ok := n.git.target(repo)
	if !ok {
		return fmt.Errorf("%w: %q", ErrRepoNotFound, repo)
	}
	for _, p := range n.currentPeers(ctx, repo, t.version) {
		return &RedirectError{PeerID: p.GetId(), PeerAddr: p.GetGrpcAddr(), Reason: reason}
	}
	return n.leaderPeer(reason)
}

// Path is the local bare repository.
func (p *Push) Path() string { return p.path }

// Version is the version the push committed, 0 before.
func (p *Push) Version() uint64 { return p.version }

// Verdict says what becomes of one ref change of a push: Accepted, or the
// reason git refuses it (git reports it to the client itself).
type Verdict struct {
	RefChange
	Accepted bool
	Reason   string // git's words where git has them: "funny refname", ...
}

// Judge decides, ref by ref, what git's receive-pack will do with a push's
// commands once the pre-receive hook accepts: the same checks, on the same
// data (the copy at the base version plus the quarantine). Only what it
// accepts is committed; what it refuses, git refuses too and says why, so
// the state says exactly what git accepted. A push whose outcome git would
// decide in a way this cannot predict (a ref that is a directory of
// another, a ref named twice) is refused whole with an error.
func (p *Push) Judge(ctx context.Context, quarantine string, updates []RefChange) ([]Verdict, error) {
	out := make([]Verdict, len(updates))
	seen := map[string]bool{}
	var tips []string
	for i, u := range updates {
		out[i] = Verdict{RefChange: u, Accepted: true}
		if seen[u.Ref] {
			return nil, fmt.Errorf("ref %s is named twice in one push", u.Ref)
		}
		seen[u.Ref] = true
		switch {
		case ValidateGitRefName(u.Ref) != nil:
			out[i].Accepted, out[i].Reason = false, "funny refname"
		case u.New == "" && u.Old != "" && p.base.refs[u.Ref] == "":
			// git deletes a ref that is not there as a no-op and says ok;
			// there is nothing to commit.
			out[i].Accepted, out[i].Reason = false, ""
		case p.base.refs[u.Ref] != u.Old:
			out[i].Accepted, out[i].Reason = false, "failed to update ref (stale old value)"
		case u.New != "":
			tips = append(tips, u.New)
		}
	}
	if len(tips) > 0 {
		missing, err := p.n.git.st.MissingInQuarantine(ctx, p.repo, quarantine, tips)
		if err != nil {
			return nil, fmt.Errorf("checking the pushed objects: %w", err)
		}
		lacks := map[string]bool{}
		for _, m := range missing {
			lacks[m] = true
		}
		for i := range out {
			if out[i].Accepted && lacks[out[i].New] {
				out[i].Accepted, out[i].Reason = false, "missing necessary objects"
			}
		}
	}
	// Directory/file conflicts: git's outcome depends on the order it
	// takes the commands in; refuse the push rather than guess.
	final := maps.Clone(p.base.refs)
	var accepted []*fsmv1.RefUpdate
	for _, v := range out {
		if !v.Accepted {
			continue
		}
		accepted = append(accepted, &fsmv1.RefUpdate{Ref: v.Ref, OldOid: v.Old, NewOid: v.New})
		if v.New == "" {
			delete(final, v.Ref)
		} else {
			final[v.Ref] = v.New
		}
	}
	if err := refConflicts(final, accepted); err != nil {
		return nil, err
	}
	return out, nil
}

// Commit ships the quarantined pack to the peers, waits until a majority of
// voters (this node included) holds it durably, then commits the accepted
// ref changes with the write lock's fencing token, as one atomic entry.
//
// The verdicts come from Judge. With atomic (the client asked for
// --atomic), one refused ref refuses the push. Commit returns the changes
// it committed; none, and no error, when git refuses every one itself.
func (p *Push) Commit(ctx context.Context, quarantine string, verdicts []Verdict, atomic bool, progress func(string)) ([]RefChange, error) {
	n := p.n
	select {
	case <-p.held.Lost():
		return nil, fmt.Errorf("lost the write lock (%v); nothing was changed", p.held.Err())
	default:
	}
	var changes []RefChange
	var refused []string
	for _, v := range verdicts {
		if v.Accepted {
			changes = append(changes, v.RefChange)
		} else if v.Reason != "" {
			refused = append(refused, fmt.Sprintf("%s (%s)", v.Ref, v.Reason))
		}
	}
	if len(refused) > 0 && atomic {
		return nil, fmt.Errorf("atomic push refused: git refuses %s; nothing was changed", strings.Join(refused, ", "))
	}
	for _, r := range refused {
		progress("not committing " + r)
	}
	var tips []string
	for _, c := range changes {
		if c.New != "" && c.New != c.Old {
			tips = append(tips, c.New)
		}
	}
	if len(changes) == 0 {
		return nil, nil
	}
	packs, err := quarantinePacks(quarantine)
	if err != nil {
		return nil, err
	}
	voters, err := n.voters()
	if err != nil {
		return nil, err
	}
	need := len(voters)/2 + 1
	if len(packs) == 0 {
		// No new objects: every new value must already be on a majority
		// (not merely in this node's object store, which may hold the
		// leftovers of a push that failed).
		if err := n.objectsOnQuorum(ctx, p.repo, tips); err != nil {
			return nil, fmt.Errorf("%v; nothing was changed", status.Convert(err).Message())
		}
	} else if err := p.replicate(ctx, packs, voters, need, tips, progress); err != nil {
		return nil, err
	}
	u := &fsmv1.UpdateRefs{Repo: p.repo, FencingToken: p.held.Token(), Atomic: true, PushId: p.id, RefRules: RefRulesGit}
	for _, c := range changes {
		u.Updates = append(u.Updates, &fsmv1.RefUpdate{Ref: c.Ref, OldOid: c.Old, NewOid: c.New})
	}
	r, err := n.Propose(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_UpdateRefs{UpdateRefs: u}})
	if err != nil {
		if errors.Is(err, ErrNoLeader) {
			return nil, fmt.Errorf("the cluster lost its quorum before the push was committed; nothing was changed: %v", err)
		}
		return nil, fmt.Errorf("committing the push failed; it may or may not have been applied: %v", err)
	}
	if rf := r.GetRefusal(); rf != nil {
		switch rf.GetReason() {
		case fsmv1.Reason_REASON_STALE_TOKEN, fsmv1.Reason_REASON_LEASE_EXPIRED, fsmv1.Reason_REASON_LOCK_NOT_HELD:
			return nil, fmt.Errorf("lost the write lock before committing (%s); nothing was changed", rf.GetMessage())
		}
		return nil, fmt.Errorf("refused: %s; nothing was changed", rf.GetMessage())
	}
	p.version = r.GetRepo().GetVersion()
	progress(fmt.Sprintf("committed version %d of %s (raft index %d)", p.version, p.repo, r.GetIndex()))
	return changes, nil
}

type packFiles struct{ pack, idx string }

func quarantinePacks(dir string) ([]packFiles, error) {
	if dir == "" {
		return nil, nil
	}
	matches, err := filepath.Glob(filepath.Join(dir, "pack", "*.pack"))
	if err != nil {
		return nil, err
	}
	sort.Strings(matches)
	var out []packFiles
	for _, m := range matches {
		idx := strings.TrimSuffix(m, ".pack") + ".idx"
		if _, err := os.Stat(idx); err != nil {
			return nil, fmt.Errorf("pack %s has no index: %w", filepath.Base(m), err)
		}
		for _, f := range []string{m, idx} {
			if err := fsyncFile(f); err != nil {
				return nil, fmt.Errorf("fsync %s: %w", filepath.Base(f), err)
			}
		}
		out = append(out, packFiles{pack: m, idx: idx})
	}
	return out, nil
}

func fsyncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// voters returns the Raft voters' member records.
func (n *Node) voters() ([]*fsmv1.Member, error) {
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, err
	}
	var out []*fsmv1.Member
	n.fsm.Read(func(s *State) {
		for _, srv := range f.Configuration().Servers {
			if srv.Suffrage != raft.Voter {
				continue
			}
			m, ok := s.Member(string(srv.ID))
			if !ok {
				m = &fsmv1.Member{Id: string(srv.ID)}
			}
			out = append(out, m)
		}
	})
	return out, nil
}

// replicate sends the packs to every other voter and returns once need
// voters (this one included) hold them durably, with every tip connected.
//
// The pack files are opened here, once: git migrates and removes the
// quarantine as soon as the hook returns, and the open files stay readable.
// Sends to peers that are slower than the majority carry on after the push
// is committed (so those peers need not fetch it later), bounded by
// stragglerTimeout and the node's life, and close the files when the last
// one ends.
func (p *Push) replicate(ctx context.Context, packs []packFiles, voters []*fsmv1.Member, need int, tips []string, progress func(string)) error {
	n := p.n
	total := len(voters)
	open, err := openPacks(packs)
	if err != nil {
		return err
	}
	type ack struct {
		id  string
		err error
	}
	acks := make(chan ack, total)
	// The sends outlive this call only up to stragglerTimeout; a push that
	// fails cancels them at once.
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), stragglerTimeout)
	var sends sync.WaitGroup
	for _, m := range voters {
		if m.GetId() == n.cfg.NodeID {
			continue
		}
		sends.Add(1)
		go func() {
			defer sends.Done()
			acks <- ack{m.GetId(), p.sendPacks(sctx, m, open, tips)}
		}()
	}
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		select {
		case <-n.stop:
			cancel()
		case <-sctx.Done():
		case <-waitDone(&sends):
		}
		sends.Wait()
		cancel()
		open.close()
	}()
	have := 1 // this node: the packs are fsynced in its quarantine
	var failures []string
	// Keep the client informed (and its session alive) on long transfers.
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	for have < need && len(failures) <= total-need {
		select {
		case a := <-acks:
			if a.err != nil {
				failures = append(failures, fmt.Sprintf("%s: %v", a.id, status.Convert(a.err).Message()))
				continue
			}
			have++
		case <-ctx.Done():
			cancel()
			return fmt.Errorf("push cancelled while replicating (%d/%d nodes hold it); nothing was changed", have, total)
		case <-sctx.Done():
			failures = append(failures, "timed out")
			cancel()
			return fmt.Errorf("replicated to %d/%d nodes, but a majority (%d) must hold a push; nothing was changed (%s)", have, total, need, strings.Join(failures, "; "))
		case <-tick.C:
			progress(fmt.Sprintf("replicating: %d/%d nodes hold the push so far", have, total))
		}
	}
	if have < need {
		cancel()
		return fmt.Errorf("replicated to %d/%d nodes, but a majority (%d) must hold a push; nothing was changed (%s)", have, total, need, strings.Join(failures, "; "))
	}
	progress(fmt.Sprintf("replicated to %d/%d nodes", have, total))
	return nil
}

// stragglerTimeout bounds a push's sends to its peers, the slow ones that
// carry on after the commit included.
const stragglerTimeout = 10 * time.Minute

func waitDone(wg *sync.WaitGroup) <-chan struct{} {
	ch := make(chan struct{})
	go func() { wg.Wait(); close(ch) }()
	return ch
}

// openPack is one pack and its index, open for every peer's send.
type openPack struct {
	pack, idx         *os.File
	packSize, idxSize int64
}

type openPackSet []openPack

func openPacks(packs []packFiles) (openPackSet, error) {
	var out openPackSet
	for _, pf := range packs {
		var op openPack
		var err error
		if op.pack, op.packSize, err = openSized(pf.pack); err != nil {
			out.close()
			return nil, err
		}
		if op.idx, op.idxSize, err = openSized(pf.idx); err != nil {
			op.pack.Close()
			out.close()
			return nil, err
		}
		out = append(out, op)
	}
	return out, nil
}

func openSized(path string) (*os.File, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, fmt.Errorf("opening the pushed pack: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("opening the pushed pack: %w", err)
	}
	return f, st.Size(), nil
}

func (s openPackSet) close() {
	for _, op := range s {
		op.pack.Close()
		op.idx.Close()
	}
}

func (p *Push) sendPacks(ctx context.Context, m *fsmv1.Member, packs openPackSet, tips []string) error {
	if m.GetGrpcAddr() == "" {
		return errors.New("address unknown")
	}
	c, err := p.n.peers.node(m.GetGrpcAddr())
	if err != nil {
		return err
	}
	for i, op := range packs {
		var packTips []string
		if i == len(packs)-1 {
			packTips = tips // checked once every pack is in
		}
		if err := p.sendPack(ctx, c, op, packTips); err != nil {
			return err
		}
	}
	return nil
}

func (p *Push) sendPack(ctx context.Context, c nodev1.NodeServiceClient, op openPack, tips []string) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.PutPack(ctx)
	if err != nil {
		return err
	}
	if err := stream.Send(&nodev1.PutPackRequest{Msg: &nodev1.PutPackRequest_Header{Header: &nodev1.PutPackHeader{
		Repo: p.repo, RepoId: p.base.id, BaseVersion: p.base.version, PushId: p.id,
		PackSize: op.packSize, IdxSize: op.idxSize, Tips: tips,
	}}}); err != nil {
		_, err = stream.CloseAndRecv()
		return err
	}
	for _, f := range []struct {
		r    io.Reader
		wrap func([]byte) *nodev1.PutPackRequest
	}{
		{io.NewSectionReader(op.pack, 0, op.packSize), func(b []byte) *nodev1.PutPackRequest {
			return &nodev1.PutPackRequest{Msg: &nodev1.PutPackRequest_PackChunk{PackChunk: b}}
		}},
		{io.NewSectionReader(op.idx, 0, op.idxSize), func(b []byte) *nodev1.PutPackRequest {
			return &nodev1.PutPackRequest{Msg: &nodev1.PutPackRequest_IdxChunk{IdxChunk: b}}
		}},
	} {
		for {
			buf := make([]byte, 1<<20)
			k, rerr := io.ReadFull(f.r, buf)
			if k > 0 {
				if err := stream.Send(f.wrap(buf[:k])); err != nil {
					_, err = stream.CloseAndRecv()
					return err
				}
			}
			if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
				break
			}
			if rerr != nil {
				return rerr
			}
		}
	}
	_, err = stream.CloseAndRecv()
	return err
}

// Finish ends the push: with ok, git has set the refs and migrated the
// objects, and this node records the committed version; otherwise the
// reconciler brings the copy to whatever was committed. The write lock is
// released either way.
func (p *Push) Finish(ok bool) {
	p.done.Do(func() {
		n := p.n
		if ok && p.version > 0 {
			// git set the refs it was asked to; make the copy exactly the
			// committed state (HEAD may have moved, and git may have refused
			// a ref after the commit) before recording the version.
			t, found := n.git.target(p.repo)
			if found && t.version == p.version {
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				err := n.git.st.SetRefs(ctx, p.repo, t.refs, t.head)
				cancel()
				if err == nil {
					err = n.git.st.SetVersion(p.repo, t.id, t.version)
				}
				if err == nil {
					p.rs.version, p.rs.err = t.version, ""
				} else {
					n.log.Warn("recording the pushed version failed; the reconciler will catch up", "repo", p.repo, "err", err)
				}
			}
		}
		p.rs.mu.Unlock()
		n.git.poke()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := p.held.Release(ctx); err != nil {
			n.log.Warn("releasing the write lock failed; it expires with its lease", "repo", p.repo, "err", err)
		}
	})
}

// ----- git sessions between nodes -----

// GitSessionHandler serves a client session proxied from another node (the
// SSH front end provides it). It returns git's exit code.
type GitSessionHandler func(ctx context.Context, service, repo, user string, publicKey []byte, gitProtocol string, stdin io.Reader, stdout, stderr io.Writer) int

// SetGitSessionHandler installs the handler for proxied client sessions.
func (n *Node) SetGitSessionHandler(h GitSessionHandler) { n.gitSessions.Store(&h) }

func (s *nodeService) GitSession(stream nodev1.NodeService_GitSessionServer) error {
	n := s.n
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	st := first.GetStart()
	if st == nil {
		return status.Error(codes.InvalidArgument, "GitSession must start with a start message")
	}
	if n.git == nil {
		return status.Error(codes.FailedPrecondition, ErrNoGit.Error())
	}
	stdinR, stdinW := io.Pipe()
	go func() {
		for {
			m, err := stream.Recv()
			if err != nil {
				stdinW.CloseWithError(err)
				return
			}
			switch x := m.Msg.(type) {
			case *nodev1.GitSessionRequest_Stdin:
				if _, err := stdinW.Write(x.Stdin); err != nil {
					return
				}
			case *nodev1.GitSessionRequest_StdinEof:
				stdinW.Close()
			}
		}
	}()
	var sendMu sync.Mutex
	send := func(m *nodev1.GitSessionResponse) error {
		sendMu.Lock()
		defer sendMu.Unlock()
		return stream.Send(m)
	}
	stdout := writerFunc(func(b []byte) (int, error) {
		return len(b), send(&nodev1.GitSessionResponse{Msg: &nodev1.GitSessionResponse_Stdout{Stdout: append([]byte(nil), b...)}})
	})
	stderr := writerFunc(func(b []byte) (int, error) {
		return len(b), send(&nodev1.GitSessionResponse{Msg: &nodev1.GitSessionResponse_Stderr{Stderr: append([]byte(nil), b...)}})
	})
	ctx := stream.Context()
	var code int
	if st.GetUser() == "" {
		// Node-to-node catch-up: serve objects from this node's copy.
		if st.GetService() != "upload-pack" {
			return status.Error(codes.PermissionDenied, "nodes may only fetch from each other")
		}
		path, err := n.git.st.Path(st.GetRepo())
		if err != nil {
			return status.Error(codes.InvalidArgument, err.Error())
		}
		code = runGit(ctx, []string{"upload-pack", "--strict", path}, st.GetGitProtocol(), stdinR, stdout, stderr)
	} else {
		h := n.gitSessions.Load()
		if h == nil {
			return status.Error(codes.FailedPrecondition, "this node has no SSH front end to serve proxied sessions")
		}
		code = (*h)(ctx, st.GetService(), st.GetRepo(), st.GetUser(), st.GetPublicKey(), st.GetGitProtocol(), stdinR, stdout, stderr)
	}
	stdinR.Close()
	return send(&nodev1.GitSessionResponse{Msg: &nodev1.GitSessionResponse_ExitCode{ExitCode: int32(code)}})
}

func runGit(ctx context.Context, args []string, gitProtocol string, stdin io.Reader, stdout, stderr io.Writer) int {
	c := exec.CommandContext(ctx, "git", args...)
	c.Env = append(os.Environ(), "GIT_TERMINAL_PROMPT=0")
	if gitProtocol != "" {
		c.Env = append(c.Env, "GIT_PROTOCOL="+gitProtocol)
	}
	c.Stdin, c.Stdout, c.Stderr = stdin, stdout, stderr
	c.WaitDelay = 5 * time.Second
	if err := storage.RunNice(c); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) && ee.ExitCode() > 0 {
			return ee.ExitCode()
		}
		fmt.Fprintf(stderr, "gitraft: git %s: %v\n", args[0], err)
		return 1
	}
	return 0
}

// ProxyGit runs a client's session on the peer at addr and returns git's
// exit code there.
func (n *Node) ProxyGit(ctx context.Context, addr, service, repo, user string, publicKey []byte, gitProtocol string, stdin io.Reader, stdout, stderr io.Writer) (int, error) {
	c, err := n.peers.conn(addr)
	if err != nil {
		return 0, err
	}
	return gitSession(ctx, c, &nodev1.GitSessionStart{Service: service, Repo: repo, User: user, PublicKey: publicKey, GitProtocol: gitProtocol, Via: n.cfg.NodeID}, stdin, stdout, stderr)
}

func gitSession(ctx context.Context, c grpc.ClientConnInterface, start *nodev1.GitSessionStart, stdin io.Reader, stdout, stderr io.Writer) (int, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := nodev1.NewNodeServiceClient(c).GitSession(ctx)
	if err != nil {
		return 0, err
	}
	if err := stream.Send(&nodev1.GitSessionRequest{Msg: &nodev1.GitSessionRequest_Start{Start: start}}); err != nil {
		return 0, err
	}
	go func() {
		buf := make([]byte, 64<<10)
		for {
			k, err := stdin.Read(buf)
			if k > 0 {
				if stream.Send(&nodev1.GitSessionRequest{Msg: &nodev1.GitSessionRequest_Stdin{Stdin: append([]byte(nil), buf[:k]...)}}) != nil {
					return
				}
			}
			if err != nil {
				stream.Send(&nodev1.GitSessionRequest{Msg: &nodev1.GitSessionRequest_StdinEof{StdinEof: true}})
				return
			}
		}
	}()
	for {
		m, err := stream.Recv()
		if err != nil {
			return 0, err
		}
		switch x := m.Msg.(type) {
		case *nodev1.GitSessionResponse_Stdout:
			if _, err := stdout.Write(x.Stdout); err != nil {
				return 0, err
			}
		case *nodev1.GitSessionResponse_Stderr:
			stderr.Write(x.Stderr)
		case *nodev1.GitSessionResponse_ExitCode:
			return int(x.ExitCode), nil
		}
	}
}

// RunNodeGit is `gitraft node-git ADDR SERVICE REPO`: git's ext:: transport
// runs it to fetch from a peer, with the node's credentials in the
// environment. It returns the exit code.
func RunNodeGit(ctx context.Context, addr, service, repo string, tlsFiles TLSFiles, insecureMode bool, stdin io.Reader, stdout, stderr io.Writer) int {
	var creds credentials.TransportCredentials
	if insecureMode {
		creds = insecure.NewCredentials()
	} else {
		b, err := pki.Files{CA: tlsFiles.CAFile, Cert: tlsFiles.CertFile, Key: tlsFiles.KeyFile}.Load()
		if err != nil {
			fmt.Fprintln(stderr, "gitraft node-git:", err)
			return 1
		}
		creds = credentials.NewTLS(b.ClientConfig(""))
	}
	c, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		fmt.Fprintln(stderr, "gitraft node-git:", err)
		return 1
	}
	defer c.Close()
	code, err := gitSession(ctx, c, &nodev1.GitSessionStart{Service: strings.TrimPrefix(service, "git-"), Repo: repo}, stdin, stdout, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "gitraft node-git:", err)
		return 1
	}
	return code
}
