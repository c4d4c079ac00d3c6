package pgctl

import "time"

// ServerConfig describes one PostgreSQL server on this host and how the
// agent reaches it.
type ServerConfig struct {
	// BinDir holds pg_ctl, pg_controldata, pg_rewind
	// (default /usr/lib/postgresql/15/bin).
	BinDir string
	// DataDir is the server's data directory.
	DataDir string
	// OSUser runs the PostgreSQL tools when the agent runs as root
	// (default postgres).
	OSUser string
	// LogFile receives the server's log when the agent starts it (pg_ctl -l).
	LogFile string
	// Host and Port are where the server listens; clients, pgbouncer and
	// standbys use them too.
	Host string
	Port int
	// User, Password and Database are what the agent connects as (a
	// superuser; default postgres/postgres).
	User, Password, Database string
	// ReplicationUser and ReplicationPassword go into primary_conninfo when
	// this server follows another, and into pg_rewind's source conninfo.
	ReplicationUser, ReplicationPassword string
	// Name is the member name: application_name in primary_conninfo and the
	// physical replication slot this server uses on a primary it follows.
	Name string
	// Timeout bounds starting, stopping and promoting (default 60s).
	Timeout time.Duration
}

// BouncerConfig describes one pgbouncer and the file of [databases] entries
// it includes (pgbouncer.ini: %include FILE, placed under [databases]).
type BouncerConfig struct {
	// AdminHost and AdminPort reach pgbouncer's admin console (database
	// "pgbouncer"); AdminUser must be in admin_users.
	AdminHost     string
	AdminPort     int
	AdminUser     string
	AdminPassword string
	// DatabasesFile is the include file the agent rewrites.
	DatabasesFile string
	// Databases are the database names to route to the primary.
	Databases []string
	// ConnectParams are extra libpq-style parameters added to each entry
	// (for example "user=app pool_size=20").
	ConnectParams string
}
