package storage

// An in-process connectivity proof for the usual push: a few new commits
// on top of a ref, each changing a few files. git's check (`rev-list
// --objects <tips> --not --all`) costs a process and a walk; this proves
// the same from the push's pack and the trees of the refs' commits, or
// gives up (errUnsure) and the caller runs git's.
//
// The proof: every object the tips reach is either in the push's packs
// (and then its own links are checked in turn), or is reachable from a
// ref, which the copy keeps complete (SetRefs refuses refs without their
// history), so what it reaches is there. An object outside the packs
// counts as reachable from a ref only when it is a ref's value, or when a
// parent commit that is a ref's value has exactly it at the same path in
// its tree: what a commit that changes a few files leaves unchanged. Any
// other case (a file moved, an old file put back, a merge of something
// not at a ref, a pack that is not whole, a big push) is left to git.

import (
	"context"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"
)

// proofBudget bounds the bytes a proof inflates (pushes bigger than this
// are git's), and proofObjects the objects it visits.
const (
	proofBudget  = 8 << 20
	proofObjects = 5000
	// proofIdxBytes bounds the pack indexes of the repository a proof
	// reads (they are read whole).
	proofIdxBytes = 16 << 20
)

// proveConnected reports whether every object tips reach is present in
// repo plus packs (paths of *.pack files with their .idx), given the
// refs' values (which must be the repository's refs: each of them is
// trusted to be complete). False means not proven, not missing.
func proveConnected(repo string, packs []string, refs map[string]string, tips []string) bool {
	if len(packs) == 0 || len(tips) == 0 {
		return false
	}
	if idxBytes(filepath.Join(repo, "objects", "pack")) > proofIdxBytes {
		return false
	}
	pushed := &objectStore{budget: proofBudget}
	defer pushed.close()
	if pushed.addPacks(packs) != nil {
		return false
	}
	n := 0
	for _, p := range pushed.packs {
		n += p.count()
	}
	if n > proofObjects {
		return false
	}
	all := &objectStore{budget: proofBudget}
	defer all.close()
	if all.addObjectDir(filepath.Join(repo, "objects")) != nil || all.addPacks(packs) != nil {
		return false
	}
	pr := &proof{pushed: pushed, all: all, atRef: map[string]bool{}, done: map[string]bool{}, baseTrees: map[string][]treeEntry{}}
	for _, oid := range refs {
		pr.atRef[oid] = true
	}
	for _, t := range tips {
		if err := pr.object(t); err != nil {
			return false
		}
	}
	return true
}

type proof struct {
	pushed    *objectStore // the push's packs
	all       *objectStore // the repository and the push's packs
	atRef     map[string]bool
	done      map[string]bool
	visited   int
	baseTrees map[string][]treeEntry // "<commit>:<path>" -> entries
}

// object proves one tip (a commit, or an annotated tag of one).
func (pr *proof) object(oid string) error {
	if pr.atRef[oid] || pr.done[oid] {
		return nil
	}
	if !pr.pushed.has(oid) {
		return errUnsure
	}
	typ, data, err := pr.pushed.read(oid)
	if err != nil {
		return err
	}
	switch typ {
	case objCommit:
		return pr.commit(oid, data)
	case objTag:
		target := parseHeaderLinks(data, "object")
		if len(target) != 1 {
			return errUnsure
		}
		pr.done[oid] = true
		return pr.object(target[0])
	}
	return errUnsure
}

// commit proves a commit in the push's packs: its parents are at refs or
// proven in turn, and its tree is proven against theirs.
func (pr *proof) commit(oid string, data []byte) error {
	if pr.visited++; pr.visited > proofObjects {
		return errUnsure
	}
	pr.done[oid] = true
	trees := parseHeaderLinks(data, "tree")
	parents := parseHeaderLinks(data, "parent")
	if len(trees) != 1 {
		return errUnsure
	}
	var bases []string // parents at refs: their trees are whole
	for _, p := range parents {
		switch {
		case pr.atRef[p]:
			bases = append(bases, p)
		case pr.done[p]:
		default:
			if err := pr.object(p); err != nil {
				return err
			}
		}
	}
	return pr.tree(trees[0], "", bases)
}

// tree proves the tree oid, found at dir in a pushed commit whose parents
// at refs are bases.
func (pr *proof) tree(oid, dir string, bases []string) error {
	if pr.atRef[oid] || pr.done[oid] {
		return nil
	}
	if !pr.pushed.has(oid) {
		return pr.inBase(oid, dir, bases)
	}
	if pr.visited++; pr.visited > proofObjects {
		return errUnsure
	}
	typ, data, err := pr.pushed.read(oid)
	if err != nil || typ != objTree {
		return errUnsure
	}
	entries, err := parseTree(data)
	if err != nil {
		return err
	}
	for _, e := range entries {
		p := path.Join(dir, e.name)
		switch {
		case e.mode == "160000":
			// A submodule's commit: not an object of this repository.
		case e.mode == "40000":
			if err := pr.tree(e.oid, p, bases); err != nil {
				return err
			}
		case pr.done[e.oid] || pr.pushed.has(e.oid):
			// A blob the push carries.
		default:
			if err := pr.inBase(e.oid, p, bases); err != nil {
				return err
			}
		}
	}
	pr.done[oid] = true
	return nil
}

// inBase accepts oid outside the push when a base commit (at a ref) has
// exactly it at p.
func (pr *proof) inBase(oid, p string, bases []string) error {
	for _, b := range bases {
		got, err := pr.baseEntry(b, p)
		if err == nil && got == oid {
			pr.done[oid] = true
			return nil
		}
	}
	return errUnsure
}

// baseEntry is the oid at path p ("" for the root tree) in commit b's tree.
func (pr *proof) baseEntry(b, p string) (string, error) {
	if p == "" {
		typ, data, err := pr.all.read(b)
		if err != nil || typ != objCommit {
			return "", errUnsure
		}
		trees := parseHeaderLinks(data, "tree")
		if len(trees) != 1 {
			return "", errUnsure
		}
		return trees[0], nil
	}
	dir, name := path.Split(p)
	dir = strings.TrimSuffix(dir, "/")
	key := b + ":" + dir
	entries, ok := pr.baseTrees[key]
	if !ok {
		tree, err := pr.baseEntry(b, dir)
		if err != nil {
			return "", err
		}
		typ, data, err := pr.all.read(tree)
		if err != nil || typ != objTree {
			return "", errUnsure
		}
		if entries, err = parseTree(data); err != nil {
			return "", err
		}
		pr.baseTrees[key] = entries
	}
	for _, e := range entries {
		if e.name == name {
			return e.oid, nil
		}
	}
	return "", errUnsure
}

// idxBytes is the size of the pack indexes in dir.
func idxBytes(dir string) int64 {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	var n int64
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".idx") {
			if info, err := e.Info(); err == nil {
				n += info.Size()
			}
		}
	}
	return n
}

// WholeWithPack is Missing for a peer that just installed a push's pack
// (InstallPack's sum): when the push's tips are proven whole from that pack
// and the copy's refs, in-process, it answers without starting git (and
// remembers them, so that the catch-up to the push's version need not walk
// them); otherwise it is Missing.
func (s *Store) WholeWithPack(ctx context.Context, name, sum string, oids []string) ([]string, error) {
	path, err := s.existing(name)
	if err != nil {
		return nil, err
	}
	if isOID(sum) {
		if refs, ok, err := readRefs(path); err == nil && ok {
			uniq := uniqueOIDs(oids)
			pack := filepath.Join(path, "objects", "pack", "pack-"+sum+".pack")
			checked := time.Now()
			if len(uniq) == len(oids) && proveConnected(path, []string{pack}, refs, uniq) {
				s.conn.add(path, uniq, checked)
				return nil, nil
			}
		}
	}
	return s.Missing(ctx, name, oids)
}

// uniqueOIDs returns the valid object ids of oids, each once; an invalid
// one makes it return nil.
func uniqueOIDs(oids []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, o := range oids {
		if !isOID(o) {
			return nil
		}
		if !seen[o] {
			seen[o] = true
			out = append(out, o)
		}
	}
	return out
}
