package main

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/gitraft/gitraft/cluster"
	"github.com/gitraft/gitraft/cluster/dbtarget"
	"github.com/gitraft/gitraft/cluster/dbtarget/pgctl"
	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
)

// dbSettings configure the database agents of `gitraft serve`. The first
// block is cluster-wide (the leader's settings apply; give every node the
// same), postgres and pgbouncer are this host's agents, each off unless its
// name is set.
type dbSettings struct {
	AutomaticFailover bool          `yaml:"automatic_failover" help:"fail over by itself when a majority of nodes sees the primary gone (cluster-wide)"`
	FailoverAfter     time.Duration `yaml:"failover_after" help:"how long the primary must be unreachable before an automatic failover (default 5s)"`
	MaxLagBytes       uint64        `yaml:"max_lag_bytes" help:"a switchover or failover target may lag the primary by at most this many bytes of WAL (default 16 MiB)"`
	PauseTimeout      time.Duration `yaml:"pause_timeout" help:"bound of the pausing and fencing phases (default 5s)"`
	SwitchoverTimeout time.Duration `yaml:"switchover_timeout" help:"bound of each later phase of a switchover or failover (default 30s)"`
	ReportInterval    time.Duration `yaml:"report_interval" help:"how often database agents report and nodes probe the primary (default 1s)"`
	ProbeTimeout      time.Duration `yaml:"probe_timeout" help:"timeout of one probe of the primary (default 1s)"`
	// IsolationFenceAfter is read by the pgbouncer agent (when to fence
	// itself) and by the leader (when a silent pgbouncer counts as fenced),
	// so it must be the same on every node.
	IsolationFenceAfter time.Duration `yaml:"isolation_fence_after" help:"a pgbouncer whose node cannot reach the cluster's quorum and leader for this long fences itself until it can; the leader counts one silent this long (plus 2 report intervals) as fenced. Same on every node, below failover_after (default failover_after minus 2 report intervals, at least failover_after/2: 3s)"`
	SynchronousMode     string        `yaml:"synchronous_mode" help:"off (asynchronous replication), on (keep one synchronous standby when one streams, and fail over only to it; without one, writes go on asynchronously and no failover promotes anyone without --force) or strict (as on, but commits wait while no standby is synchronous). Cluster-wide (default off)"`

	Postgres  postgresSettings  `yaml:"postgres"`
	PgBouncer pgbouncerSettings `yaml:"pgbouncer"`
}

// postgresSettings describe the PostgreSQL server this node's agent drives.
type postgresSettings struct {
	Member              string        `yaml:"member" help:"member name of the PostgreSQL server on this host; switches the postgres agent on"`
	Host                string        `yaml:"host" help:"address clients, pgbouncer and standbys reach the server at (default 127.0.0.1)"`
	Port                int           `yaml:"port" help:"the server's port (default 5432)"`
	Priority            int           `yaml:"priority" help:"failover preference, higher first (after the WAL position)"`
	NoFailover          bool          `yaml:"no_failover" help:"never promote this member"`
	DataDir             string        `yaml:"data_dir" help:"the server's data directory"`
	BinDir              string        `yaml:"bin_dir" help:"PostgreSQL tools (default /usr/lib/postgresql/15/bin)"`
	OSUser              string        `yaml:"os_user" help:"user that runs the PostgreSQL tools when gitraft runs as root (default postgres)"`
	LogFile             string        `yaml:"log_file" help:"server log file when the agent starts it"`
	User                string        `yaml:"user" help:"superuser the agent connects as (default postgres)"`
	Password            string        `yaml:"password" help:"that user's password"`
	Database            string        `yaml:"database" help:"database the agent connects to (default postgres)"`
	ReplicationUser     string        `yaml:"replication_user" help:"replication user for primary_conninfo and pg_rewind"`
	ReplicationPassword string        `yaml:"replication_password" help:"that user's password"`
	Timeout             time.Duration `yaml:"timeout" help:"bound of starting, stopping and promoting the server (default 60s)"`
}

// pgbouncerSettings describe the pgbouncer this node's agent drives.
type pgbouncerSettings struct {
	Name          string        `yaml:"name" help:"name of the pgbouncer on this host; switches the pgbouncer agent on"`
	AdminHost     string        `yaml:"admin_host" help:"pgbouncer's admin console host (default 127.0.0.1)"`
	AdminPort     int           `yaml:"admin_port" help:"pgbouncer's admin console port (default 6432)"`
	AdminUser     string        `yaml:"admin_user" help:"a user in pgbouncer's admin_users (default pgbouncer)"`
	AdminPassword string        `yaml:"admin_password" help:"that user's password"`
	DatabasesFile string        `yaml:"databases_file" help:"the [databases] include file the agent rewrites"`
	Databases     []string      `yaml:"databases" help:"database names pgbouncer routes to the primary"`
	ConnectParams string        `yaml:"connect_params" help:"extra parameters on each [databases] entry, e.g. pool_size=20"`
	PauseExpiry   time.Duration `yaml:"pause_expiry" help:"a PAUSE ends by itself after this long (default 30s)"`
}

// clusterSettings are the cluster-wide settings the leader applies.
func (d dbSettings) clusterSettings() dbtarget.Settings {
	return dbtarget.Settings{
		AutomaticFailover: d.AutomaticFailover, FailoverAfter: d.FailoverAfter, MaxLagBytes: d.MaxLagBytes,
		PauseTimeout: d.PauseTimeout, SwitchoverTimeout: d.SwitchoverTimeout,
		ReportInterval: d.ReportInterval, ProbeTimeout: d.ProbeTimeout, IsolationFenceAfter: d.IsolationFenceAfter,
		SynchronousMode: d.SynchronousMode,
	}.WithDefaults()
}

// validate checks the settings before anything starts.
func (d dbSettings) validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", cluster.ErrConfig, fmt.Sprintf(format, args...))
	}
	if err := dbtarget.CheckSynchronousMode(d.SynchronousMode); err != nil {
		return bad("database.%v", err)
	}
	if d.IsolationFenceAfter < 0 {
		return bad("database.isolation_fence_after %s: give a positive duration, or leave it unset (failover_after minus 2 report intervals)", d.IsolationFenceAfter)
	}
	if set := d.clusterSettings(); set.IsolationFenceAfter >= set.FailoverAfter {
		return bad("database.isolation_fence_after (%s) must be below database.failover_after (%s): a pgbouncer cut off with the old primary has to fence itself before the rest of the cluster fails over; set it to %s or less, or leave it unset (that value)",
			set.IsolationFenceAfter, set.FailoverAfter, dbtarget.DefaultIsolationFenceAfter(set.FailoverAfter, set.ReportInterval))
	}
	if p := d.Postgres; p.Member != "" {
		if err := dbtarget.ValidName(p.Member); err != nil {
			return bad("database.postgres.member: %v", err)
		}
		if p.DataDir == "" {
			return bad("database.postgres.data_dir is required with database.postgres.member (%s)", p.Member)
		}
		if p.Port < 0 || p.Port > 65535 {
			return bad("database.postgres.port %d: use 1 to 65535", p.Port)
		}
	}
	if b := d.PgBouncer; b.Name != "" {
		if err := dbtarget.ValidName(b.Name); err != nil {
			return bad("database.pgbouncer.name: %v", err)
		}
		if b.DatabasesFile == "" {
			return bad("database.pgbouncer.databases_file is required with database.pgbouncer.name (%s): the file pgbouncer includes under [databases] (%%include FILE)", b.Name)
		}
		if len(b.Databases) == 0 {
			return bad("database.pgbouncer.databases is required with database.pgbouncer.name (%s): the database names to route to the primary", b.Name)
		}
		if b.AdminPort < 0 || b.AdminPort > 65535 {
			return bad("database.pgbouncer.admin_port %d: use 1 to 65535", b.AdminPort)
		}
		if d.Postgres.Member != "" && d.Postgres.Member == b.Name {
			return bad("database.pgbouncer.name and database.postgres.member are both %q; give them different names", b.Name)
		}
	}
	return nil
}

// startDatabaseAgents starts the PostgreSQL and pgbouncer agents this node's
// configuration switches on; they stop when ctx ends. Every node also
// probes the primary (for automatic failover and the read-only signal).
func startDatabaseAgents(ctx context.Context, cfg fileConfig, n *cluster.Node, log *slog.Logger) error {
	d := cfg.Database
	if err := d.validate(); err != nil {
		return err
	}
	set := d.clusterSettings()
	n.SetDatabaseSettings(set)
	log = log.With("node", n.ID())

	var pgAgent *dbtarget.PostgresAgent
	if p := d.Postgres; p.Member != "" {
		host, port := p.Host, p.Port
		if host == "" {
			host = "127.0.0.1"
		}
		if port == 0 {
			port = 5432
		}
		srv, err := pgctl.NewServer(pgctl.ServerConfig{
			BinDir: p.BinDir, DataDir: p.DataDir, OSUser: p.OSUser, LogFile: p.LogFile,
			Host: host, Port: port, User: p.User, Password: p.Password, Database: p.Database,
			ReplicationUser: p.ReplicationUser, ReplicationPassword: p.ReplicationPassword,
			Name: p.Member, Timeout: p.Timeout,
		}, log)
		if err != nil {
			return fmt.Errorf("database.postgres (%s): %w", p.Member, err)
		}
		pgAgent = dbtarget.NewPostgresAgent(dbtarget.PostgresAgentConfig{
			Member:          &dbv1.Member{Name: p.Member, Host: host, Port: int32(port), Priority: int32(p.Priority), NoFailover: p.NoFailover},
			ReportInterval:  set.ReportInterval,
			SynchronousMode: set.SynchronousMode,
		}, n, srv, log)
	}
	var bAgent *dbtarget.BouncerAgent
	if b := d.PgBouncer; b.Name != "" {
		host, port, user := b.AdminHost, b.AdminPort, b.AdminUser
		if host == "" {
			host = "127.0.0.1"
		}
		if port == 0 {
			port = 6432
		}
		if user == "" {
			user = "pgbouncer"
		}
		bc, err := pgctl.NewBouncer(pgctl.BouncerConfig{
			AdminHost: host, AdminPort: port, AdminUser: user, AdminPassword: b.AdminPassword,
			DatabasesFile: b.DatabasesFile, Databases: b.Databases, ConnectParams: b.ConnectParams,
		}, log)
		if err != nil {
			return fmt.Errorf("database.pgbouncer (%s): %w", b.Name, err)
		}
		bAgent = dbtarget.NewBouncerAgent(dbtarget.BouncerAgentConfig{
			Name:                b.Name,
			StateFile:           filepath.Join(cfg.DataDir, "database", "pgbouncer-"+b.Name+".json"),
			PauseExpiry:         b.PauseExpiry,
			PauseTimeout:        set.PauseTimeout,
			ReportInterval:      set.ReportInterval,
			IsolationFenceAfter: set.IsolationFenceAfter,
		}, n, bc, log)
	}
	prober := dbtarget.NewProber(dbtarget.ProberConfig{Interval: set.ReportInterval, Timeout: set.ProbeTimeout}, n, log)
	go prober.Run(ctx)
	if pgAgent != nil {
		go pgAgent.Run(ctx)
		log.Info("postgres agent started", "member", d.Postgres.Member)
	}
	if bAgent != nil {
		go bAgent.Run(ctx)
		log.Info("pgbouncer agent started", "pgbouncer", d.PgBouncer.Name)
	}
	return nil
}
