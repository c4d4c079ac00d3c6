// Package lockd implements per-repository write locks for gitraft.
//
// Each repository has at most one writer at a time. The writer holds a write
// lock that lives in the replicated Raft state: a holder name, a lease and a
// fencing token (the Raft log index of the entry that granted the lock).
//
// The package has two halves:
//
//   - [Table] is a pure, deterministic lock table embedded in the Raft state
//     machine. It never reads the local clock: "now" is the leader's time
//     stamped into each log entry and passed in by the caller, so every
//     replica applying the same entries reaches the same state.
//     It frees the locks of a node process that is gone ([Table.FreeNode])
//     and, for requests with a wait lease, serves waiters in order of
//     arrival.
//   - [Client] is the writer's side. It acquires a lock through a [Locker]
//     (proposals through Raft, implemented by package cluster), waiting while
//     someone else holds it, renews the lease in the background and reports
//     through [Held.Lost] when the lock is gone and the writer must stop.
//
// See DESIGN.md in this directory for the reasoning behind the design.
package lockd
