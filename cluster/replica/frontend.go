package replica

// What the SSH front end asks before a session: whose key, what access,
// where a read is served. Every answer comes after a read barrier; a node
// that cannot confirm it is current refuses (unless ServeStaleReads).

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strconv"
	"strings"
	"time"

	gossh "golang.org/x/crypto/ssh"

	"github.com/gitraft/gitraft/gitproto"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

// notCurrentError is a refusal wrapping gitproto.ErrNotCurrent whose
// message is the whole explanation.
type notCurrentError struct{ msg string }

func (e *notCurrentError) Error() string { return e.msg }
func (e *notCurrentError) Unwrap() error { return gitproto.ErrNotCurrent }

// readMode is what a read barrier found out about this node.
type readMode int

const (
	readCurrent     readMode = iota // applied what the leader had committed
	readLagging                     // a leader answered, but this node cannot apply that far in time
	readUnconfirmed                 // no leader answered: this node may be cut off
)

// freshRead runs a read barrier, but not for long (3 s).
func (r *Replicas) freshRead(ctx context.Context) (readMode, error) {
	bctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if _, err := r.node.ReadBarrier(bctx); err != nil {
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
func (r *Replicas) notCurrent(what string) error {
	var others []string
	for _, m := range r.node.Members() {
		if m.GetId() != r.node.ID() && m.GetSshAddr() != "" {
			others = append(others, fmt.Sprintf("%s (%s)", m.GetId(), m.GetSshAddr()))
		}
	}
	hint := ""
	if len(others) > 0 {
		hint = "; try another node: " + strings.Join(others, ", ")
	}
	return &notCurrentError{fmt.Sprintf("%s cannot reach the cluster's leader (no quorum from here), so it refuses to %s from a copy that may be stale%s", r.node.ID(), what, hint)}
}

// HostSigners returns the node's SSH host keys (Config.HostSigners).
func (r *Replicas) HostSigners(ctx context.Context) ([]gossh.Signer, error) {
	if r.cfg.HostSigners == nil {
		return nil, errors.New("no SSH host key configured")
	}
	return r.cfg.HostSigners(ctx)
}

// UserForKey says whose SSH key this is, from the current state.
//
// A node that cannot confirm it is current answers from what it has, with
// an error wrapping gitproto.ErrNotCurrent (unless ServeStaleReads): the
// front end then refuses the session with that message, instead of a bare
// "permission denied". A lagging node answers from what it has: its
// sessions are served by the leader, which checks the key again.
func (r *Replicas) UserForKey(ctx context.Context, key gossh.PublicKey) (string, error) {
	mode, err := r.freshRead(ctx)
	if err != nil {
		return "", err
	}
	fp := gossh.FingerprintSHA256(key)
	user := r.node.KeyOwner(fp)
	if user == "" {
		return "", fmt.Errorf("%w %s", gitproto.ErrUnknownKey, fp)
	}
	if mode == readUnconfirmed && !r.cfg.ServeStaleReads {
		return user, r.notCurrent("check keys")
	}
	return user, nil
}

// Access returns a user's access to a repository after a read barrier.
//
// A node that cannot confirm it is current refuses, unless
// ServeStaleReads. A lagging node judges from what it has applied; the
// session is then served by the leader, which judges again.
func (r *Replicas) Access(ctx context.Context, repo, user string) (gitproto.Access, error) {
	mode, err := r.freshRead(ctx)
	if err != nil {
		return gitproto.AccessNone, err
	}
	if mode == readUnconfirmed && !r.cfg.ServeStaleReads {
		return gitproto.AccessNone, r.notCurrent("check access")
	}
	a, found := r.node.Access(repo, user)
	if !found {
		return gitproto.AccessNone, fmt.Errorf("%w: %q", ErrRepoNotFound, repo)
	}
	switch a {
	case fsmv1.Access_ACCESS_READ:
		return gitproto.AccessRead, nil
	case fsmv1.Access_ACCESS_WRITE:
		return gitproto.AccessWrite, nil
	case fsmv1.Access_ACCESS_ADMIN:
		return gitproto.AccessAdmin, nil
	}
	return gitproto.AccessNone, nil
}

// Unreachable returns which of oids no ref of this node's copy reaches.
func (r *Replicas) Unreachable(ctx context.Context, repo string, oids []string) ([]string, error) {
	return r.st.Unreachable(ctx, repo, oids)
}

// PrepareRead makes a read of repo not stale: it names the local path once
// this node's copy is at the committed version, or the gRPC address of a
// current peer to proxy to when catching up takes too long.
func (r *Replicas) PrepareRead(ctx context.Context, repo string, progress func(string)) (gitproto.ReadPlan, error) {
	path, peer, err := r.prepareRead(ctx, repo, progress)
	return gitproto.ReadPlan{Path: path, Peer: peer}, err
}

func (r *Replicas) prepareRead(ctx context.Context, repo string, progress func(string)) (path, peer string, err error) {
	self := r.node.ID()
	mode, err := r.freshRead(ctx)
	if err != nil {
		return "", "", err
	}
	if mode == readUnconfirmed && !r.cfg.ServeStaleReads {
		return "", "", r.notCurrent("serve " + strconv.Quote(repo))
	}
	if mode == readLagging {
		id, addr := r.node.Leader()
		if addr == "" || id == self {
			return "", "", fmt.Errorf("%s is behind the Raft log and cannot catch up", self)
		}
		progress(fmt.Sprintf("%s is behind the Raft log; serving %q through the leader %s", self, repo, id))
		return "", addr, nil
	}
	t, ok := r.node.Repo(repo)
	if !ok {
		return "", "", fmt.Errorf("%w: %q", ErrRepoNotFound, repo)
	}
	path, err = r.st.Path(repo)
	if err != nil {
		return "", "", err
	}
	c := r.copyOf(repo)
	if mode == readUnconfirmed {
		v := c.pos().version
		if v == 0 {
			return "", "", fmt.Errorf("%w: no quorum, and %s has no copy of %q", ErrNoLeader, self, repo)
		}
		progress(fmt.Sprintf("warning: %s cannot reach the cluster's leader; serving its copy at version %d, which may be stale (git.serve_stale_reads is on)", self, v))
		return path, "", nil
	}
	// The copy holds the committed version: serve it. (Its position moves
	// only once the disk holds what it says, so a push or a catch-up at
	// work on it does not make it look current early.)
	if c.currentAt(t) {
		if r.refsAre(ctx, repo, t) {
			return path, "", nil
		}
		// The refs on disk are not the state's: a push just committed
		// ahead of this read, or an edit behind gitraft's back. Under the
		// guard it is plain which; a damaged copy heals there and then.
		r.checkRefs(ctx, c, repo)
		if c.currentAt(t) {
			return path, "", nil
		}
	}
	// Behind: a current peer serves the read at once, and this copy catches
	// up in the background.
	r.Poke()
	if peers := r.currentPeers(ctx, repo, t.Version); len(peers) > 0 {
		progress(fmt.Sprintf("%s is behind on %q (version %d committed); serving it through %s, which is current", self, repo, t.Version, peers[0].GetId()))
		return "", peers[0].GetGrpcAddr(), nil
	}
	// No peer is current either (a repository just created, or every copy
	// catching up): catch up here, for a while.
	progress(fmt.Sprintf("%s is behind on %q (version %d committed); catching up", self, repo, t.Version))
	cctx, cancel := context.WithTimeout(ctx, r.cfg.ReadCatchUp)
	defer cancel()
	for {
		if err := c.guard.Lock(cctx); err == nil {
			if !c.currentAt(t) {
				r.catchUpLocked(cctx, c, repo)
			}
			c.guard.Unlock()
		}
		if c.currentAt(t) {
			return path, "", nil
		}
		if ctx.Err() != nil {
			return "", "", ctx.Err()
		}
		if cctx.Err() != nil {
			break
		}
		select {
		case <-cctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
	if peers := r.currentPeers(ctx, repo, t.Version); len(peers) > 0 {
		progress(fmt.Sprintf("serving %q through %s, which is current", repo, peers[0].GetId()))
		return "", peers[0].GetGrpcAddr(), nil
	}
	return "", "", fmt.Errorf("%s cannot catch up on %q and no peer holds version %d", self, repo, t.Version)
}

// refsAre reports whether the copy's refs on disk are t's.
func (r *Replicas) refsAre(ctx context.Context, repo string, t Target) bool {
	disk, err := r.st.Refs(ctx, repo)
	return err == nil && maps.Equal(disk, t.Refs)
}

// checkRefs compares a copy's refs with the state under its guard (no push
// or catch-up is then between the two), and marks the copy damaged and
// heals it when they differ. It gives up quietly when the guard stays
// busy past the read's catch-up time.
func (r *Replicas) checkRefs(ctx context.Context, c *copyState, repo string) {
	gctx, cancel := context.WithTimeout(ctx, r.cfg.ReadCatchUp)
	defer cancel()
	if c.guard.Lock(gctx) != nil {
		return
	}
	defer c.guard.Unlock()
	t, ok := r.node.Repo(repo)
	if !ok || !c.currentAt(t) {
		return
	}
	disk, err := r.st.Refs(gctx, repo)
	if err != nil {
		return
	}
	diff := diffRefs(disk, t.Refs)
	if len(diff) == 0 {
		return
	}
	r.markDamaged(c, repo, diff)
	if err := r.catchUpLocked(gctx, c, repo); err != nil {
		r.log.Warn("healing a copy whose refs differ from the state failed; reads go to a current peer", "repo", repo, "err", err)
	}
}
