package backup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/gitraft/gitraft/cluster"
	"github.com/gitraft/gitraft/storage"
)

// ErrBadBackup says a backup failed its checks.
var ErrBadBackup = errors.New("the backup failed its checks")

// RestoreOptions configures Restore.
type RestoreOptions struct {
	Dir string
	// Node is the configuration of the first node of the new cluster (its
	// id, data dir, Raft address, TLS files); its data dir must be new.
	Node     cluster.Config
	Parallel int
	Progress func(string)
	Logger   *slog.Logger
}

// Restore makes a new node's data dir from a backup: it verifies the
// backup, puts each repository on disk at the backup's version (its packs
// installed with their checksums checked, its refs set, all fsynced), and
// writes the state as the node's initial Raft snapshot last, so that a
// restore cut off before the end leaves no data dir a node would start
// from, and running it again finishes it.
func Restore(ctx context.Context, opt RestoreOptions) (*Manifest, error) {
	say := func(format string, args ...any) {
		if opt.Progress != nil {
			opt.Progress(fmt.Sprintf(format, args...))
		}
	}
	dataDir := opt.Node.DataDir
	if dataDir == "" {
		return nil, fmt.Errorf("%w: no data dir given (data_dir, --data-dir)", cluster.ErrRestore)
	}
	for _, name := range []string{"node.json", "raft"} {
		if _, err := os.Stat(filepath.Join(dataDir, name)); err == nil {
			return nil, fmt.Errorf("%w: %s already holds a node (%s); restore into a new, empty data dir", cluster.ErrRestore, dataDir, name)
		}
	}
	v, err := Verify(ctx, VerifyOptions{Dir: opt.Dir, Parallel: opt.Parallel, Progress: opt.Progress})
	if err != nil {
		return nil, err
	}
	if len(v.Problems) > 0 {
		lines := make([]string, len(v.Problems))
		for i, p := range v.Problems {
			lines[i] = "  " + p.String()
		}
		return nil, fmt.Errorf("%w (%d problems); nothing was restored:\n%s", ErrBadBackup, len(v.Problems), strings.Join(lines, "\n"))
	}
	m := v.Manifest
	say("backup of index %d (%s, %d repositories) verified", m.Index, m.Finished.Format("2006-01-02 15:04:05Z"), len(m.Repos))
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return nil, err
	}
	st, err := storage.Open(storage.Config{Root: filepath.Join(dataDir, "repos")}, opt.Logger)
	if err != nil {
		return nil, err
	}
	for i, r := range m.Repos {
		if err := restoreRepo(ctx, st, opt.Dir, r); err != nil {
			return nil, fmt.Errorf("restore repository %q: %w", r.Name, err)
		}
		if (i+1)%100 == 0 {
			say("%d of %d repositories restored", i+1, len(m.Repos))
		}
	}
	if err := cluster.RestoreDataDir(opt.Node, v.State, opt.Logger); err != nil {
		return nil, err
	}
	return m, nil
}

// restoreRepo puts one repository on disk as its copy at the backup's
// version.
func restoreRepo(ctx context.Context, st *storage.Store, dir string, r Repo) error {
	if err := st.Init(ctx, r.Name, r.ID); err != nil {
		return err
	}
	for _, sum := range r.Packs {
		pack, err := os.Open(PackPath(dir, sum, ".pack"))
		if err != nil {
			return err
		}
		idx, err := os.Open(PackPath(dir, sum, ".idx"))
		if err != nil {
			pack.Close()
			return err
		}
		_, err = st.InstallPack(ctx, r.Name, pack, idx)
		pack.Close()
		idx.Close()
		if err != nil {
			return fmt.Errorf("pack %s: %w", sum, err)
		}
	}
	head := r.Head
	if head == "" {
		head = cluster.DefaultHead
	}
	if err := st.SetRefs(ctx, r.Name, r.Refs, head); err != nil {
		return err
	}
	return st.SetVersion(r.Name, r.ID, r.Version)
}
