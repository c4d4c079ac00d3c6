package backup

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/gitraft/gitraft/cluster"
	backupv1 "github.com/gitraft/gitraft/proto/gitraft/backup/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	"github.com/gitraft/gitraft/storage"
)

// CreateOptions configures Create.
type CreateOptions struct {
	// Dir is the backup directory (created if missing). An earlier backup
	// in it makes this one incremental.
	Dir    string
	Client backupv1.BackupServiceClient
	// Parallel is how many repositories are copied at once (default 4).
	Parallel int
	// Version is this gitraft's version, for the manifest.
	Version string
	// Progress, if set, is told what happens, a line at a time.
	Progress func(string)
	// Git is the git runner for the checks (default: git from PATH).
	Git *storage.Git
}

// repoAttempts bounds how often one repository's copy is tried again when
// the node's copy was busy (a repack, a catch-up).
const repoAttempts = 3

// Create writes a backup of the cluster the client reaches into
// opt.Dir: the state at one index (a read barrier on the serving node),
// then each repository's packs at the version that index names, copying
// only packs the directory lacks. Every repository's refs are checked
// against the packs written (git fsck --connectivity-only) before the
// manifest is written, last and atomically; then files no manifest names
// any more are removed. The backup is not recorded in the cluster here:
// the caller does that (RecordBackup) once Create returns.
func Create(ctx context.Context, opt CreateOptions) (*Manifest, error) {
	if opt.Parallel <= 0 {
		opt.Parallel = 4
	}
	if opt.Git == nil {
		opt.Git = storage.DefaultGit()
	}
	say := func(format string, args ...any) {
		if opt.Progress != nil {
			opt.Progress(fmt.Sprintf(format, args...))
		}
	}
	dir := opt.Dir
	if err := os.MkdirAll(filepath.Join(dir, PacksDir), 0o700); err != nil {
		return nil, fmt.Errorf("backup directory: %w", err)
	}
	unlock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	prev, err := ReadManifest(dir)
	if errors.Is(err, ErrNoBackup) {
		prev = nil
	} else if err != nil {
		return nil, fmt.Errorf("%w; move it away, or back up into another directory", err)
	}
	prev.repo("") // builds its index before the workers share it
	started := time.Now().UTC()

	// The state, at one index.
	st, sf, node, err := fetchState(ctx, opt.Client, dir)
	if err != nil {
		return nil, err
	}
	m := &Manifest{Format: manifestV1, Index: st.Index, Node: node, Version: opt.Version, Started: started,
		State: sf, Packs: map[string]Pack{}, Bytes: uint64(sf.Size), BytesWritten: uint64(sf.Size)}
	repos := st.Repos()
	say("state at index %d from %s: %d repositories", st.Index, node, len(repos))

	// The repositories' packs.
	m.Repos = make([]Repo, len(repos))
	var mu sync.Mutex
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var firstErr error
	jobs := make(chan int)
	var wg sync.WaitGroup
	for range opt.Parallel {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				r := repos[i]
				repo := Repo{Name: r.GetName(), ID: r.GetId(), Version: r.GetVersion(), Head: r.GetHead(), Refs: map[string]string{}}
				for _, ref := range r.GetRefs() {
					repo.Refs[ref.GetName()] = ref.GetOid()
				}
				packs, written, err := copyRepo(ctx, opt, prev, &repo)
				if err == nil && !(len(written) == 0 && prev.checked(repo)) {
					err = checkConnected(ctx, opt.Git, dir, repo)
				}
				mu.Lock()
				if err != nil {
					if firstErr == nil {
						firstErr = fmt.Errorf("repository %q (version %d): %w", repo.Name, repo.Version, err)
						cancel()
					}
				} else {
					m.Repos[i] = repo
					for sum, p := range packs {
						m.Packs[sum] = p
					}
					for sum := range written {
						m.PacksWritten++
						m.BytesWritten += uint64(written[sum].PackSize + written[sum].IdxSize)
					}
				}
				mu.Unlock()
			}
		}()
	}
	for i := range repos {
		select {
		case jobs <- i:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
	}
	close(jobs)
	wg.Wait()
	if firstErr != nil {
		return nil, firstErr
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	for _, p := range m.Packs {
		m.Bytes += uint64(p.PackSize + p.IdxSize)
	}
	if err := syncDir(filepath.Join(dir, PacksDir)); err != nil {
		return nil, err
	}
	m.Finished = time.Now().UTC()
	if err := writeManifest(dir, m); err != nil {
		return nil, fmt.Errorf("write the manifest: %w", err)
	}
	// Only now is the backup complete; what no manifest names goes.
	old, err := unnamed(dir, m)
	if err != nil {
		say("warning: listing files no longer needed: %v", err)
	}
	for _, p := range old {
		if err := os.Remove(p); err != nil {
			say("warning: %v", err)
		}
	}
	return m, nil
}

// lockDir takes an exclusive lock on the backup directory for this process
// (released when it exits, however it exits).
func lockDir(dir string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("%s is in use by another gitraft backup (%v); wait for it to finish", dir, err)
	}
	return func() { f.Close() }, nil
}

// fetchState streams the state into dir/state-<index>.bin (fsynced) and
// decodes it.
func fetchState(ctx context.Context, c backupv1.BackupServiceClient, dir string) (*cluster.BackupState, StateFile, string, error) {
	stream, err := c.ExportState(ctx, &backupv1.ExportStateRequest{})
	if err != nil {
		return nil, StateFile{}, "", err
	}
	tmp, err := os.CreateTemp(dir, "state-*.tmp")
	if err != nil {
		return nil, StateFile{}, "", err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	h := sha256.New()
	var index uint64
	var node string
	var size int64
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, StateFile{}, "", err
		}
		if msg.GetIndex() != 0 {
			index, node = msg.GetIndex(), msg.GetNodeId()
		}
		if _, err := tmp.Write(msg.GetChunk()); err != nil {
			return nil, StateFile{}, "", err
		}
		h.Write(msg.GetChunk())
		size += int64(len(msg.GetChunk()))
	}
	if err := tmp.Sync(); err != nil {
		return nil, StateFile{}, "", err
	}
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		return nil, StateFile{}, "", err
	}
	st, err := cluster.ReadBackupState(tmp)
	if err != nil {
		return nil, StateFile{}, "", fmt.Errorf("the state the node sent does not decode: %w", err)
	}
	if st.Index != index {
		return nil, StateFile{}, "", fmt.Errorf("the node announced the state at index %d and sent index %d", index, st.Index)
	}
	name := fmt.Sprintf("state-%d.bin", index)
	if err := os.Rename(tmp.Name(), filepath.Join(dir, name)); err != nil {
		return nil, StateFile{}, "", err
	}
	return st, StateFile{File: name, Size: size, SHA256: hex.EncodeToString(h.Sum(nil))}, node, nil
}

// copyRepo copies one repository's packs that the directory lacks, trying
// again when the node's copy was busy. It fills repo.Packs and returns the
// sums of every pack named and of those written.
func copyRepo(ctx context.Context, opt CreateOptions, prev *Manifest, repo *Repo) (all, written map[string]Pack, err error) {
	for attempt := 1; ; attempt++ {
		all, written, err = copyRepoOnce(ctx, opt, prev, repo)
		if err == nil || attempt == repoAttempts || status.Code(err) != codes.Unavailable || ctx.Err() != nil {
			return all, written, err
		}
		if opt.Progress != nil {
			opt.Progress(fmt.Sprintf("%s: %v; trying again", repo.Name, status.Convert(err).Message()))
		}
		select {
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		case <-time.After(time.Duration(attempt) * time.Second):
		}
	}
}

func copyRepoOnce(ctx context.Context, opt CreateOptions, prev *Manifest, repo *Repo) (map[string]Pack, map[string]Pack, error) {
	dir := opt.Dir
	packDir := filepath.Join(dir, PacksDir)
	had := have(prev, dir, repo.Name)
	stream, err := opt.Client.CopyRepo(ctx, &backupv1.CopyRepoRequest{Name: repo.Name, Id: repo.ID, Version: repo.Version, Have: had})
	if err != nil {
		return nil, nil, err
	}
	written := map[string]Pack{}
	var cur *packWriter
	var start *backupv1.PackStart
	defer func() {
		if cur != nil {
			cur.abort()
		}
	}()
	finish := func() error {
		if cur == nil {
			return nil
		}
		p, err := cur.finish(start.GetPackSize(), start.GetIdxSize())
		cur = nil
		if err != nil {
			return err
		}
		written[start.GetName()] = p
		return nil
	}
	var done *backupv1.RepoPacks
	for done == nil {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil, nil, fmt.Errorf("the node ended the stream before listing the packs")
		}
		if err != nil {
			return nil, nil, err
		}
		switch x := msg.Msg.(type) {
		case *backupv1.CopyRepoResponse_Pack:
			if err := finish(); err != nil {
				return nil, nil, err
			}
			start = x.Pack
			if cur, err = newPackWriter(packDir, start.GetName()); err != nil {
				return nil, nil, err
			}
		case *backupv1.CopyRepoResponse_PackChunk:
			if cur == nil {
				return nil, nil, fmt.Errorf("the node sent pack data before naming the pack")
			}
			if _, err := cur.pack.Write(x.PackChunk); err != nil {
				return nil, nil, err
			}
		case *backupv1.CopyRepoResponse_IdxChunk:
			if cur == nil {
				return nil, nil, fmt.Errorf("the node sent index data before naming the pack")
			}
			if _, err := cur.idx.Write(x.IdxChunk); err != nil {
				return nil, nil, err
			}
		case *backupv1.CopyRepoResponse_Done:
			if err := finish(); err != nil {
				return nil, nil, err
			}
			done = x.Done
		default:
			return nil, nil, fmt.Errorf("the node sent a message this gitraft does not know (%T); run the same version", msg.Msg)
		}
	}
	all := map[string]Pack{}
	for _, sum := range done.GetPacks() {
		if p, ok := written[sum]; ok {
			all[sum] = p
		} else if p, ok := prev.pack(sum); ok && sizeIs(PackPath(dir, sum, ".pack"), p.PackSize) {
			all[sum] = p
		} else {
			return nil, nil, fmt.Errorf("the node did not send pack %s, which the backup directory lacks", sum)
		}
	}
	repo.Packs = append([]string{}, done.GetPacks()...) // [] rather than null in the manifest
	return all, written, nil
}

// checked reports whether the previous backup held the repository with
// the same refs and the same packs: it checked them then, and the packs'
// files are the ones it wrote (have() compared their sizes; verify compares
// their checksums), so they need no walk again.
func (m *Manifest) checked(r Repo) bool {
	p, ok := m.repo(r.Name)
	return ok && p.ID == r.ID && maps.Equal(p.Refs, r.Refs) && slices.Equal(slices.Sorted(slices.Values(p.Packs)), slices.Sorted(slices.Values(r.Packs)))
}

func (m *Manifest) pack(sum string) (Pack, bool) {
	if m == nil {
		return Pack{}, false
	}
	p, ok := m.Packs[sum]
	return p, ok
}

// Record is what the cluster keeps of a finished backup.
func (m *Manifest) Record() *fsmv1.BackupRecord {
	return &fsmv1.BackupRecord{
		Index: m.Index, FinishedUnixNano: m.Finished.UnixNano(), DurationNanos: int64(m.Finished.Sub(m.Started)), Bytes: m.Bytes, BytesWritten: m.BytesWritten,
		Repos: uint64(len(m.Repos)), Packs: uint64(len(m.Packs)), PacksWritten: uint64(m.PacksWritten), Node: m.Node,
	}
}
