package backup

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// Names in a backup directory.
const (
	ManifestFile = "manifest.json"
	PacksDir     = "packs"
	lockFile     = ".lock"
	manifestV1   = 1
)

// ErrNoBackup says a directory holds no complete backup.
var ErrNoBackup = errors.New("no complete backup")

// Manifest describes one complete backup. It is written last, atomically.
type Manifest struct {
	Format int `json:"format"`
	// Index is the Raft index of the state the backup holds.
	Index uint64 `json:"index"`
	// Node served the backup; Version is the gitraft that wrote it.
	Node     string    `json:"node"`
	Version  string    `json:"gitraft_version"`
	Started  time.Time `json:"started"`
	Finished time.Time `json:"finished"`
	State    StateFile `json:"state"`
	Repos    []Repo    `json:"repos"`
	// Packs lists every pack some repository names, by checksum.
	Packs map[string]Pack `json:"packs"`
	// Bytes is the size of the state and every pack named; BytesWritten
	// what this run wrote (the rest was there from an earlier backup).
	Bytes        uint64 `json:"bytes"`
	BytesWritten uint64 `json:"bytes_written"`
	PacksWritten int    `json:"packs_written"`

	byName map[string]int // index of Repos by name; see repo
}

// repo finds a repository of the manifest by name. The index is built on
// the first call, which must not run concurrently with others.
func (m *Manifest) repo(name string) (Repo, bool) {
	if m == nil {
		return Repo{}, false
	}
	if m.byName == nil {
		m.byName = make(map[string]int, len(m.Repos))
		for i, r := range m.Repos {
			m.byName[r.Name] = i
		}
	}
	i, ok := m.byName[name]
	if !ok {
		return Repo{}, false
	}
	return m.Repos[i], true
}

// StateFile is the state's file in the backup directory.
type StateFile struct {
	File   string `json:"file"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// Repo is one repository at the backup's index.
type Repo struct {
	Name    string            `json:"name"`
	ID      uint64            `json:"id"`
	Version uint64            `json:"version"`
	Head    string            `json:"head,omitempty"`
	Refs    map[string]string `json:"refs"`
	// Packs hold every object the refs reach (and maybe more).
	Packs []string `json:"packs"`
}

// Pack is one pack's files and their checksums.
type Pack struct {
	PackSize   int64  `json:"pack_size"`
	IdxSize    int64  `json:"idx_size"`
	PackSHA256 string `json:"pack_sha256"`
	IdxSHA256  string `json:"idx_sha256"`
}

// PackPath is the path of a pack's file in a backup directory; ext is
// ".pack" or ".idx".
func PackPath(dir, sum, ext string) string {
	return filepath.Join(dir, PacksDir, "pack-"+sum+ext)
}

// ReadManifest reads a backup directory's manifest. ErrNoBackup when there
// is none.
func ReadManifest(dir string) (*Manifest, error) {
	b, err := os.ReadFile(filepath.Join(dir, ManifestFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w in %s: it has no %s (a backup that was cut off never writes one)", ErrNoBackup, dir, ManifestFile)
	}
	if err != nil {
		return nil, err
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%s is damaged: %v", filepath.Join(dir, ManifestFile), err)
	}
	if m.Format != manifestV1 {
		return nil, fmt.Errorf("%s has format %d; this gitraft reads format %d", filepath.Join(dir, ManifestFile), m.Format, manifestV1)
	}
	if m.Packs == nil {
		m.Packs = map[string]Pack{}
	}
	return &m, nil
}

// writeManifest writes the manifest atomically: a temporary file, fsynced,
// renamed into place, and the directory fsynced.
func writeManifest(dir string, m *Manifest) error {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(dir, ManifestFile), append(b, '\n'))
}

func writeFileAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		os.Remove(tmp)
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(tmp)
		return err
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// have is what an incremental backup tells the node it need not send for a
// repository: the packs the previous manifest named for it whose files are
// still in the directory, with their sums.
func have(prev *Manifest, dir, repo string) []string {
	r, ok := prev.repo(repo)
	if !ok {
		return nil
	}
	var out []string
	for _, sum := range r.Packs {
		p, ok := prev.Packs[sum]
		if !ok {
			continue
		}
		if sizeIs(PackPath(dir, sum, ".pack"), p.PackSize) && sizeIs(PackPath(dir, sum, ".idx"), p.IdxSize) {
			out = append(out, sum)
		}
	}
	slices.Sort(out)
	return out
}

func sizeIs(path string, size int64) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular() && st.Size() == size
}

// unnamed lists the files in a backup directory that m does not name: packs
// of repositories repacked or deleted since, older states, temporary files
// of a backup that was cut off.
func unnamed(dir string, m *Manifest) ([]string, error) {
	var out []string
	entries, err := os.ReadDir(filepath.Join(dir, PacksDir))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	for _, e := range entries {
		name := e.Name()
		keep := false
		for _, ext := range []string{".pack", ".idx"} {
			if sum, ok := cutPack(name, ext); ok {
				_, keep = m.Packs[sum]
			}
		}
		if !keep {
			out = append(out, filepath.Join(dir, PacksDir, name))
		}
	}
	top, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	for _, e := range top {
		name := e.Name()
		if e.Type().IsRegular() && name != m.State.File && name != ManifestFile && name != lockFile &&
			(filepath.Ext(name) == ".tmp" || (len(name) > 6 && name[:6] == "state-")) {
			out = append(out, filepath.Join(dir, name))
		}
	}
	slices.Sort(out)
	return out, nil
}

// cutPack returns the checksum of a file named pack-<sum><ext>.
func cutPack(name, ext string) (string, bool) {
	if len(name) != len("pack-")+40+len(ext) || name[:5] != "pack-" || name[len(name)-len(ext):] != ext {
		return "", false
	}
	sum := name[5 : 5+40]
	for _, c := range sum {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return "", false
		}
	}
	return sum, true
}
