package storage

// A small reader of git's object store, enough for the connectivity proof
// in connect.go: pack indexes (version 2), pack entries with their deltas,
// and loose objects. SHA-1 only, like the rest of the package. It reads
// commits, trees and tags; blobs it only looks up.

import (
	"bufio"
	"bytes"
	"compress/zlib"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// errUnsure is what the reader and the proof return for anything they do
// not handle; the caller then asks git.
var errUnsure = errors.New("storage: not provable in-process")

// Object types as packs number them.
const (
	objCommit   = 1
	objTree     = 2
	objBlob     = 3
	objTag      = 4
	objOfsDelta = 6
	objRefDelta = 7
)

// packIndex is one pack and its index (version 2), held in memory.
type packIndex struct {
	pack    *os.File
	fanout  [256]uint32
	oids    []byte // n * 20
	offsets []byte // n * 4
	large   []byte // 8-byte offsets
}

func openPackIndex(packPath string) (*packIndex, error) {
	idx, err := os.ReadFile(strings.TrimSuffix(packPath, ".pack") + ".idx")
	if err != nil {
		return nil, err
	}
	if len(idx) < minIdxLen || string(idx[:8]) != idxMagicV2 {
		return nil, errUnsure
	}
	p := &packIndex{}
	for i := range 256 {
		p.fanout[i] = binary.BigEndian.Uint32(idx[8+4*i:])
	}
	n := int(p.fanout[255])
	base := 8 + 1024
	need := base + n*hashLen + n*4 + n*4 + 2*hashLen
	if len(idx) < need {
		return nil, errUnsure
	}
	p.oids = idx[base : base+n*hashLen]
	p.offsets = idx[base+n*hashLen+n*4 : base+n*hashLen+n*8]
	p.large = idx[base+n*hashLen+n*8 : len(idx)-2*hashLen]
	if p.pack, err = os.Open(packPath); err != nil {
		return nil, err
	}
	return p, nil
}

func (p *packIndex) count() int { return int(p.fanout[255]) }

// find returns the offset of raw (20 bytes) in the pack.
func (p *packIndex) find(raw []byte) (int64, bool) {
	lo := 0
	if raw[0] > 0 {
		lo = int(p.fanout[raw[0]-1])
	}
	hi := int(p.fanout[raw[0]])
	i := lo + sort.Search(hi-lo, func(i int) bool {
		return bytes.Compare(p.oids[(lo+i)*hashLen:(lo+i+1)*hashLen], raw) >= 0
	})
	if i >= hi || !bytes.Equal(p.oids[i*hashLen:(i+1)*hashLen], raw) {
		return 0, false
	}
	off := binary.BigEndian.Uint32(p.offsets[i*4:])
	if off&0x80000000 == 0 {
		return int64(off), true
	}
	j := int(off &^ 0x80000000)
	if (j+1)*8 > len(p.large) {
		return 0, false
	}
	return int64(binary.BigEndian.Uint64(p.large[j*8:])), true
}

// objectStore reads objects from packs and from loose object directories.
type objectStore struct {
	packs []*packIndex
	loose []string // objects directories
	// budget bounds the bytes inflated, so a proof gives up on big pushes
	// (git is faster there) instead of spending the node's time.
	budget int64
}

func (o *objectStore) close() {
	for _, p := range o.packs {
		p.pack.Close()
	}
}

// addPacks opens the packs (*.pack with their .idx) given.
func (o *objectStore) addPacks(paths []string) error {
	for _, path := range paths {
		p, err := openPackIndex(path)
		if err != nil {
			return err
		}
		o.packs = append(o.packs, p)
	}
	return nil
}

// addObjectDir adds an objects directory: its packs and its loose objects.
func (o *objectStore) addObjectDir(dir string) error {
	packs, err := filepath.Glob(filepath.Join(dir, "pack", "pack-*.pack"))
	if err != nil {
		return err
	}
	var withIdx []string
	for _, p := range packs {
		if exists(strings.TrimSuffix(p, ".pack") + ".idx") {
			withIdx = append(withIdx, p)
		}
	}
	o.loose = append(o.loose, dir)
	return o.addPacks(withIdx)
}

func rawOID(oid string) ([]byte, error) {
	if len(oid) != 2*hashLen {
		return nil, errUnsure
	}
	return hex.DecodeString(oid)
}

// has reports whether the store holds oid.
func (o *objectStore) has(oid string) bool {
	raw, err := rawOID(oid)
	if err != nil {
		return false
	}
	for _, p := range o.packs {
		if _, ok := p.find(raw); ok {
			return true
		}
	}
	for _, d := range o.loose {
		if exists(filepath.Join(d, oid[:2], oid[2:])) {
			return true
		}
	}
	return false
}

// read returns an object's type and content.
func (o *objectStore) read(oid string) (int, []byte, error) {
	raw, err := rawOID(oid)
	if err != nil {
		return 0, nil, err
	}
	for _, p := range o.packs {
		if off, ok := p.find(raw); ok {
			return o.readPacked(p, off, 0)
		}
	}
	for _, d := range o.loose {
		f, err := os.Open(filepath.Join(d, oid[:2], oid[2:]))
		if err != nil {
			continue
		}
		defer f.Close()
		return o.readLoose(f)
	}
	return 0, nil, errUnsure
}

func (o *objectStore) readLoose(f *os.File) (int, []byte, error) {
	z, err := zlib.NewReader(bufio.NewReader(f))
	if err != nil {
		return 0, nil, errUnsure
	}
	defer z.Close()
	br := bufio.NewReader(z)
	hdr, err := br.ReadString(0)
	if err != nil {
		return 0, nil, errUnsure
	}
	kind, size, ok := strings.Cut(strings.TrimSuffix(hdr, "\x00"), " ")
	var n int64
	if _, err := fmt.Sscanf(size, "%d", &n); !ok || err != nil {
		return 0, nil, errUnsure
	}
	typ := map[string]int{"commit": objCommit, "tree": objTree, "blob": objBlob, "tag": objTag}[kind]
	if typ == 0 {
		return 0, nil, errUnsure
	}
	data, err := o.inflate(br, n)
	return typ, data, err
}

// inflate reads exactly n bytes of content from r, within the budget.
func (o *objectStore) inflate(r io.Reader, n int64) ([]byte, error) {
	if n < 0 || n > o.budget {
		return nil, errUnsure
	}
	o.budget -= n
	data := make([]byte, n)
	if _, err := io.ReadFull(r, data); err != nil {
		return nil, errUnsure
	}
	return data, nil
}

// readPacked reads the entry at off, resolving deltas (depth bounds the
// chain).
func (o *objectStore) readPacked(p *packIndex, off int64, depth int) (int, []byte, error) {
	if depth > 64 {
		return 0, nil, errUnsure
	}
	br := bufio.NewReader(io.NewSectionReader(p.pack, off, 1<<62))
	b, err := br.ReadByte()
	if err != nil {
		return 0, nil, errUnsure
	}
	typ := int(b>>4) & 7
	size := int64(b & 15)
	for shift := 4; b&0x80 != 0; shift += 7 {
		if b, err = br.ReadByte(); err != nil || shift > 56 {
			return 0, nil, errUnsure
		}
		size |= int64(b&0x7f) << shift
	}
	var baseType int
	var base []byte
	switch typ {
	case objCommit, objTree, objBlob, objTag:
	case objOfsDelta:
		b, err := br.ReadByte()
		if err != nil {
			return 0, nil, errUnsure
		}
		rel := int64(b & 0x7f)
		for b&0x80 != 0 {
			if b, err = br.ReadByte(); err != nil || rel > 1<<55 {
				return 0, nil, errUnsure
			}
			rel = (rel+1)<<7 | int64(b&0x7f)
		}
		if rel <= 0 || rel > off {
			return 0, nil, errUnsure
		}
		if baseType, base, err = o.readPacked(p, off-rel, depth+1); err != nil {
			return 0, nil, err
		}
	case objRefDelta:
		raw := make([]byte, hashLen)
		if _, err := io.ReadFull(br, raw); err != nil {
			return 0, nil, errUnsure
		}
		boff, ok := p.find(raw)
		if !ok {
			return 0, nil, errUnsure // a thin pack's base elsewhere
		}
		if baseType, base, err = o.readPacked(p, boff, depth+1); err != nil {
			return 0, nil, err
		}
	default:
		return 0, nil, errUnsure
	}
	z, err := zlib.NewReader(br)
	if err != nil {
		return 0, nil, errUnsure
	}
	defer z.Close()
	data, err := o.inflate(z, size)
	if err != nil || base == nil {
		return typ, data, err
	}
	out, err := o.applyDelta(base, data)
	return baseType, out, err
}

// applyDelta applies a git delta to base.
func (o *objectStore) applyDelta(base, delta []byte) ([]byte, error) {
	varint := func() (int64, bool) {
		var v int64
		for shift := 0; shift < 63; shift += 7 {
			if len(delta) == 0 {
				return 0, false
			}
			b := delta[0]
			delta = delta[1:]
			v |= int64(b&0x7f) << shift
			if b&0x80 == 0 {
				return v, true
			}
		}
		return 0, false
	}
	srcSize, ok1 := varint()
	dstSize, ok2 := varint()
	if !ok1 || !ok2 || srcSize != int64(len(base)) || dstSize > o.budget {
		return nil, errUnsure
	}
	o.budget -= dstSize
	out := make([]byte, 0, dstSize)
	for len(delta) > 0 {
		op := delta[0]
		delta = delta[1:]
		switch {
		case op&0x80 != 0:
			var off, n int64
			for i := range 4 {
				if op&(1<<i) != 0 {
					if len(delta) == 0 {
						return nil, errUnsure
					}
					off |= int64(delta[0]) << (8 * i)
					delta = delta[1:]
				}
			}
			for i := range 3 {
				if op&(0x10<<i) != 0 {
					if len(delta) == 0 {
						return nil, errUnsure
					}
					n |= int64(delta[0]) << (8 * i)
					delta = delta[1:]
				}
			}
			if n == 0 {
				n = 0x10000
			}
			if off+n > int64(len(base)) || int64(len(out))+n > dstSize {
				return nil, errUnsure
			}
			out = append(out, base[off:off+n]...)
		case op != 0:
			if int(op) > len(delta) || int64(len(out))+int64(op) > dstSize {
				return nil, errUnsure
			}
			out = append(out, delta[:op]...)
			delta = delta[op:]
		default:
			return nil, errUnsure
		}
	}
	if int64(len(out)) != dstSize {
		return nil, errUnsure
	}
	return out, nil
}

// treeEntry is one entry of a tree object.
type treeEntry struct {
	mode string
	name string
	oid  string
}

func parseTree(data []byte) ([]treeEntry, error) {
	var out []treeEntry
	for len(data) > 0 {
		sp := bytes.IndexByte(data, ' ')
		nul := bytes.IndexByte(data, 0)
		if sp < 0 || nul < sp || nul+1+hashLen > len(data) {
			return nil, errUnsure
		}
		out = append(out, treeEntry{
			mode: string(data[:sp]),
			name: string(data[sp+1 : nul]),
			oid:  hex.EncodeToString(data[nul+1 : nul+1+hashLen]),
		})
		data = data[nul+1+hashLen:]
	}
	return out, nil
}

// parseHeaderLinks returns the values of a commit's or tag's header lines
// named key ("tree", "parent", "object"), up to the blank line.
func parseHeaderLinks(data []byte, key string) []string {
	var out []string
	for len(data) > 0 {
		nl := bytes.IndexByte(data, '\n')
		if nl <= 0 {
			break // the blank line, or no newline at all
		}
		if v, ok := strings.CutPrefix(string(data[:nl]), key+" "); ok {
			out = append(out, v)
		}
		data = data[nl+1:]
	}
	return out
}
