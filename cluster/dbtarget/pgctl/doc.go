// Package pgctl drives a real PostgreSQL server (pg_ctl, pg_controldata,
// pg_rewind and SQL) and a real pgbouncer (its admin console and an included
// [databases] file) for the dbtarget agents. It implements dbtarget.Server
// and dbtarget.Bouncer; package pgtest starts both on loopback for tests.
//
// Server runs the PostgreSQL tools as OSUser when the agent is root, in the
// C locale. Stop is a fast shutdown and reads the shutdown checkpoint's
// location with pg_controldata. Promote signals pg_promote again every half
// second until recovery ends (PostgreSQL 15 can miss the first wakeup right
// after losing its primary). Demote runs CHECKPOINT on the new primary when
// its control file still names the previous timeline (pg_rewind reads the
// source's timeline there), creates this member's replication slot on it,
// runs pg_rewind (which does nothing when the histories did not diverge,
// and needs data checksums or wal_log_hints), puts the server's own *.conf
// files back (pg_rewind copies the source's), writes standby.signal,
// primary_conninfo and primary_slot_name, starts it and waits until it
// streams.
//
// Bouncer pauses and resumes only the routed databases (PAUSE db, RESUME
// db), and confirms a PAUSE with SHOW SERVERS: pgbouncer 1.18 answers a
// waiting PAUSE at once after anyone used WAIT_CLOSE on the database, so
// the driver never uses WAIT_CLOSE. Fence is KILL db (the database then
// waits for RESUME db). Point rewrites the include file atomically, issues
// RELOAD and checks SHOW DATABASES. After a fence, pgbouncer connects for
// clients that logged in meanwhile only server_login_retry after RESUME, so
// pgbouncers should run with a short server_login_retry (1s).
package pgctl
