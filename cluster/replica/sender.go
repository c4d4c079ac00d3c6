package replica

// The node that takes a push, top to bottom: BeginPush (write lock, the
// lock's grant applied here, catch-up), then from git's pre-receive hook
// Commit (judge each command as git will, ship the quarantined pack to the
// voters, wait for a majority, compare-and-swap the refs through Raft in an
// entry that also releases the lock), then Finish (record the version;
// release the lock if no entry did). receiver.go is the other side.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/gitraft/gitraft/gitproto"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
	"github.com/gitraft/gitraft/storage"
)

// RefRulesGit is UpdateRefs.ref_rules for git's full ref-name rules and no
// directory/file conflicts between refs.
const RefRulesGit = 2

// Push is one push holding its repository's write lock on this node; it
// is the gitproto.PushTx of the push.
type Push struct {
	r       *Replicas
	repo    string
	user    string
	id      string
	path    string
	lock    Lock
	copy    *copyState
	base    Target
	version atomic.Uint64 // set by Commit (the hook's goroutine)
	// committed is the repository as the push's entry left it, and
	// changed the refs it changed, which git then sets.
	committed atomic.Pointer[Target]
	changed   atomic.Pointer[[]string]
	done      sync.Once
	// guardTaken is the copy guard's count once this push took it, or 0
	// when the push changed the copy itself (a catch-up) before git ran.
	guardTaken uint64
}

var (
	_ gitproto.PushTx      = (*Push)(nil)
	_ gitproto.ReadAheadTx = (*Push)(nil)
	_ gitproto.ReadAhead   = (*Replicas)(nil)
)

// PushCopy names the copy a push to repo would run in and marks it, so
// that git may read its refs while BeginPush waits for the write lock. It
// offers only a copy that is current by this node's state, which nothing
// is changing, of a repository whose lock nobody holds: otherwise the
// push would most likely find it changed (UnchangedSince).
func (r *Replicas) PushCopy(repo string) (path string, mark uint64, ok bool) {
	t, found := r.node.Repo(repo)
	if !found || r.node.Locked(repo) {
		return "", 0, false
	}
	c := r.copyOf(repo)
	mark, free := c.guard.mark()
	if !free || !c.currentAt(t) {
		return "", 0, false
	}
	path, err := r.st.Path(repo)
	if err != nil {
		return "", 0, false
	}
	return path, mark, true
}

// UnchangedSince says whether nothing changed the push's copy since
// PushCopy gave mark: nobody took its guard in between, and the push did
// not catch it up. What git read from it then is the push's base.
func (p *Push) UnchangedSince(mark uint64) bool { return p.guardTaken == mark+1 }

// ----- 1. lock and catch-up -----

// BeginPush takes the repository's write lock for this node and brings the
// local copy to the committed version, so git advertises the true refs. A
// node that should not take the push returns a *gitproto.Redirect.
func (r *Replicas) BeginPush(ctx context.Context, repo, user, pushID string, progress func(string)) (gitproto.PushTx, error) {
	p, err := r.beginPush(ctx, repo, user, pushID, progress)
	if err != nil {
		return nil, err
	}
	return p, nil
}

func (r *Replicas) beginPush(ctx context.Context, repo, user, pushID string, progress func(string)) (*Push, error) {
	self := r.node.ID()
	if free, err := r.st.FreeBytes(); err == nil && free < r.cfg.MinFreeBytes {
		return nil, r.pushPeer(ctx, repo, fmt.Sprintf("%s has only %d MB free on its data disk", self, free>>20))
	}
	progress(fmt.Sprintf("%s took the push", self))
	waited := false
	lock, err := r.node.Lock(ctx, repo, self+"/"+pushID, func(holder string) {
		waited = true
		progress(fmt.Sprintf("waiting for the write lock on %q, held by %s", repo, holder))
	})
	switch {
	case errors.Is(err, ErrRepoNotFound):
		return nil, fmt.Errorf("%w: %q", ErrRepoNotFound, repo)
	case errors.Is(err, ErrNoLeader):
		return nil, fmt.Errorf("the cluster has lost its quorum (no leader): %v", err)
	case err != nil:
		return nil, fmt.Errorf("write lock: %w", err)
	}
	if waited {
		progress("got the write lock")
	}
	p := &Push{r: r, repo: repo, user: user, id: pushID, lock: lock, copy: r.copyOf(repo)}
	release := func() {
		rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		lock.Release(rctx)
		cancel()
	}
	// The copy's guard: no catch-up changes the copy while git works in it.
	if err := p.copy.guard.Lock(ctx); err != nil {
		release()
		return nil, fmt.Errorf("push cancelled while waiting for the copy of %q: %w", repo, err)
	}
	fail := func(err error) (*Push, error) {
		p.copy.guard.Unlock()
		release()
		return nil, err
	}
	// The lock was granted at the index that is its fencing token. Every
	// earlier change to the repository came before it (each held the lock
	// first), and none can come after while we hold it; the grant itself
	// changes no ref. So once this node has applied the index before the
	// grant, its state has the repository exactly as the grant found it:
	// that is the read barrier a push needs, without asking the leader. It
	// is there as a rule by the time the grant returns (the entry that
	// carried the grant to this node also carried the commit of what came
	// before), whereas the grant itself reaches a follower's state only
	// with the leader's next message (up to 2x raft.commit_timeout later).
	bctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	err = r.node.WaitApplied(bctx, lock.Token()-1)
	cancel()
	if errors.Is(err, ErrNoLeader) {
		return fail(fmt.Errorf("the cluster has lost its quorum (no leader): %v", err))
	}
	if err != nil {
		return fail(r.leaderPeer(self + " is behind the Raft log"))
	}
	t, ok := r.node.Repo(repo)
	if !ok {
		return fail(fmt.Errorf("%w: %q", ErrRepoNotFound, repo))
	}
	if !p.copy.currentAt(t) && r.st.Pruning(repo) {
		// Catching up would wait for the prune: a current peer takes it.
		return fail(r.pushPeer(ctx, repo, fmt.Sprintf("%s is behind on %q while housekeeping prunes its copy", self, repo)))
	}
	if p.copy.currentAt(t) {
		p.guardTaken = p.copy.guard.held()
	} else {
		progress(fmt.Sprintf("%s is behind on %q; catching up to version %d first", self, repo, t.Version))
		if err := r.catchUpLocked(ctx, p.copy, repo); err != nil {
			return fail(r.pushPeer(ctx, repo, fmt.Sprintf("%s could not catch up (%v)", self, err)))
		}
	}
	p.base = t
	if p.path, err = r.st.Path(repo); err != nil {
		return fail(err)
	}
	// This node holds the write lock and the copy's guard: a ref lock file
	// now is a leftover of a killed git, and would make git refuse refs
	// that are about to be committed.
	if k, err := r.st.RemoveStaleLocks(repo); err != nil {
		return fail(err)
	} else if k > 0 {
		r.log.Warn("removed lock files an interrupted git left behind", "repo", repo, "count", k)
	}
	return p, nil
}

// pushPeer picks a current peer to hand a push to.
func (r *Replicas) pushPeer(ctx context.Context, repo, reason string) error {
	t, ok := r.node.Repo(repo)
	if !ok {
		return fmt.Errorf("%w: %q", ErrRepoNotFound, repo)
	}
	for _, m := range r.currentPeers(ctx, repo, t.Version) {
		return &gitproto.Redirect{PeerID: m.GetId(), Peer: m.GetGrpcAddr(), Reason: reason}
	}
	return r.leaderPeer(reason)
}

// leaderPeer returns the leader as a redirect target, when it is not us.
func (r *Replicas) leaderPeer(reason string) error {
	id, addr := r.node.Leader()
	if addr == "" || id == r.node.ID() {
		return fmt.Errorf("%s, and no other node is known to take over", reason)
	}
	return &gitproto.Redirect{PeerID: id, Peer: addr, Reason: reason}
}

// Path is the local bare repository.
func (p *Push) Path() string { return p.path }

// Version is the version the push committed, 0 before.
func (p *Push) Version() uint64 { return p.version.Load() }

// ----- 2. judge -----

// Verdict says what becomes of one ref change of a push: Accepted, or the
// reason git refuses it (git reports it to the client itself).
type Verdict struct {
	gitproto.RefUpdate
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
func (p *Push) Judge(ctx context.Context, quarantine string, updates []gitproto.RefUpdate) ([]Verdict, error) {
	out := make([]Verdict, len(updates))
	seen := map[string]bool{}
	var tips []string
	for i, u := range updates {
		out[i] = Verdict{RefUpdate: u, Accepted: true}
		if seen[u.Ref] {
			return nil, fmt.Errorf("ref %s is named twice in one push", u.Ref)
		}
		seen[u.Ref] = true
		switch {
		case storage.ValidateGitRefName(u.Ref) != nil:
			out[i].Accepted, out[i].Reason = false, "funny refname"
		case u.New == "" && u.Old != "" && p.base.Refs[u.Ref] == "":
			// git deletes a ref that is not there as a no-op and says ok;
			// there is nothing to commit.
			out[i].Accepted, out[i].Reason = false, ""
		case p.base.Refs[u.Ref] != u.Old:
			out[i].Accepted, out[i].Reason = false, "failed to update ref (stale old value)"
		case u.New != "":
			tips = append(tips, u.New)
		}
	}
	if len(tips) > 0 {
		missing, err := p.r.st.MissingInQuarantine(ctx, p.repo, quarantine, tips)
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
	final := maps.Clone(p.base.Refs)
	if final == nil {
		final = map[string]string{}
	}
	var created []string
	for _, v := range out {
		if !v.Accepted {
			continue
		}
		if v.New == "" {
			delete(final, v.Ref)
			continue
		}
		final[v.Ref] = v.New
		if v.Old == "" {
			created = append(created, v.Ref)
		}
	}
	if err := storage.RefConflicts(final, created); err != nil {
		return nil, err
	}
	return out, nil
}

// ----- 3. ship, majority, compare-and-swap -----

// Commit judges the push's commands (Judge), ships the quarantined pack to
// the peers, waits until a majority of voters (this node included) holds
// it durably, then commits the accepted ref changes with the write lock's
// fencing token, as one atomic entry. With atomic (the client asked for
// --atomic), one refused ref refuses the push. It returns the changes it
// committed; none, and no error, when git refuses every one itself.
func (p *Push) Commit(ctx context.Context, quarantine string, updates []gitproto.RefUpdate, atomic bool, progress func(string)) ([]gitproto.RefUpdate, error) {
	verdicts, err := p.Judge(ctx, quarantine, updates)
	if err != nil {
		return nil, err
	}
	return p.commit(ctx, quarantine, verdicts, atomic, progress)
}

func (p *Push) commit(ctx context.Context, quarantine string, verdicts []Verdict, atomic bool, progress func(string)) ([]gitproto.RefUpdate, error) {
	select {
	case <-p.lock.Lost():
		return nil, fmt.Errorf("lost the write lock (%v); nothing was changed", p.lock.Err())
	default:
	}
	var changes []gitproto.RefUpdate
	var refused []string
	for _, v := range verdicts {
		if v.Accepted {
			changes = append(changes, v.RefUpdate)
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
	if len(changes) == 0 {
		return nil, nil
	}
	var tips []string
	for _, c := range changes {
		if c.New != "" && c.New != c.Old {
			tips = append(tips, c.New)
		}
	}
	packs, err := quarantinePacks(quarantine)
	if err != nil {
		return nil, err
	}
	voters, err := p.r.node.Voters()
	if err != nil {
		return nil, err
	}
	need := len(voters)/2 + 1
	if len(packs) == 0 {
		// No new objects: every new value must already be on a majority
		// (not merely in this node's object store, which may hold the
		// leftovers of a push that failed).
		if err := p.r.ObjectsOnQuorum(ctx, p.repo, tips); err != nil {
			return nil, fmt.Errorf("%v; nothing was changed", status.Convert(err).Message())
		}
	} else if err := p.replicate(ctx, packs, voters, need, tips, progress); err != nil {
		return nil, err
	}
	// The majority holds the objects; the lock may still have been lost
	// meanwhile (the entry's fencing token would be refused anyway, but the
	// pusher learns why sooner).
	select {
	case <-p.lock.Lost():
		return nil, fmt.Errorf("lost the write lock while replicating (%v); nothing was changed", p.lock.Err())
	default:
	}
	// The lock goes with the entry: the push needs it for nothing after
	// the compare-and-swap (this node's copy is guarded until Finish), and
	// a release of its own would cost a Raft round trip more. Only when
	// every member applies such entries; otherwise Finish releases it.
	withRelease := p.r.node.ReleaseWithRefs()
	u := &fsmv1.UpdateRefs{Repo: p.repo, FencingToken: p.lock.Token(), Atomic: true, PushId: p.id, RefRules: RefRulesGit, ReleaseLock: withRelease}
	for _, c := range changes {
		u.Updates = append(u.Updates, &fsmv1.RefUpdate{Ref: c.Ref, OldOid: c.Old, NewOid: c.New})
	}
	// The request id makes the entry idempotent: a retry after a lost
	// answer is answered with the first result, never applied twice.
	e := &fsmv1.Entry{RequestId: fmt.Sprintf("push/%s/%s/%d", p.r.node.ID(), p.id, u.FencingToken), Command: &fsmv1.Entry_UpdateRefs{UpdateRefs: u}}
	res, err := p.proposeCommit(ctx, e, progress)
	if err != nil {
		return nil, err
	}
	if withRelease {
		// Applied: the entry released the lock, or its token was no
		// longer good (then the lock was not this push's any more).
		p.lock.MarkReleased()
	}
	if rf := res.GetRefusal(); rf != nil {
		switch rf.GetReason() {
		case fsmv1.Reason_REASON_STALE_TOKEN, fsmv1.Reason_REASON_LEASE_EXPIRED, fsmv1.Reason_REASON_LOCK_NOT_HELD:
			return nil, fmt.Errorf("lost the write lock before committing (%s); nothing was changed", rf.GetMessage())
		}
		return nil, fmt.Errorf("refused: %s; nothing was changed", rf.GetMessage())
	}
	v := res.GetRepo().GetVersion()
	// What the entry made of the repository: the base plus the changes
	// (atomic, so all of them). Finish records it without waiting for this
	// node to apply the entry (a follower learns of the commit only with
	// the leader's next message).
	after := maps.Clone(p.base.Refs)
	if after == nil {
		after = map[string]string{}
	}
	refs := make([]string, 0, len(changes))
	for _, c := range changes {
		refs = append(refs, c.Ref)
		if c.New == "" {
			delete(after, c.Ref)
		} else {
			after[c.Ref] = c.New
		}
	}
	p.committed.Store(&Target{Name: p.repo, ID: res.GetRepo().GetId(), Version: v, Refs: after, Head: res.GetRepo().GetHead()})
	p.changed.Store(&refs)
	p.version.Store(v)
	progress(fmt.Sprintf("committed version %d of %s (raft index %d)", v, p.repo, res.GetIndex()))
	return changes, nil
}

// proposeCommit proposes the push's ref change, trying again across a
// leader change (no leader, the leader gone or stepping down while the
// entry was in flight) for as long as this node holds the write lock and
// the client waits: the same entry, same request id and fencing token, so
// that an entry that committed but whose answer was lost is answered with
// what was applied. Once the lock is lost it stops; any entry still in
// flight carries a token the state machine then refuses.
func (p *Push) proposeCommit(ctx context.Context, e *fsmv1.Entry, progress func(string)) (*fsmv1.Result, error) {
	backoff := 50 * time.Millisecond
	told := false
	for {
		res, err := p.r.node.Propose(ctx, e)
		if err == nil {
			return res, nil
		}
		if !retryCommit(err) || ctx.Err() != nil {
			if errors.Is(err, ErrNoLeader) {
				return nil, fmt.Errorf("the cluster lost its quorum before the push was committed; nothing was changed: %v", err)
			}
			return nil, fmt.Errorf("committing the push failed; it may or may not have been applied: %v", err)
		}
		if !told {
			told = true
			progress(fmt.Sprintf("committing: %v; trying again while this node holds the write lock", err))
			p.r.log.Warn("committing a push failed; trying again", "repo", p.repo, "push_id", p.id, "token", p.lock.Token(), "err", err)
		}
		t := time.NewTimer(backoff/2 + time.Duration(rand.Int64N(int64(backoff/2)+1)))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("push cancelled while committing; it may or may not have been applied: %v", err)
		case <-p.lock.Lost():
			t.Stop()
			// An attempt may still be in flight: if it committed, it did so
			// while the lock was ours; ask once more, and the request id
			// gives its result.
			res, err2 := p.r.node.Propose(ctx, e)
			if err2 == nil {
				return res, nil
			}
			return nil, fmt.Errorf("lost the write lock (%v) while committing (%v; then %v); the push may or may not have been applied", p.lock.Err(), err, err2)
		case <-t.C:
		}
		backoff = min(2*backoff, 500*time.Millisecond)
	}
}

// retryCommit says whether a failed proposal may be tried again: the
// cluster had no leader or lost it, which says nothing about the entry.
func retryCommit(err error) bool {
	if errors.Is(err, ErrNoLeader) {
		return true
	}
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded:
		return true
	}
	return false
}

type packFiles struct{ pack, idx string }

// quarantinePacks lists the packs git received into quarantine
// (syncPacks makes them durable).
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
		out = append(out, packFiles{pack: m, idx: idx})
	}
	return out, nil
}

// syncPacks makes the quarantined packs durable on this node: the files
// (git fsyncs them too, with core.fsync) and the directory that names
// them (which git does not).
func syncPacks(packs []packFiles) error {
	for _, pf := range packs {
		for _, f := range []string{pf.pack, pf.idx} {
			if err := fsyncFile(f); err != nil {
				return fmt.Errorf("fsync %s: %w", filepath.Base(f), err)
			}
		}
	}
	if len(packs) > 0 {
		if err := fsyncFile(filepath.Dir(packs[0].pack)); err != nil {
			return fmt.Errorf("fsync the quarantine: %w", err)
		}
	}
	return nil
}

func fsyncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// replicate sends the packs to every other voter and returns once need
// voters (this one included, once syncPacks is done) hold them durably,
// with every tip connected.
//
// The pack files are opened here, once: git migrates and removes the
// quarantine as soon as the hook returns, and the open files stay readable.
// Sends to peers that are slower than the majority carry on after the push
// is committed (so those peers need not fetch it later), bounded by
// StragglerTimeout and the node's life, and close the files when the last
// one ends.
func (p *Push) replicate(ctx context.Context, packs []packFiles, voters []*fsmv1.Member, need int, tips []string, progress func(string)) error {
	r := p.r
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
	// The sends outlive this call only up to StragglerTimeout; a push that
	// fails cancels them at once.
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.cfg.StragglerTimeout)
	var sends sync.WaitGroup
	localPending := false // this node's own fsyncs not yet done
	for _, m := range voters {
		sends.Add(1)
		if m.GetId() == r.node.ID() {
			localPending = true
			// This node holds them once they are durable in its
			// quarantine; its fsyncs run beside the sends.
			go func() {
				defer sends.Done()
				acks <- ack{m.GetId(), syncPacks(packs)}
			}()
			continue
		}
		go func() {
			defer sends.Done()
			acks <- ack{m.GetId(), p.sendPacks(sctx, m, open, tips)}
		}()
	}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		select {
		case <-r.stop:
			cancel()
		case <-sctx.Done():
		case <-waitDone(&sends):
		}
		sends.Wait()
		cancel()
		open.close()
	}()
	have := 0
	var failures []string
	// Keep the client informed (and its session alive) on long transfers.
	tick := time.NewTicker(10 * time.Second)
	defer tick.Stop()
	// Once too many have failed there is no majority; this node's own
	// fsyncs are waited for all the same (they are quick), so the pusher
	// is told how many hold the push.
	for have < need && (len(failures) <= total-need || localPending) {
		select {
		case a := <-acks:
			if a.id == r.node.ID() {
				localPending = false
			}
			if a.err != nil {
				failures = append(failures, fmt.Sprintf("%s: %v", a.id, status.Convert(a.err).Message()))
				continue
			}
			have++
		case <-ctx.Done():
			cancel()
			return fmt.Errorf("push cancelled while replicating (%d/%d nodes hold it); nothing was changed", have, total)
		case <-p.lock.Lost():
			cancel()
			return fmt.Errorf("lost the write lock while replicating (%v; %d/%d nodes hold it); nothing was changed", p.lock.Err(), have, total)
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
	c, err := p.r.client(m.GetGrpcAddr())
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

func (p *Push) sendPack(ctx context.Context, c replicav1.ReplicaServiceClient, op openPack, tips []string) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.PutPack(ctx)
	if err != nil {
		return err
	}
	if err := stream.Send(&replicav1.PutPackRequest{Msg: &replicav1.PutPackRequest_Header{Header: &replicav1.PutPackHeader{
		Repo: p.repo, RepoId: p.base.ID, BaseVersion: p.base.Version, PushId: p.id,
		PackSize: op.packSize, IdxSize: op.idxSize, Tips: tips,
	}}}); err != nil {
		_, err = stream.CloseAndRecv()
		return err
	}
	for _, f := range []struct {
		r    io.Reader
		wrap func([]byte) *replicav1.PutPackRequest
	}{
		{io.NewSectionReader(op.pack, 0, op.packSize), func(b []byte) *replicav1.PutPackRequest {
			return &replicav1.PutPackRequest{Msg: &replicav1.PutPackRequest_PackChunk{PackChunk: b}}
		}},
		{io.NewSectionReader(op.idx, 0, op.idxSize), func(b []byte) *replicav1.PutPackRequest {
			return &replicav1.PutPackRequest{Msg: &replicav1.PutPackRequest_IdxChunk{IdxChunk: b}}
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

// ----- 4. finish -----

// Finish ends the push: with ok, git has set the refs and migrated the
// objects, and this node records the committed version; otherwise the
// reconciler brings the copy to whatever was committed. The write lock is
// released either way: by the commit's own entry, or here.
func (p *Push) Finish(ok bool) {
	p.done.Do(func() {
		r := p.r
		if t := p.committed.Load(); ok && t != nil {
			// git set the refs it was asked to; make the copy exactly the
			// committed state (HEAD may have moved, and git may have refused
			// a ref after the commit) before recording the version. That
			// state is the commit's result, so a follower need not wait to
			// apply the entry first.
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			err := r.st.SetRefs(ctx, p.repo, t.Refs, t.Head)
			cancel()
			if changed := p.changed.Load(); err == nil && changed != nil {
				// The refs git set must outlive a crash that the version
				// recorded next does.
				err = r.st.SyncRefs(p.repo, *changed)
			}
			if err == nil {
				err = r.st.SetVersion(p.repo, t.ID, t.Version)
			}
			if err == nil {
				p.copy.reached(t.ID, t.Version)
			} else {
				r.log.Warn("recording the pushed version failed; the reconciler will catch up", "repo", p.repo, "err", err)
			}
		}
		p.copy.guard.Unlock()
		r.Poke()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := p.lock.Release(ctx); err != nil {
			r.log.Warn("releasing the write lock failed; it expires with its lease", "repo", p.repo, "err", err)
		}
	})
}
