// Package replica is the git side of a node: the push pipeline (lock,
// catch-up, receive, ship the pack to the peers, majority, compare-and-swap,
// finish), the copies on this node's disk and the reconciler that brings
// them to the replicated state, the scrub that finds damaged copies and
// the heal that repairs them from a peer, housekeeping of those copies
// (repack, prune, leftovers of failed pushes), and the gRPC service
// gitraft.replica.v1 that carries packs, catch-up and git sessions between
// nodes.
//
// It implements gitproto.Backend, so the SSH front end talks to it
// directly. What it needs from the Raft node (proposals, read barriers,
// members, write locks, peer connections) is the small Node interface; the
// package never imports cluster. See DESIGN.md, sender.go (the node that
// takes a push) and receiver.go (a peer).
package replica
