package replica

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/gitraft/gitraft/gitproto"
)

// begin takes the push on node i.
func (c *fakeCluster) begin(ctx context.Context, i int) *Push {
	c.t.Helper()
	p, err := c.nodes[i].r.beginPush(ctx, c.repo, "alice", "push1", noProgress)
	if err != nil {
		c.t.Fatalf("BeginPush: %v", err)
	}
	return p
}

// The whole pipeline: the pack reaches every peer, the ref change is
// committed with the lock's token, the taking node records the version,
// and the lock and the copy's guard are free again.
func Test_Push_CommitsOnMajority(t *testing.T) {
	c := newFakeCluster(t, 3)
	d := c.newPush("refs/heads/main")
	p := c.begin(context.Background(), 0)
	lock := p.lock.(*fakeLock)
	got, err := p.Commit(context.Background(), d.quarantine, []gitproto.RefUpdate{d.update}, false, noProgress)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0] != d.update || p.Version() != 2 || c.version() != 2 {
		t.Fatalf("committed %v at version %d (state %d), want the update at 2", got, p.Version(), c.version())
	}
	// A majority held the pack before the commit; the straggler finishes
	// its send afterwards.
	waitFor(t, "every peer to hold the push", func() bool { return c.holds(1, d.update.New) && c.holds(2, d.update.New) })
	c.migrate(0, d)
	p.Finish(true)
	if at := p.copy.pos(); at.version != 2 {
		t.Errorf("the taking node's copy is at %d, want 2", at.version)
	}
	if !lock.releasedByEntry.Load() || !lock.marked.Load() {
		t.Errorf("the write lock was not released with the ref change (by the entry %v, marked %v)", lock.releasedByEntry.Load(), lock.marked.Load())
	}
	if !p.copy.guard.TryLock() {
		t.Fatal("the copy's guard is still held after Finish")
	}
	p.copy.guard.Unlock()
}

// One of two peers refuses the pack: the other and the taking node are a
// majority, so the push commits. Both refuse: nothing is committed, and the
// client is told how far it got.
func Test_Push_PeerRefuses(t *testing.T) {
	refuse := func(context.Context) error { return status.Error(codes.ResourceExhausted, "disk full (test)") }
	t.Run("one", func(t *testing.T) {
		c := newFakeCluster(t, 3)
		c.onPutPack(1, refuse)
		d := c.newPush("refs/heads/main")
		p := c.begin(context.Background(), 0)
		defer p.Finish(false)
		if _, err := p.Commit(context.Background(), d.quarantine, []gitproto.RefUpdate{d.update}, false, noProgress); err != nil {
			t.Fatal(err)
		}
		if c.version() != 2 || !c.holds(2, d.update.New) {
			t.Fatalf("version %d; peer n3 holds it: %v", c.version(), c.holds(2, d.update.New))
		}
	})
	t.Run("both", func(t *testing.T) {
		c := newFakeCluster(t, 3)
		c.onPutPack(1, refuse)
		c.onPutPack(2, refuse)
		d := c.newPush("refs/heads/main")
		p := c.begin(context.Background(), 0)
		lock := p.lock.(*fakeLock)
		_, err := p.Commit(context.Background(), d.quarantine, []gitproto.RefUpdate{d.update}, false, noProgress)
		if err == nil || !strings.Contains(err.Error(), "replicated to 1/3 nodes") || !strings.Contains(err.Error(), "disk full") {
			t.Fatalf("Commit: %v, want a refusal naming 1/3 and the peers' reason", err)
		}
		p.Finish(false)
		if c.version() != 1 || c.s.proposals.Load() != 0 {
			t.Fatalf("version %d after %d proposals; nothing should be committed", c.version(), c.s.proposals.Load())
		}
		if !lock.released.Load() {
			t.Error("the write lock was not released")
		}
	})
}

// A slow peer does not hold the push up: the commit comes once a majority
// holds the pack, and the slow send carries on.
func Test_Push_PeerSlow(t *testing.T) {
	c := newFakeCluster(t, 3)
	release := make(chan struct{})
	c.onPutPack(2, func(ctx context.Context) error {
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	d := c.newPush("refs/heads/main")
	p := c.begin(context.Background(), 0)
	done := make(chan error, 1)
	go func() {
		_, err := p.Commit(context.Background(), d.quarantine, []gitproto.RefUpdate{d.update}, false, noProgress)
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the push waited for the slow peer")
	}
	c.migrate(0, d)
	p.Finish(true)
	close(release)
	waitFor(t, "the slow peer to get the pack after the commit", func() bool { return c.holds(2, d.update.New) })
}

// Compare-and-swap: a ref that moved since the push began is refused by
// Judge (git refuses it too), whole with --atomic; a fencing token the
// state no longer honours is refused by the state, and nothing changes.
func Test_Push_StaleCAS(t *testing.T) {
	t.Run("stale old value", func(t *testing.T) {
		c := newFakeCluster(t, 3)
		d := c.newPush("refs/heads/main")
		p := c.begin(context.Background(), 0)
		defer p.Finish(false)
		stale := d.update
		stale.Old = strings.Repeat("1", 40) // the client saw another value
		v, err := p.Judge(context.Background(), d.quarantine, []gitproto.RefUpdate{stale})
		if err != nil || v[0].Accepted || !strings.Contains(v[0].Reason, "stale") {
			t.Fatalf("Judge: %+v, %v; want refused as stale", v, err)
		}
		if _, err := p.Commit(context.Background(), d.quarantine, []gitproto.RefUpdate{stale}, true, noProgress); err == nil || !strings.Contains(err.Error(), "atomic push refused") {
			t.Fatalf("atomic Commit: %v", err)
		}
		got, err := p.Commit(context.Background(), d.quarantine, []gitproto.RefUpdate{stale}, false, noProgress)
		if err != nil || len(got) != 0 || c.s.proposals.Load() != 0 {
			t.Fatalf("Commit: %v, %v, %d proposals; want nothing committed", got, err, c.s.proposals.Load())
		}
	})
	t.Run("stale token", func(t *testing.T) {
		c := newFakeCluster(t, 3)
		d := c.newPush("refs/heads/main")
		p := c.begin(context.Background(), 0)
		defer p.Finish(false)
		// Another holder got the lock meanwhile (this one's lease ran out
		// where its holder could not see it).
		c.s.mu.Lock()
		c.s.index++
		c.s.lock = &fakeLock{s: c.s, token: c.s.index, lost: make(chan struct{})}
		c.s.mu.Unlock()
		_, err := p.Commit(context.Background(), d.quarantine, []gitproto.RefUpdate{d.update}, false, noProgress)
		if err == nil || !strings.Contains(err.Error(), "lost the write lock before committing") {
			t.Fatalf("Commit: %v", err)
		}
		if c.version() != 1 {
			t.Fatalf("version %d, want 1", c.version())
		}
	})
}

// The lock is lost while the pack is on its way: the push stops at once,
// proposes nothing, and says so.
func Test_Push_LockLostMidPush(t *testing.T) {
	c := newFakeCluster(t, 3)
	arrived := make(chan struct{}, 2)
	hold := func(ctx context.Context) error {
		arrived <- struct{}{}
		<-ctx.Done()
		return ctx.Err()
	}
	c.onPutPack(1, hold)
	c.onPutPack(2, hold)
	d := c.newPush("refs/heads/main")
	p := c.begin(context.Background(), 0)
	defer p.Finish(false)
	go func() {
		<-arrived
		p.lock.(*fakeLock).lose()
	}()
	_, err := p.Commit(context.Background(), d.quarantine, []gitproto.RefUpdate{d.update}, false, noProgress)
	if err == nil || !strings.Contains(err.Error(), "lost the write lock while replicating") {
		t.Fatalf("Commit: %v", err)
	}
	if c.s.proposals.Load() != 0 {
		t.Fatal("a push that lost its lock proposed its change")
	}
}

// The holder dies before the majority (its context ends while the peers
// are slow): nothing is committed, the lock is released and the copy is
// free for the next writer.
func Test_Push_HolderDiesBeforeMajority(t *testing.T) {
	c := newFakeCluster(t, 3)
	arrived := make(chan struct{}, 2)
	hold := func(ctx context.Context) error {
		arrived <- struct{}{}
		<-ctx.Done()
		return ctx.Err()
	}
	c.onPutPack(1, hold)
	c.onPutPack(2, hold)
	d := c.newPush("refs/heads/main")
	ctx, cancel := context.WithCancel(context.Background())
	p := c.begin(ctx, 0)
	go func() {
		<-arrived
		cancel()
	}()
	_, err := p.Commit(ctx, d.quarantine, []gitproto.RefUpdate{d.update}, false, noProgress)
	if err == nil || !strings.Contains(err.Error(), "push cancelled while replicating") {
		t.Fatalf("Commit: %v", err)
	}
	p.Finish(false)
	if c.s.proposals.Load() != 0 || c.version() != 1 {
		t.Fatal("a cancelled push committed")
	}
	// The next push takes the lock and the copy at once.
	bctx, bcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer bcancel()
	next := c.begin(bctx, 0)
	next.Finish(false)
}

// The holder dies after the majority: the change is committed and a
// majority holds its objects, so the peers reach the new version from their
// own disks, without the holder.
func Test_Push_HolderDiesAfterMajority(t *testing.T) {
	c := newFakeCluster(t, 3)
	d := c.newPush("refs/heads/main")
	ctx, cancel := context.WithCancel(context.Background())
	p := c.begin(ctx, 0)
	if _, err := p.Commit(ctx, d.quarantine, []gitproto.RefUpdate{d.update}, false, noProgress); err != nil {
		t.Fatal(err)
	}
	cancel() // the holder is gone: git never migrates, Finish never runs
	for _, i := range []int{1, 2} {
		waitFor(t, "the peer to hold the push", func() bool { return c.holds(i, d.update.New) })
		n := c.nodes[i]
		cp := n.r.copyOf(c.repo)
		if err := cp.guard.Lock(context.Background()); err != nil {
			t.Fatal(err)
		}
		err := n.r.catchUpLocked(context.Background(), cp, c.repo)
		cp.guard.Unlock()
		if err != nil {
			t.Fatalf("%s catching up without the holder: %v", n.id, err)
		}
		refs, _ := n.store.Refs(context.Background(), c.repo)
		if refs["refs/heads/main"] != d.update.New || cp.pos().version != 2 {
			t.Fatalf("%s: refs %v at version %d", n.id, refs, cp.pos().version)
		}
	}
}

// The client vanishes: a push that has not reached its commit stops on its
// context, and a push waiting for a busy copy gives up with its context
// instead of waiting for the other push.
func Test_Push_ClientVanishes(t *testing.T) {
	c := newFakeCluster(t, 3)
	d := c.newPush("refs/heads/main")
	ctx, cancel := context.WithCancel(context.Background())
	p := c.begin(ctx, 0)
	cancel()
	if _, err := p.Commit(ctx, d.quarantine, []gitproto.RefUpdate{d.update}, false, noProgress); err == nil {
		t.Fatal("a push whose client is gone committed")
	}
	p.Finish(false)
	if c.s.proposals.Load() != 0 {
		t.Fatal("a push whose client is gone proposed")
	}

	// The copy is busy (a catch-up holds its guard); a pusher that leaves
	// while waiting for it is not stuck, and frees the write lock.
	cp := c.nodes[0].r.copyOf(c.repo)
	cp.guard.Lock(context.Background())
	defer cp.guard.Unlock()
	wctx, wcancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer wcancel()
	start := time.Now()
	_, err := c.nodes[0].r.beginPush(wctx, c.repo, "alice", "push2", noProgress)
	if err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("BeginPush on a busy copy: %v", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Fatal("BeginPush ignored its context")
	}
	c.s.mu.Lock()
	held := c.s.lock != nil
	c.s.mu.Unlock()
	if held {
		t.Fatal("the write lock stayed taken after the pusher left")
	}
}

// A read does not wait for a push at work on the copy: a current copy is
// served at once, and a copy that is behind gives up with the read's
// context (the old mutex made it wait for the whole push).
func Test_PrepareRead_DoesNotWaitForPush(t *testing.T) {
	c := newFakeCluster(t, 1)
	p := c.begin(context.Background(), 0)
	defer p.Finish(false)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	plan, err := c.nodes[0].r.PrepareRead(ctx, c.repo, noProgress)
	if err != nil || plan.Path == "" {
		t.Fatalf("PrepareRead during a push: %+v, %v", plan, err)
	}
	// The state moves on (another version committed), while the push holds
	// the copy: the read is bounded by its context, not by the push.
	c.s.setRef(c.repo, "refs/heads/other", strings.Repeat("2", 40))
	rctx, rcancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer rcancel()
	start := time.Now()
	_, err = c.nodes[0].r.PrepareRead(rctx, c.repo, noProgress)
	if err == nil {
		t.Fatal("a copy that is behind was served")
	}
	if time.Since(start) > 5*time.Second {
		t.Fatalf("PrepareRead took %s behind a push", time.Since(start))
	}
}

// Reports, health and reads look at a copy while pushes and catch-ups
// change it; with -race this proves they share nothing unguarded.
func Test_Report_WhilePushing(t *testing.T) {
	c := newFakeCluster(t, 3)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, n := range c.nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				n.r.Report("")
				n.r.Health()
				n.r.MemberReplicas(context.Background(), c.repo)
			}
		}()
	}
	d := c.newPush("refs/heads/main")
	p := c.begin(context.Background(), 0)
	if _, err := p.Commit(context.Background(), d.quarantine, []gitproto.RefUpdate{d.update}, false, noProgress); err != nil {
		t.Fatal(err)
	}
	c.migrate(0, d)
	p.Finish(true)
	waitFor(t, "the peers to hold the push", func() bool { return c.holds(1, d.update.New) && c.holds(2, d.update.New) })
	for _, n := range c.nodes[1:] {
		n.r.syncAll()
	}
	close(stop)
	wg.Wait()
	for _, n := range c.nodes {
		rep := n.r.Report(c.repo).GetReplicas()
		if len(rep) != 1 || rep[0].GetVersion() != 2 {
			t.Errorf("%s reports %v", n.id, rep)
		}
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Once git has set exactly the committed refs, recording the version
// starts no git: the refs are read from their files, and nothing differs.
func Test_Push_FinishStartsNoGit(t *testing.T) {
	count, counter := countGit(t)
	c := newFakeCluster(t, 3)
	d := c.newPush("refs/heads/main")
	p := c.begin(context.Background(), 0)
	if _, err := p.Commit(context.Background(), d.quarantine, []gitproto.RefUpdate{d.update}, false, noProgress); err != nil {
		t.Fatal(err)
	}
	// What receive-pack does once the hook accepts: migrate, set the ref.
	c.migrate(0, d)
	os.MkdirAll(filepath.Join(p.Path(), "refs", "heads"), 0o755)
	if err := os.WriteFile(filepath.Join(p.Path(), "refs", "heads", "main"), []byte(d.update.New+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// Only this node's copy counts: a peer catching up in the background
	// may run git meanwhile, which is not Finish's doing.
	before := count(p.Path())
	p.Finish(true)
	if n := count(p.Path()) - before; n != 0 {
		b, _ := os.ReadFile(counter)
		t.Fatalf("Finish started %d git processes (all: %s)", n, b)
	}
	if at := p.copy.pos(); at.version != 2 {
		t.Fatalf("the copy is at %d, want 2", at.version)
	}
}

// countGit puts a git on PATH that counts its runs (before any store
// looks git up) and returns the count and the file that lists them (one
// line a run: its working directory and arguments). count counts the runs
// whose line holds every one of within (all runs when none is given).
func countGit(t *testing.T) (count func(within ...string) int, counter string) {
	t.Helper()
	counter = filepath.Join(t.TempDir(), "count")
	wrapper := t.TempDir()
	real, err := exec.LookPath("git")
	if err != nil {
		t.Fatal(err)
	}
	script := "#!/bin/sh\necho \"$PWD $*\" >> '" + counter + "'\nexec '" + real + "' \"$@\"\n"
	if err := os.WriteFile(filepath.Join(wrapper, "git"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", wrapper+string(os.PathListSeparator)+os.Getenv("PATH"))
	return func(within ...string) int {
		b, err := os.ReadFile(counter)
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		n := 0
	lines:
		for _, l := range strings.Split(string(b), "\n") {
			if l == "" {
				continue
			}
			for _, w := range within {
				if !strings.Contains(l, w) {
					continue lines
				}
			}
			n++
		}
		return n
	}, counter
}

// A small push starts no git of gitraft's own anywhere: the node that
// takes it proves the pushed tip whole from the quarantined pack, each
// peer from the pack it installed, and the peers then record the version
// by writing the ref themselves.
func Test_Push_StartsNoGitOfItsOwn(t *testing.T) {
	count, counter := countGit(t)
	c := newFakeCluster(t, 3)
	d := c.newPush("refs/heads/main")
	p := c.begin(context.Background(), 0)
	before := count()
	if _, err := p.Commit(context.Background(), d.quarantine, []gitproto.RefUpdate{d.update}, false, noProgress); err != nil {
		t.Fatal(err)
	}
	c.migrate(0, d)
	os.MkdirAll(filepath.Join(p.Path(), "refs", "heads"), 0o755)
	if err := os.WriteFile(filepath.Join(p.Path(), "refs", "heads", "main"), []byte(d.update.New+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	p.Finish(true)
	// What each peer's reconciler does once the push is committed.
	for i := 1; i < len(c.nodes); i++ {
		n := c.nodes[i]
		waitFor(t, n.id+" to answer the push's PutPack", func() bool { return n.putPacks.Load() == 1 })
		cp := n.r.copyOf(c.repo)
		if err := cp.guard.Lock(context.Background()); err != nil {
			t.Fatal(err)
		}
		err := n.r.catchUpLocked(context.Background(), cp, c.repo)
		cp.guard.Unlock()
		if err != nil {
			t.Fatalf("%s catching up: %v", n.id, err)
		}
	}
	for i := range c.nodes {
		if v := c.nodes[i].r.copyOf(c.repo).pos().version; v != 2 {
			t.Fatalf("node %d is at version %d, want 2", i, v)
		}
	}
	if n := count() - before; n != 0 {
		b, _ := os.ReadFile(counter)
		t.Fatalf("the push started %d git processes (all: %s)", n, b)
	}
	for i := 1; i < len(c.nodes); i++ {
		refs, err := c.nodes[i].store.Refs(context.Background(), c.repo)
		if err != nil || refs["refs/heads/main"] != d.update.New {
			t.Fatalf("node %d: refs %v, %v", i, refs, err)
		}
	}
}

// A node that cannot apply the entry that granted its lock (it is behind
// the log) does not take the push: it hands it to the leader, and frees
// the lock and its copy's guard.
func Test_Push_BehindTheLockHandsOver(t *testing.T) {
	c := newFakeCluster(t, 3)
	behind := errors.New("waiting to apply index 9: context deadline exceeded")
	c.nodes[1].node.barrierErr.Store(&behind)
	_, err := c.nodes[1].r.beginPush(context.Background(), c.repo, "alice", "push1", noProgress)
	var redirect *gitproto.Redirect
	if !errors.As(err, &redirect) || redirect.PeerID != c.nodes[0].node.id {
		t.Fatalf("BeginPush on a node behind the log: %v, want a redirect to %s", err, c.nodes[0].node.id)
	}
	c.s.mu.Lock()
	held := c.s.lock
	c.s.mu.Unlock()
	if held != nil && !held.released.Load() {
		t.Fatal("the write lock is still held")
	}
	cp := c.nodes[1].r.copyOf(c.repo)
	if !cp.guard.TryLock() {
		t.Fatal("the copy's guard is still held")
	}
	cp.guard.Unlock()
}

// While some member runs an older gitraft, the push's entry carries no
// release_lock, and Finish releases the lock with an entry of its own.
func Test_Push_ReleasesItselfWithOlderMembers(t *testing.T) {
	c := newFakeCluster(t, 3)
	c.s.oldMembers.Store(true)
	d := c.newPush("refs/heads/main")
	p := c.begin(context.Background(), 0)
	lock := p.lock.(*fakeLock)
	if _, err := p.Commit(context.Background(), d.quarantine, []gitproto.RefUpdate{d.update}, false, noProgress); err != nil {
		t.Fatal(err)
	}
	if lock.releasedByEntry.Load() || lock.marked.Load() {
		t.Fatal("the entry released the lock although a member could not apply it")
	}
	c.migrate(0, d)
	p.Finish(true)
	if !lock.released.Load() {
		t.Fatal("Finish did not release the lock")
	}
}

// git may start on a push's copy ahead of its lock (gitproto.ReadAhead):
// PushCopy offers a current copy that nothing is changing, and the push's
// UnchangedSince says whether anything changed it since the mark.
func Test_Push_ReadAheadMark(t *testing.T) {
	c := newFakeCluster(t, 3)
	ctx := context.Background()
	r := c.nodes[0].r
	path, mark, ok := r.PushCopy(c.repo)
	if want, _ := c.nodes[0].store.Path(c.repo); !ok || path != want {
		t.Fatalf("PushCopy: %q %v, want %q", path, ok, want)
	}
	p := c.begin(ctx, 0)
	if !p.UnchangedSince(mark) {
		t.Fatal("nothing changed the copy, yet the push says it changed")
	}
	if _, _, ok := r.PushCopy(c.repo); ok {
		t.Fatal("PushCopy offered a copy whose lock a push holds")
	}
	// A push commits version 2 through node 0 meanwhile.
	d := c.newPush("refs/heads/main")
	if _, err := p.Commit(ctx, d.quarantine, []gitproto.RefUpdate{d.update}, false, noProgress); err != nil {
		t.Fatal(err)
	}
	c.migrate(0, d)
	p.Finish(true)

	// Something took the guard between the mark and the push.
	_, mark, ok = r.PushCopy(c.repo)
	if !ok {
		t.Fatal("PushCopy offered nothing after the push")
	}
	cp := r.copyOf(c.repo)
	if err := cp.guard.Lock(ctx); err != nil {
		t.Fatal(err)
	}
	cp.guard.Unlock()
	p = c.begin(ctx, 0)
	if p.UnchangedSince(mark) {
		t.Fatal("the guard was taken since the mark, yet the push says unchanged")
	}
	p.Finish(false)

	// Node 1 is behind (version 1): not offered, and a push there catches
	// it up first, which changes it.
	waitFor(t, "node 1 to hold the push's objects", func() bool { return c.holds(1, d.update.New) })
	if _, _, ok := c.nodes[1].r.PushCopy(c.repo); ok {
		t.Fatal("PushCopy offered a copy behind the state")
	}
	mark, _ = c.nodes[1].r.copyOf(c.repo).guard.mark()
	p = c.begin(ctx, 1)
	if p.UnchangedSince(mark) {
		t.Fatal("the push caught its copy up, yet says unchanged")
	}
	p.Finish(false)
}
