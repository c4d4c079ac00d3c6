package replica

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/gitraft/gitraft/storage"
)

// ErrReplaced says a repository was deleted, or deleted and created again,
// after the index a backup holds: its objects at that index may be gone.
var ErrReplaced = errors.New("repository replaced")

// ErrBehind says this node's copy did not reach the version a backup needs
// in the time it was given.
var ErrBehind = errors.New("copy behind")

// OpenForBackup opens the packs of this node's copy of a repository once it
// holds incarnation id at version or later. A copy that is behind catches
// up first (as a read does), for at most wait. A later version holds every
// object of an earlier one: packs are only ever added, and housekeeping
// prunes only unreachable objects after a grace period far longer than a
// backup. It returns the packs (close them with storage.ClosePacks) and
// the version the copy held when they were opened.
func (r *Replicas) OpenForBackup(ctx context.Context, name string, id, version uint64, wait time.Duration) ([]*storage.PackFile, uint64, error) {
	replaced := func() error {
		t, ok := r.node.Repo(name)
		if !ok || t.ID != id {
			return fmt.Errorf("%w: %q was deleted or created again after the backup's index; run the backup again", ErrReplaced, name)
		}
		return nil
	}
	if err := replaced(); err != nil {
		return nil, 0, err
	}
	c := r.copyOf(name)
	holds := func() bool { p := c.pos(); return p.id == id && p.version >= version }
	if !holds() {
		r.Poke()
		wctx, cancel := context.WithTimeout(ctx, wait)
		defer cancel()
		for !holds() {
			if err := replaced(); err != nil {
				return nil, 0, err
			}
			if err := c.guard.Lock(wctx); err == nil {
				if !holds() {
					r.catchUpLocked(wctx, c, name)
				}
				c.guard.Unlock()
			}
			if holds() {
				break
			}
			if ctx.Err() != nil {
				return nil, 0, ctx.Err()
			}
			if wctx.Err() != nil {
				p := c.pos()
				msg := c.errText()
				if msg == "" {
					msg = "still catching up"
				}
				return nil, 0, fmt.Errorf("%w: %s holds %q at version %d, the backup needs %d, and it did not catch up in %s (%s); run the backup against a node that is current",
					ErrBehind, r.node.ID(), name, p.version, version, wait, msg)
			}
			select {
			case <-wctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	packs, err := r.st.OpenPacks(ctx, name)
	if err != nil {
		return nil, 0, err
	}
	// A catch-up that replaced the copy meanwhile would have moved its
	// position to another incarnation.
	p := c.pos()
	if p.id != id || p.version < version {
		storage.ClosePacks(packs)
		if err := replaced(); err != nil {
			return nil, 0, err
		}
		return nil, 0, fmt.Errorf("%w: %s's copy of %q changed while its packs were opened; run the backup again", ErrBehind, r.node.ID(), name)
	}
	return packs, p.version, nil
}
