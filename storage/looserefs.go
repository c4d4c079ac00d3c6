package storage

import (
	"errors"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
)

// writeLooseRefs makes a few ref changes the way `git update-ref --stdin`
// does for loose refs, without starting git: each ref's lock file
// (refs/...<ref>.lock, created exclusively, as git does) gets the new
// value and is fsynced, and only once every lock is held and written are
// they renamed into place (deletions remove the loose file); the caller
// fsyncs the directories. want maps each changed ref to its new value, ""
// to delete it; have is what the refs are now (the caller holds the
// repository's guard, so nothing else changes them).
//
// It reports false, having changed nothing, for what it leaves to git: a
// name git's rules refuse, a ref deleted from packed-refs (which git
// rewrites), a ref that is or would be a directory of another, or a lock
// file already there; SetRefs then runs update-ref, which does all of it
// or says why not.
func writeLooseRefs(repo string, have, want map[string]string) (bool, error) {
	packed := readPackedNames(repo)
	refs := slices.Sorted(maps.Keys(want))
	for _, ref := range refs {
		if ValidateGitRefName(ref) != nil {
			return false, nil
		}
		if want[ref] == "" {
			if packed == nil || packed[ref] {
				return false, nil
			}
			continue
		}
		if _, ok := have[ref]; ok {
			continue // an update: the ref's path is a file already
		}
		for other := range have {
			if strings.HasPrefix(ref, other+"/") || strings.HasPrefix(other, ref+"/") {
				return false, nil // a directory/file conflict, even if other goes
			}
		}
		if st, err := os.Lstat(filepath.Join(repo, filepath.FromSlash(ref))); err == nil && st.IsDir() {
			return false, nil // an empty directory git would remove first
		}
	}
	var locks []string
	unlock := func() {
		for _, l := range locks {
			os.Remove(l)
		}
	}
	for _, ref := range refs {
		path := filepath.Join(repo, filepath.FromSlash(ref))
		if want[ref] != "" {
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				unlock()
				if errors.Is(err, fs.ErrExist) || errors.Is(err, syscall.ENOTDIR) {
					return false, nil
				}
				return false, wrapIO("create ref directory", err)
			}
		}
		f, err := os.OpenFile(path+".lock", os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			unlock()
			if errors.Is(err, fs.ErrExist) || errors.Is(err, syscall.ENOTDIR) {
				return false, nil
			}
			return false, wrapIO("lock ref", err)
		}
		locks = append(locks, path+".lock")
		if want[ref] != "" {
			_, err = f.WriteString(want[ref] + "\n")
			if err == nil {
				err = f.Sync()
			}
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			unlock()
			return false, wrapIO("write ref", err)
		}
	}
	for _, ref := range refs {
		path := filepath.Join(repo, filepath.FromSlash(ref))
		var err error
		if want[ref] != "" {
			err = os.Rename(path+".lock", path)
		} else {
			if err = os.Remove(path); errors.Is(err, fs.ErrNotExist) {
				err = nil
			}
			os.Remove(path + ".lock")
			removeEmptyRefDirs(repo, filepath.Dir(path))
		}
		if err != nil {
			unlock()
			return false, wrapIO("update ref", err)
		}
	}
	return true, nil
}

// removeEmptyRefDirs removes dir and its parents while they are empty,
// down to refs/<kind> (refs/heads, refs/tags stay), as git does after a
// deletion, so that a later ref named like the directory can be created.
func removeEmptyRefDirs(repo, dir string) {
	stop := filepath.Join(repo, "refs")
	for {
		parent := filepath.Dir(dir)
		if parent == stop || !strings.HasPrefix(dir, stop+string(filepath.Separator)) {
			return
		}
		if os.Remove(dir) != nil {
			return
		}
		dir = parent
	}
}

// readPackedNames returns the names in packed-refs: an empty map when there
// is no such file, nil when it cannot be read.
func readPackedNames(repo string) map[string]bool {
	b, err := os.ReadFile(filepath.Join(repo, "packed-refs"))
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]bool{}
	}
	if err != nil {
		return nil
	}
	names := map[string]bool{}
	for _, line := range strings.Split(string(b), "\n") {
		if line == "" || line[0] == '#' || line[0] == '^' {
			continue
		}
		if _, ref, ok := strings.Cut(line, " "); ok {
			names[ref] = true
		}
	}
	return names
}
