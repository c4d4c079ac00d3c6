package storage

import (
	"bufio"
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// readRefs reads a repository's refs under refs/ from its files, as `git
// for-each-ref` would list them, without starting git: packed-refs, then
// the loose refs, which take precedence. It reports ok false when it meets
// what it does not read itself (a symbolic ref, a reftable repository, a
// line it does not understand, a repository without HEAD); the caller then
// asks git.
//
// A ref being changed while it reads is seen before or after the change,
// never torn: git replaces ref files by rename.
func readRefs(repo string) (refs map[string]string, ok bool, err error) {
	if exists(filepath.Join(repo, "reftable")) || !exists(filepath.Join(repo, "HEAD")) {
		return nil, false, nil // reftable, or not (or no longer) a repository
	}
	refs = map[string]string{}
	b, err := os.ReadFile(filepath.Join(repo, "packed-refs"))
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, false, wrapIO("read packed-refs", err)
	default:
		sc := bufio.NewScanner(bytes.NewReader(b))
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			if line == "" || line[0] == '#' || line[0] == '^' {
				continue // header, or the peeled value of the tag above
			}
			oid, ref, found := strings.Cut(line, " ")
			if !found || !isOID(oid) || !strings.HasPrefix(ref, "refs/") {
				return nil, false, nil
			}
			refs[ref] = oid
		}
		if sc.Err() != nil {
			return nil, false, nil
		}
	}
	root := filepath.Join(repo, "refs")
	odd := false
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // removed while walking (git prunes empty directories)
			}
			return err
		}
		if d.IsDir() || strings.HasSuffix(d.Name(), ".lock") {
			return nil
		}
		c, err := os.ReadFile(p)
		if errors.Is(err, fs.ErrNotExist) {
			return nil // deleted while walking
		}
		if err != nil {
			return err
		}
		oid := strings.TrimSpace(string(c))
		if !isOID(oid) {
			odd = true
			return filepath.SkipAll // a symbolic ref, or something odd
		}
		rel, err := filepath.Rel(repo, p)
		if err != nil {
			return err
		}
		refs[filepath.ToSlash(rel)] = oid
		return nil
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, false, wrapIO("read refs", err)
	}
	if odd {
		return nil, false, nil
	}
	return refs, true, nil
}
