package storage

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// packedRefsThreshold is the number of changed refs from which SetRefs
// writes the whole ref set as one packed-refs file instead of an update-ref
// transaction. git's transaction writes (and fsyncs) one loose file per ref:
// 10,000 refs took 6 s. One file and a few directory fsyncs take
// milliseconds.
const packedRefsThreshold = 256

// writeAllPacked makes the repository's refs exactly want, as one
// packed-refs file and no loose refs, the way `git pack-refs --all` leaves
// them. It takes git's own lock (packed-refs.lock), so a git process that
// changes refs at the same time fails instead of interleaving; the caller
// holds the repository's guard, so none should.
//
// Crash safety: the new packed-refs replaces the old one in one rename,
// then the loose refs (which would shadow it) are removed. A crash between
// the two leaves some refs at older values; the caller records the version
// only after SetRefs returns, so the copy is then behind, never wrong.
func writeAllPacked(repo string, want map[string]string) error {
	lock := filepath.Join(repo, "packed-refs.lock")
	f, err := os.OpenFile(lock, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%w: packed-refs is locked by another git process", ErrGit)
		}
		return wrapIO("lock packed-refs", err)
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(lock)
		}
	}()
	w := bufio.NewWriterSize(f, 1<<20)
	w.WriteString("# pack-refs with: sorted \n")
	for _, ref := range slices.Sorted(maps.Keys(want)) {
		fmt.Fprintf(w, "%s %s\n", want[ref], ref)
	}
	if err := w.Flush(); err != nil {
		return wrapIO("write packed-refs", err)
	}
	if err := f.Sync(); err != nil {
		return wrapIO("fsync packed-refs", err)
	}
	if err := f.Close(); err != nil {
		return wrapIO("write packed-refs", err)
	}
	if err := os.Rename(lock, filepath.Join(repo, "packed-refs")); err != nil {
		return wrapIO("install packed-refs", err)
	}
	ok = true
	if err := syncDir(repo); err != nil {
		return err
	}
	// Loose refs shadow packed ones: remove every one, then the empty
	// directories below refs/heads and refs/tags.
	dirs := map[string]bool{}
	err = filepath.WalkDir(filepath.Join(repo, "refs"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return wrapIO("remove loose ref", err)
		}
		dirs[filepath.Dir(p)] = true
		return nil
	})
	if err != nil {
		return err
	}
	keep := map[string]bool{filepath.Join(repo, "refs"): true, filepath.Join(repo, "refs", "heads"): true, filepath.Join(repo, "refs", "tags"): true}
	for _, d := range slices.Sorted(maps.Keys(dirs)) {
		for !keep[d] && strings.HasPrefix(d, filepath.Join(repo, "refs")+string(filepath.Separator)) {
			if os.Remove(d) != nil {
				break // not empty
			}
			d = filepath.Dir(d)
		}
		if err := syncDir(d); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}
