package replica

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	gossh "golang.org/x/crypto/ssh"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/gitraft/gitraft/gitproto"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
	"github.com/gitraft/gitraft/storage"
)

// Errors of the pipeline. The front end's sentinels are used as they are,
// so that gitproto recognises them without translation.
var (
	// ErrNoLeader is what the Node's errors wrap when no leader answers
	// (no quorum, or this node is cut off).
	ErrNoLeader = errors.New("no leader")
	// ErrRepoNotFound: the replicated state has no such repository.
	ErrRepoNotFound = gitproto.ErrRepoNotFound
)

// Node is what the pipeline needs from the Raft node it runs on.
type Node interface {
	// ID is this node's id.
	ID() string
	// Propose commits an entry through the leader and returns the result of
	// applying it (a refusal is a result, not an error). Errors wrap
	// ErrNoLeader when no leader answered.
	Propose(ctx context.Context, e *fsmv1.Entry) (*fsmv1.Result, error)
	// ReadBarrier returns once this node has applied what the leader had
	// committed; errors wrap ErrNoLeader when no leader answered.
	ReadBarrier(ctx context.Context) (uint64, error)
	// WaitApplied returns once this node has applied index (say, the
	// entry that granted a lock, whose fencing token is its index).
	WaitApplied(ctx context.Context, index uint64) error
	// AppliedIndex is the last index this node applied.
	AppliedIndex() uint64
	// Ready reports whether this node has caught up with the log once
	// since it started (before, its state may be far behind).
	Ready() bool
	// Repo is what the applied state says a repository must look like;
	// Repos says it for every repository.
	Repo(name string) (Target, bool)
	Repos() map[string]Target
	// Members are the members' records; Voters those of Raft's voters.
	Members() []*fsmv1.Member
	Voters() ([]*fsmv1.Member, error)
	// Leader is the leader's id and gRPC address ("" when unknown).
	Leader() (id, addr string)
	// KeyOwner is the user whose SSH key has this SHA256 fingerprint, ""
	// for nobody.
	KeyOwner(fingerprint string) string
	// Access is a user's access to a repository; found is false when there
	// is no such repository.
	Access(repo, user string) (a fsmv1.Access, found bool)
	// Lock takes a repository's write lock for holder, waiting while
	// another holds it (onWait is told who). Errors wrap ErrRepoNotFound or
	// ErrNoLeader where they apply.
	Lock(ctx context.Context, repo, holder string, onWait func(holder string)) (Lock, error)
	// Locked says whether this node's applied state has the repository's
	// write lock held (a hint: the state may be behind).
	Locked(repo string) bool
	// ReleaseWithRefs reports whether every member applies an UpdateRefs
	// that releases its write lock (release_lock); while some member runs
	// an older gitraft, a push releases its lock with an entry of its own.
	ReleaseWithRefs() bool
	// Conn is a connection to a peer's gRPC server with node credentials.
	Conn(addr string) (grpc.ClientConnInterface, error)
}

// Lock is a write lock this node holds.
type Lock interface {
	// Token is the lock's fencing token.
	Token() uint64
	// Lost is closed once the lock is lost (lease ran out, taken over); Err
	// then says why.
	Lost() <-chan struct{}
	Err() error
	Release(ctx context.Context) error
	// MarkReleased says a committed entry released the lock (a push's
	// UpdateRefs carries release_lock): stop renewing; Release then
	// proposes nothing.
	MarkReleased()
}

// Target is what the replicated state says a repository must look like.
type Target struct {
	Name    string
	ID      uint64
	Version uint64
	Refs    map[string]string // shared with the state: never modified
	Head    string
}

// Config configures a node's git side.
type Config struct {
	Store *storage.Store
	// Binary is the gitraft executable, which git runs to fetch from peers
	// (`gitraft node-git`, through git's ext:: transport).
	Binary string
	// FetchEnv is added to that command's environment: the node's
	// credentials (GITRAFT_TLS_* or GITRAFT_INSECURE).
	FetchEnv []string
	// HostSigners returns the node's SSH host keys (gitproto.Backend).
	HostSigners func(ctx context.Context) ([]gossh.Signer, error)
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
	// Lease is the write lock's lease during a push (default 15s); the
	// node's lock client renews it. Only for messages here.
	Lease time.Duration
	// StragglerTimeout bounds a push's sends to its peers, the slow ones
	// that carry on after the commit included (default 10m).
	StragglerTimeout time.Duration
	// ScrubInterval is how often the background scrub walks every copy
	// (default a week; negative: never, `gitraft repo scrub` still works).
	ScrubInterval time.Duration
	// ScrubRate bounds the bytes of packs a scrub reads per second (default
	// 8 MiB/s; negative: no bound).
	ScrubRate int64
	// Housekeeping is the node's housekeeping of its copies (on by
	// default).
	Housekeeping HousekeepConfig
}

func (c *Config) setDefaults() {
	if c.SyncInterval == 0 {
		c.SyncInterval = 5 * time.Second
	}
	if c.ReadCatchUp == 0 {
		c.ReadCatchUp = 10 * time.Second
	}
	if c.MinFreeBytes == 0 {
		c.MinFreeBytes = 100 << 20
	}
	if c.SyncWorkers <= 0 {
		c.SyncWorkers = 4
	}
	if c.StuckAfter == 0 {
		c.StuckAfter = 2 * time.Minute
	}
	if c.StragglerTimeout == 0 {
		c.StragglerTimeout = 10 * time.Minute
	}
	if c.ScrubInterval == 0 {
		c.ScrubInterval = 7 * 24 * time.Hour
	}
	if c.ScrubRate == 0 {
		c.ScrubRate = 8 << 20
	}
	c.Housekeeping.setDefaults()
}

// position is how far a copy on disk got: the incarnation and the version.
type position struct{ id, version uint64 }

// copyState is what this node's disk holds of one repository. The guard
// serialises the work that changes the copy; what that work reached is
// published through atomics, so reports and reads never wait for it.
type copyState struct {
	guard *guard
	at    atomic.Pointer[position] // nil: nothing on disk
	// syncing is set while a catch-up fetches for it; lastErr is the last
	// catch-up's failure ("" after a success).
	syncing atomic.Bool
	lastErr atomic.Pointer[string]
	// failingSince is when catching up started failing (unix nanos; 0
	// while it succeeds): a copy failing for long is stuck.
	failingSince atomic.Int64
	// damaged says why a scrub found the copy damaged (nil: sound). A
	// damaged copy is never current: it serves no reads and acks no
	// pushes until a catch-up has healed it.
	damaged atomic.Pointer[string]
}

func newCopy() *copyState { return &copyState{guard: newGuard()} }

func (c *copyState) pos() position {
	if p := c.at.Load(); p != nil {
		return *p
	}
	return position{}
}

// reached records the copy at t's incarnation and version, with no error.
func (c *copyState) reached(id, version uint64) {
	c.at.Store(&position{id, version})
	c.lastErr.Store(nil)
	c.failingSince.Store(0)
}

func (c *copyState) errText() string {
	if p := c.lastErr.Load(); p != nil {
		return *p
	}
	return ""
}

// currentAt reports whether the copy holds t (the same incarnation, at
// least its version, not damaged).
func (c *copyState) currentAt(t Target) bool {
	p := c.pos()
	return p.id == t.ID && p.version >= t.Version && c.damaged.Load() == nil
}

func (c *copyState) damage() string {
	if p := c.damaged.Load(); p != nil {
		return *p
	}
	return ""
}

// Replicas is a node's git side: its copies on disk, the reconciler, the
// push pipeline (gitproto.Backend) and the gRPC service between nodes.
type Replicas struct {
	cfg  Config
	node Node
	st   *storage.Store
	log  *slog.Logger

	mu     sync.Mutex
	copies map[string]*copyState
	kick   chan struct{}

	sessions atomic.Pointer[SessionHandler]
	scrub    scrubStats
	hk       housekeeping

	stop     chan struct{}
	stopOnce sync.Once
	wg       sync.WaitGroup
}

var _ gitproto.Backend = (*Replicas)(nil)

// New prepares a node's git side over the copies already on disk. Start
// runs the reconciler.
func New(cfg Config, node Node, logger *slog.Logger) *Replicas {
	cfg.setDefaults()
	if logger == nil {
		logger = slog.Default()
	}
	r := &Replicas{cfg: cfg, node: node, st: cfg.Store, log: logger.With("component", "replicas"),
		copies: map[string]*copyState{}, kick: make(chan struct{}, 1), stop: make(chan struct{})}
	r.hk.slot = newGuard()
	if list, err := cfg.Store.List(); err == nil {
		for _, l := range list {
			c := newCopy()
			c.at.Store(&position{l.ID, l.Version})
			if l.Damaged != "" {
				why := l.Damaged
				c.damaged.Store(&why)
			}
			r.copies[l.Name] = c
		}
	}
	return r
}

// Start runs the reconciler, and the housekeeping scheduler unless it is
// off, until Close.
func (r *Replicas) Start() {
	r.wg.Add(2)
	go func() {
		defer r.wg.Done()
		r.reconcile()
	}()
	go func() {
		defer r.wg.Done()
		r.scrubLoop()
	}()
	if !r.cfg.Housekeeping.Off {
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			r.housekeepLoop()
		}()
	}
}

// Close stops the reconciler, housekeeping and the sends still under way,
// and waits for them.
func (r *Replicas) Close() {
	r.stopOnce.Do(func() { close(r.stop) })
	r.wg.Wait()
}

// Poke asks the reconciler to look at every copy soon (the state changed).
func (r *Replicas) Poke() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// StuckAfter is how long a copy may fail to catch up before it is stuck.
func (r *Replicas) StuckAfter() time.Duration { return r.cfg.StuckAfter }

func (r *Replicas) copyOf(name string) *copyState {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := r.copies[name]
	if c == nil {
		c = newCopy()
		r.copies[name] = c
	}
	return c
}

func (r *Replicas) lookup(name string) *copyState {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.copies[name]
}

// Health counts the copies that are behind the replicated state and those
// whose catching up has been failing for longer than StuckAfter, and names
// the first few stuck ones.
func (r *Replicas) Health() (behind, stuck int, names []string) {
	targets := r.node.Repos()
	now := time.Now().UnixNano()
	for _, name := range slices.Sorted(maps.Keys(targets)) {
		c := r.lookup(name)
		if c == nil {
			behind++
			continue
		}
		if c.currentAt(targets[name]) {
			continue
		}
		behind++
		if since := c.failingSince.Load(); since != 0 && now-since > int64(r.cfg.StuckAfter) {
			stuck++
			if len(names) < 5 {
				names = append(names, name)
			}
		}
	}
	return behind, stuck, names
}

// Report lists this node's copies (one, or all for "") and their states,
// judged against the state this node has applied.
func (r *Replicas) Report(repo string) *replicav1.GetReplicasResponse {
	resp := &replicav1.GetReplicasResponse{NodeId: r.node.ID(), Index: r.node.AppliedIndex()}
	targets := r.node.Repos()
	names := slices.Sorted(maps.Keys(targets))
	if repo != "" {
		names = []string{repo}
	}
	for _, name := range names {
		t, ok := targets[name]
		if !ok {
			continue
		}
		rep := &replicav1.Replica{Repo: name, RepoId: t.ID, State: replicav1.ReplicaState_REPLICA_STATE_BEHIND}
		if c := r.lookup(name); c != nil {
			if p := c.pos(); p.id == t.ID {
				rep.Version, rep.Error = p.version, c.errText()
				switch {
				case c.damage() != "":
					rep.State, rep.Error = replicav1.ReplicaState_REPLICA_STATE_DAMAGED, c.damage()
				case p.version >= t.Version:
					rep.State = replicav1.ReplicaState_REPLICA_STATE_CURRENT
				case c.syncing.Load():
					rep.State = replicav1.ReplicaState_REPLICA_STATE_SYNCING
				}
			}
		}
		resp.Replicas = append(resp.Replicas, rep)
	}
	return resp
}

func (r *Replicas) client(addr string) (replicav1.ReplicaServiceClient, error) {
	if addr == "" {
		return nil, errors.New("address unknown")
	}
	c, err := r.node.Conn(addr)
	if err != nil {
		return nil, err
	}
	return replicav1.NewReplicaServiceClient(c), nil
}

// MemberReplicas asks every member (this node included) for its copy of a
// repository; members that do not answer are reported with the error.
func (r *Replicas) MemberReplicas(ctx context.Context, repo string) map[string]*replicav1.Replica {
	out := map[string]*replicav1.Replica{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, m := range r.node.Members() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var rep *replicav1.Replica
			if m.GetId() == r.node.ID() {
				if rs := r.Report(repo).GetReplicas(); len(rs) == 1 {
					rep = rs[0]
				}
			} else if c, err := r.client(m.GetGrpcAddr()); err == nil {
				cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
				resp, err := c.GetReplicas(cctx, &replicav1.GetReplicasRequest{Repo: repo})
				cancel()
				if err == nil && len(resp.GetReplicas()) == 1 {
					rep = resp.GetReplicas()[0]
				} else if err != nil {
					rep = &replicav1.Replica{Repo: repo, Error: status.Convert(err).Message()}
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

// currentPeers asks the other members which hold a repository at version or
// later, and returns those that do.
func (r *Replicas) currentPeers(ctx context.Context, name string, version uint64) []*fsmv1.Member {
	members := r.node.Members()
	type answer struct {
		m  *fsmv1.Member
		ok bool
	}
	ch := make(chan answer, len(members))
	asked := 0
	for _, m := range members {
		if m.GetId() == r.node.ID() || m.GetGrpcAddr() == "" {
			continue
		}
		asked++
		go func() {
			c, err := r.client(m.GetGrpcAddr())
			if err != nil {
				ch <- answer{m, false}
				return
			}
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			resp, err := c.GetReplicas(cctx, &replicav1.GetReplicasRequest{Repo: name})
			ok := err == nil && len(resp.GetReplicas()) == 1 && resp.GetReplicas()[0].GetVersion() >= version &&
				resp.GetReplicas()[0].GetState() != replicav1.ReplicaState_REPLICA_STATE_DAMAGED
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

// gitChecks bounds the git processes object checks may run at once on a
// node, so a burst of ref updates cannot starve Raft of CPU.
var gitChecks = make(chan struct{}, 4)

func (r *Replicas) missingLocal(ctx context.Context, repo string, oids []string) ([]string, error) {
	select {
	case gitChecks <- struct{}{}:
		defer func() { <-gitChecks }()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return r.st.Missing(ctx, repo, oids)
}

// missingWithPack is missingLocal for a peer that just installed a push's
// pack (its checksum sum): the usual push is proven whole from that pack
// in-process, without starting git (storage.WholeWithPack).
func (r *Replicas) missingWithPack(ctx context.Context, repo, sum string, oids []string) ([]string, error) {
	select {
	case gitChecks <- struct{}{}:
		defer func() { <-gitChecks }()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return r.st.WholeWithPack(ctx, repo, sum, oids)
}

// ObjectsOnQuorum checks that a majority of voters hold every object whole,
// so a ref may point at them without a push having shipped them. The
// error is a gRPC status (FailedPrecondition when too few hold them).
func (r *Replicas) ObjectsOnQuorum(ctx context.Context, repo string, oids []string) error {
	if len(oids) == 0 {
		return nil
	}
	voters, err := r.node.Voters()
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
			if m.GetId() == r.node.ID() {
				lacks, err = r.missingLocal(ctx, repo, oids)
				if errors.Is(err, storage.ErrNotFound) {
					lacks, err = oids, nil
				}
			} else if c, cerr := r.client(m.GetGrpcAddr()); cerr == nil {
				cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				var resp *replicav1.MissingObjectsResponse
				resp, err = c.MissingObjects(cctx, &replicav1.MissingObjectsRequest{Repo: repo, Oids: oids})
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
	return status.Errorf(codes.FailedPrecondition, "only %d of %d nodes hold the objects (e.g. %s); a ref may only point at objects a push stored on a majority", have, len(voters), firstOf(missing))
}

func firstOf(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[0]
}

// Held counts the repositories of marks that this node's disk holds at
// least at the marked version and not damaged. A repository the state no
// longer has counts as held: there is nothing left to fill.
func (r *Replicas) Held(marks map[string]Target) int {
	held := 0
	for name, m := range marks {
		t, ok := r.node.Repo(name)
		if !ok || t.ID != m.ID {
			held++
			continue
		}
		if c := r.lookup(name); c != nil && c.currentAt(m) {
			held++
		}
	}
	return held
}

// untilStop returns a context that ends with ctx or when the node stops,
// whichever comes first; cancel ends it and the goroutine that watches.
func (r *Replicas) untilStop(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		select {
		case <-r.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, cancel
}
