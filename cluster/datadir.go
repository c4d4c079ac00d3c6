package cluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/gitraft/gitraft/cluster/atomicfile"
)

// dataDirMeta is written into a node's data dir on first start and checked on
// every later start, so that a node never runs on another node's data or on
// data from another cluster.
type dataDirMeta struct {
	Format  int       `json:"format"`
	NodeID  string    `json:"node_id"`
	CA      string    `json:"ca_fingerprint,omitempty"` // sha256 of the cluster CA certificate; empty when insecure
	Created time.Time `json:"created"`
}

const (
	metaFile      = "node.json"
	metaFormat    = 1
	raftDirName   = "raft"
	raftDBName    = "raft.db"
	errDataDirFix = "point --data-dir at this node's own directory, or move the directory away to start this node afresh (it will then have to join again)"
)

// ErrDataDir is wrapped by every refusal to use a data dir.
var ErrDataDir = errors.New("unusable data dir")

// checkDataDir creates dir on first use and otherwise checks that it belongs
// to this node and this cluster.
func checkDataDir(dir, nodeID, caFingerprint string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("%w: %v", ErrDataDir, err)
	}
	path := filepath.Join(dir, metaFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			if e.Name() == raftDirName {
				return fmt.Errorf("%w: %s has Raft data but no %s; it was not made by gitraft, or is damaged: %s", ErrDataDir, dir, metaFile, errDataDirFix)
			}
		}
		m := dataDirMeta{Format: metaFormat, NodeID: nodeID, CA: caFingerprint, Created: time.Now().UTC()}
		b, _ := json.MarshalIndent(m, "", "  ")
		return atomicfile.Write(path, append(b, '\n'), 0o600)
	}
	if err != nil {
		return fmt.Errorf("%w: %v", ErrDataDir, err)
	}
	var m dataDirMeta
	if err := json.Unmarshal(b, &m); err != nil {
		return fmt.Errorf("%w: %s is damaged (%v): %s", ErrDataDir, path, err, errDataDirFix)
	}
	switch {
	case m.Format != metaFormat:
		return fmt.Errorf("%w: %s has format %d, this gitraft knows %d", ErrDataDir, path, m.Format, metaFormat)
	case m.NodeID != nodeID:
		return fmt.Errorf("%w: %s belongs to node %q, not %q: %s", ErrDataDir, dir, m.NodeID, nodeID, errDataDirFix)
	case m.CA != caFingerprint:
		return fmt.Errorf("%w: %s was made for a cluster whose CA has fingerprint %s, but the configured CA has %s (or insecure mode changed): use the cluster's own CA, or %s",
			ErrDataDir, dir, orNone(m.CA), orNone(caFingerprint), errDataDirFix)
	}
	return nil
}

func orNone(s string) string {
	if s == "" {
		return "none (insecure)"
	}
	return s
}
