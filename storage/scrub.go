package storage

// Scrubbing a copy: what a periodic scrub reads (every pack and index,
// checked against their own checksums; git's connectivity check from the
// refs), and what healing a damaged copy needs first (damaged packs set
// aside, refs whose history is not whole dropped, the damage recorded in
// the marker so that a restart does not forget it).

import (
	"bytes"
	"context"
	"crypto/sha1"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// ErrDamaged wraps what a scrub finds wrong with a copy's objects.
var ErrDamaged = errors.New("copy damaged")

// DamagedDir is where a repository's damaged packs are set aside, inside
// the repository (git never looks there), one directory per heal.
const DamagedDir = "gitraft-damaged"

// PackDamage is one pack that failed its checksums.
type PackDamage struct {
	Pack string // "pack-<sum>", the name without .pack/.idx
	Why  string
}

// VerifyPacks reads every pack and index of a repository and checks them
// as InstallPack does: the pack's trailing SHA-1 against its content, the
// index's against its own, the pack checksum recorded in the index against
// the pack's. wait is called after each chunk read with its size, so the
// caller can bound the rate (nil: no bound). Packs that disappear while it
// runs (a repack) are skipped. It returns the damaged packs and the bytes
// read.
func (s *Store) VerifyPacks(ctx context.Context, name string, wait func(ctx context.Context, n int) error) ([]PackDamage, int64, error) {
	path, err := s.existing(name)
	if err != nil {
		return nil, 0, err
	}
	dir := filepath.Join(path, "objects", "pack")
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, 0, nil
	}
	if err != nil {
		return nil, 0, wrapIO("read pack dir", err)
	}
	var bad []PackDamage
	var read int64
	for _, e := range entries {
		base, ok := strings.CutSuffix(e.Name(), ".idx")
		if !ok || !strings.HasPrefix(base, "pack-") {
			continue
		}
		why, n, err := verifyPack(ctx, filepath.Join(dir, base), wait)
		read += n
		if err != nil {
			return bad, read, err
		}
		if why != "" {
			bad = append(bad, PackDamage{Pack: base, Why: why})
		}
	}
	return bad, read, nil
}

// verifyPack checks one pack and its index; why is "" when both are sound.
// A pack whose index and pack are both gone was removed by a repack.
func verifyPack(ctx context.Context, base string, wait func(context.Context, int) error) (why string, read int64, err error) {
	pf, err := os.Open(base + ".pack")
	if errors.Is(err, fs.ErrNotExist) {
		if _, ierr := os.Stat(base + ".idx"); errors.Is(ierr, fs.ErrNotExist) {
			return "", 0, nil
		}
		return "the index has no pack", 0, nil
	}
	if err != nil {
		return "", 0, wrapIO("open pack", err)
	}
	defer pf.Close()
	p, n, err := hashFile(ctx, pf, hashLen, wait)
	read += n
	if err != nil {
		return "", read, err
	}
	switch {
	case p.size < minPackLen || !bytes.HasPrefix(p.head, []byte(packMagic)):
		return fmt.Sprintf("not a pack (%d bytes)", p.size), read, nil
	case !bytes.Equal(p.tail, p.sum):
		return fmt.Sprintf("pack checksum %x does not match its content (%x)", p.tail, p.sum), read, nil
	}
	xf, err := os.Open(base + ".idx")
	if errors.Is(err, fs.ErrNotExist) {
		return "", read, nil // removed by a repack meanwhile
	}
	if err != nil {
		return "", read, wrapIO("open index", err)
	}
	defer xf.Close()
	x, n, err := hashFile(ctx, xf, 2*hashLen, wait)
	read += n
	if err != nil {
		return "", read, err
	}
	if x.size < minIdxLen || !bytes.Equal(x.head, []byte(idxMagicV2)) {
		return fmt.Sprintf("not a version 2 pack index (%d bytes)", x.size), read, nil
	}
	x.h.Write(x.tail[:hashLen])
	if sum := x.h.Sum(nil); !bytes.Equal(sum, x.tail[hashLen:]) {
		return fmt.Sprintf("index checksum %x does not match its content (%x)", x.tail[hashLen:], sum), read, nil
	}
	if !bytes.Equal(x.tail[:hashLen], p.tail) {
		return fmt.Sprintf("the index belongs to pack %x, not to %x", x.tail[:hashLen], p.tail), read, nil
	}
	return "", read, nil
}

// hashFile reads f whole, hashing all but its last keep bytes.
func hashFile(ctx context.Context, f *os.File, keep int, wait func(context.Context, int) error) (hashed, int64, error) {
	th := &tailHash{h: sha1.New(), keep: keep}
	buf := make([]byte, 256<<10)
	var read int64
	for {
		if err := ctx.Err(); err != nil {
			return hashed{}, read, err
		}
		n, err := f.Read(buf)
		if n > 0 {
			th.Write(buf[:n])
			read += int64(n)
			if wait != nil {
				if err := wait(ctx, n); err != nil {
					return hashed{}, read, err
				}
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return hashed{}, read, wrapIO("read "+filepath.Base(f.Name()), err)
		}
	}
	if len(th.tail) < keep {
		return hashed{size: th.size, head: th.head}, read, nil
	}
	return hashed{size: th.size, head: th.head, tail: th.tail, sum: th.h.Sum(nil), h: th.h}, read, nil
}

// CheckConnectivity runs `git fsck --connectivity-only`: every object the
// refs reach (and HEAD, the index and reflogs) must be there, and commits
// and trees readable. Blobs are not inflated: the pack checksums of
// VerifyPacks cover their bytes at a small part of the cost. nil when
// sound; an error wrapping ErrDamaged with git's complaint when not.
func (s *Store) CheckConnectivity(ctx context.Context, name string) error {
	path, err := s.existing(name)
	if err != nil {
		return err
	}
	out, err := s.run(ctx, path, nil, nil, "fsck", "--connectivity-only", "--no-dangling", "--no-progress")
	switch {
	case err == nil:
		return nil
	case ctx.Err() != nil || errors.Is(err, ErrDiskFull):
		return err
	}
	// fsck names what is missing on stdout, and fails on stderr.
	msg := strings.TrimSpace(string(out))
	if msg == "" {
		// Only stderr: git's own words, without the command line.
		msg = err.Error()
		if i := strings.Index(msg, "exit status "); i >= 0 {
			if _, rest, ok := strings.Cut(msg[i:], ": "); ok {
				msg = rest
			}
		}
	}
	return fmt.Errorf("%w: git fsck --connectivity-only: %s", ErrDamaged, firstLines(msg, 3))
}

func firstLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = append(lines[:n], fmt.Sprintf("(%d more lines)", len(lines)-n))
	}
	return strings.Join(lines, "; ")
}

// SetAsidePacks moves damaged packs (their .pack, .idx and any .rev,
// .bitmap, .keep, .promisor, .mtimes) out of git's sight, into
// <repo>/gitraft-damaged/<unix time>/, for an operator to inspect. It
// returns that directory. The caller holds the copy's guard; the objects
// the packs held are then missing, and a catch-up fetches them again.
func (s *Store) SetAsidePacks(name string, packs []string) (string, error) {
	path, err := s.existing(name)
	if err != nil {
		return "", err
	}
	if len(packs) == 0 {
		return "", nil
	}
	dst := filepath.Join(path, DamagedDir, strconv.FormatInt(time.Now().UnixNano(), 10))
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return "", wrapIO("set aside damaged packs", err)
	}
	src := filepath.Join(path, "objects", "pack")
	for _, p := range packs {
		if !strings.HasPrefix(p, "pack-") || strings.ContainsAny(p, `/\`) {
			return "", fmt.Errorf("storage: %q is not a pack name", p)
		}
		// The index first: git never sees a pack it cannot use.
		for _, ext := range []string{".idx", ".pack", ".rev", ".bitmap", ".keep", ".promisor", ".mtimes"} {
			err := os.Rename(filepath.Join(src, p+ext), filepath.Join(dst, p+ext))
			if err != nil && !errors.Is(err, fs.ErrNotExist) {
				return "", wrapIO("set aside damaged pack", err)
			}
		}
	}
	s.conn.forget(path)
	if err := syncDir(src); err != nil {
		return "", err
	}
	return dst, syncDir(dst)
}

// ForgetChecks drops what Missing remembers of a repository: its objects
// changed behind its back (a scrub found damage).
func (s *Store) ForgetChecks(name string) {
	if path, err := s.Path(name); err == nil {
		s.conn.forget(path)
	}
}

// DropRefsNotWhole deletes the refs whose history is not whole (an object
// absent, anywhere in it), walking each without trusting the other refs,
// so that the checks that do trust them (Missing, SetRefs) see the gap and
// a catch-up fetches it. It returns the refs it dropped. For damaged
// copies; one `git rev-list` answers when every ref is whole.
func (s *Store) DropRefsNotWhole(ctx context.Context, name string) ([]string, error) {
	path, err := s.existing(name)
	if err != nil {
		return nil, err
	}
	refs, err := s.Refs(ctx, name)
	if err != nil {
		return nil, err
	}
	tips := slices.Compact(slices.Sorted(maps.Values(refs)))
	broken, err := s.notWhole(ctx, path, tips)
	if err != nil {
		return nil, err
	}
	s.conn.forget(path)
	if len(broken) == 0 {
		return nil, nil
	}
	bad := map[string]bool{}
	for _, o := range broken {
		bad[o] = true
	}
	var tx bytes.Buffer
	var dropped []string
	tx.WriteString("start\n")
	for _, ref := range slices.Sorted(maps.Keys(refs)) {
		if bad[refs[ref]] {
			fmt.Fprintf(&tx, "delete %s\n", ref)
			dropped = append(dropped, ref)
		}
	}
	tx.WriteString("prepare\ncommit\n")
	if _, err := s.run(ctx, path, tx.Bytes(), nil, "update-ref", "--stdin"); err != nil {
		return nil, err
	}
	return dropped, syncRefDirs(path, dropped)
}

// notWhole returns which of oids have an object missing in their history,
// walking all of it (no `--not --all`), in halves to name them.
func (s *Store) notWhole(ctx context.Context, path string, oids []string) ([]string, error) {
	if len(oids) == 0 {
		return nil, nil
	}
	_, err := s.run(ctx, path, []byte(strings.Join(oids, "\n")+"\n"), nil, "rev-list", "--objects", "--stdin", "--quiet")
	switch {
	case err == nil:
		return nil, nil
	case ctx.Err() != nil || errors.Is(err, ErrDiskFull):
		return nil, err
	}
	if len(oids) == 1 {
		return oids, nil
	}
	half := len(oids) / 2
	a, err := s.notWhole(ctx, path, oids[:half])
	if err != nil {
		return nil, err
	}
	b, err := s.notWhole(ctx, path, oids[half:])
	if err != nil {
		return nil, err
	}
	return append(a, b...), nil
}

// MarkDamaged records in a copy's marker that it is damaged and why, so
// that a restart still knows (Replica.Damaged); SetVersion clears it.
func (s *Store) MarkDamaged(name, why string) error {
	path, err := s.existing(name)
	if err != nil {
		return err
	}
	r, err := s.Local(name)
	if err != nil {
		return err
	}
	r.Damaged = why
	return writeMarker(filepath.Join(path, MarkerFile), r)
}

// PackBytes is the size of a repository's packs and indexes: what a scrub
// reads.
func (s *Store) PackBytes(name string) (int64, error) {
	path, err := s.existing(name)
	if err != nil {
		return 0, err
	}
	entries, err := os.ReadDir(filepath.Join(path, "objects", "pack"))
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, wrapIO("read pack dir", err)
	}
	var n int64
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".pack") || strings.HasSuffix(e.Name(), ".idx") {
			if fi, err := e.Info(); err == nil {
				n += fi.Size()
			}
		}
	}
	return n, nil
}
