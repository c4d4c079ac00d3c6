// Package storage keeps gitraft's bare repositories on local disk: safe names
// and paths, and (as the git path grows) staging of incoming packs, applying a
// committed version and catching up from peers.
//
// A node's disk is a cache of the replicated state; nothing here decides what
// is true. storage imports no other gitraft package.
package storage
