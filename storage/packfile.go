package storage

import (
	"bytes"
	"context"
	"crypto/sha1"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Pack and index formats, SHA-1 only: gitraft creates SHA-1 repositories, and
// the checksums below are 20 bytes. (A SHA-256 repository would need 32-byte
// trailers and index version 3 handling.)
const (
	hashLen    = sha1.Size
	packMagic  = "PACK"
	idxMagicV2 = "\xfftOc\x00\x00\x00\x02"
	// An index v2 has an 8-byte header, a 1024-byte fan-out table and
	// two trailing checksums.
	minIdxLen = 8 + 256*4 + 2*hashLen
	// A pack has a 12-byte header and a trailing checksum.
	minPackLen = 12 + hashLen
)

// InstallPack makes a pack and its index durable in a repository and returns
// the pack's checksum in hex (its name: objects/pack/pack-<sum>.pack).
//
// Both are streamed to temporary files in objects/pack (tmp_gitraft_*, which
// `git prune` would also clear) and fsynced. The pack's trailing SHA-1 is
// checked against its content as it streams, the index's against its own
// content, and the pack checksum recorded in the index against the pack's.
// Then both are renamed into place, pack first and index last, so git never
// sees an index without its pack, and the directory is fsynced.
//
// InstallPack only adds files under names of its own and renames them into
// place, so unlike the other calls it may run while another operation on
// the same repository is under way (a node takes a pushed pack while it
// catches up). On any error nothing is left in objects/pack. ErrCorrupt when a checksum
// or format check fails, ErrDiskFull when the disk is full. Installing a pack
// that is already there succeeds. Only SHA-1 repositories are supported.
func (s *Store) InstallPack(ctx context.Context, name string, pack, idx io.Reader) (string, error) {
	path, err := s.existing(name)
	if err != nil {
		return "", err
	}
	dir := filepath.Join(path, "objects", "pack")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", wrapIO("pack dir", err)
	}
	// Not named *.idx or *.pack: git takes every *.idx in the pack
	// directory for a pack's index (index-pack's are tmp_idx_*), and a
	// repack or fetch beside this would list it and fail when it is
	// renamed away.
	base := filepath.Join(dir, "tmp_gitraft_"+randHex(8))
	tmpPack, tmpIdx := base+"_pack", base+"_idx"
	sum, err := s.installPack(ctx, dir, tmpPack, tmpIdx, pack, idx)
	if err != nil {
		os.Remove(tmpPack)
		os.Remove(tmpIdx)
		return "", err
	}
	return sum, nil
}

func (s *Store) installPack(ctx context.Context, dir, tmpPack, tmpIdx string, pack, idx io.Reader) (string, error) {
	p, err := writeHashed(ctx, tmpPack, "pack", pack, hashLen)
	if err != nil {
		return "", err
	}
	switch {
	case p.size < minPackLen || !bytes.HasPrefix(p.head, []byte(packMagic)):
		return "", fmt.Errorf("%w: not a pack (%d bytes)", ErrCorrupt, p.size)
	case !bytes.Equal(p.tail, p.sum):
		return "", fmt.Errorf("%w: pack checksum %x does not match its content (%x)", ErrCorrupt, p.tail, p.sum)
	}
	packSum := p.tail
	// The pack reaches the disk while the index arrives: the two fsyncs
	// overlap (the file system commits them together where it can).
	packSynced := make(chan error, 1)
	go func() { packSynced <- syncFile(tmpPack) }()
	waitPack := func() error {
		if packSynced == nil {
			return nil
		}
		err := <-packSynced
		packSynced = nil
		return err
	}
	// On an error path the pack is removed anyway: its fsync is only
	// waited for, so that no goroutine outlives the call.
	defer func() { _ = waitPack() }()

	// The index ends with the pack's checksum and then its own, which
	// covers everything before it, the pack's checksum included.
	x, err := writeHashed(ctx, tmpIdx, "index", idx, 2*hashLen)
	if err != nil {
		return "", err
	}
	if x.size < minIdxLen || !bytes.Equal(x.head, []byte(idxMagicV2)) {
		return "", fmt.Errorf("%w: not a version 2 pack index (%d bytes)", ErrCorrupt, x.size)
	}
	x.h.Write(x.tail[:hashLen])
	if idxSum := x.h.Sum(nil); !bytes.Equal(idxSum, x.tail[hashLen:]) {
		return "", fmt.Errorf("%w: index checksum %x does not match its content (%x)", ErrCorrupt, x.tail[hashLen:], idxSum)
	}
	if !bytes.Equal(x.tail[:hashLen], packSum) {
		return "", fmt.Errorf("%w: the index belongs to pack %x, not to %x", ErrCorrupt, x.tail[:hashLen], packSum)
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	if err := syncFile(tmpIdx); err != nil {
		return "", err
	}
	if err := waitPack(); err != nil {
		return "", err
	}

	hexSum := hex.EncodeToString(packSum)
	final := filepath.Join(dir, "pack-"+hexSum)
	if exists(final+".pack") && exists(final+".idx") {
		// Installed before, perhaps by a push that failed, so no ref may
		// reach it and a prune may drop it. Freshen it, as git freshens an
		// object it would write again, so that a prune keeps it for its
		// grace period; a prune that already looked at it is waited for,
		// and the pack installed again if it took it away.
		now := time.Now()
		freshened := os.Chtimes(final+".pack", now, now) == nil
		if ch := s.pruning(filepath.Dir(filepath.Dir(dir))); ch != nil {
			select {
			case <-ch:
			case <-ctx.Done():
				return "", ctx.Err()
			}
			freshened = false
		}
		if freshened || exists(final+".pack") && exists(final+".idx") && os.Chtimes(final+".pack", now, now) == nil {
			os.Remove(tmpPack)
			os.Remove(tmpIdx)
			return hexSum, nil
		}
	}
	if err := os.Rename(tmpPack, final+".pack"); err != nil {
		return "", wrapIO("install pack", err)
	}
	if err := os.Rename(tmpIdx, final+".idx"); err != nil {
		// The pack alone is invisible to git, but leave nothing behind.
		os.Remove(final + ".pack")
		return "", wrapIO("install index", err)
	}
	if err := syncDir(dir); err != nil {
		// Not known to be durable: take it back.
		os.Remove(final + ".idx")
		os.Remove(final + ".pack")
		return "", err
	}
	return hexSum, nil
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// hashed is what writeHashed saw of a stream.
type hashed struct {
	size int64
	head []byte    // the first 8 bytes
	tail []byte    // the last keep bytes
	sum  []byte    // SHA-1 of everything but tail
	h    hash.Hash // the hash behind sum, open for more
}

// writeHashed copies r to a new read-only file at path (the caller
// fsyncs it). It hashes everything but the last keep bytes on the way.
func writeHashed(ctx context.Context, path, what string, r io.Reader, keep int) (hashed, error) {
	if r == nil {
		return hashed{}, fmt.Errorf("%w: no %s given", ErrCorrupt, what)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return hashed{}, wrapIO("create "+what, err)
	}
	defer f.Close()
	th := &tailHash{h: sha1.New(), keep: keep}
	src := &streamReader{ctx: ctx, r: r}
	if _, err := io.Copy(io.MultiWriter(f, th), src); err != nil {
		if src.err != nil {
			return hashed{}, fmt.Errorf("read %s: %w", what, src.err)
		}
		return hashed{}, wrapIO("write "+what, err)
	}
	if err := f.Close(); err != nil {
		return hashed{}, wrapIO("close "+what, err)
	}
	if len(th.tail) < keep {
		return hashed{}, fmt.Errorf("%w: %s of %d bytes is shorter than its checksum", ErrCorrupt, what, th.size)
	}
	return hashed{size: th.size, head: th.head, tail: th.tail, sum: th.h.Sum(nil), h: th.h}, nil
}

// tailHash hashes everything written to it but the last keep bytes, which
// it holds, along with the first few bytes and the size.
type tailHash struct {
	h    hash.Hash
	keep int
	tail []byte
	head []byte
	size int64
}

func (t *tailHash) Write(p []byte) (int, error) {
	if n := min(8-len(t.head), len(p)); n > 0 {
		t.head = append(t.head, p[:n]...)
	}
	t.size += int64(len(p))
	if len(p) >= t.keep {
		t.h.Write(t.tail)
		t.h.Write(p[:len(p)-t.keep])
		t.tail = append(t.tail[:0], p[len(p)-t.keep:]...)
		return len(p), nil
	}
	t.tail = append(t.tail, p...)
	if over := len(t.tail) - t.keep; over > 0 {
		t.h.Write(t.tail[:over])
		t.tail = append(t.tail[:0], t.tail[over:]...)
	}
	return len(p), nil
}

// streamReader stops a copy when ctx ends and remembers a read error, so a
// broken stream is not reported as a write failure or as bad data.
type streamReader struct {
	ctx context.Context
	r   io.Reader
	err error
}

func (s *streamReader) Read(p []byte) (int, error) {
	if err := s.ctx.Err(); err != nil {
		s.err = err
		return 0, err
	}
	n, err := s.r.Read(p)
	if err != nil && err != io.EOF {
		s.err = err
	}
	return n, err
}

// IndexPack stores a bare pack stream (no index) with `git index-pack
// --stdin --fix-thin`, which checks every object, completes a thin pack from
// the repository's objects, and writes and fsyncs pack and index
// (core.fsync=objects,derived-metadata). It returns the pack's checksum in
// hex. ErrCorrupt (with ErrGit) when git refuses the data.
func (s *Store) IndexPack(ctx context.Context, name string, pack io.Reader) (string, error) {
	path, err := s.existing(name)
	if err != nil {
		return "", err
	}
	args := []string{"index-pack", "--stdin", "--fix-thin"}
	c := s.command(ctx, path, nil, args...)
	src := &streamReader{ctx: ctx, r: pack}
	var stdout, stderr bytes.Buffer
	c.Stdin, c.Stdout, c.Stderr = src, &stdout, &stderr
	packDir := filepath.Join(path, "objects", "pack")
	before := tmpPacks(packDir)
	if err := RunNice(c); err != nil {
		removeNewTmpPacks(packDir, before)
		if src.err != nil {
			return "", fmt.Errorf("read pack: %w", src.err)
		}
		gerr := gitError(ctx, args, err, stderr.String())
		if !errors.Is(gerr, ErrDiskFull) && ctx.Err() == nil && badPackData(stderr.String()) {
			return "", fmt.Errorf("%w: %w", ErrCorrupt, gerr)
		}
		return "", gerr
	}
	out := strings.TrimSpace(stdout.String())
	out = strings.TrimPrefix(strings.TrimPrefix(out, "pack\t"), "keep\t")
	if len(out) != 2*hashLen || !isOID(out) {
		return "", fmt.Errorf("%w: git index-pack printed %q, not a pack name", ErrGit, stdout.String())
	}
	// git fsynced pack and index, but not their directory entries.
	if err := syncDir(filepath.Join(path, "objects", "pack")); err != nil {
		return "", err
	}
	return out, nil
}

// tmpPacks lists the temporary files git's index-pack leaves in a pack
// directory when it fails (not InstallPack's tmp_gitraft_ files).
func tmpPacks(dir string) map[string]bool {
	have := map[string]bool{}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "tmp_pack_") || strings.HasPrefix(e.Name(), "tmp_idx_") {
			have[e.Name()] = true
		}
	}
	return have
}

// removeNewTmpPacks removes the temporary files a failed git command left
// in dir. Only IndexPack and Fetch run git commands that write there, and
// the caller serialises those per repository, so no other git is writing
// them.
func removeNewTmpPacks(dir string, before map[string]bool) {
	for name := range tmpPacks(dir) {
		if !before[name] {
			os.Remove(filepath.Join(dir, name))
		}
	}
}

// badPackData tells, from git index-pack's stderr, that the pack itself was
// bad (rather than git or the disk).
func badPackData(stderr string) bool {
	for _, s := range []string{"early EOF", "bad object", "corrupt", "mismatch", "inflate returned",
		"bad pack", "pack signature", "pack version", "unknown object type", "delta base", "truncated", "premature end"} {
		if strings.Contains(stderr, s) {
			return true
		}
	}
	return false
}
