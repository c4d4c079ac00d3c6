// Package cluster is gitraft's consensus core: one Raft group
// (hashicorp/raft, with raft-boltdb/v2 behind a log cache and file
// snapshots) whose state machine records every repository's version and
// refs, the write locks and the members' addresses, users, keys and grants,
// the last backup that finished, and (through the sub-packages dbtarget and
// mail) the PostgreSQL failover target and the mail hosts' drain state.
//
// A Node is one member. It serves the admin gRPC API (ClusterService,
// RepoService, LockService, UserService, DatabaseService, MailService,
// BackupService) and
// the node-to-node API (NodeService, DatabaseAgentService) over
// mutual TLS, forwards writes from followers to the leader, answers reads
// only after a read barrier (so they are never stale), and exposes
// /metrics, /healthz, /readyz and /db/writable over HTTP.
//
// Backups: BackupService streams the state at a read barrier and each
// repository's packs; RestoreDataDir makes a new node's data dir whose
// initial Raft snapshot is a backup's state. The backup directory itself is
// package cluster/backup's.
// A write lock whose holder is gone is freed as soon as the cluster knows:
// a node that starts again frees what its earlier process held (its new
// incarnation), and the leader frees the locks of a node it stops hearing
// from (holders.go). Waiters are served in order of arrival.
//
// State is the deterministic state machine; it can be driven without Raft.
// See DESIGN.md for why it is built this way.
package cluster
