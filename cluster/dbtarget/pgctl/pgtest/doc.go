// Package pgtest starts real PostgreSQL 15 servers (a primary, streaming
// standbys made with pg_basebackup and a replication slot) and real
// pgbouncer instances (transaction pooling, an %include of a [databases]
// file) on loopback for tests, and runs a client that writes numbered rows
// through pgbouncer while a test switches the primary.
//
// Everything runs as the postgres OS user when the test runs as root, in a
// directory under the system temp dir that the postgres user owns; cleanup
// stops every server (immediate shutdown) and pgbouncer and removes it, and
// prints the tail of their logs when the test failed (PGTEST_KEEP=1 keeps
// the directory). pgbouncers run with server_login_retry = 1, as gitraft's
// README advises.
package pgtest
