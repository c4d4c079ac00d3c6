package cluster

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"go.etcd.io/bbolt"
	"google.golang.org/grpc"

	"github.com/gitraft/gitraft/cluster/pki"
	"github.com/gitraft/gitraft/cluster/replica"
	"github.com/gitraft/gitraft/lockd"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
)

// Sentinel errors of the cluster package. They become gRPC status codes only
// at the service edge.
var (
	ErrNoLeader  = errors.New("no leader")
	ErrNotLeader = errors.New("not the leader")
	ErrConfig    = errors.New("invalid configuration")
)

// TLSFiles names the cluster CA and this node's certificate and key.
type TLSFiles struct {
	CAFile   string `yaml:"ca_file"`
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
}

// RaftTuning holds the Raft timing and log-compaction settings.
type RaftTuning struct {
	// HeartbeatTimeout and ElectionTimeout: a follower that hears nothing
	// from the leader for a random time between one and two of these starts
	// an election (with pre-vote, so a node that merely lost touch does not
	// disturb a healthy leader). Default 500ms each: a leader killed on a LAN
	// is replaced in about a second.
	HeartbeatTimeout time.Duration `yaml:"heartbeat_timeout" help:"how long a follower waits without hearing from the leader before it starts an election (default 500ms)"`
	ElectionTimeout  time.Duration `yaml:"election_timeout" help:"how long a candidate waits for votes before it tries again (default 500ms)"`
	// LeaderLeaseTimeout: a leader that cannot reach a majority for this
	// long steps down. Default: heartbeat_timeout (not less, so that a
	// leader on a loaded machine keeps leading).
	LeaderLeaseTimeout time.Duration `yaml:"leader_lease_timeout" help:"a leader that cannot reach a majority for this long steps down (default: heartbeat_timeout)"`
	// CommitTimeout is how long the leader lets pass without sending its
	// commit index to a follower when no entries flow (hashicorp/raft's
	// CommitTimeout, which jitters it up to twice that). A follower applies
	// an entry only once it learns it committed, and a push taken by a
	// follower waits for that (its write lock's grant): raft's default,
	// 50ms, was most of a small push's time. Default 5ms.
	CommitTimeout time.Duration `yaml:"commit_timeout" help:"longest the leader waits to tell followers its commit index when no entries flow (default 5ms)"`
	// HolderTimeout: when the leader has not heard from a node for this
	// long (its heartbeats fail), it frees the write locks the node holds
	// instead of waiting for their leases to run out. Default 4 ×
	// heartbeat_timeout; it must stay well under the lock lease (15s).
	HolderTimeout     time.Duration `yaml:"holder_timeout" help:"free the write locks of a node the leader has not heard from for this long (default 4 x heartbeat_timeout)"`
	SnapshotThreshold uint64        `yaml:"snapshot_threshold"`
	// SnapshotBytes takes a snapshot once the entries applied since the
	// last one add up to this many bytes (default 64 MiB), however few they
	// are: a push of many refs is one large entry, and the entry count alone
	// let a million refs live only in the log.
	SnapshotBytes    uint64        `yaml:"snapshot_bytes" help:"take a snapshot once the entries applied since the last one reach this many bytes (default 64 MiB)"`
	SnapshotInterval time.Duration `yaml:"snapshot_interval"`
	TrailingLogs     uint64        `yaml:"trailing_logs"`
}

// Config configures one node.
type Config struct {
	NodeID  string
	DataDir string

	// Listen addresses, and what peers should dial (default: the listen address).
	RaftAddr, RaftAdvertise string
	GRPCAddr, GRPCAdvertise string
	HTTPAddr                string
	// PProf serves Go's profiler under /debug/pprof/ on the HTTP port. That
	// port has no authentication: anyone who reaches it can profile the
	// process and read its command line. Off by default.
	PProf bool
	// SSHAdvertise is recorded for peers and clients (served by gitproto).
	SSHAdvertise string
	// SSHHostKeys are the public SSH host keys this node serves (from its
	// host key files), in authorized_keys form. They are recorded in the
	// replicated state for known_hosts; the private keys never reach it.
	SSHHostKeys []string

	// Bootstrap makes this node found a new cluster, once: a node that has
	// Raft state never bootstraps again.
	Bootstrap bool
	// Join lists gRPC addresses of existing members to ask for membership
	// when this node has no Raft state.
	Join []string

	TLS TLSFiles
	// Insecure runs without TLS; only allowed when every address is loopback.
	Insecure bool

	Raft RaftTuning

	// Git, if set, makes the node keep repositories on disk.
	Git *GitConfig

	// LeaderWait bounds how long a write waits for a leader before it fails
	// with Unavailable.
	LeaderWait time.Duration
	// LockExpiryInterval is how often the leader looks for expired locks.
	LockExpiryInterval time.Duration
	// DefaultLease is the lease of a write lock acquired without one.
	DefaultLease time.Duration
	// PromoteInterval is how often the leader asks each non-voter how much
	// it holds, to promote it to voter once it holds everything (default 1s).
	PromoteInterval time.Duration

	// Version is the gitraft version this binary runs, for status and for
	// messages such as "upgrade this node" (default "dev").
	Version string

	// newerCommands, if set (tests only), stands in for a newer binary: the
	// state machine hands it every decoded entry before checking it.
	newerCommands func(e *fsmv1.Entry)
	// featureLevel, if set (tests only), is the feature level this node
	// reports instead of FeatureLevel, standing in for an older binary.
	featureLevel uint32
	// replicasOf, if set (tests only), answers for a member's
	// ReplicaService.GetReplicas, which the leader asks before promoting a
	// non-voter (in-process nodes keep no repositories); ask asks the
	// member itself.
	replicasOf func(ctx context.Context, id string, ask func(context.Context) (*replicav1.GetReplicasResponse, error)) (*replicav1.GetReplicasResponse, error)
}

func (c *Config) setDefaults() {
	if c.RaftAdvertise == "" {
		c.RaftAdvertise = c.RaftAddr
	}
	if c.GRPCAdvertise == "" {
		c.GRPCAdvertise = c.GRPCAddr
	}
	r := &c.Raft
	if r.HeartbeatTimeout == 0 {
		r.HeartbeatTimeout = 500 * time.Millisecond
	}
	if r.ElectionTimeout == 0 {
		r.ElectionTimeout = 500 * time.Millisecond
	}
	if r.LeaderLeaseTimeout == 0 {
		r.LeaderLeaseTimeout = r.HeartbeatTimeout
	}
	if r.HolderTimeout == 0 {
		r.HolderTimeout = 4 * r.HeartbeatTimeout
	}
	if r.CommitTimeout == 0 {
		r.CommitTimeout = 5 * time.Millisecond
	}
	if r.SnapshotThreshold == 0 {
		r.SnapshotThreshold = 8192
	}
	if r.SnapshotBytes == 0 {
		r.SnapshotBytes = 64 << 20
	}
	if r.SnapshotInterval == 0 {
		r.SnapshotInterval = 2 * time.Minute
	}
	if r.TrailingLogs == 0 {
		r.TrailingLogs = 10240
	}
	if c.LeaderWait == 0 {
		c.LeaderWait = 5 * time.Second
	}
	if c.LockExpiryInterval == 0 {
		c.LockExpiryInterval = time.Second
	}
	if c.PromoteInterval == 0 {
		c.PromoteInterval = time.Second
	}
	if c.DefaultLease == 0 {
		c.DefaultLease = 30 * time.Second
	}
	if c.Version == "" {
		c.Version = "dev"
	}
}

func (c *Config) validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrConfig, fmt.Sprintf(format, args...))
	}
	if c.NodeID == "" {
		return bad("node_id is required")
	}
	if len(c.NodeID) > 63 || !validID(c.NodeID) {
		return bad("node_id %q: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit", c.NodeID)
	}
	if c.DataDir == "" {
		return bad("data_dir is required")
	}
	if c.RaftAddr == "" || c.GRPCAddr == "" {
		return bad("raft_addr and grpc_addr are required")
	}
	if c.Insecure {
		for _, a := range []string{c.RaftAddr, c.RaftAdvertise, c.GRPCAddr, c.GRPCAdvertise, c.HTTPAddr} {
			if a != "" && !isLoopback(a) {
				return bad("insecure mode is only allowed on loopback addresses, and %q is not one; configure tls (gitraft ca init, gitraft ca issue node %s)", a, c.NodeID)
			}
		}
	} else if c.TLS.CAFile == "" || c.TLS.CertFile == "" || c.TLS.KeyFile == "" {
		return bad("tls.ca_file, tls.cert_file and tls.key_file are required (create them with `gitraft ca init` and `gitraft ca issue node %s`), or run insecure on loopback", c.NodeID)
	}
	return nil
}

func validID(s string) bool {
	for i, r := range s {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || (i > 0 && (r == '-' || r == '_' || r == '.'))
		if !ok {
			return false
		}
	}
	return s != ""
}

func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Node is one gitraft cluster member: a Raft peer with its state machine,
// serving the admin and node-to-node gRPC APIs and the HTTP health and
// metrics endpoints.
type Node struct {
	cfg    Config
	log    *slog.Logger
	fsm    *fsm
	raft   *raft.Raft
	store  *raftboltdb.BoltStore
	snaps  raft.SnapshotStore
	trans  *raft.NetworkTransport
	bundle *pki.Bundle // nil when insecure

	grpcServer *grpc.Server
	grpcLn     net.Listener
	httpServer *http.Server
	httpLn     net.Listener

	peers   *peerPool
	metrics *metrics
	git     *replica.Replicas // nil unless Config.Git
	locks   *lockd.Client
	// incarnation is new each time this process starts; the member record
	// carries it, and locks granted to this node carry it too, so that a
	// restart frees what the previous process held (lockd.Table.FreeNode).
	incarnation string
	silent      *silentPeers // peers whose heartbeats fail, while leading
	lockWaits   *lockWaits   // wakes writers waiting here for a lock

	db dbRuntime // the database target's settings and leader memory (database.go)

	leaderCh chan bool
	needJoin bool
	layer    *streamLayer
	// fresh: this node started without Raft state (new, or its data dir
	// was lost). It is not ready until it has once held every repository
	// its state had when it caught up with the log (fillMarks).
	fresh       bool
	fillMu      sync.Mutex
	fillMarks   map[string]replica.Target
	filled      atomic.Bool
	joinErr     atomic.Pointer[string] // why the last join attempt failed
	leaderReady atomic.Bool            // the leader loop has passed its barrier
	ready       atomic.Bool            // sticky: caught up once after start

	stop     chan struct{}
	wg       sync.WaitGroup
	closeOne sync.Once
}

// New opens the data dir, starts Raft and the servers, and bootstraps or
// joins as configured. It returns once everything listens; use WaitLeader to
// wait for an election.
func New(cfg Config, logger *slog.Logger) (_ *Node, err error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.Default()
	}
	n := &Node{cfg: cfg, log: logger.With("node", cfg.NodeID), stop: make(chan struct{}), incarnation: newIncarnation(), silent: newSilentPeers(), lockWaits: newLockWaits()}
	n.fsm = newFSM(n.log, cfg.Version)
	n.fsm.newer = cfg.newerCommands
	n.fsm.snapshotBytes = cfg.Raft.SnapshotBytes
	n.fsm.onLockChange = n.lockWaits.applied
	defer func() {
		if err != nil {
			n.Close()
		}
	}()

	var fingerprint string
	if !cfg.Insecure {
		b, err := pki.Files{CA: cfg.TLS.CAFile, Cert: cfg.TLS.CertFile, Key: cfg.TLS.KeyFile}.Load()
		if err != nil {
			return nil, fmt.Errorf("node TLS: %w", err)
		}
		if b.Role != pki.RoleNode {
			return nil, fmt.Errorf("%w: %s is a %s certificate; a node needs one made by `gitraft ca issue node %s`", ErrConfig, cfg.TLS.CertFile, b.Role, cfg.NodeID)
		}
		if b.Leaf.Subject.CommonName != cfg.NodeID {
			return nil, fmt.Errorf("%w: %s was issued to node %q, but this is node %q", ErrConfig, cfg.TLS.CertFile, b.Leaf.Subject.CommonName, cfg.NodeID)
		}
		n.bundle = b
		if fingerprint, err = caFingerprint(cfg.TLS.CAFile); err != nil {
			return nil, err
		}
	}
	if err := checkDataDir(cfg.DataDir, cfg.NodeID, fingerprint); err != nil {
		return nil, err
	}
	n.metrics = newMetrics(n)
	n.fsm.observe = n.metrics.observeApply
	n.peers = newPeerPool(n.clientTLS())
	n.locks = lockd.NewClient(n.Locker(), lockd.ClientConfig{Lease: pushLease}, n.log)

	if cfg.Git != nil {
		n.enableGit(*cfg.Git)
	}
	if err := n.openRaft(); err != nil {
		return nil, err
	}
	if err := n.serveGRPC(); err != nil {
		return nil, err
	}
	if cfg.HTTPAddr != "" {
		if err := n.serveHTTP(); err != nil {
			return nil, err
		}
	}
	n.goRun(n.watchLeadership)
	n.goRun(n.registerSelf)
	n.goRun(n.watchHostKeys)
	n.goRun(n.watchReady)
	n.goRun(n.snapshotBySize)
	if n.needJoin {
		n.goRun(n.joinLoop)
	}
	if n.git != nil {
		n.git.Start()
	}
	return n, nil
}

func caFingerprint(caFile string) (string, error) {
	b, err := os.ReadFile(caFile)
	if err != nil {
		return "", fmt.Errorf("read CA: %w", err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return "", fmt.Errorf("%w: %s holds no PEM certificate", ErrConfig, caFile)
	}
	sum := sha256.Sum256(blk.Bytes)
	return hex.EncodeToString(sum[:8]), nil
}

func (n *Node) goRun(fn func()) {
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		fn()
	}()
}

// serverTLS is the TLS config for this node's listeners; nil when insecure.
// Callers must still check the peer's role where it matters.
func (n *Node) serverTLS() *tls.Config {
	if n.bundle == nil {
		return nil
	}
	c, err := n.bundle.ServerConfig()
	if err != nil {
		// New checked the role is node, which is all ServerConfig needs.
		panic(err)
	}
	return c
}

func (n *Node) clientTLS() *tls.Config {
	if n.bundle == nil {
		return nil
	}
	return n.bundle.ClientConfig("")
}

func (n *Node) openRaft() error {
	dir := filepath.Join(n.cfg.DataDir, raftDirName)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	store, err := raftboltdb.New(raftboltdb.Options{
		Path:        filepath.Join(dir, raftDBName),
		BoltOptions: &bbolt.Options{Timeout: 2 * time.Second},
	})
	if errors.Is(err, bbolt.ErrTimeout) {
		return fmt.Errorf("%w: %s is locked: another gitraft process is using data dir %s", ErrDataDir, raftDBName, n.cfg.DataDir)
	}
	if err != nil {
		return fmt.Errorf("%w: cannot open %s (%v); the file is damaged or not a gitraft log: restore the data dir from a backup, or %s",
			ErrDataDir, filepath.Join(dir, raftDBName), err, errDataDirFix)
	}
	n.store = store
	logs, err := raft.NewLogCache(512, store)
	if err != nil {
		return err
	}
	snaps, err := raft.NewFileSnapshotStoreWithLogger(dir, 2, newHCLog(n.log, "snapshot"))
	if err != nil {
		return fmt.Errorf("%w: snapshots in %s: %v", ErrDataDir, dir, err)
	}
	n.snaps = snaps
	existing, err := raft.HasExistingState(logs, store, snaps)
	if err != nil {
		return fmt.Errorf("%w: reading Raft state: %v", ErrDataDir, err)
	}

	ln, err := net.Listen("tcp", n.cfg.RaftAddr)
	if err != nil {
		return fmt.Errorf("raft listen: %w", err)
	}
	var serverTLS *tls.Config
	if st := n.serverTLS(); st != nil {
		serverTLS = st.Clone()
		serverTLS.VerifyConnection = requireNodePeer
	}
	advertise := n.cfg.RaftAdvertise
	if _, port, _ := net.SplitHostPort(advertise); port == "0" {
		advertise = ln.Addr().String()
		n.cfg.RaftAdvertise = advertise
	}
	layer, err := newStreamLayer(ln, advertise, serverTLS, n.clientTLS(), n.log)
	if err != nil {
		ln.Close()
		return err
	}
	n.layer = layer
	n.fresh = !existing
	if !existing && !n.cfg.Bootstrap && len(n.cfg.Join) > 0 {
		// Until a member has admitted it (joinLoop), this node takes no
		// part in Raft: under the ID of a voter that lost its data dir it
		// would otherwise vote, and be counted, with a log it no longer has.
		layer.held.Store(true)
	}
	n.trans = raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream:  layer,
		MaxPool: 3,
		Timeout: 10 * time.Second,
		Logger:  newHCLog(n.log, "raft-net"),
	})

	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(n.cfg.NodeID)
	rc.Logger = newHCLog(n.log, "raft")
	rc.HeartbeatTimeout = n.cfg.Raft.HeartbeatTimeout
	rc.ElectionTimeout = n.cfg.Raft.ElectionTimeout
	rc.LeaderLeaseTimeout = n.cfg.Raft.LeaderLeaseTimeout
	rc.CommitTimeout = n.cfg.Raft.CommitTimeout
	rc.PreVoteDisabled = false // pre-vote (the NetworkTransport supports it)
	rc.SnapshotThreshold = n.cfg.Raft.SnapshotThreshold
	rc.SnapshotInterval = n.cfg.Raft.SnapshotInterval
	rc.TrailingLogs = n.cfg.Raft.TrailingLogs
	n.leaderCh = make(chan bool, 16)
	rc.NotifyCh = n.leaderCh
	if err := raft.ValidateConfig(rc); err != nil {
		return fmt.Errorf("%w: raft: %v", ErrConfig, err)
	}

	r, err := raft.NewRaft(rc, n.fsm, logs, store, snaps, n.trans)
	if err != nil {
		return fmt.Errorf("start raft: %w", err)
	}
	n.raft = r
	n.metrics.watchRaft(r)
	n.watchHeartbeats()

	switch {
	case existing:
		n.log.Info("restarting with existing Raft state", "index", r.LastIndex(), "term", r.CurrentTerm())
	case n.cfg.Bootstrap:
		n.log.Info("bootstrapping a new cluster", "raft_addr", advertise)
		f := r.BootstrapCluster(raft.Configuration{Servers: []raft.Server{{
			ID: rc.LocalID, Address: raft.ServerAddress(advertise), Suffrage: raft.Voter,
		}}})
		if err := f.Error(); err != nil && !errors.Is(err, raft.ErrCantBootstrap) {
			return fmt.Errorf("bootstrap: %w", err)
		}
	case len(n.cfg.Join) > 0:
		n.needJoin = true // once every server listens (see New)
	default:
		n.log.Warn("no Raft state, not bootstrapping and nothing to join: waiting to be added with `gitraft cluster join`")
	}
	return nil
}

// requireNodePeer refuses TLS peers whose certificate is not a node's.
func requireNodePeer(cs tls.ConnectionState) error {
	role, name, err := pki.PeerRole(cs)
	if err != nil {
		return err
	}
	if role != pki.RoleNode {
		return fmt.Errorf("peer %q has a %s certificate; only nodes may connect here", name, role)
	}
	return nil
}

// ID is this node's ID.
func (n *Node) ID() string { return n.cfg.NodeID }

// GRPCAddr is the address the gRPC server listens on.
func (n *Node) GRPCAddr() string { return n.grpcLn.Addr().String() }

// HTTPAddr is the address the HTTP server listens on ("" if none).
func (n *Node) HTTPAddr() string {
	if n.httpLn == nil {
		return ""
	}
	return n.httpLn.Addr().String()
}

// RaftAddr is the address peers use for Raft.
func (n *Node) RaftAddr() string { return n.cfg.RaftAdvertise }

// IsLeader reports whether this node is the Raft leader.
func (n *Node) IsLeader() bool { return n.raft.State() == raft.Leader }

// AppliedIndex is the last index this node's state machine applied.
func (n *Node) AppliedIndex() uint64 { return n.fsm.Index() }

// handOverLeadership transfers leadership to another voter when this node
// leads and has one; it waits at most timeout, and a failure only means an
// ordinary election follows.
func (n *Node) handOverLeadership(timeout time.Duration) {
	if n.raft == nil || n.raft.State() != raft.Leader {
		return
	}
	voters := 0
	if f := n.raft.GetConfiguration(); f.Error() == nil {
		for _, s := range f.Configuration().Servers {
			if s.Suffrage == raft.Voter {
				voters++
			}
		}
	}
	if voters < 2 {
		return
	}
	done := make(chan error, 1)
	go func() { done <- n.raft.LeadershipTransfer().Error() }()
	select {
	case err := <-done:
		if err != nil {
			n.log.Warn("stopping: leadership transfer failed; the others elect a leader", "err", err)
			return
		}
		_, to := n.raft.LeaderWithID()
		n.log.Info("stopping: handed leadership over", "leader", string(to))
	case <-time.After(timeout):
		n.log.Warn("stopping: leadership transfer did not finish in time; the others elect a leader", "timeout", timeout.String())
	}
}

// WaitLeader blocks until some leader is known, or ctx ends.
func (n *Node) WaitLeader(ctx context.Context) (string, error) {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		if _, id := n.raft.LeaderWithID(); id != "" {
			return string(id), nil
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("%w after waiting: %v", ErrNoLeader, ctx.Err())
		case <-t.C:
		}
	}
}

// Close stops the servers and Raft. It does not leave the cluster. A
// leader first hands leadership to another voter (bounded by 1 s; on a LAN
// it takes milliseconds), so that a graceful stop costs the cluster no
// election timeout: while no node can confirm the state, pgbouncer agents
// hold their clients (database.isolation_fence_after). The HTTP and gRPC
// servers then get at most 1 s, together, to finish what they serve, so
// that a node stopped with SIGTERM exits within about 2 s.
func (n *Node) Close() error {
	var err error
	n.closeOne.Do(func() {
		n.handOverLeadership(time.Second)
		close(n.stop)
		if n.git != nil {
			n.git.Close()
		}
		var servers sync.WaitGroup
		if n.httpServer != nil {
			servers.Add(1)
			go func() {
				defer servers.Done()
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				n.httpServer.Shutdown(ctx)
				cancel()
			}()
		}
		if n.grpcServer != nil {
			servers.Add(1)
			go func() {
				defer servers.Done()
				done := make(chan struct{})
				go func() { n.grpcServer.GracefulStop(); close(done) }()
				select {
				case <-done:
				case <-time.After(time.Second):
					n.grpcServer.Stop()
					<-done
				}
			}()
		}
		servers.Wait()
		if n.raft != nil {
			err = n.raft.Shutdown().Error()
		}
		if n.trans != nil {
			n.trans.Close()
		}
		n.wg.Wait()
		if n.peers != nil {
			n.peers.Close()
		}
		if n.store != nil {
			if cerr := n.store.Close(); err == nil {
				err = cerr
			}
		}
	})
	return err
}
