package pgctl

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/gitraft/gitraft/cluster/atomicfile"
	"github.com/gitraft/gitraft/cluster/dbtarget"
)

// Defaults of ServerConfig.
const (
	DefaultBinDir  = "/usr/lib/postgresql/15/bin"
	DefaultOSUser  = "postgres"
	DefaultTimeout = 60 * time.Second
)

// Server drives one PostgreSQL server on this host with pg_ctl,
// pg_controldata, pg_rewind and SQL. Health may be called at any time;
// Stop, Start, Promote and Demote run one at a time.
type Server struct {
	cfg  ServerConfig
	log  *slog.Logger
	user osUser
	slot string
	mu   sync.Mutex
}

var _ dbtarget.Server = (*Server)(nil)

// NewServer checks cfg, fills in defaults and returns a driver for the
// server. It does not touch the server.
func NewServer(cfg ServerConfig, log *slog.Logger) (*Server, error) {
	if cfg.BinDir == "" {
		cfg.BinDir = DefaultBinDir
	}
	if cfg.OSUser == "" {
		cfg.OSUser = DefaultOSUser
	}
	if cfg.Host == "" {
		cfg.Host = "127.0.0.1"
	}
	if cfg.Port == 0 {
		cfg.Port = 5432
	}
	if cfg.User == "" {
		cfg.User = "postgres"
	}
	if cfg.Database == "" {
		cfg.Database = "postgres"
	}
	if cfg.ReplicationUser == "" {
		cfg.ReplicationUser, cfg.ReplicationPassword = cfg.User, cfg.Password
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	switch {
	case cfg.DataDir == "" || !filepath.IsAbs(cfg.DataDir):
		return nil, fmt.Errorf("%w: DataDir %q: want the absolute path of the data directory", ErrConfig, cfg.DataDir)
	case cfg.Port < 1 || cfg.Port > 65535:
		return nil, fmt.Errorf("%w: Port %d: want 1-65535", ErrConfig, cfg.Port)
	case cfg.Name == "":
		return nil, fmt.Errorf("%w: Name: want the member name (it names the replication slot)", ErrConfig)
	}
	if cfg.LogFile == "" {
		// Beside the data directory, not in it: pg_basebackup and
		// pg_rewind copy what is in it.
		cfg.LogFile = filepath.Clean(cfg.DataDir) + ".log"
	}
	if _, err := os.Stat(filepath.Join(cfg.BinDir, "pg_ctl")); err != nil {
		return nil, fmt.Errorf("%w: BinDir %q: no pg_ctl there: %v", ErrConfig, cfg.BinDir, err)
	}
	u, err := lookupOSUser(cfg.OSUser)
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.Default()
	}
	return &Server{cfg: cfg, user: u, slot: SlotName(cfg.Name),
		log: log.With("member", cfg.Name, "data_dir", cfg.DataDir)}, nil
}

// SlotName is the physical replication slot a member uses on the primary
// it follows: its name in lower case, with characters a slot name cannot
// hold replaced by '_'.
func SlotName(member string) string {
	b := []byte(strings.ToLower(member))
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_') {
			b[i] = '_'
		}
	}
	if len(b) > 63 {
		b = b[:63]
	}
	return string(b)
}

// Endpoint is where the server listens.
func (s *Server) Endpoint() dbtarget.Endpoint {
	return dbtarget.Endpoint{Host: s.cfg.Host, Port: s.cfg.Port}
}

func (s *Server) connConfig(host string, port int) (*pgx.ConnConfig, error) {
	cc, err := pgx.ParseConfig(connString("connect_timeout", "5", "application_name", "gitraft-agent"))
	if err != nil {
		return nil, err
	}
	cc.Host, cc.Port = host, uint16(port)
	cc.User, cc.Password, cc.Database = s.cfg.User, s.cfg.Password, s.cfg.Database
	cc.Fallbacks = nil
	return cc, nil
}

// connect opens a SQL connection to host:port as the agent's user.
func (s *Server) connect(ctx context.Context, host string, port int) (*pgx.Conn, error) {
	cc, err := s.connConfig(host, port)
	if err != nil {
		return nil, err
	}
	return pgx.ConnectConfig(ctx, cc)
}

// healthTimeout bounds one Health call: a server that hangs is not healthy.
const healthTimeout = 5 * time.Second

// probe is Health with where a standby's WAL receiver connects to.
type probe struct {
	dbtarget.Health
	senderHost string
	senderPort int
}

// Health asks the server how it is.
func (s *Server) Health(ctx context.Context) dbtarget.Health { return s.probe(ctx).Health }

func (s *Server) probe(ctx context.Context) probe {
	var p probe
	ctx, cancel := context.WithTimeout(ctx, healthTimeout)
	defer cancel()
	conn, err := s.connect(ctx, s.cfg.Host, s.cfg.Port)
	if err != nil {
		p.Err = err.Error()
		return p
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if err := conn.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&p.InRecovery); err != nil {
		p.Err = err.Error()
		return p
	}
	p.Running = true
	var write, replay *string
	var tli int64
	if !p.InRecovery {
		err = conn.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text,
			('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint,
			current_setting('synchronous_standby_names'),
			coalesce((SELECT array_agg(application_name::text ORDER BY application_name) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')), '{}'),
			coalesce((SELECT array_agg(application_name::text ORDER BY application_name) FROM pg_stat_replication WHERE state = 'streaming'), '{}')`).
			Scan(&write, &tli, &p.SynchronousStandbyNames, &p.Synchronous, &p.Replicas)
		replay = write
	} else {
		var status, host *string
		var recvTLI, port *int64
		err = conn.QueryRow(ctx, `SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text,
			greatest((SELECT timeline_id FROM pg_control_checkpoint()), (SELECT min_recovery_end_timeline FROM pg_control_recovery())),
			r.status, r.received_tli, r.sender_host, r.sender_port, current_setting('synchronous_standby_names')
			FROM (SELECT 1) one LEFT JOIN pg_stat_wal_receiver r ON true`).Scan(&write, &replay, &tli, &status, &recvTLI, &host, &port, &p.SynchronousStandbyNames)
		if err == nil {
			if recvTLI != nil && *recvTLI > tli {
				tli = *recvTLI
			}
			p.Streaming = status != nil && *status == "streaming"
			if host != nil {
				p.senderHost = *host
			}
			if port != nil {
				p.senderPort = int(*port)
			}
			if p.Streaming {
				p.Upstream = dbtarget.Endpoint{Host: p.senderHost, Port: p.senderPort}
			}
		}
		if write == nil {
			write = replay
		}
	}
	if err != nil {
		p.Err = err.Error()
		return p
	}
	p.Timeline = uint32(tli)
	if write != nil {
		p.WriteLSN, _ = dbtarget.ParseLSN(*write)
	}
	if replay != nil {
		p.ReplayLSN, _ = dbtarget.ParseLSN(*replay)
	}
	return p
}

// running asks pg_ctl status whether a postmaster runs on the data
// directory.
func (s *Server) running(ctx context.Context) (bool, error) {
	out, err := s.user.run(ctx, s.cfg.BinDir, "pg_ctl", "status", "-D", s.cfg.DataDir)
	switch exitCode(err) {
	case -1:
		if err != nil {
			return false, err
		}
		return true, nil
	case 3:
		return false, nil
	default:
		return false, fmt.Errorf("pg_ctl status: %w", &toolError{tool: "pg_ctl", code: exitCode(err), output: out})
	}
}

// controlData is what pg_controldata says about the data directory.
type controlData struct {
	state      string // "shut down", "shut down in recovery", "in production", ...
	checkpoint dbtarget.LSN
	timeline   uint32
}

func (s *Server) controlData(ctx context.Context) (controlData, error) {
	out, err := s.user.run(ctx, s.cfg.BinDir, "pg_controldata", "-D", s.cfg.DataDir)
	if err != nil {
		return controlData{}, err
	}
	var cd controlData
	var haveLSN bool
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		switch strings.TrimSpace(k) {
		case "Database cluster state":
			cd.state = v
		case "Latest checkpoint location":
			if cd.checkpoint, err = dbtarget.ParseLSN(v); err != nil {
				return controlData{}, fmt.Errorf("pg_controldata: %w", err)
			}
			haveLSN = true
		case "Latest checkpoint's TimeLineID":
			n, err := strconv.ParseUint(v, 10, 32)
			if err != nil {
				return controlData{}, fmt.Errorf("pg_controldata: timeline %q: %v", v, err)
			}
			cd.timeline = uint32(n)
		}
	}
	if !haveLSN || cd.state == "" {
		return controlData{}, fmt.Errorf("%w: pg_controldata printed no checkpoint location or state: %s", ErrTool, out)
	}
	return cd, nil
}

func (s *Server) timeoutSeconds() string {
	return strconv.Itoa(max(1, int(s.cfg.Timeout.Round(time.Second)/time.Second)))
}

// Stop shuts the server down with a fast shutdown and returns the
// checkpoint location pg_controldata reports. After a clean shutdown that
// is the shutdown checkpoint, the last WAL record the server wrote; a server
// that had crashed reports its last checkpoint before the crash.
func (s *Server) Stop(ctx context.Context) (dbtarget.LSN, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stop(ctx)
}

func (s *Server) stop(ctx context.Context) (dbtarget.LSN, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout+10*time.Second)
	defer cancel()
	up, err := s.running(ctx)
	if err != nil {
		return 0, fmt.Errorf("stop: %w", err)
	}
	if up {
		t0 := time.Now()
		if err := s.fastStop(ctx); err != nil {
			// Fencing matters more than a clean checkpoint: make sure it
			// is down, and say that the location is not final.
			s.log.Warn("fast shutdown failed; stopping with an immediate shutdown", "err", err)
			if _, ierr := s.user.run(context.WithoutCancel(ctx), s.cfg.BinDir, "pg_ctl", "stop", "-D", s.cfg.DataDir, "-m", "immediate", "-w", "-t", "30"); ierr != nil {
				return 0, fmt.Errorf("stop: fast shutdown: %w; immediate shutdown: %v", err, ierr)
			}
			return 0, fmt.Errorf("stop: fast shutdown failed, stopped with an immediate shutdown so the WAL end is unknown: %w", err)
		}
		s.log.Info("stopped", "took", time.Since(t0).Round(time.Millisecond))
	}
	cd, err := s.controlData(ctx)
	if err != nil {
		return 0, fmt.Errorf("stop: %w", err)
	}
	if !strings.HasPrefix(cd.state, "shut down") {
		s.log.Warn("server was not shut down cleanly; its checkpoint location is older than its last WAL", "state", cd.state, "lsn", cd.checkpoint.String())
	}
	return cd.checkpoint, nil
}

// Checkpoint runs CHECKPOINT, which writes every dirty buffer now, while
// clients still write, so that a fast stop soon after (whose shutdown
// checkpoint clients wait for under a switchover's pause) has little left
// to write. It does not wait for Stop and friends, nor they for it.
func (s *Server) Checkpoint(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	conn, err := s.connect(ctx, s.cfg.Host, s.cfg.Port)
	if err != nil {
		return fmt.Errorf("checkpoint: %w: %v", ErrNotRunning, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	t0 := time.Now()
	if _, err := conn.Exec(ctx, "CHECKPOINT"); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	s.log.Info("checkpoint", "took", time.Since(t0).Round(time.Millisecond))
	return nil
}

// fastStop asks the postmaster for a fast shutdown and waits until it is
// gone (postmaster.pid removed, as pg_ctl -w sees it), at most the
// configured timeout. It watches every 10ms, where pg_ctl -w looks every
// 100ms: under a switchover's pause every moment counts.
func (s *Server) fastStop(ctx context.Context) error {
	if _, err := s.user.run(ctx, s.cfg.BinDir, "pg_ctl", "stop", "-D", s.cfg.DataDir, "-m", "fast", "-W"); err != nil {
		if up, rerr := s.running(ctx); rerr == nil && !up {
			return nil // it stopped meanwhile
		}
		return err
	}
	pidFile := filepath.Join(s.cfg.DataDir, "postmaster.pid")
	deadline := time.Now().Add(s.cfg.Timeout)
	every := 10 * time.Millisecond
	for {
		_, err := os.Stat(pidFile)
		switch {
		case errors.Is(err, os.ErrNotExist):
			return nil
		case err != nil:
			// Not ours to read: ask pg_ctl, less often.
			every = 50 * time.Millisecond
			if up, rerr := s.running(ctx); rerr == nil && !up {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pg_ctl stop -m fast: %w: the server still runs after %s", ErrTool, s.cfg.Timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(every):
		}
	}
}

// SetSynchronousStandbyNames sets synchronous_standby_names with ALTER
// SYSTEM (RESET for "") and pg_reload_conf, and waits (at most 5s) until
// the setting is in force.
func (s *Server) SetSynchronousStandbyNames(ctx context.Context, value string) error {
	ctx, cancel := context.WithTimeout(ctx, healthTimeout)
	defer cancel()
	conn, err := s.connect(ctx, s.cfg.Host, s.cfg.Port)
	if err != nil {
		return fmt.Errorf("synchronous_standby_names: %w: %v", ErrNotRunning, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	stmt := "ALTER SYSTEM SET synchronous_standby_names = " + quoteConfValue(value)
	if value == "" {
		stmt = "ALTER SYSTEM RESET synchronous_standby_names"
	}
	if _, err := conn.Exec(ctx, stmt); err != nil {
		return fmt.Errorf("synchronous_standby_names: %w", err)
	}
	if _, err := conn.Exec(ctx, "SELECT pg_reload_conf()"); err != nil {
		return fmt.Errorf("synchronous_standby_names: reload: %w", err)
	}
	for {
		var cur string
		if err := conn.QueryRow(ctx, "SELECT current_setting('synchronous_standby_names')").Scan(&cur); err != nil {
			return fmt.Errorf("synchronous_standby_names: %w", err)
		}
		if cur == value {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("synchronous_standby_names: still %q after reload, want %q: %w", cur, value, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// Start starts the server as its data directory says and waits until it
// answers queries. Starting a running server only checks that it answers.
func (s *Server) Start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.start(ctx)
}

func (s *Server) start(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout+10*time.Second)
	defer cancel()
	up, err := s.running(ctx)
	if err != nil {
		return fmt.Errorf("start: %w", err)
	}
	if !up {
		t0 := time.Now()
		if _, err := s.user.run(ctx, s.cfg.BinDir, "pg_ctl", "start", "-D", s.cfg.DataDir, "-l", s.cfg.LogFile, "-w", "-t", s.timeoutSeconds()); err != nil {
			return fmt.Errorf("start (log: %s): %w", s.cfg.LogFile, err)
		}
		s.log.Info("started", "took", time.Since(t0).Round(time.Millisecond))
	}
	for {
		p := s.probe(ctx)
		if p.Running {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("start: %w: %s", ErrNotRunning, p.Err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Promote promotes a standby (pg_promote) and returns once it accepts
// writes. Promoting a primary does nothing.
func (s *Server) Promote(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout+10*time.Second)
	defer cancel()
	conn, err := s.connect(ctx, s.cfg.Host, s.cfg.Port)
	if err != nil {
		return fmt.Errorf("promote: %w: %v", ErrNotRunning, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var inRecovery bool
	if err := conn.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&inRecovery); err != nil {
		return fmt.Errorf("promote: %w", err)
	}
	if !inRecovery {
		s.log.Info("promote: already a primary")
		return nil
	}
	// pg_promote signals the startup process. PostgreSQL 15 can miss the
	// wakeup while it switches WAL sources after losing its primary, and
	// then sleeps wal_retrieve_retry_interval (5s by default) before it
	// looks again; so signal again every half second until recovery ends.
	// A leftover promote file is removed when a postmaster starts.
	t0 := time.Now()
	deadline := t0.Add(s.cfg.Timeout)
	var signalled time.Time
	for {
		if err := conn.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&inRecovery); err != nil {
			return fmt.Errorf("promote: %w", err)
		}
		if !inRecovery {
			break
		}
		if time.Since(signalled) >= 500*time.Millisecond {
			var ok bool
			err := conn.QueryRow(ctx, "SELECT pg_promote(false)").Scan(&ok)
			if err != nil && !strings.Contains(err.Error(), "recovery is not in progress") {
				return fmt.Errorf("promote: %w: %v", ErrPromote, err)
			}
			signalled = time.Now()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("promote: %w: still in recovery after %s", ErrPromote, s.cfg.Timeout)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("promote: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	var readOnly string
	if err := conn.QueryRow(ctx, "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')").Scan(&inRecovery, &readOnly); err != nil {
		return fmt.Errorf("promote: %w", err)
	}
	if inRecovery || readOnly != "off" {
		return fmt.Errorf("promote: %w: in recovery %v, transaction_read_only %s", ErrPromote, inRecovery, readOnly)
	}
	s.log.Info("promoted", "took", time.Since(t0).Round(time.Millisecond))
	return nil
}

// Demote turns the server into a streaming standby of primary: it stops it
// if it runs, rewinds it with pg_rewind when its history diverged from the
// primary's (pg_rewind finds that out, and does nothing when it did not),
// writes standby.signal and primary_conninfo (with this member's slot, which
// it creates on the primary when missing), starts it and waits until it
// streams. A standby already streaming from primary is left alone.
func (s *Server) Demote(ctx context.Context, primary dbtarget.Endpoint) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if primary.Host == "" || primary.Port < 1 || primary.Port > 65535 {
		return fmt.Errorf("demote: %w: primary %q", ErrConfig, primary)
	}
	if sameEndpoint(primary, s.Endpoint()) {
		return fmt.Errorf("demote: %w: %s is this server; a server cannot follow itself", ErrConfig, primary)
	}
	ctx, cancel := context.WithTimeout(ctx, 3*s.cfg.Timeout)
	defer cancel()
	p := s.probe(ctx)
	if p.Running && p.InRecovery && p.Streaming && sameEndpoint(primary, dbtarget.Endpoint{Host: p.senderHost, Port: p.senderPort}) {
		s.log.Info("demote: already streaming from the primary", "primary", primary.String())
		return nil
	}
	t0 := time.Now()
	if p.Running && p.InRecovery {
		// A standby that follows another server (a primary that is gone,
		// or an old primary it now cascades through): point it at primary
		// in place. PostgreSQL 13 and later restart the WAL receiver when
		// primary_conninfo changes on reload, and recovery_target_timeline
		// 'latest' follows the new primary's timeline. If its history
		// diverged from primary's it cannot stream: then the full way
		// below, with pg_rewind.
		err := s.repoint(ctx, primary)
		if err == nil {
			s.log.Info("demote: pointed the standby at the primary in place", "primary", primary.String(), "was", p.senderHost+":"+strconv.Itoa(p.senderPort), "took", time.Since(t0).Round(time.Millisecond))
			return nil
		}
		s.log.Warn("demote: pointing the running standby at the primary did not work; stopping, rewinding and starting it", "primary", primary.String(), "err", err)
	}
	if _, err := s.stop(ctx); err != nil {
		if up, rerr := s.running(ctx); rerr != nil || up {
			return fmt.Errorf("demote: %w", err)
		}
	}
	if err := s.preparePrimary(ctx, primary, true); err != nil {
		return fmt.Errorf("demote: %w", err)
	}
	if err := s.rewind(ctx, primary); err != nil {
		return fmt.Errorf("demote: %w", err)
	}
	if err := s.writeStandbyConfig(primary); err != nil {
		return fmt.Errorf("demote: %w", err)
	}
	if err := s.start(ctx); err != nil {
		return fmt.Errorf("demote: %w", err)
	}
	for {
		p := s.probe(ctx)
		if p.Running && p.InRecovery && p.Streaming {
			s.log.Info("demoted", "primary", primary.String(), "took", time.Since(t0).Round(time.Millisecond))
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("demote: %w from %s (running %v, in recovery %v): %s", ErrNotStreaming, primary, p.Running, p.InRecovery, p.Err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// repoint points a running standby at primary: its slot there,
// primary_conninfo, reload, then it waits (at most 10s) until it streams
// from primary.
func (s *Server) repoint(ctx context.Context, primary dbtarget.Endpoint) error {
	if err := s.preparePrimary(ctx, primary, false); err != nil {
		return err
	}
	if err := s.writeStandbyConfig(primary); err != nil {
		return err
	}
	conn, err := s.connect(ctx, s.cfg.Host, s.cfg.Port)
	if err != nil {
		return err
	}
	_, err = conn.Exec(ctx, "SELECT pg_reload_conf()")
	conn.Close(context.WithoutCancel(ctx))
	if err != nil {
		return fmt.Errorf("reload: %w", err)
	}
	deadline := time.Now().Add(min(10*time.Second, s.cfg.Timeout))
	for {
		p := s.probe(ctx)
		if p.Running && p.InRecovery && p.Streaming && sameEndpoint(primary, p.Upstream) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w from %s after reload (running %v, in recovery %v, streaming from %s): %s", ErrNotStreaming, primary, p.Running, p.InRecovery, p.Upstream, p.Err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// sameEndpoint compares endpoints, treating names that resolve to the same
// address as equal.
func sameEndpoint(a, b dbtarget.Endpoint) bool {
	if a.Port != b.Port {
		return false
	}
	if a.Host == b.Host {
		return true
	}
	ia, ib := net.ParseIP(a.Host), net.ParseIP(b.Host)
	return ia != nil && ib != nil && ia.Equal(ib)
}

// preparePrimary readies primary for this server to follow it: it
// creates this member's physical replication slot there when missing, and,
// for a rewind, when the primary's last checkpoint is on an older timeline
// than the one it writes (it was promoted a moment ago), runs CHECKPOINT:
// pg_rewind reads the source's timeline from its control file and would
// otherwise compare histories against the old timeline.
func (s *Server) preparePrimary(ctx context.Context, primary dbtarget.Endpoint, forRewind bool) error {
	conn, err := s.connect(ctx, primary.Host, primary.Port)
	if err != nil {
		return fmt.Errorf("primary %s: %w", primary, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var inRecovery bool
	var current, checkpointed int64
	if err := conn.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&inRecovery); err != nil {
		return fmt.Errorf("primary %s: %w", primary, err)
	}
	if inRecovery {
		return fmt.Errorf("primary %s: %w: it is a standby (in recovery)", primary, ErrConfig)
	}
	var created bool
	err = conn.QueryRow(ctx, `SELECT count(pg_create_physical_replication_slot($1, true)) > 0
		FROM (SELECT 1) one WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)`, s.slot).Scan(&created)
	if err != nil && !strings.Contains(err.Error(), "already exists") {
		return fmt.Errorf("replication slot %s on %s: %w", s.slot, primary, err)
	}
	if created {
		s.log.Info("created replication slot", "slot", s.slot, "primary", primary.String())
	}
	if !forRewind {
		return nil
	}
	const timelines = `SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint,
		(SELECT timeline_id FROM pg_control_checkpoint())`
	if err := conn.QueryRow(ctx, timelines).Scan(&current, &checkpointed); err != nil {
		return fmt.Errorf("primary %s: timeline: %w", primary, err)
	}
	if checkpointed < current {
		t0 := time.Now()
		if _, err := conn.Exec(ctx, "CHECKPOINT"); err != nil {
			return fmt.Errorf("primary %s: CHECKPOINT: %w", primary, err)
		}
		if err := conn.QueryRow(ctx, timelines).Scan(&current, &checkpointed); err != nil {
			return fmt.Errorf("primary %s: timeline: %w", primary, err)
		}
		if checkpointed < current {
			return fmt.Errorf("primary %s: last checkpoint on timeline %d after CHECKPOINT, want %d", primary, checkpointed, current)
		}
		s.log.Info("checkpoint on the new primary", "primary", primary.String(), "timeline", current, "took", time.Since(t0).Round(time.Millisecond))
	}
	return nil
}

// rewind runs pg_rewind against primary, keeping this server's own
// configuration files (pg_rewind copies the source's).
func (s *Server) rewind(ctx context.Context, primary dbtarget.Endpoint) error {
	// The configuration files at the top of the data directory
	// (postgresql.conf, postgresql.auto.conf, pg_hba.conf, pg_ident.conf
	// and any other *.conf) are this server's own.
	confs, err := filepath.Glob(filepath.Join(s.cfg.DataDir, "*.conf"))
	if err != nil {
		return err
	}
	saved := map[string][]byte{}
	for _, f := range confs {
		if fi, err := os.Lstat(f); err != nil || !fi.Mode().IsRegular() {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		saved[f] = b
	}
	// A crashed standby cannot run pg_rewind's single-user crash recovery
	// with standby.signal in place; the signal is written again below.
	for _, f := range []string{"standby.signal", "recovery.signal"} {
		if err := os.Remove(filepath.Join(s.cfg.DataDir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	src := connString("host", primary.Host, "port", strconv.Itoa(primary.Port), "user", s.cfg.User,
		"password", s.cfg.Password, "dbname", s.cfg.Database, "connect_timeout", "10", "application_name", "pg_rewind")
	t0 := time.Now()
	out, err := s.user.run(ctx, s.cfg.BinDir, "pg_rewind", "--target-pgdata", s.cfg.DataDir, "--source-server", src)
	for f, b := range saved {
		if werr := atomicfile.WriteOwned(f, b, 0o600, s.user.uid, s.user.gid); werr != nil && err == nil {
			err = werr
		}
	}
	if err != nil {
		return fmt.Errorf("pg_rewind from %s: %w", primary, err)
	}
	s.log.Info("pg_rewind", "primary", primary.String(), "took", time.Since(t0).Round(time.Millisecond),
		"rewound", !strings.Contains(out, "no rewind required"))
	return nil
}

// autoConfKeys are the settings Demote owns in postgresql.auto.conf.
var autoConfKeys = regexp.MustCompile(`^\s*(primary_conninfo|primary_slot_name|restore_command|recovery_target\w*)\s*=`)

// writeStandbyConfig writes standby.signal and points primary_conninfo and
// primary_slot_name in postgresql.auto.conf at primary.
func (s *Server) writeStandbyConfig(primary dbtarget.Endpoint) error {
	path := filepath.Join(s.cfg.DataDir, "postgresql.auto.conf")
	old, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	var b strings.Builder
	for _, line := range strings.SplitAfter(string(old), "\n") {
		if line == "" || autoConfKeys.MatchString(line) {
			continue
		}
		b.WriteString(line)
		if !strings.HasSuffix(line, "\n") {
			b.WriteByte('\n')
		}
	}
	if b.Len() == 0 {
		b.WriteString("# Do not edit this file manually!\n# It will be overwritten by the ALTER SYSTEM command.\n")
	}
	conninfo := connString("host", primary.Host, "port", strconv.Itoa(primary.Port), "user", s.cfg.ReplicationUser,
		"password", s.cfg.ReplicationPassword, "application_name", s.cfg.Name)
	fmt.Fprintf(&b, "primary_conninfo = %s\n", quoteConfValue(conninfo))
	fmt.Fprintf(&b, "primary_slot_name = %s\n", quoteConfValue(s.slot))
	fmt.Fprintf(&b, "recovery_target_timeline = 'latest'\n")
	if err := atomicfile.WriteOwned(path, []byte(b.String()), 0o600, s.user.uid, s.user.gid); err != nil {
		return err
	}
	return atomicfile.WriteOwned(filepath.Join(s.cfg.DataDir, "standby.signal"), nil, 0o600, s.user.uid, s.user.gid)
}

// quoteConfValue quotes a postgresql.conf string value.
func quoteConfValue(v string) string {
	return "'" + strings.NewReplacer(`\`, `\\`, `'`, `''`).Replace(v) + "'"
}
