// Package pgctl drives a real PostgreSQL server (pg_ctl, pg_controldata,
// pg_rewind and SQL) and a real pgbouncer (its admin console and an included
// [databases] file) for the dbtarget agents. It implements dbtarget.Server
// and dbtarget.Bouncer.
package pgctl
