// Package storage keeps gitraft's bare repositories on local disk: safe names
// and paths, each copy's incarnation and version (its marker), installing
// the packs peers ship, setting refs to a committed version, fetching
// missing objects from peers, what a scrub reads and a heal needs
// (pack checksums, connectivity, damaged packs set aside, the damage
// recorded in the marker), and keeping each copy healthy (Health,
// Housekeep, RemoveLeftovers: repack, commit-graph, prune after a grace
// period). It runs the real git for everything git does.
//
// A node's disk is a cache of the replicated state; nothing here decides what
// is true. storage imports no other gitraft package.
package storage
