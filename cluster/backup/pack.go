package backup

import (
	"bytes"
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/gitraft/gitraft/storage"
)

// ErrCorrupt says a pack or its index does not match its checksums.
var ErrCorrupt = errors.New("corrupt pack")

const sumLen = sha1.Size

// packWriter takes one pack and its index from the stream into temporary
// files in the packs directory; finish checks them and renames them into
// place, pack first and index last, so a pack with its index is complete.
type packWriter struct {
	dir, sum  string
	pack, idx *hashedFile
}

func newPackWriter(dir, sum string) (*packWriter, error) {
	if _, ok := cutPack("pack-"+sum+".pack", ".pack"); !ok {
		return nil, fmt.Errorf("%w: the node named a pack %q, which is not a 40-hex checksum", ErrCorrupt, sum)
	}
	w := &packWriter{dir: dir, sum: sum}
	var err error
	if w.pack, err = newHashedFile(dir, "tmp-"+sum+"-*.pack"); err != nil {
		return nil, err
	}
	if w.idx, err = newHashedFile(dir, "tmp-"+sum+"-*.idx"); err != nil {
		w.pack.abort()
		return nil, err
	}
	return w, nil
}

func (w *packWriter) abort() {
	w.pack.abort()
	w.idx.abort()
}

// finish checks what was written: the sizes announced, the pack's trailing
// SHA-1 against its content and its name, the index's trailing SHA-1
// against its content and the pack checksum it records. Then it fsyncs and
// renames both into place.
func (w *packWriter) finish(packSize, idxSize int64) (Pack, error) {
	fail := func(err error) (Pack, error) { w.abort(); return Pack{}, err }
	if w.pack.n != packSize || w.idx.n != idxSize {
		return fail(fmt.Errorf("%w: pack %s: got %d+%d bytes, the node announced %d+%d", ErrCorrupt, w.sum, w.pack.n, w.idx.n, packSize, idxSize))
	}
	if got := hex.EncodeToString(w.pack.tail.sum()); got != w.sum || !w.pack.tail.ok() {
		return fail(fmt.Errorf("%w: pack %s: its content hashes to %s", ErrCorrupt, w.sum, got))
	}
	if !w.idx.tail.ok() || len(w.idx.tail.prev) < sumLen || hex.EncodeToString(w.idx.tail.prev[len(w.idx.tail.prev)-sumLen:]) != w.sum {
		return fail(fmt.Errorf("%w: index of pack %s is damaged or belongs to another pack", ErrCorrupt, w.sum))
	}
	p := Pack{PackSize: packSize, IdxSize: idxSize, PackSHA256: w.pack.sha256(), IdxSHA256: w.idx.sha256()}
	for _, f := range []*hashedFile{w.pack, w.idx} {
		if err := f.close(); err != nil {
			return fail(err)
		}
	}
	if err := os.Rename(w.pack.path, filepath.Join(w.dir, "pack-"+w.sum+".pack")); err != nil {
		return fail(err)
	}
	if err := os.Rename(w.idx.path, filepath.Join(w.dir, "pack-"+w.sum+".idx")); err != nil {
		return fail(err)
	}
	return p, nil
}

// hashedFile is a temporary file that hashes what is written to it.
type hashedFile struct {
	path string
	f    *os.File
	n    int64
	sha  hash.Hash
	tail *trailer
}

// newHashedFile creates a temporary file in dir named after pattern (as
// os.CreateTemp does).
func newHashedFile(dir, pattern string) (*hashedFile, error) {
	f, err := os.CreateTemp(dir, pattern)
	if err != nil {
		return nil, err
	}
	return &hashedFile{path: f.Name(), f: f, sha: sha256.New(), tail: &trailer{h: sha1.New()}}, nil
}

func (h *hashedFile) Write(p []byte) (int, error) {
	k, err := h.f.Write(p)
	h.n += int64(k)
	h.sha.Write(p[:k])
	h.tail.Write(p[:k])
	return k, err
}

func (h *hashedFile) sha256() string { return hex.EncodeToString(h.sha.Sum(nil)) }

func (h *hashedFile) close() error {
	if err := h.f.Sync(); err != nil {
		h.f.Close()
		return err
	}
	return h.f.Close()
}

func (h *hashedFile) abort() {
	h.f.Close()
	os.Remove(h.path)
}

// trailer hashes everything but the last sumLen bytes written, and keeps
// those (git's packs and indexes end with the SHA-1 of what comes before),
// and the sumLen bytes before them in prev.
type trailer struct {
	h    hash.Hash
	tail []byte // the last bytes, not yet hashed
	prev []byte // up to sumLen bytes hashed last
}

func (t *trailer) Write(p []byte) (int, error) {
	t.tail = append(t.tail, p...)
	if k := len(t.tail) - sumLen; k > 0 {
		t.h.Write(t.tail[:k])
		t.prev = append(t.prev, t.tail[:k]...)
		if len(t.prev) > sumLen {
			t.prev = append(t.prev[:0], t.prev[len(t.prev)-sumLen:]...)
		}
		t.tail = append(t.tail[:0], t.tail[k:]...)
	}
	return len(p), nil
}

// ok reports whether the trailing bytes are the hash of the rest.
func (t *trailer) ok() bool { return len(t.tail) == sumLen && bytes.Equal(t.h.Sum(nil), t.tail) }

// sum is the trailing checksum as written.
func (t *trailer) sum() []byte { return t.tail }

// fileSHA256 hashes a file.
func fileSHA256(path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, err
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

// scratchRepo makes a bare repository in a temporary directory whose
// objects are the given packs of the backup (linked, not copied) and whose
// refs are refs, for git to check. The caller removes it.
func scratchRepo(dir string, r Repo) (string, error) {
	tmp, err := os.MkdirTemp("", "gitraft-backup-check-")
	if err != nil {
		return "", err
	}
	// What git init --bare makes that git needs, without a process for it.
	for _, d := range []string{"objects/pack", "objects/info", "refs/heads", "refs/tags"} {
		if err := os.MkdirAll(filepath.Join(tmp, d), 0o700); err != nil {
			os.RemoveAll(tmp)
			return "", err
		}
	}
	for name, content := range map[string]string{
		"HEAD":   "ref: refs/heads/main\n",
		"config": "[core]\n\trepositoryformatversion = 0\n\tbare = true\n",
	} {
		if err := os.WriteFile(filepath.Join(tmp, name), []byte(content), 0o600); err != nil {
			os.RemoveAll(tmp)
			return "", err
		}
	}
	for _, sum := range r.Packs {
		for _, ext := range []string{".pack", ".idx"} {
			src, err := filepath.Abs(PackPath(dir, sum, ext))
			if err != nil {
				os.RemoveAll(tmp)
				return "", err
			}
			if err := os.Symlink(src, filepath.Join(tmp, "objects", "pack", "pack-"+sum+ext)); err != nil {
				os.RemoveAll(tmp)
				return "", err
			}
		}
	}
	var b strings.Builder
	b.WriteString("# pack-refs with: peeled sorted \n")
	for _, ref := range slices.Sorted(maps.Keys(r.Refs)) {
		fmt.Fprintf(&b, "%s %s\n", r.Refs[ref], ref)
	}
	if err := os.WriteFile(filepath.Join(tmp, "packed-refs"), []byte(b.String()), 0o600); err != nil {
		os.RemoveAll(tmp)
		return "", err
	}
	if _, ok := r.Refs[r.Head]; ok {
		if err := os.WriteFile(filepath.Join(tmp, "HEAD"), []byte("ref: "+r.Head+"\n"), 0o600); err != nil {
			os.RemoveAll(tmp)
			return "", err
		}
	}
	return tmp, nil
}

// checkConnected runs `git fsck --connectivity-only` over the repository's
// packs in the backup with its refs: every ref must name an object that is
// there, with its whole history.
func checkConnected(ctx context.Context, g *storage.Git, dir string, r Repo) error {
	for _, sum := range r.Packs {
		if _, err := os.Stat(PackPath(dir, sum, ".idx")); err != nil {
			return fmt.Errorf("pack %s is missing from %s", sum, filepath.Join(dir, PacksDir))
		}
	}
	tmp, err := scratchRepo(dir, r)
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	c := g.Command(ctx, tmp, []string{"GIT_DIR=."}, "fsck", "--connectivity-only", "--no-dangling", "--no-progress")
	var out bytes.Buffer
	c.Stdout, c.Stderr = &out, &out
	if err := g.Run(c); err != nil {
		msg := strings.TrimSpace(out.String())
		if len(msg) > 800 {
			msg = msg[:800] + "..."
		}
		return fmt.Errorf("its refs name objects the backup does not hold, or whose history it lacks (git fsck: %s)", msg)
	}
	return nil
}

// verifyPack runs `git verify-pack` on a pack of the backup: every object
// decodes and hashes to its name, and the index matches the pack.
func verifyPack(ctx context.Context, g *storage.Git, dir, sum string) error {
	idx, err := filepath.Abs(PackPath(dir, sum, ".idx"))
	if err != nil {
		return err
	}
	c := g.Command(ctx, os.TempDir(), nil, "verify-pack", idx)
	var out bytes.Buffer
	c.Stdout, c.Stderr = io.Discard, &out
	if err := g.Run(c); err != nil {
		msg := strings.TrimSpace(out.String())
		if len(msg) > 400 {
			msg = msg[:400] + "..."
		}
		if msg == "" {
			msg = err.Error()
		}
		return fmt.Errorf("git verify-pack: %s", msg)
	}
	return nil
}
