package storage

// Housekeeping: reading a copy's health (packs, loose objects, the
// derived indexes) and keeping it healthy (repack, commit-graph, pruning
// what no ref reaches after a grace period, removing what failed pushes
// left). See DESIGN.md, "Housekeeping".

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// HousekeepFile in a repository records when housekeeping last ran there.
const HousekeepFile = "gitraft-housekeep.json"

// Health is what a copy's object store looks like.
type Health struct {
	// Packs counts the packs (cruft and kept ones included), PackBytes
	// their size; CruftPacks and KeptPacks are among them.
	Packs, CruftPacks, KeptPacks int
	PackBytes                    int64
	// LooseObjects counts the objects stored one file each, LooseBytes
	// their size.
	LooseObjects int
	LooseBytes   int64
	// Leftovers counts what interrupted git commands left: temporary pack
	// files, quarantine directories of pushes, stale .keep files of
	// receive-pack or fetch (of any age; RemoveLeftovers removes those
	// older than a grace period).
	Leftovers int
	// CommitGraph, MultiPackIndex and Bitmap: whether the derived indexes
	// exist.
	CommitGraph, MultiPackIndex, Bitmap bool
	// LastRun is when Housekeep last finished here, LastPrune when it last
	// pruned (zero: never). Since is when housekeeping first saw the copy
	// (NoteHousekeepSince; zero: not yet).
	LastRun, LastPrune, Since time.Time
}

// housekeepRecord is HousekeepFile's content.
type housekeepRecord struct {
	Since     time.Time `json:"since,omitzero"`
	LastRun   time.Time `json:"last_run,omitzero"`
	LastPrune time.Time `json:"last_prune,omitzero"`
}

// NoteHousekeepSince records, once, when housekeeping first saw a copy
// that it has never run on, so that its first prune is due a prune
// interval later rather than at once (a node starting on 10,000 copies
// does not prune them all in its first minutes).
func (s *Store) NoteHousekeepSince(name string, at time.Time) error {
	path, err := s.existing(name)
	if err != nil {
		return err
	}
	b, _ := json.Marshal(housekeepRecord{Since: at.UTC()})
	// Not fsynced: losing it in a crash only moves the first prune.
	return os.WriteFile(filepath.Join(path, HousekeepFile), append(b, '\n'), 0o644)
}

// Health reads a copy's object store without running git: one directory
// listing of objects/ and objects/pack, and one of each loose-object
// directory that exists.
func (s *Store) Health(name string) (Health, error) {
	path, err := s.existing(name)
	if err != nil {
		return Health{}, err
	}
	var h Health
	objects := filepath.Join(path, "objects")
	packDir := filepath.Join(objects, "pack")
	entries, err := os.ReadDir(packDir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return Health{}, fmt.Errorf("health of %s: %w", name, err)
	}
	have := map[string]bool{}
	for _, e := range entries {
		have[e.Name()] = true
	}
	for _, e := range entries {
		n := e.Name()
		switch {
		case isLeftover(n):
			h.Leftovers++
		case n == "multi-pack-index":
			h.MultiPackIndex = true
		case strings.HasSuffix(n, ".bitmap"):
			h.Bitmap = true
		case strings.HasPrefix(n, "pack-") && strings.HasSuffix(n, ".pack"):
			base := strings.TrimSuffix(n, ".pack")
			if !have[base+".idx"] {
				continue // not (yet) a pack git sees
			}
			h.Packs++
			if fi, err := e.Info(); err == nil {
				h.PackBytes += fi.Size()
			}
			if have[base+".mtimes"] {
				h.CruftPacks++
			}
			if have[base+".keep"] {
				h.KeptPacks++
				if staleKeep(filepath.Join(packDir, base+".keep")) {
					h.Leftovers++
				}
			}
		}
	}
	top, err := os.ReadDir(objects)
	if err != nil {
		return Health{}, fmt.Errorf("health of %s: %w", name, err)
	}
	for _, e := range top {
		n := e.Name()
		switch {
		case isQuarantine(n) || isLeftover(n):
			h.Leftovers++
		case e.IsDir() && len(n) == 2 && isHex(n):
			files, err := os.ReadDir(filepath.Join(objects, n))
			if err != nil {
				continue // removed while we looked
			}
			for _, f := range files {
				if isLeftover(f.Name()) {
					h.Leftovers++
					continue
				}
				h.LooseObjects++
				if fi, err := f.Info(); err == nil {
					h.LooseBytes += fi.Size()
				}
			}
		}
	}
	h.CommitGraph = exists(filepath.Join(objects, "info", "commit-graph")) || exists(filepath.Join(objects, "info", "commit-graphs", "commit-graph-chain"))
	if b, err := os.ReadFile(filepath.Join(path, HousekeepFile)); err == nil {
		var rec housekeepRecord
		if json.Unmarshal(b, &rec) == nil {
			h.LastRun, h.LastPrune, h.Since = rec.LastRun, rec.LastPrune, rec.Since
		}
	}
	return h, nil
}

func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// isQuarantine reports whether a directory in objects/ is the quarantine of
// a push (git 2.13 and later: tmp_objdir-incoming-XXXXXX; older: incoming-).
func isQuarantine(name string) bool {
	return strings.HasPrefix(name, "tmp_objdir-") || strings.HasPrefix(name, "incoming-")
}

// isLeftover reports whether a file name is a temporary file of git
// (index-pack's tmp_pack_/tmp_idx_/tmp_rev_, pack-objects' and repack's
// .tmp-*, a loose object's tmp_obj_) or of InstallPack (tmp_gitraft_).
func isLeftover(name string) bool {
	return strings.HasPrefix(name, "tmp_") || strings.HasPrefix(name, ".tmp-")
}

// staleKeep reports whether a .keep file is one receive-pack or fetch
// writes while it works (their content says so) and removes when done;
// an interrupted one leaves it, and the pack is then never repacked. An
// operator's own .keep (any other content) is left alone.
func staleKeep(path string) bool {
	b, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	return strings.HasPrefix(string(b), "receive-pack ") || strings.HasPrefix(string(b), "fetch-pack ")
}

// RemoveLeftovers removes what interrupted git commands and failed pushes
// left in a copy and has not changed for grace: temporary pack, index and
// object files, quarantine directories of pushes (judged by the newest file
// in them, so a push still writing keeps its own), and the .keep files of
// receive-pack and fetch. Anything younger than grace may belong to a git
// that still runs; the caller also holds the copy's guard, so no push of
// this node is in flight. It returns how many it removed.
func (s *Store) RemoveLeftovers(name string, grace time.Duration) (int, error) {
	path, err := s.existing(name)
	if err != nil {
		return 0, err
	}
	cutoff := time.Now().Add(-grace)
	objects := filepath.Join(path, "objects")
	packDir := filepath.Join(objects, "pack")
	removed := 0
	var errs []error
	remove := func(p string, all bool) {
		if newest(p).After(cutoff) {
			return
		}
		var err error
		if all {
			err = os.RemoveAll(p)
		} else {
			err = os.Remove(p)
		}
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
			return
		}
		removed++
		s.log.Info("removed a leftover of an interrupted git command", "repo", name, "path", strings.TrimPrefix(p, path+"/"))
	}
	if entries, err := os.ReadDir(packDir); err == nil {
		for _, e := range entries {
			n := e.Name()
			switch {
			case isLeftover(n):
				remove(filepath.Join(packDir, n), e.IsDir())
			case strings.HasSuffix(n, ".keep") && staleKeep(filepath.Join(packDir, n)):
				remove(filepath.Join(packDir, n), false)
			}
		}
	}
	top, err := os.ReadDir(objects)
	if err != nil {
		return removed, fmt.Errorf("leftovers of %s: %w", name, err)
	}
	for _, e := range top {
		n := e.Name()
		switch {
		case isQuarantine(n):
			remove(filepath.Join(objects, n), true)
		case isLeftover(n):
			remove(filepath.Join(objects, n), e.IsDir())
		case e.IsDir() && len(n) == 2 && isHex(n):
			files, err := os.ReadDir(filepath.Join(objects, n))
			if err != nil {
				continue
			}
			for _, f := range files {
				if isLeftover(f.Name()) {
					remove(filepath.Join(objects, n, f.Name()), false)
				}
			}
		}
	}
	if removed > 0 {
		if err := syncDir(packDir); err != nil {
			errs = append(errs, err)
		}
	}
	return removed, errors.Join(errs...)
}

// newest is the latest modification time of p or, for a directory, of
// anything in it (a zero time if nothing can be read: then it goes).
func newest(p string) time.Time {
	var t time.Time
	filepath.WalkDir(p, func(q string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if fi, err := d.Info(); err == nil && fi.ModTime().After(t) {
			t = fi.ModTime()
		}
		return nil
	})
	return t
}

// HousekeepOptions say what one Housekeep does.
type HousekeepOptions struct {
	// Prune makes the repack a full one that drops the objects no ref
	// reaches and that have not been written or freshened for Grace (git's
	// cruft packs, `git repack --cruft --cruft-expiration`); the ones
	// younger stay, in a cruft pack. Without it the repack is geometric
	// and drops nothing. Set it only for a copy at the committed version:
	// a copy that is behind holds packs of committed pushes that its refs
	// do not reach yet.
	Prune bool
	Grace time.Duration
}

// HousekeepResult is what one Housekeep did.
type HousekeepResult struct {
	Before, After Health
	Pruned        bool
}

// Housekeep repacks a copy and writes its commit-graph:
//
//   - without Prune, `git repack -d --geometric=2 --write-midx`: packs
//     (and loose objects) are rolled up so that each pack is at least twice
//     the size of all smaller ones together. The work is proportional to
//     what changed, not to the repository, and nothing is dropped: every
//     object of every rolled-up pack goes into the new one. A multi-pack
//     index covers the packs. No multi-pack bitmap: with git 2.39 a pruning
//     repack that wrote one beside pushes left a bitmap that missed objects
//     (clones then failed with "did not receive expected object"; found by
//     Test_E2E_HousekeepUnderPushes), so none is written at all. The big
//     pack keeps the bitmap of the last pruning repack until a roll-up
//     takes it in.
//   - with Prune, `git repack -d --cruft --cruft-expiration=<Grace ago>
//     --write-bitmap-index`: one pack, with a bitmap, of everything the
//     refs reach (pack-objects reads the refs once and bitmaps only its own
//     pack), one cruft pack of the unreachable objects younger than Grace;
//     the older ones are gone.
//
// then `git commit-graph write --reachable --split`.
//
// It runs beside pushes, catch-ups and reads, as git's repack is made to:
// new packs are written before the old ones go, and a repack removes only
// the packs it saw when it started, so a pack that arrives meanwhile stays.
// A push's pack waits in its quarantine, which repack does not look into,
// until its ref change is committed. A peer's pack (InstallPack) is in the
// pack directory at once, with a fresh mtime, so a prune keeps its objects
// for Grace; InstallPack refreshes the mtime of a pack that was already
// there and waits for a prune under way, so an old unreachable pack that
// a push sends again is not dropped under it.
func (s *Store) Housekeep(ctx context.Context, name string, opt HousekeepOptions) (HousekeepResult, error) {
	path, err := s.existing(name)
	if err != nil {
		return HousekeepResult{}, err
	}
	before, err := s.Health(name)
	if err != nil {
		return HousekeepResult{}, err
	}
	res := HousekeepResult{Before: before}
	if opt.Prune {
		done, perr := s.startPrune(ctx, path)
		if perr != nil {
			return res, perr
		}
		_, err = s.run(ctx, path, nil, nil, "repack", "-q", "-d", "--cruft", "--cruft-expiration="+expireArg(opt.Grace), "--write-bitmap-index")
		// What Missing found whole may have been unreachable and gone now.
		s.conn.pruneEnded(path)
		done()
		res.Pruned = err == nil
	} else {
		_, err = s.run(ctx, path, nil, nil, "-c", "repack.writeBitmaps=false", "repack", "-q", "-d", "--geometric=2", "--write-midx")
	}
	if err != nil {
		return res, fmt.Errorf("repack %s: %w", name, err)
	}
	if err := syncDir(filepath.Join(path, "objects", "pack")); err != nil {
		return res, err
	}
	if _, err := s.run(ctx, path, nil, nil, "commit-graph", "write", "--reachable", "--split", "--no-progress"); err != nil {
		return res, fmt.Errorf("commit-graph %s: %w", name, err)
	}
	rec := housekeepRecord{Since: before.Since, LastRun: time.Now().UTC(), LastPrune: before.LastPrune}
	if rec.Since.IsZero() {
		rec.Since = rec.LastRun
	}
	if res.Pruned {
		rec.LastPrune = rec.LastRun
	}
	b, _ := json.Marshal(rec)
	if err := writeFileSync(filepath.Join(path, HousekeepFile), append(b, '\n')); err != nil {
		return res, err
	}
	res.After, err = s.Health(name)
	return res, err
}

// expireArg is git's date for "grace ago" (git's approxidate reads
// "<n>.seconds.ago"; "now" for no grace).
func expireArg(grace time.Duration) string {
	if grace <= 0 {
		return "now"
	}
	return fmt.Sprintf("%d.seconds.ago", int64(grace.Seconds()+0.5))
}

// startPrune records that a pruning repack runs in the repository at path,
// once no other prune and no SetRefs runs there (SetRefs waits for it from
// then on); the function it returns ends that.
func (s *Store) startPrune(ctx context.Context, path string) (func(), error) {
	ch := make(chan struct{})
	for {
		s.pmu.Lock()
		old, busy := s.prunes[path], s.refChanges[path] > 0
		if old == nil && !busy {
			if s.prunes == nil {
				s.prunes = map[string]chan struct{}{}
			}
			s.prunes[path] = ch
			s.pmu.Unlock()
			break
		}
		s.pmu.Unlock()
		// A ref change takes milliseconds; another prune is rare (the
		// caller serialises them).
		wait := time.After(5 * time.Millisecond)
		if old != nil {
			wait = nil
		}
		select {
		case <-old:
		case <-wait:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return func() {
		s.pmu.Lock()
		delete(s.prunes, path)
		s.pmu.Unlock()
		close(ch)
	}, nil
}

// beginRefChange waits while a pruning repack runs in the repository at
// path, then marks a ref change under way there, so that no prune starts
// until the function it returns is called.
func (s *Store) beginRefChange(ctx context.Context, path string) (func(), error) {
	for {
		s.pmu.Lock()
		ch := s.prunes[path]
		if ch == nil {
			if s.refChanges == nil {
				s.refChanges = map[string]int{}
			}
			s.refChanges[path]++
			s.pmu.Unlock()
			return func() {
				s.pmu.Lock()
				if s.refChanges[path]--; s.refChanges[path] <= 0 {
					delete(s.refChanges, path)
				}
				s.pmu.Unlock()
			}, nil
		}
		s.pmu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// Pruning reports whether a pruning Housekeep runs in a repository now
// (SetRefs that gives refs new values waits for it to end).
func (s *Store) Pruning(name string) bool {
	path, err := s.Path(name)
	return err == nil && s.pruning(path) != nil
}

// pruning returns a channel closed when the prune under way in the
// repository at path ends, or nil if none runs.
func (s *Store) pruning(path string) <-chan struct{} {
	s.pmu.Lock()
	defer s.pmu.Unlock()
	return s.prunes[path]
}
