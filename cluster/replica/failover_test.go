package replica

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/gitraft/gitraft/gitproto"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

// The leader changes while the push commits: the first proposals fail as
// they do when no leader answers (Propose gave up waiting) or the leader
// went away mid-call; the holder tries again with the same entry and the
// push is acknowledged once the new leader takes it.
func Test_Push_CommitRetriesAgainstNewLeader(t *testing.T) {
	for _, fail := range []error{
		fmt.Errorf("%w: no leader could take the write (test)", ErrNoLeader),
		status.Error(codes.Unavailable, "connection refused (test)"),
	} {
		t.Run(status.Code(fail).String(), func(t *testing.T) {
			c := newFakeCluster(t, 3)
			var attempts atomic.Int32
			var ids []string
			c.s.beforePropose = func(_ context.Context, e *fsmv1.Entry) error {
				if e.GetUpdateRefs() == nil {
					return nil
				}
				ids = append(ids, e.GetRequestId())
				if attempts.Add(1) <= 2 {
					return fail
				}
				return nil
			}
			d := c.newPush("refs/heads/main")
			p := c.begin(context.Background(), 0)
			defer p.Finish(false)
			var said []string
			got, err := p.Commit(context.Background(), d.quarantine, []gitproto.RefUpdate{d.update}, false, func(s string) { said = append(said, s) })
			if err != nil {
				t.Fatalf("Commit: %v", err)
			}
			if len(got) != 1 || c.version() != 2 || c.s.proposals.Load() != 1 {
				t.Fatalf("committed %v, version %d after %d applied proposals; want the update once, at 2", got, c.version(), c.s.proposals.Load())
			}
			if attempts.Load() != 3 || ids[0] == "" || ids[0] != ids[1] || ids[1] != ids[2] {
				t.Fatalf("%d attempts with request ids %q; want 3 with one id", attempts.Load(), ids)
			}
			if !strings.Contains(strings.Join(said, "\n"), "trying again") {
				t.Errorf("the client was not told the commit is retried: %q", said)
			}
		})
	}
}

// The entry commits but its answer is lost (the leader died right after):
// the retry is answered with what was applied, so the push is reported
// committed, once, instead of failing on its own, now stale, old values.
func Test_Push_LostAnswerThenRetryReportsSuccessOnce(t *testing.T) {
	c := newFakeCluster(t, 3)
	var lost atomic.Bool
	c.s.afterApply = func(e *fsmv1.Entry) error {
		if e.GetUpdateRefs() != nil && lost.CompareAndSwap(false, true) {
			return status.Error(codes.Unavailable, "leader gone after the commit (test)")
		}
		return nil
	}
	d := c.newPush("refs/heads/main")
	p := c.begin(context.Background(), 0)
	defer p.Finish(false)
	got, err := p.Commit(context.Background(), d.quarantine, []gitproto.RefUpdate{d.update}, false, noProgress)
	if err != nil {
		t.Fatalf("Commit: %v", err)
	}
	if !lost.Load() {
		t.Fatal("the answer was never lost: the test did not test anything")
	}
	if len(got) != 1 || p.Version() != 2 || c.version() != 2 || c.s.proposals.Load() != 1 {
		t.Fatalf("committed %v, push version %d, state version %d, %d applied; want one commit at 2", got, p.Version(), c.version(), c.s.proposals.Load())
	}
}

// Retrying stops once the lock is lost: a holder never commits after its
// lease ran out.
func Test_Push_CommitStopsRetryingWhenLockLost(t *testing.T) {
	c := newFakeCluster(t, 3)
	d := c.newPush("refs/heads/main")
	p := c.begin(context.Background(), 0)
	defer p.Finish(false)
	var attempts atomic.Int32
	c.s.beforePropose = func(_ context.Context, e *fsmv1.Entry) error {
		if e.GetUpdateRefs() == nil {
			return nil
		}
		if attempts.Add(1) == 2 {
			p.lock.(*fakeLock).lose()
		}
		return fmt.Errorf("%w (test)", ErrNoLeader)
	}
	_, err := p.Commit(context.Background(), d.quarantine, []gitproto.RefUpdate{d.update}, false, noProgress)
	if err == nil || !strings.Contains(err.Error(), "lost the write lock") {
		t.Fatalf("Commit: %v; want the lock lost", err)
	}
	if c.s.proposals.Load() != 0 || c.version() != 1 {
		t.Fatal("a push committed after its lock was lost")
	}
	// A refusal is never retried: it is the answer.
	if n := attempts.Load(); n > 3 {
		t.Errorf("%d attempts after the lock was lost at the second", n)
	}
}

// A failure that is not about the leader (a bug, a refused entry) is not
// retried.
func Test_Push_CommitDoesNotRetryOtherErrors(t *testing.T) {
	c := newFakeCluster(t, 3)
	var attempts atomic.Int32
	c.s.beforePropose = func(_ context.Context, e *fsmv1.Entry) error {
		if e.GetUpdateRefs() == nil {
			return nil
		}
		attempts.Add(1)
		return errors.New("entry refused by the leader (test)")
	}
	d := c.newPush("refs/heads/main")
	p := c.begin(context.Background(), 0)
	defer p.Finish(false)
	if _, err := p.Commit(context.Background(), d.quarantine, []gitproto.RefUpdate{d.update}, false, noProgress); err == nil {
		t.Fatal("Commit succeeded")
	}
	if attempts.Load() != 1 {
		t.Fatalf("%d attempts, want 1", attempts.Load())
	}
}
