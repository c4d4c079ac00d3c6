package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	nodev1 "github.com/gitraft/gitraft/proto/gitraft/node/v1"
	"github.com/gitraft/gitraft/storage"
)

// GitConfig switches on the git side of a node: its repositories on disk.
type GitConfig struct {
	Store *storage.Store
	// Binary is the gitraft executable, which git runs to fetch from peers
	// (`gitraft node-git`, through git's ext:: transport).
	Binary string
	// SyncInterval is how often every repository is checked against the
	// replicated state even without a change (default 5s).
	SyncInterval time.Duration
	// ReadCatchUp bounds how long a read waits for this node to catch up
	// before it is proxied to a current peer (default 10s).
	ReadCatchUp time.Duration
	// MinFreeBytes is the free space below which this node hands pushes to
	// a peer instead of taking them (default 100 MB).
	MinFreeBytes uint64
	// SyncWorkers is how many copies the reconciler brings up to date at
	// once (default 4).
	SyncWorkers int
	// StuckAfter is how long a copy may fail to catch up before it counts as
	// stuck: /readyz turns 503 and gitraft_repos_stuck counts it (default
	// 2m).
	StuckAfter time.Duration
	// ServeStaleReads lets a node that cannot confirm it is current (no
	// leader, cut off from the quorum) serve its own copy with a warning.
	// Off by default: such a read is refused.
	ServeStaleReads bool
}

// replicaState is what this node's disk holds of one repository.
type replicaState struct {
	mu      sync.Mutex // held while syncing or while a push runs here
	version uint64     // last version reached on disk
	id      uint64
	syncing bool
	err     string
	// failingSince is when catching up started failing (unix nanos; 0
	// while it succeeds): a copy failing for long is stuck.
	failingSince atomic.Int64
}

// replicas brings this node's disk to the replicated state, repository by
// repository, and knows how far each copy got.
type replicas struct {
	n     *Node
	st    *storage.Store
	cfg   GitConfig
	log   *slog.Logger
	mu    sync.Mutex
	repos map[string]*replicaState
	kick  chan struct{}
}

// enableGit attaches the repository store, before Raft starts applying.
func (n *Node) enableGit(cfg GitConfig) {
	if cfg.SyncInterval == 0 {
		cfg.SyncInterval = 5 * time.Second
	}
	if cfg.ReadCatchUp == 0 {
		cfg.ReadCatchUp = 10 * time.Second
	}
	if cfg.MinFreeBytes == 0 {
		cfg.MinFreeBytes = 100 << 20
	}
	if cfg.SyncWorkers <= 0 {
		cfg.SyncWorkers = 4
	}
	if cfg.StuckAfter == 0 {
		cfg.StuckAfter = 2 * time.Minute
	}
	r := &replicas{n: n, st: cfg.Store, cfg: cfg, log: n.log.With("component", "replicas"), repos: map[string]*replicaState{}, kick: make(chan struct{}, 1)}
	if list, err := cfg.Store.List(); err == nil {
		for _, l := range list {
			r.repos[l.Name] = &replicaState{version: l.Version, id: l.ID}
		}
	}
	n.git = r
	n.fsm.onRepoChange = r.poke
}

func (r *replicas) poke() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

func (r *replicas) get(name string) *replicaState {
	r.mu.Lock()
	defer r.mu.Unlock()
	rs := r.repos[name]
	if rs == nil {
		rs = &replicaState{}
		r.repos[name] = rs
	}
	return rs
}

func (r *replicas) loop() {
	t := time.NewTicker(r.cfg.SyncInterval)
	defer t.Stop()
	for {
		select {
		case <-r.n.stop:
			return
		case <-r.kick:
		case <-t.C:
		}
		if !r.n.ready.Load() {
			continue // the state may still be behind; don't act on it yet
		}
		r.syncAll()
	}
}

// target is what the replicated state says a repository must look like.
type target struct {
	name    string
	id      uint64
	version uint64
	refs    map[string]string
	head    string
}

func (r *replicas) targets() map[string]target {
	out := map[string]target{}
	r.n.fsm.Read(func(s *State) {
		for name, rs := range s.repos {
			out[name] = target{name: name, id: rs.id, version: rs.version, refs: rs.refs, head: rs.head}
		}
	})
	return out
}

func (r *replicas) target(name string) (target, bool) {
	var t target
	var ok bool
	r.n.fsm.Read(func(s *State) {
		rs, found := s.repos[name]
		if found {
			t, ok = target{name: name, id: rs.id, version: rs.version, refs: rs.refs, head: rs.head}, true
		}
	})
	return t, ok
}

func (r *replicas) syncAll() {
	targets := r.targets()
	// The copies that need work, taken by syncWorkers goroutines at once:
	// a burst of creates or a node back from a long absence fills many
	// repositories, and each is mostly waiting on fsync or on a peer.
	work := make(chan string)
	var wg sync.WaitGroup
	for range r.cfg.SyncWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for name := range work {
				rs := r.get(name)
				if !rs.mu.TryLock() {
					continue // a push or another sync has it; next round
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
				if err := r.syncLocked(ctx, rs, name); err != nil {
					r.log.Warn("catching up failed; will retry", "repo", name, "err", err)
				}
				cancel()
				rs.mu.Unlock()
			}
		}()
	}
feed:
	for _, name := range slices.Sorted(maps.Keys(targets)) {
		rs := r.get(name)
		t := targets[name]
		if rs.mu.TryLock() {
			current := rs.id == t.id && rs.version >= t.version && rs.err == ""
			rs.mu.Unlock()
			if current {
				continue
			}
		}
		select {
		case <-r.n.stop:
			break feed
		case work <- name:
		}
	}
	close(work)
	wg.Wait()
	// Repositories the state no longer has.
	r.mu.Lock()
	var gone []string
	for name := range r.repos {
		if _, ok := targets[name]; !ok {
			gone = append(gone, name)
		}
	}
	r.mu.Unlock()
	for _, name := range gone {
		rs := r.get(name)
		if !rs.mu.TryLock() {
			continue
		}
		if _, ok := r.target(name); !ok {
			if err := r.st.Delete(name); err != nil && !errors.Is(err, storage.ErrNotFound) {
				r.log.Warn("removing a deleted repository failed", "repo", name, "err", err)
			} else {
				r.log.Info("removed deleted repository", "repo", name)
				r.mu.Lock()
				delete(r.repos, name)
				r.mu.Unlock()
			}
		}
		rs.mu.Unlock()
	}
}

// syncLocked brings one repository to the version the state has now. The
// caller holds rs.mu.
func (r *replicas) syncLocked(ctx context.Context, rs *replicaState, name string) error {
	t, ok := r.target(name)
	if !ok {
		return fmt.Errorf("repository %q: %w", name, storage.ErrNotFound)
	}
	local, err := r.st.Local(name)
	if errors.Is(err, storage.ErrNotFound) || err == nil && local.ID != t.id {
		if err := r.st.Init(ctx, name, t.id); err != nil {
			return r.fail(rs, fmt.Errorf("init: %w", err))
		}
		local = storage.Replica{Name: name, ID: t.id, Version: 1}
	} else if err != nil {
		return r.fail(rs, err)
	}
	rs.id = t.id
	if local.Version >= t.version {
		rs.version, rs.err, rs.syncing = local.Version, "", false
		rs.failingSince.Store(0)
		return nil
	}
	rs.syncing = true
	defer func() { rs.syncing = false }()
	oids := slices.Collect(maps.Values(t.refs))
	if k, err := r.st.RemoveStaleLocks(name); err != nil {
		return r.fail(rs, err)
	} else if k > 0 {
		r.log.Warn("removed lock files an interrupted git left behind", "repo", name, "count", k)
	}
	missing, err := r.st.Missing(ctx, name, oids)
	if err != nil {
		return r.fail(rs, err)
	}
	if len(missing) > 0 {
		// Refs whose objects this copy lost would fail every check that
		// trusts the refs; the state puts them back below.
		if dropped, err := r.st.DropBrokenRefs(ctx, name); err != nil {
			return r.fail(rs, err)
		} else if len(dropped) > 0 {
			r.log.Warn("dropped refs whose objects this copy lost", "repo", name, "refs", dropped)
			if missing, err = r.st.Missing(ctx, name, oids); err != nil {
				return r.fail(rs, err)
			}
		}
	}
	if len(missing) > 0 {
		if err := r.fetchFromPeer(ctx, name, t.version, missing); err != nil {
			return r.fail(rs, err)
		}
	}
	if err := r.st.SetRefs(ctx, name, t.refs, t.head); err != nil {
		return r.fail(rs, err)
	}
	if err := r.st.SetVersion(name, t.id, t.version); err != nil {
		return r.fail(rs, err)
	}
	r.log.Info("caught up", "repo", name, "version", t.version, "from", local.Version, "fetched", len(missing))
	rs.version, rs.err = t.version, ""
	rs.failingSince.Store(0)
	return nil
}

func (r *replicas) fail(rs *replicaState, err error) error {
	rs.err = err.Error()
	rs.failingSince.CompareAndSwap(0, time.Now().UnixNano())
	return err
}

// health counts the copies that are behind the replicated state and those
// whose catching up has been failing for longer than stuckAfter, and names
// the first few stuck ones.
func (r *replicas) health() (behind, stuck int, names []string) {
	targets := r.targets()
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now().UnixNano()
	for _, name := range slices.Sorted(maps.Keys(targets)) {
		t := targets[name]
		rs := r.repos[name]
		if rs == nil {
			behind++
			continue
		}
		if !rs.mu.TryLock() {
			continue // a push or a catch-up is at work on it right now
		}
		cur := rs.id == t.id && rs.version >= t.version
		rs.mu.Unlock()
		if cur {
			continue
		}
		behind++
		if since := rs.failingSince.Load(); since != 0 && now-since > int64(r.cfg.StuckAfter) {
			stuck++
			if len(names) < 5 {
				names = append(names, name)
			}
		}
	}
	return behind, stuck, names
}

// fetchFromPeer fetches objects from a peer whose copy is at least at
// version, through git's ext:: transport and `gitraft node-git`.
func (r *replicas) fetchFromPeer(ctx context.Context, name string, version uint64, oids []string) error {
	peers := r.n.currentPeers(ctx, name, version)
	if len(peers) == 0 {
		return fmt.Errorf("no peer holds version %d of %q yet", version, name)
	}
	var errs []string
	for _, p := range peers {
		url := fmt.Sprintf("ext::%s node-git %s %%S %s", extQuote(r.cfg.Binary), p.GetGrpcAddr(), extQuote(name))
		err := r.st.Fetch(ctx, name, url, r.n.nodeGitEnv(), oids)
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

// nodeGitEnv gives `gitraft node-git` this node's credentials.
func (n *Node) nodeGitEnv() []string {
	if n.cfg.Insecure {
		return []string{"GITRAFT_INSECURE=true"}
	}
	return []string{
		"GITRAFT_TLS_CA_FILE=" + n.cfg.TLS.CAFile,
		"GITRAFT_TLS_CERT_FILE=" + n.cfg.TLS.CertFile,
		"GITRAFT_TLS_KEY_FILE=" + n.cfg.TLS.KeyFile,
	}
}

// currentPeers asks the other members which hold a repository at version or
// later, and returns those that do.
func (n *Node) currentPeers(ctx context.Context, name string, version uint64) []*fsmv1.Member {
	var members []*fsmv1.Member
	n.fsm.Read(func(s *State) { members = s.Members() })
	type answer struct {
		m  *fsmv1.Member
		ok bool
	}
	ch := make(chan answer, len(members))
	asked := 0
	for _, m := range members {
		if m.GetId() == n.cfg.NodeID || m.GetGrpcAddr() == "" {
			continue
		}
		asked++
		go func() {
			c, err := n.peers.node(m.GetGrpcAddr())
			if err != nil {
				ch <- answer{m, false}
				return
			}
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			resp, err := c.GetReplicas(cctx, &nodev1.GetReplicasRequest{Repo: name})
			ok := err == nil && len(resp.GetReplicas()) == 1 && resp.GetReplicas()[0].GetVersion() >= version
			ch <- answer{m, ok}
		}()
	}
	var out []*fsmv1.Member
	for range asked {
		if a := <-ch; a.ok {
			out = append(out, a.m)
		}
	}
	return out
}

// replicaReport lists this node's copies and their states.
func (n *Node) replicaReport(repo string) *nodev1.GetReplicasResponse {
	resp := &nodev1.GetReplicasResponse{NodeId: n.cfg.NodeID, Index: n.fsm.Index()}
	if n.git == nil {
		return resp
	}
	targets := n.git.targets()
	names := slices.Sorted(maps.Keys(targets))
	if repo != "" {
		names = []string{repo}
	}
	for _, name := range names {
		t, ok := targets[name]
		if !ok {
			continue
		}
		n.git.mu.Lock()
		rs := n.git.repos[name]
		n.git.mu.Unlock()
		rep := &nodev1.Replica{Repo: name, RepoId: t.id, State: nodev1.ReplicaState_REPLICA_STATE_BEHIND}
		if rs != nil && rs.id == t.id {
			rep.Version, rep.Error = rs.version, rs.err
			switch {
			case rs.version >= t.version:
				rep.State = nodev1.ReplicaState_REPLICA_STATE_CURRENT
			case rs.syncing:
				rep.State = nodev1.ReplicaState_REPLICA_STATE_SYNCING
			}
		}
		resp.Replicas = append(resp.Replicas, rep)
	}
	return resp
}

func (s *nodeService) GetReplicas(ctx context.Context, req *nodev1.GetReplicasRequest) (*nodev1.GetReplicasResponse, error) {
	return s.n.replicaReport(req.GetRepo()), nil
}

// PutPack receives a pushed pack from the node that took the push and makes
// it durable here. It answers only once the pack is fsynced and this node's
// copy holds the push's base version, so that the ack counts toward the
// push's quorum.
func (s *nodeService) PutPack(stream nodev1.NodeService_PutPackServer) error {
	n := s.n
	if n.git == nil {
		return status.Error(codes.FailedPrecondition, "this node serves no repositories")
	}
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	h := first.GetHeader()
	if h == nil {
		return status.Error(codes.InvalidArgument, "PutPack must start with a header")
	}
	ctx := stream.Context()
	t, ok := n.git.target(h.GetRepo())
	if !ok || t.id != h.GetRepoId() {
		// This node may be behind on the create; wait for it briefly.
		if _, err := n.ReadBarrier(ctx); err == nil {
			t, ok = n.git.target(h.GetRepo())
		}
		if !ok || t.id != h.GetRepoId() {
			return status.Errorf(codes.NotFound, "repository %q (id %d) not found on %s", h.GetRepo(), h.GetRepoId(), n.cfg.NodeID)
		}
	}
	rs := n.git.get(h.GetRepo())
	packR, packW := io.Pipe()
	idxR, idxW := io.Pipe()
	type res struct {
		sum string
		err error
	}
	done := make(chan res, 1)
	go func() {
		sum, err := n.git.st.InstallPack(ctx, h.GetRepo(), packR, idxR)
		packR.CloseWithError(err)
		idxR.CloseWithError(err)
		done <- res{sum, err}
	}()
	inIdx := false
	var recvErr error
	for {
		m, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			recvErr = err
			break
		}
		switch x := m.Msg.(type) {
		case *nodev1.PutPackRequest_PackChunk:
			if inIdx {
				recvErr = errors.New("pack bytes after idx bytes")
			} else if _, err := packW.Write(x.PackChunk); err != nil {
				recvErr = err
			}
		case *nodev1.PutPackRequest_IdxChunk:
			if !inIdx {
				packW.Close()
				inIdx = true
			}
			if _, err := idxW.Write(x.IdxChunk); err != nil {
				recvErr = err
			}
		}
		if recvErr != nil {
			break
		}
	}
	if recvErr != nil {
		packW.CloseWithError(recvErr)
		idxW.CloseWithError(recvErr)
		<-done
		return status.Errorf(codes.Aborted, "receiving pack: %v", recvErr)
	}
	packW.Close()
	idxW.Close()
	r := <-done
	if r.err != nil {
		code := codes.Internal
		if errors.Is(r.err, storage.ErrDiskFull) {
			code = codes.ResourceExhausted
		}
		return status.Errorf(code, "%s could not store the pack: %v", n.cfg.NodeID, r.err)
	}
	// Count toward the quorum only with every object of the base version.
	rs.mu.Lock()
	if rs.id != t.id || rs.version < h.GetBaseVersion() {
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err = n.git.syncLocked(cctx, rs, h.GetRepo())
		cancel()
	}
	behind, at := rs.version < h.GetBaseVersion(), rs.version
	rs.mu.Unlock()
	if err != nil || behind {
		return status.Errorf(codes.Unavailable, "%s stored the pack but is behind version %d (at %d): %v", n.cfg.NodeID, h.GetBaseVersion(), at, err)
	}
	// And only when the push's new values are whole here: present, with
	// their history, in this copy.
	if len(h.GetTips()) > 0 {
		missing, err := n.missingLocal(ctx, h.GetRepo(), h.GetTips())
		if err != nil {
			return status.Errorf(codes.Unavailable, "%s stored the pack but could not check it: %v", n.cfg.NodeID, err)
		}
		if len(missing) > 0 {
			return status.Errorf(codes.FailedPrecondition, "%s stored the pack, but it does not make %s whole here", n.cfg.NodeID, strings.Join(missing[:min(3, len(missing))], ", "))
		}
	}
	return stream.SendAndClose(&nodev1.PutPackResponse{NodeId: n.cfg.NodeID, Checksum: r.sum})
}

func (s *nodeService) GetLocalRefs(ctx context.Context, req *nodev1.GetLocalRefsRequest) (*nodev1.GetLocalRefsResponse, error) {
	n := s.n
	if n.git == nil {
		return nil, status.Error(codes.FailedPrecondition, ErrNoGit.Error())
	}
	local, err := n.git.st.Local(req.GetRepo())
	if errors.Is(err, storage.ErrNotFound) {
		return nil, status.Errorf(codes.NotFound, "%s has no copy of %q", n.cfg.NodeID, req.GetRepo())
	}
	if err != nil {
		return nil, err
	}
	refs, err := n.git.st.Refs(ctx, req.GetRepo())
	if err != nil {
		return nil, err
	}
	head, err := n.git.st.Head(ctx, req.GetRepo())
	if err != nil {
		return nil, err
	}
	return &nodev1.GetLocalRefsResponse{NodeId: n.cfg.NodeID, RepoId: local.ID, Version: local.Version, Refs: refs, Head: head}, nil
}

// memberReplicas asks every member (this node included) for its copy of a
// repository; members that do not answer are reported unreachable.
func (n *Node) memberReplicas(ctx context.Context, repo string) map[string]*nodev1.Replica {
	var members []*fsmv1.Member
	n.fsm.Read(func(s *State) { members = s.Members() })
	out := map[string]*nodev1.Replica{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, m := range members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var rep *nodev1.Replica
			if m.GetId() == n.cfg.NodeID {
				if r := n.replicaReport(repo).GetReplicas(); len(r) == 1 {
					rep = r[0]
				}
			} else if c, err := n.peers.node(m.GetGrpcAddr()); err == nil {
				cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
				resp, err := c.GetReplicas(cctx, &nodev1.GetReplicasRequest{Repo: repo})
				cancel()
				if err == nil && len(resp.GetReplicas()) == 1 {
					rep = resp.GetReplicas()[0]
				} else if err != nil {
					rep = &nodev1.Replica{Repo: repo, Error: status.Convert(err).Message()}
				}
			}
			if rep != nil {
				mu.Lock()
				out[m.GetId()] = rep
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return out
}

// gitChecks bounds the git processes object checks may run at once on a
// node, so a burst of ref updates cannot starve Raft of CPU.
var gitChecks = make(chan struct{}, 4)

func (n *Node) missingLocal(ctx context.Context, repo string, oids []string) ([]string, error) {
	select {
	case gitChecks <- struct{}{}:
		defer func() { <-gitChecks }()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return n.git.st.Missing(ctx, repo, oids)
}

func (s *nodeService) MissingObjects(ctx context.Context, req *nodev1.MissingObjectsRequest) (*nodev1.MissingObjectsResponse, error) {
	if s.n.git == nil {
		return nil, status.Error(codes.FailedPrecondition, ErrNoGit.Error())
	}
	var missing []string
	var err error
	if req.GetFull() {
		missing, err = s.n.git.st.MissingWhole(ctx, req.GetRepo(), req.GetOids())
	} else {
		missing, err = s.n.missingLocal(ctx, req.GetRepo(), req.GetOids())
	}
	if errors.Is(err, storage.ErrNotFound) {
		missing = req.GetOids()
	} else if err != nil {
		return nil, err
	}
	return &nodev1.MissingObjectsResponse{NodeId: s.n.cfg.NodeID, Missing: missing}, nil
}

// objectsOnQuorum checks that a majority of voters hold every object, so a
// ref may point at them without a push having shipped them.
func (n *Node) objectsOnQuorum(ctx context.Context, repo string, oids []string) error {
	if n.git == nil || len(oids) == 0 {
		return nil
	}
	voters, err := n.voters()
	if err != nil {
		return err
	}
	need := len(voters)/2 + 1
	type answer struct {
		ok    bool
		lacks []string
	}
	answers := make(chan answer, len(voters))
	for _, m := range voters {
		go func() {
			var lacks []string
			var err error
			if m.GetId() == n.cfg.NodeID {
				lacks, err = n.missingLocal(ctx, repo, oids)
				if errors.Is(err, storage.ErrNotFound) {
					lacks, err = oids, nil
				}
			} else if c, cerr := n.peers.node(m.GetGrpcAddr()); cerr == nil {
				cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				var resp *nodev1.MissingObjectsResponse
				resp, err = c.MissingObjects(cctx, &nodev1.MissingObjectsRequest{Repo: repo, Oids: oids})
				cancel()
				lacks = resp.GetMissing()
			} else {
				err = cerr
			}
			answers <- answer{ok: err == nil && len(lacks) == 0, lacks: lacks}
		}()
	}
	have := 0
	var missing []string
	for range voters {
		a := <-answers
		if a.ok {
			have++
		} else if len(a.lacks) > 0 {
			missing = a.lacks
		}
		if have >= need {
			return nil
		}
	}
	if have < need {
		return status.Errorf(codes.FailedPrecondition, "only %d of %d nodes hold the objects (e.g. %s); a ref may only point at objects a push stored on a majority", have, len(voters), strings.Join(missing[:min(1, len(missing))], ""))
	}
	return nil
}
