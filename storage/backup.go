package storage

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// PackFile is one pack of a repository with its index, both open. A file
// opened stays readable after it is removed, so a repack that deletes the
// pack while a backup streams it takes nothing from the reader.
type PackFile struct {
	// Name is the pack's checksum, 40 hex: objects/pack/pack-<Name>.pack.
	Name      string
	Pack, Idx *os.File
	PackSize  int64
	IdxSize   int64
	// Loose is set for a pack made for the reader from the repository's
	// loose objects (OpenPacks); it is not in the repository.
	Loose bool
}

// ErrPacksChanging says the packs of a repository kept changing while
// OpenPacks listed them.
var ErrPacksChanging = errors.New("packs kept changing")

// openPackAttempts bounds how often OpenPacks lists a repository's packs
// again after one vanished between the listing and its opening.
const openPackAttempts = 8

// OpenPacks opens every pack of a repository that has its index (a pack
// without one is still being installed, and holds nothing a recorded
// version needs), and, when the repository has loose objects, a pack of
// them made with `git pack-objects` in a temporary directory under the
// store's root. A pack removed between the listing and its opening (a
// concurrent repack) makes it list again: the repack's new pack holds what
// the old one did. The caller closes the files with ClosePacks.
func (s *Store) OpenPacks(ctx context.Context, name string) ([]*PackFile, error) {
	path, err := s.existing(name)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(path, "objects", "pack")
	for range openPackAttempts {
		packs, vanished, err := openPackDir(dir)
		if err != nil {
			return nil, err
		}
		if vanished {
			ClosePacks(packs)
			continue
		}
		loose, err := s.loosePack(ctx, path)
		if err != nil {
			ClosePacks(packs)
			return nil, err
		}
		if loose != nil && !slices.ContainsFunc(packs, func(p *PackFile) bool { return p.Name == loose.Name }) {
			packs = append(packs, loose)
		} else if loose != nil {
			ClosePacks([]*PackFile{loose})
		}
		return packs, nil
	}
	return nil, fmt.Errorf("%w: %q lost a pack between listing and opening %d times in a row", ErrPacksChanging, name, openPackAttempts)
}

// ClosePacks closes what OpenPacks opened.
func ClosePacks(packs []*PackFile) {
	for _, p := range packs {
		p.Pack.Close()
		p.Idx.Close()
	}
}

// openPackDir opens the packs with an index in dir; vanished reports a
// pack that was listed and then could not be opened.
func openPackDir(dir string) (packs []*PackFile, vanished bool, err error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, wrapIO("list packs", err)
	}
	names := map[string]bool{}
	for _, e := range entries {
		names[e.Name()] = true
	}
	for _, e := range entries {
		sum, ok := strings.CutPrefix(e.Name(), "pack-")
		if !ok {
			continue
		}
		if sum, ok = strings.CutSuffix(sum, ".pack"); !ok || !isOID(sum) || !names["pack-"+sum+".idx"] {
			continue
		}
		p, err := openPack(filepath.Join(dir, "pack-"+sum))
		if errors.Is(err, fs.ErrNotExist) {
			return packs, true, nil
		}
		if err != nil {
			ClosePacks(packs)
			return nil, false, err
		}
		p.Name = sum
		packs = append(packs, p)
	}
	return packs, false, nil
}

// openPack opens base.pack and base.idx.
func openPack(base string) (*PackFile, error) {
	pf, err := os.Open(base + ".pack")
	if err != nil {
		return nil, err
	}
	xf, err := os.Open(base + ".idx")
	if err != nil {
		pf.Close()
		return nil, err
	}
	p := &PackFile{Pack: pf, Idx: xf}
	for f, size := range map[*os.File]*int64{pf: &p.PackSize, xf: &p.IdxSize} {
		st, err := f.Stat()
		if err != nil {
			pf.Close()
			xf.Close()
			return nil, wrapIO("stat pack", err)
		}
		*size = st.Size()
	}
	return p, nil
}

// LooseObjects lists the loose objects of a repository, sorted.
func (s *Store) LooseObjects(name string) ([]string, error) {
	path, err := s.existing(name)
	if err != nil {
		return nil, err
	}
	return looseObjects(path)
}

func looseObjects(repo string) ([]string, error) {
	objects := filepath.Join(repo, "objects")
	dirs, err := os.ReadDir(objects)
	if err != nil {
		return nil, wrapIO("list objects", err)
	}
	var out []string
	for _, d := range dirs {
		if !d.IsDir() || len(d.Name()) != 2 || !isHex(d.Name()) {
			continue
		}
		files, err := os.ReadDir(filepath.Join(objects, d.Name()))
		if err != nil {
			return nil, wrapIO("list objects", err)
		}
		for _, f := range files {
			if oid := d.Name() + f.Name(); isOID(oid) {
				out = append(out, oid)
			}
		}
	}
	slices.Sort(out)
	return out, nil
}

// loosePack packs the repository's loose objects, if it has any, into a
// temporary directory under the store's root, opens the result and removes
// the files (the open handles keep them). The same loose objects give the
// same pack (one thread, no delta reuse from elsewhere), so an incremental
// backup does not copy it again.
func (s *Store) loosePack(ctx context.Context, repo string) (*PackFile, error) {
	oids, err := looseObjects(repo)
	if err != nil || len(oids) == 0 {
		return nil, err
	}
	tmp, err := os.MkdirTemp(s.root, ".backup-")
	if err != nil {
		return nil, wrapIO("temporary directory for a pack of loose objects", err)
	}
	defer os.RemoveAll(tmp)
	out, err := s.run(ctx, repo, []byte(strings.Join(oids, "\n")+"\n"), nil,
		"pack-objects", "-q", "--threads=1", filepath.Join(tmp, "pack"))
	if err != nil {
		return nil, err
	}
	sum := strings.TrimSpace(string(out))
	if !isOID(sum) {
		return nil, fmt.Errorf("%w: git pack-objects printed %q, not a pack checksum", ErrGit, sum)
	}
	p, err := openPack(filepath.Join(tmp, "pack-"+sum))
	if err != nil {
		return nil, wrapIO("open the pack of loose objects", err)
	}
	p.Name, p.Loose = sum, true
	return p, nil
}
