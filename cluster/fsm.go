package cluster

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/encoding/protodelim"
	"google.golang.org/protobuf/proto"

	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

// fsm adapts State to raft.FSM. It decodes entries, serialises access to
// the state and lets readers wait for an index to be applied.
//
// An entry this binary cannot apply (a format or command from a newer
// gitraft, or bytes that do not decode) halts the FSM instead of panicking:
// it applies nothing from that entry on, answers each of them with an error
// wrapping ErrHalted, and refuses to snapshot, so that Raft keeps the log
// from the last snapshot on. A restarted, upgraded binary restores that
// snapshot and replays the log, the halting entry included.
type fsm struct {
	mu      sync.RWMutex
	state   *State
	applied chan struct{} // closed and replaced after every apply

	log     *slog.Logger
	version string               // this binary's version, for messages
	halt    atomic.Pointer[Halt] // set when halted; only Apply and Restore write it

	// observe, if set, is called after each command is applied (metrics).
	observe func(e *fsmv1.Entry, r *fsmv1.Result, took time.Duration)
	// onLockChange, if set, is called after each command is applied, to
	// wake writers waiting for a lock the entry may have freed.
	onLockChange func(e *fsmv1.Entry, r *fsmv1.Result)
	// onRepoChange, if set, is called after an entry that may change what a
	// repository looks like on disk, and after a restore.
	onRepoChange func()
	// newer, if set (tests only), sees every decoded entry before it is
	// checked: it stands in for a newer binary that knows more commands.
	newer func(e *fsmv1.Entry)

	// sinceSnapshot counts the bytes of the command entries applied since
	// the last snapshot that was persisted: what a restart would replay
	// from the log. Apply adds to it, a persisted snapshot takes off what it
	// covers, a restore clears it.
	sinceSnapshot atomic.Uint64
	// snapshotBytes, when not 0, is the count at which Apply pokes
	// logGrown, without blocking (the node takes a snapshot; see
	// Node.snapshotBySize).
	snapshotBytes uint64
	logGrown      chan struct{}

	// configIndex is the index of the last configuration entry applied (0
	// until one is, after a start from a snapshot). GetConfiguration does
	// not say it; a configuration change may pass it as prevIndex to fail
	// if another change came first.
	configIndex atomic.Uint64
}

func newFSM(logger *slog.Logger, version string) *fsm {
	if logger == nil {
		logger = slog.Default()
	}
	if version == "" {
		version = "dev"
	}
	return &fsm{state: NewState(), applied: make(chan struct{}), log: logger, version: version, logGrown: make(chan struct{}, 1)}
}

// Apply implements raft.FSM. It returns the entry's *fsmv1.Result, or an
// error wrapping ErrHalted when the FSM is halted. It never blocks and never
// panics on what the log holds.
func (f *fsm) Apply(l *raft.Log) any {
	if l.Type != raft.LogCommand {
		return nil
	}
	if h := f.halt.Load(); h != nil {
		return fmt.Errorf("%w: the entry at index %d is committed but this node did not apply it, nor will it until it is upgraded (%s)", ErrHalted, l.Index, h.Message())
	}
	start := time.Now()
	e := &fsmv1.Entry{}
	if err := proto.Unmarshal(l.Data, e); err != nil {
		return f.halted(&Halt{Index: l.Index, DecodeErr: err.Error(), Version: f.version})
	}
	if f.newer != nil {
		f.newer(e)
	}
	if what := cannotApply(e); what != "" {
		return f.halted(&Halt{Index: l.Index, Unknown: what, Version: f.version})
	}
	f.mu.Lock()
	r := f.state.Apply(l.Index, e)
	grown := f.sinceSnapshot.Add(uint64(len(l.Data)))
	f.notifyLocked()
	f.mu.Unlock()
	if f.snapshotBytes > 0 && grown >= f.snapshotBytes {
		select {
		case f.logGrown <- struct{}{}:
		default:
		}
	}
	if f.observe != nil {
		f.observe(e, r, time.Since(start))
	}
	if f.onLockChange != nil {
		f.onLockChange(e, r)
	}
	for _, l := range r.GetFreed() {
		why := "its node restarted (new incarnation)"
		if fr := e.GetFreeNodeLocks(); fr != nil {
			why = "its node is unreachable: " + fr.GetReason()
		}
		f.log.Info("write lock freed", "repo", l.GetRepo(), "holder", l.GetHolder(), "token", l.GetFencingToken(),
			"index", r.GetIndex(), "reason", freedReason(e), "why", why)
	}
	if f.onRepoChange != nil && r.GetRefusal() == nil {
		switch e.Command.(type) {
		case *fsmv1.Entry_CreateRepo, *fsmv1.Entry_DeleteRepo, *fsmv1.Entry_UpdateRefs:
			f.onRepoChange()
		}
	}
	return r
}

// halted records the halt, says so in the logs and wakes readers waiting
// for an index (they now fail instead of waiting in vain).
func (f *fsm) halted(h *Halt) error {
	f.mu.Lock()
	f.halt.Store(h)
	f.notifyLocked()
	f.mu.Unlock()
	f.log.Error(h.Message(), "index", h.Index, "version", h.Version,
		"applied_index", h.Index-1, "effect", "this node applies no more entries and takes no snapshots until it is restarted with a gitraft that knows the entry; its log is kept")
	return h.err()
}

// Halted returns why the FSM halted, or nil while it applies normally.
func (f *fsm) Halted() *Halt { return f.halt.Load() }

func (f *fsm) notifyLocked() {
	close(f.applied)
	f.applied = make(chan struct{})
}

// StoreConfiguration implements raft.ConfigurationStore. Configuration
// entries change no gitraft state, but the applied index must pass them so
// that reads waiting for a commit index that is a membership change go on.
func (f *fsm) StoreConfiguration(index uint64, _ raft.Configuration) {
	if index > f.configIndex.Load() {
		f.configIndex.Store(index) // only the FSM goroutine writes it
	}
	f.mu.Lock()
	if index > f.state.index && f.halt.Load() == nil {
		f.state.index = index
	}
	f.notifyLocked()
	f.mu.Unlock()
}

// Index returns the last applied index.
func (f *fsm) Index() uint64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.Index()
}

// WaitApplied blocks until index has been applied or ctx ends. It fails at
// once with ErrHalted when the FSM halted before index.
func (f *fsm) WaitApplied(ctx context.Context, index uint64) error {
	for {
		f.mu.RLock()
		done, ch := f.state.Index() >= index, f.applied
		f.mu.RUnlock()
		if done {
			return nil
		}
		if h := f.halt.Load(); h != nil {
			return h.err()
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("waiting to apply index %d: %w", index, ctx.Err())
		}
	}
}

// Read runs fn with the state under a read lock.
func (f *fsm) Read(fn func(s *State)) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	fn(f.state)
}

// Snapshot implements raft.FSM: it only captures; Persist writes. A halted
// FSM refuses: Raft would label the snapshot with the index of the last
// entry it handed to Apply, past the entries this binary skipped, and then
// drop them from the log, so that an upgraded binary could never apply them.
func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	if h := f.halt.Load(); h != nil {
		return nil, fmt.Errorf("no snapshot while halted, so that the log from index %d on is kept: %w", h.Index, h.err())
	}
	f.mu.RLock()
	defer f.mu.RUnlock()
	return &fsmSnapshot{view: f.state.capture(), f: f, covers: f.sinceSnapshot.Load()}, nil
}

// BytesSinceSnapshot is the size of the command entries applied since the
// last persisted snapshot.
func (f *fsm) BytesSinceSnapshot() uint64 { return f.sinceSnapshot.Load() }

// Restore implements raft.FSM: it builds a new state and swaps it in. A
// restored snapshot is the whole state at its index, so it also ends a halt
// (Raft installs one on a follower that fell behind the leader's log).
func (f *fsm) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	index, items, err := readSnapshot(rc)
	if err != nil {
		return err
	}
	s, err := restoreState(index, items)
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.state = s
	f.sinceSnapshot.Store(0)
	if h := f.halt.Swap(nil); h != nil {
		f.log.Warn("a snapshot replaced the halted state; applying the log again", "index", index, "halted_index", h.Index)
	}
	f.notifyLocked()
	f.mu.Unlock()
	if f.onRepoChange != nil {
		f.onRepoChange()
	}
	return nil
}

type fsmSnapshot struct {
	view *snapshotView
	f    *fsm
	// covers is the fsm's bytes since the last snapshot when this one was
	// captured: once persisted, the log no longer needs them.
	covers uint64
}

func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	if err := writeSnapshot(sink, s.view); err != nil {
		sink.Cancel()
		return err
	}
	if err := sink.Close(); err != nil {
		return err
	}
	if s.f != nil {
		s.f.snapshotPersisted(s.covers)
	}
	return nil
}

// snapshotPersisted takes what a persisted snapshot covers off the bytes
// since the last snapshot (never below zero: a restore may have cleared
// them meanwhile).
func (f *fsm) snapshotPersisted(covers uint64) {
	for {
		cur := f.sinceSnapshot.Load()
		if f.sinceSnapshot.CompareAndSwap(cur, cur-min(cur, covers)) {
			return
		}
	}
}

func (s *fsmSnapshot) Release() {}

func writeSnapshot(w io.Writer, v *snapshotView) error {
	bw := bufio.NewWriterSize(w, 1<<16)
	if _, err := protodelim.MarshalTo(bw, &fsmv1.SnapshotHeader{Format: fsmv1.EntryFormat_ENTRY_FORMAT_V1, Index: v.index}); err != nil {
		return fmt.Errorf("write snapshot header: %w", err)
	}
	var err error
	var count uint64
	v.items(func(it *fsmv1.SnapshotItem) bool {
		_, err = protodelim.MarshalTo(bw, it)
		count++
		return err == nil
	})
	if err == nil {
		_, err = protodelim.MarshalTo(bw, &fsmv1.SnapshotItem{Item: &fsmv1.SnapshotItem_End{End: &fsmv1.SnapshotEnd{Items: count}}})
	}
	if err != nil {
		return fmt.Errorf("write snapshot: %w", err)
	}
	return bw.Flush()
}

// maxSnapshotItem bounds one item (a repo with its refs) in a snapshot.
const maxSnapshotItem = 512 << 20

func readSnapshot(r io.Reader) (uint64, []*fsmv1.SnapshotItem, error) {
	br := bufio.NewReaderSize(r, 1<<16)
	opts := protodelim.UnmarshalOptions{MaxSize: maxSnapshotItem}
	h := &fsmv1.SnapshotHeader{}
	if err := opts.UnmarshalFrom(br, h); err != nil {
		return 0, nil, fmt.Errorf("read snapshot header: %w", err)
	}
	if h.GetFormat() != fsmv1.EntryFormat_ENTRY_FORMAT_V1 {
		return 0, nil, fmt.Errorf("snapshot has format %v, which this binary does not know; upgrade gitraft on this node", h.GetFormat())
	}
	var items []*fsmv1.SnapshotItem
	for {
		it := &fsmv1.SnapshotItem{}
		err := opts.UnmarshalFrom(br, it)
		if errors.Is(err, io.EOF) {
			return 0, nil, fmt.Errorf("read snapshot: cut off after %d items, before its end marker", len(items))
		}
		if err != nil {
			return 0, nil, fmt.Errorf("read snapshot item %d: %w", len(items), err)
		}
		if end := it.GetEnd(); end != nil {
			if end.GetItems() != uint64(len(items)) {
				return 0, nil, fmt.Errorf("read snapshot: end marker counts %d items, read %d", end.GetItems(), len(items))
			}
			return h.GetIndex(), items, nil
		}
		items = append(items, it)
	}
}
