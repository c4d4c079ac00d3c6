// Package backup writes, checks and restores gitraft backups: the
// replicated state at one Raft index and every repository's objects and
// refs at the versions that index names, in a directory of plain files.
//
// A backup directory holds
//
//	manifest.json          written last: a backup without it is not one
//	state-<index>.bin      the replicated state, in the Raft snapshot format
//	packs/pack-<sum>.pack  git packs, named by their checksum, with their .idx
//
// Packs are immutable and named by their content, so a backup into a
// directory that holds an earlier one copies only the packs it lacks
// (incremental), and tools such as borg or restic on top see unchanged files.
// Create drives a node's gitraft.backup.v1 service; Verify and Restore need
// only the directory and git.
package backup
