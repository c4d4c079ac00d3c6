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
	"os/exec"
	"path/filepath"
	"strings"
)

// InstallPack makes a pack and its index durable in a repository: both are
// streamed to temporary files and fsynced, the pack's trailing SHA-1 is
// checked against its content and against the checksum inside the index,
// and then both are renamed into objects/pack (pack first, index last, so
// git never sees an index without its pack). On any error nothing is left
// behind. Only SHA-1 repositories are supported.
func (s *Store) InstallPack(ctx context.Context, name string, pack, idx io.Reader) (string, error) {
	path, err := s.existing(name)
	if err != nil {
		return "", err
	}
	dir := filepath.Join(path, "objects", "pack")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", wrapIO("pack dir", err)
	}
	tmpPack := filepath.Join(dir, "tmp_gitraft_"+randHex(6)+".pack")
	tmpIdx := strings.TrimSuffix(tmpPack, ".pack") + ".idx"
	cleanup := func() {
		os.Remove(tmpPack)
		os.Remove(tmpIdx)
	}
	packTrailer, packSum, err := writeHashed(tmpPack, pack)
	if err != nil {
		cleanup()
		return "", err
	}
	if !bytes.Equal(packTrailer, packSum) {
		cleanup()
		return "", fmt.Errorf("%w: pack checksum %x does not match its content (%x)", ErrCorrupt, packTrailer, packSum)
	}
	idxBytes, err := writeAll(tmpIdx, idx)
	if err != nil {
		cleanup()
		return "", err
	}
	if len(idxBytes) < 48 || !bytes.Equal(idxBytes[len(idxBytes)-40:len(idxBytes)-20], packTrailer) {
		cleanup()
		return "", fmt.Errorf("%w: the index does not belong to pack %x", ErrCorrupt, packTrailer)
	}
	if sum := sha1.Sum(idxBytes[:len(idxBytes)-20]); !bytes.Equal(sum[:], idxBytes[len(idxBytes)-20:]) {
		cleanup()
		return "", fmt.Errorf("%w: index checksum mismatch", ErrCorrupt)
	}
	if err := ctx.Err(); err != nil {
		cleanup()
		return "", err
	}
	hexSum := hex.EncodeToString(packTrailer)
	final := filepath.Join(dir, "pack-"+hexSum)
	if _, err := os.Stat(final + ".idx"); err == nil {
		cleanup() // installed before: idempotent
		return hexSum, nil
	}
	if err := os.Rename(tmpPack, final+".pack"); err != nil {
		cleanup()
		return "", wrapIO("install pack", err)
	}
	if err := os.Rename(tmpIdx, final+".idx"); err != nil {
		os.Remove(final + ".pack")
		cleanup()
		return "", wrapIO("install index", err)
	}
	return hexSum, syncDir(dir)
}

// writeHashed copies r to a new file, fsyncs it, and returns the file's
// last 20 bytes and the SHA-1 of everything before them.
func writeHashed(path string, r io.Reader) (trailer, sum []byte, err error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return nil, nil, wrapIO("create pack", err)
	}
	defer f.Close()
	tw := &trailerHash{h: sha1.New()}
	if _, err := io.Copy(io.MultiWriter(f, tw), r); err != nil {
		return nil, nil, wrapIO("write pack", err)
	}
	if err := f.Sync(); err != nil {
		return nil, nil, wrapIO("fsync pack", err)
	}
	if len(tw.tail) < 20 {
		return nil, nil, fmt.Errorf("%w: pack shorter than its checksum", ErrCorrupt)
	}
	return tw.tail, tw.h.Sum(nil), f.Close()
}

// trailerHash hashes everything but the last 20 bytes written to it.
type trailerHash struct {
	h    hash.Hash
	tail []byte
}

func (t *trailerHash) Write(p []byte) (int, error) {
	buf := append(t.tail, p...)
	if len(buf) > 20 {
		t.h.Write(buf[:len(buf)-20])
		buf = buf[len(buf)-20:]
	}
	t.tail = append([]byte(nil), buf...)
	return len(p), nil
}

func writeAll(path string, r io.Reader) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, 1<<30))
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return nil, wrapIO("create index", err)
	}
	defer f.Close()
	if _, err := f.Write(b); err != nil {
		return nil, wrapIO("write index", err)
	}
	if err := f.Sync(); err != nil {
		return nil, wrapIO("fsync index", err)
	}
	return b, f.Close()
}

// IndexPack stores a bare pack stream (no index) with `git index-pack
// --stdin --fix-thin`, which writes and fsyncs pack and index.
func (s *Store) IndexPack(ctx context.Context, name string, pack io.Reader) (string, error) {
	path, err := s.existing(name)
	if err != nil {
		return "", err
	}
	c := exec.CommandContext(ctx, s.git, "index-pack", "--stdin", "--fix-thin")
	c.Dir, c.Env, c.Stdin = path, s.env(), pack
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	if err := c.Run(); err != nil {
		return "", gitError([]string{"index-pack", "--stdin"}, err, stderr.String())
	}
	out := strings.TrimSpace(stdout.String())
	out = strings.TrimPrefix(strings.TrimPrefix(out, "pack\t"), "keep\t")
	if out == "" {
		return "", errors.New("index-pack printed no pack name")
	}
	return out, nil
}
