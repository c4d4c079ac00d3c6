package replica

// A peer's side, top to bottom: PutPack (store a pushed pack, fsynced; hold
// the push's base version, catching up if behind; check the push's tips are
// whole here; only then ack), the questions the sender and the reconcilers
// ask (GetReplicas, MissingObjects, GetLocalRefs), and the reconciler that
// brings every copy to the replicated state (catchUpLocked). sender.go is
// the other side.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
	"github.com/gitraft/gitraft/storage"
)

// Service is the gRPC service gitraft.replica.v1 of this node. Register it
// only on a server that accepts node certificates alone for it.
type Service struct {
	replicav1.UnimplementedReplicaServiceServer
	r *Replicas
}

// Service returns the node's gitraft.replica.v1 service.
func (r *Replicas) Service() *Service { return &Service{r: r} }

// ----- PutPack: a peer takes a pushed pack -----

// PutPack receives a pushed pack from the node that took the push and makes
// it durable here. It answers only once the pack is fsynced, this node's
// copy holds the push's base version, and the push's new values are whole
// in it, so that the ack counts toward the push's quorum.
func (s *Service) PutPack(stream replicav1.ReplicaService_PutPackServer) error {
	r := s.r
	self := r.node.ID()
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	h := first.GetHeader()
	if h == nil {
		return status.Error(codes.InvalidArgument, "PutPack must start with a header")
	}
	ctx := stream.Context()
	t, ok := r.node.Repo(h.GetRepo())
	if !ok || t.ID != h.GetRepoId() {
		// This node may be behind on the create; wait for it briefly.
		if _, err := r.node.ReadBarrier(ctx); err == nil {
			t, ok = r.node.Repo(h.GetRepo())
		}
		if !ok || t.ID != h.GetRepoId() {
			return status.Errorf(codes.NotFound, "repository %q (id %d) not found on %s", h.GetRepo(), h.GetRepoId(), self)
		}
	}
	sum, err := r.receivePack(ctx, h.GetRepo(), stream)
	if err != nil {
		return err
	}
	// Count toward the quorum only with every object of the base version.
	c := r.copyOf(h.GetRepo())
	if !c.currentAt(Target{ID: t.ID, Version: h.GetBaseVersion()}) {
		if r.st.Pruning(h.GetRepo()) {
			// Catching up would wait for the prune with the guard held;
			// the other nodes ack meanwhile.
			return status.Errorf(codes.Unavailable, "%s stored the pack but is behind version %d while housekeeping prunes its copy", self, h.GetBaseVersion())
		}
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err = c.guard.Lock(cctx)
		if err == nil {
			err = r.catchUpLocked(cctx, c, h.GetRepo())
			c.guard.Unlock()
		}
		cancel()
	}
	if at := c.pos(); err != nil || at.id != t.ID || at.version < h.GetBaseVersion() || c.damage() != "" {
		return status.Errorf(codes.Unavailable, "%s stored the pack but is behind version %d (at %d): %v", self, h.GetBaseVersion(), at.version, err)
	}
	// And only when the push's new values are whole here: present, with
	// their history, in this copy.
	if len(h.GetTips()) > 0 {
		missing, err := r.missingWithPack(ctx, h.GetRepo(), sum, h.GetTips())
		if err != nil {
			return status.Errorf(codes.Unavailable, "%s stored the pack but could not check it: %v", self, err)
		}
		if len(missing) > 0 {
			return status.Errorf(codes.FailedPrecondition, "%s stored the pack, but it does not make %s whole here", self, strings.Join(missing[:min(3, len(missing))], ", "))
		}
	}
	return stream.SendAndClose(&replicav1.PutPackResponse{NodeId: self, Checksum: sum})
}

// receivePack streams the pack and its index into the copy (InstallPack:
// checksums checked, fsynced). It needs no guard: it only adds files.
func (r *Replicas) receivePack(ctx context.Context, repo string, stream replicav1.ReplicaService_PutPackServer) (string, error) {
	packR, packW := io.Pipe()
	idxR, idxW := io.Pipe()
	type res struct {
		sum string
		err error
	}
	done := make(chan res, 1)
	go func() {
		sum, err := r.st.InstallPack(ctx, repo, packR, idxR)
		packR.CloseWithError(err)
		idxR.CloseWithError(err)
		done <- res{sum, err}
	}()
	inIdx := false
	var recvErr error
	for recvErr == nil {
		m, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			recvErr = err
			break
		}
		switch x := m.Msg.(type) {
		case *replicav1.PutPackRequest_PackChunk:
			if inIdx {
				recvErr = errors.New("pack bytes after idx bytes")
			} else if _, err := packW.Write(x.PackChunk); err != nil {
				recvErr = err
			}
		case *replicav1.PutPackRequest_IdxChunk:
			if !inIdx {
				packW.Close()
				inIdx = true
			}
			if _, err := idxW.Write(x.IdxChunk); err != nil {
				recvErr = err
			}
		}
	}
	if recvErr != nil {
		packW.CloseWithError(recvErr)
		idxW.CloseWithError(recvErr)
		<-done
		return "", status.Errorf(codes.Aborted, "receiving pack: %v", recvErr)
	}
	packW.Close()
	idxW.Close()
	res1 := <-done
	if res1.err != nil {
		code := codes.Internal
		if errors.Is(res1.err, storage.ErrDiskFull) {
			code = codes.ResourceExhausted
		}
		return "", status.Errorf(code, "%s could not store the pack: %v", r.node.ID(), res1.err)
	}
	return res1.sum, nil
}

// ----- questions peers ask -----

// GetReplicas reports this node's copies and their states.
func (s *Service) GetReplicas(ctx context.Context, req *replicav1.GetReplicasRequest) (*replicav1.GetReplicasResponse, error) {
	return s.r.Report(req.GetRepo()), nil
}

// MissingObjects says which objects this node's copy lacks (whole history).
func (s *Service) MissingObjects(ctx context.Context, req *replicav1.MissingObjectsRequest) (*replicav1.MissingObjectsResponse, error) {
	r := s.r
	var missing []string
	var err error
	if req.GetFull() {
		missing, err = r.st.MissingWhole(ctx, req.GetRepo(), req.GetOids())
	} else {
		missing, err = r.missingLocal(ctx, req.GetRepo(), req.GetOids())
	}
	if errors.Is(err, storage.ErrNotFound) {
		missing = req.GetOids()
	} else if err != nil {
		return nil, err
	}
	return &replicav1.MissingObjectsResponse{NodeId: r.node.ID(), Missing: missing}, nil
}

// GetLocalRefs reads a copy's refs and HEAD from this node's disk.
func (s *Service) GetLocalRefs(ctx context.Context, req *replicav1.GetLocalRefsRequest) (*replicav1.GetLocalRefsResponse, error) {
	r := s.r
	local, err := r.st.Local(req.GetRepo())
	if errors.Is(err, storage.ErrNotFound) {
		return nil, status.Errorf(codes.NotFound, "%s has no copy of %q", r.node.ID(), req.GetRepo())
	}
	if err != nil {
		return nil, err
	}
	refs, err := r.st.Refs(ctx, req.GetRepo())
	if err != nil {
		return nil, err
	}
	head, err := r.st.Head(ctx, req.GetRepo())
	if err != nil {
		return nil, err
	}
	return &replicav1.GetLocalRefsResponse{NodeId: r.node.ID(), RepoId: local.ID, Version: local.Version, Refs: refs, Head: head}, nil
}

// ----- the reconciler -----

func (r *Replicas) reconcile() {
	t := time.NewTicker(r.cfg.SyncInterval)
	defer t.Stop()
	for {
		select {
		case <-r.stop:
			return
		case <-r.kick:
		case <-t.C:
		}
		if !r.node.Ready() {
			continue // the state may still be behind; don't act on it yet
		}
		r.syncAll()
	}
}

func (r *Replicas) syncAll() {
	targets := r.node.Repos()
	// The copies that need work, taken by SyncWorkers goroutines at once:
	// a burst of creates or a node back from a long absence fills many
	// repositories, and each is mostly waiting on fsync or on a peer.
	work := make(chan string)
	var wg sync.WaitGroup
	for range r.cfg.SyncWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for name := range work {
				c := r.copyOf(name)
				if r.st.Pruning(name) {
					// Its ref change would wait for the prune, holding the
					// guard that pushes through this node need; next round.
					continue
				}
				if !c.guard.TryLock() {
					continue // a push or another catch-up has it; next round
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
				go func() {
					select {
					case <-r.stop:
						cancel()
					case <-ctx.Done():
					}
				}()
				if err := r.catchUpLocked(ctx, c, name); err != nil {
					r.log.Warn("catching up failed; will retry", "repo", name, "err", err)
				}
				cancel()
				c.guard.Unlock()
			}
		}()
	}
feed:
	for _, name := range slices.Sorted(maps.Keys(targets)) {
		c := r.copyOf(name)
		if c.currentAt(targets[name]) && c.errText() == "" {
			continue
		}
		select {
		case <-r.stop:
			break feed
		case work <- name:
		}
	}
	close(work)
	wg.Wait()
	// Repositories the state no longer has.
	r.mu.Lock()
	var gone []string
	for name := range r.copies {
		if _, ok := targets[name]; !ok {
			gone = append(gone, name)
		}
	}
	r.mu.Unlock()
	for _, name := range gone {
		c := r.copyOf(name)
		if !c.guard.TryLock() {
			continue
		}
		if _, ok := r.node.Repo(name); !ok {
			if err := r.st.Delete(name); err != nil && !errors.Is(err, storage.ErrNotFound) {
				r.log.Warn("removing a deleted repository failed", "repo", name, "err", err)
			} else {
				r.log.Info("removed deleted repository", "repo", name)
				r.mu.Lock()
				delete(r.copies, name)
				r.mu.Unlock()
			}
		}
		c.guard.Unlock()
	}
}

// catchUpLocked brings one copy to the version the state has now. The
// caller holds the copy's guard.
func (r *Replicas) catchUpLocked(ctx context.Context, c *copyState, name string) error {
	t, ok := r.node.Repo(name)
	if !ok {
		return fmt.Errorf("repository %q: %w", name, storage.ErrNotFound)
	}
	local, err := r.st.Local(name)
	if errors.Is(err, storage.ErrNotFound) || err == nil && local.ID != t.ID {
		if err := r.st.Init(ctx, name, t.ID); err != nil {
			return r.fail(c, fmt.Errorf("init: %w", err))
		}
		local = storage.Replica{Name: name, ID: t.ID, Version: 1}
		c.at.Store(&position{t.ID, 1})
	} else if err != nil {
		return r.fail(c, err)
	}
	// A damaged copy (a scrub found lost objects or refs that differ from
	// the state) is healed even at its version: the refs whose history is
	// not whole are dropped, the missing objects fetched from a current
	// peer, and every ref reset to the state's value.
	damaged := c.damage()
	if local.Version >= t.Version && damaged == "" {
		c.reached(t.ID, local.Version)
		return nil
	}
	c.syncing.Store(true)
	defer c.syncing.Store(false)
	oids := slices.Collect(maps.Values(t.Refs))
	if k, err := r.st.RemoveStaleLocks(name); err != nil {
		return r.fail(c, err)
	} else if k > 0 {
		r.log.Warn("removed lock files an interrupted git left behind", "repo", name, "count", k)
	}
	if damaged != "" {
		r.st.ForgetChecks(name)
		dropped, err := r.st.DropRefsNotWhole(ctx, name)
		if err != nil {
			return r.fail(c, err)
		}
		if len(dropped) > 0 {
			r.log.Warn("heal: dropped refs whose history this copy lost; the state puts them back", "repo", name, "refs", dropped)
		}
	}
	missing, err := r.st.Missing(ctx, name, oids)
	if err != nil {
		return r.fail(c, err)
	}
	if len(missing) > 0 {
		// Refs whose objects this copy lost would fail every check that
		// trusts the refs; the state puts them back below.
		if dropped, err := r.st.DropBrokenRefs(ctx, name); err != nil {
			return r.fail(c, err)
		} else if len(dropped) > 0 {
			r.log.Warn("dropped refs whose objects this copy lost", "repo", name, "refs", dropped)
			if missing, err = r.st.Missing(ctx, name, oids); err != nil {
				return r.fail(c, err)
			}
		}
	}
	if len(missing) > 0 {
		if err := r.fetchFromPeer(ctx, name, t.Version, missing); err != nil {
			if damaged != "" {
				r.scrub.healFailed.Add(1)
			}
			return r.fail(c, err)
		}
	}
	var reset []string
	if damaged != "" {
		if disk, err := r.st.Refs(ctx, name); err == nil {
			reset = diffRefs(disk, t.Refs)
		}
	}
	if err := r.st.SetRefs(ctx, name, t.Refs, t.Head); err != nil {
		return r.fail(c, err)
	}
	if err := r.st.SetVersion(name, t.ID, t.Version); err != nil {
		return r.fail(c, err)
	}
	c.damaged.Store(nil)
	c.reached(t.ID, t.Version)
	if damaged != "" {
		r.scrub.healed.Add(1)
		r.log.Warn("healed a damaged copy from a current peer", "repo", name, "version", t.Version, "damage", damaged, "fetched", len(missing), "refs_reset", reset)
		return nil
	}
	r.log.Info("caught up", "repo", name, "version", t.Version, "from", local.Version, "fetched", len(missing))
	return nil
}

func (r *Replicas) fail(c *copyState, err error) error {
	msg := err.Error()
	c.lastErr.Store(&msg)
	c.failingSince.CompareAndSwap(0, time.Now().UnixNano())
	return err
}

// fetchFromPeer fetches objects from a peer whose copy is at least at
// version, through git's ext:: transport and `gitraft node-git`.
func (r *Replicas) fetchFromPeer(ctx context.Context, name string, version uint64, oids []string) error {
	peers := r.currentPeers(ctx, name, version)
	if len(peers) == 0 {
		return fmt.Errorf("no peer holds version %d of %q yet", version, name)
	}
	var errs []string
	for _, p := range peers {
		url := fmt.Sprintf("ext::%s node-git %s %%S %s", extQuote(r.cfg.Binary), p.GetGrpcAddr(), extQuote(name))
		err := r.st.Fetch(ctx, name, url, r.cfg.FetchEnv, oids)
		if err == nil {
			return nil
		}
		errs = append(errs, fmt.Sprintf("%s: %v", p.GetId(), err))
	}
	return fmt.Errorf("fetching %d objects failed from every current peer: %s", len(oids), strings.Join(errs, "; "))
}

// extQuote escapes spaces and percent signs for git's ext:: transport.
func extQuote(s string) string {
	return strings.NewReplacer("%", "%%", " ", "% ").Replace(s)
}
