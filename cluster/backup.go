package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/gitraft/gitraft/cluster/replica"
	backupv1 "github.com/gitraft/gitraft/proto/gitraft/backup/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	"github.com/gitraft/gitraft/storage"
)

// backupChunk is the size of the pieces a backup streams.
const backupChunk = 1 << 20

// backupCatchUp bounds how long CopyRepo waits for this node's copy to
// reach the version a backup needs.
const backupCatchUp = 2 * time.Minute

// ----- BackupService -----

type backupService struct {
	backupv1.UnimplementedBackupServiceServer
	n *Node
}

func (n *Node) registerBackup(s *grpc.Server) {
	backupv1.RegisterBackupServiceServer(s, &backupService{n: n})
}

// ExportState streams the state at a read barrier's index, in the snapshot
// format: a backup holds what a Raft snapshot of the same index would.
func (s *backupService) ExportState(_ *backupv1.ExportStateRequest, stream backupv1.BackupService_ExportStateServer) error {
	ctx := stream.Context()
	if _, err := s.n.ReadBarrier(ctx); err != nil {
		return toStatus(err)
	}
	var v *snapshotView
	s.n.fsm.Read(func(st *State) { v = st.capture() })
	first := true
	w := &chunkWriter{send: func(b []byte) error {
		m := &backupv1.ExportStateResponse{Chunk: b}
		if first {
			m.Index, m.NodeId, first = v.index, s.n.cfg.NodeID, false
		}
		return stream.Send(m)
	}}
	if err := writeSnapshot(w, v); err != nil {
		return toStatus(err)
	}
	if err := w.Flush(); err != nil {
		return toStatus(err)
	}
	return nil
}

// chunkWriter sends what is written to it in pieces of backupChunk.
type chunkWriter struct {
	buf  []byte
	send func([]byte) error
}

func (w *chunkWriter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		k := min(len(p), backupChunk-len(w.buf))
		w.buf = append(w.buf, p[:k]...)
		p = p[k:]
		if len(w.buf) == backupChunk {
			if err := w.Flush(); err != nil {
				return 0, err
			}
		}
	}
	return n, nil
}

func (w *chunkWriter) Flush() error {
	if len(w.buf) == 0 {
		return nil
	}
	err := w.send(w.buf)
	w.buf = nil
	return err
}

// CopyRepo streams the packs of this node's copy of a repository once it
// holds the version asked for.
func (s *backupService) CopyRepo(req *backupv1.CopyRepoRequest, stream backupv1.BackupService_CopyRepoServer) error {
	n := s.n
	if n.git == nil {
		return status.Errorf(codes.FailedPrecondition, "%s keeps no repositories (%v); run the backup against a node that does", n.cfg.NodeID, ErrNoGit)
	}
	if err := storage.ValidateName(req.GetName()); err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	if req.GetId() == 0 || req.GetVersion() == 0 {
		return status.Error(codes.InvalidArgument, "a repository's id and version start at 1")
	}
	ctx := stream.Context()
	packs, version, err := n.git.OpenForBackup(ctx, req.GetName(), req.GetId(), req.GetVersion(), backupCatchUp)
	switch {
	case errors.Is(err, replica.ErrReplaced):
		return status.Error(codes.Aborted, err.Error())
	case errors.Is(err, replica.ErrBehind), errors.Is(err, storage.ErrPacksChanging):
		return status.Error(codes.Unavailable, err.Error())
	case err != nil:
		return toStatus(err)
	}
	defer storage.ClosePacks(packs)
	have := map[string]bool{}
	for _, h := range req.GetHave() {
		have[h] = true
	}
	done := &backupv1.RepoPacks{Version: version, NodeId: n.cfg.NodeID}
	for _, p := range packs {
		done.Packs = append(done.Packs, p.Name)
		if have[p.Name] {
			continue
		}
		if err := stream.Send(&backupv1.CopyRepoResponse{Msg: &backupv1.CopyRepoResponse_Pack{Pack: &backupv1.PackStart{
			Name: p.Name, PackSize: p.PackSize, IdxSize: p.IdxSize, Loose: p.Loose,
		}}}); err != nil {
			return err
		}
		if err := sendFile(p.Pack, p.PackSize, func(b []byte) error {
			return stream.Send(&backupv1.CopyRepoResponse{Msg: &backupv1.CopyRepoResponse_PackChunk{PackChunk: b}})
		}); err != nil {
			return err
		}
		if err := sendFile(p.Idx, p.IdxSize, func(b []byte) error {
			return stream.Send(&backupv1.CopyRepoResponse{Msg: &backupv1.CopyRepoResponse_IdxChunk{IdxChunk: b}})
		}); err != nil {
			return err
		}
	}
	return stream.Send(&backupv1.CopyRepoResponse{Msg: &backupv1.CopyRepoResponse_Done{Done: done}})
}

// sendFile sends the first size bytes of f, from its start, in chunks.
func sendFile(f io.ReaderAt, size int64, send func([]byte) error) error {
	buf := make([]byte, backupChunk)
	for off := int64(0); off < size; {
		k, err := f.ReadAt(buf[:min(int64(len(buf)), size-off)], off)
		if k > 0 {
			if err := send(buf[:k]); err != nil {
				return err
			}
			off += int64(k)
		}
		if err != nil && !(errors.Is(err, io.EOF) && off == size) {
			return status.Errorf(codes.Internal, "read pack: %v", err)
		}
	}
	return nil
}

// RecordBackup commits a finished backup to the replicated state.
func (s *backupService) RecordBackup(ctx context.Context, req *backupv1.RecordBackupRequest) (*backupv1.RecordBackupResponse, error) {
	b := req.GetBackup()
	if b.GetIndex() == 0 {
		return nil, status.Error(codes.InvalidArgument, "a backup record needs the index of the state it holds")
	}
	r, err := s.n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_RecordBackup{RecordBackup: &fsmv1.RecordBackup{Backup: b}}})
	if err != nil {
		return nil, err
	}
	return &backupv1.RecordBackupResponse{Index: r.GetIndex()}, nil
}

// ----- reading a backup's state -----

// BackupState is the replicated state a backup holds.
type BackupState struct {
	Index uint64
	State *State
}

// ReadBackupState decodes a state written by ExportState (the snapshot
// format) and checks that it restores.
func ReadBackupState(r io.Reader) (*BackupState, error) {
	index, items, err := readSnapshot(r)
	if err != nil {
		return nil, err
	}
	s, err := restoreState(index, items)
	if err != nil {
		return nil, err
	}
	if index == 0 {
		return nil, fmt.Errorf("the state has index 0; it was not written by gitraft backup")
	}
	return &BackupState{Index: index, State: s}, nil
}

// ----- restoring a backup as a new cluster -----

// ErrRestore is wrapped by every refusal to restore into a data dir.
var ErrRestore = errors.New("cannot restore")

// RestoreDataDir makes dataDir the data dir of the first node of a new
// cluster whose state is the backup's: a Raft snapshot at the backup's
// index, with a configuration of this node alone as voter, and the node's
// identity file. `gitraft serve` on that dir starts from the snapshot, elects
// itself and goes on at the next index; other nodes join it as usual.
//
// The old cluster's members and write locks are left out: the new cluster
// has members of its own, and no push of the old one is in flight here.
// dataDir must not hold Raft state yet. The repositories' copies are the
// caller's (they go under dataDir/repos).
func RestoreDataDir(cfg Config, b *BackupState, logger *slog.Logger) error {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return err
	}
	if logger == nil {
		logger = slog.Default()
	}
	for _, name := range []string{metaFile, raftDirName} {
		if _, err := os.Stat(filepath.Join(cfg.DataDir, name)); err == nil {
			return fmt.Errorf("%w: %s already holds a node (%s); restore into a new, empty data dir", ErrRestore, cfg.DataDir, name)
		}
	}
	var fingerprint string
	if !cfg.Insecure {
		var err error
		if fingerprint, err = caFingerprint(cfg.TLS.CAFile); err != nil {
			return err
		}
	}
	if err := checkDataDir(cfg.DataDir, cfg.NodeID, fingerprint); err != nil {
		return err
	}
	dir := filepath.Join(cfg.DataDir, raftDirName)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("%w: %v", ErrRestore, err)
	}
	snaps, err := raft.NewFileSnapshotStoreWithLogger(dir, 2, newHCLog(logger, "snapshot"))
	if err != nil {
		return fmt.Errorf("%w: snapshots in %s: %v", ErrRestore, dir, err)
	}
	conf := raft.Configuration{Servers: []raft.Server{{
		ID: raft.ServerID(cfg.NodeID), Address: raft.ServerAddress(cfg.RaftAdvertise), Suffrage: raft.Voter,
	}}}
	// The file store encodes the peers of the old snapshot format through
	// a transport; both of raft's encode an address as its bytes.
	_, trans := raft.NewInmemTransport(raft.ServerAddress(cfg.RaftAdvertise))
	defer trans.Close()
	sink, err := snaps.Create(raft.SnapshotVersionMax, b.Index, 1, conf, b.Index, trans)
	if err != nil {
		return fmt.Errorf("%w: create snapshot: %v", ErrRestore, err)
	}
	v := b.State.capture()
	v.members, v.locks = nil, nil
	if err := writeSnapshot(sink, v); err != nil {
		sink.Cancel()
		return fmt.Errorf("%w: %v", ErrRestore, err)
	}
	if err := sink.Close(); err != nil {
		return fmt.Errorf("%w: write snapshot: %v", ErrRestore, err)
	}
	return nil
}

// Repos lists the backup's repositories with their refs, sorted by name.
func (b *BackupState) Repos() []*fsmv1.Repo {
	list, _ := b.State.Repos()
	out := make([]*fsmv1.Repo, 0, len(list))
	for _, r := range list {
		full, _ := b.State.Repo(r.GetName())
		out = append(out, full)
	}
	return out
}
