package pgctl

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/gitraft/gitraft/cluster/atomicfile"
	"github.com/gitraft/gitraft/cluster/dbtarget"
)

// Bouncer drives one pgbouncer through its admin console (the pseudo
// database "pgbouncer", spoken to with the simple query protocol) and the
// file of [databases] entries its ini includes:
//
//	[databases]
//	%include /etc/pgbouncer/gitraft-databases.ini
//
// It pauses and resumes the databases it routes one by one (PAUSE db,
// RESUME db), so other databases the pgbouncer serves are not touched.
type Bouncer struct {
	cfg BouncerConfig
	log *slog.Logger
}

var _ dbtarget.Bouncer = (*Bouncer)(nil)

// dbName is what a routed database may be called: it goes into the include
// file and into admin commands unquoted.
var dbName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_.$-]{0,62}$`)

// NewBouncer checks cfg, fills in defaults and returns a driver for the
// pgbouncer. It does not touch the pgbouncer.
func NewBouncer(cfg BouncerConfig, log *slog.Logger) (*Bouncer, error) {
	if cfg.AdminHost == "" {
		cfg.AdminHost = "127.0.0.1"
	}
	if cfg.AdminPort == 0 {
		cfg.AdminPort = 6432
	}
	if cfg.AdminUser == "" {
		cfg.AdminUser = "pgbouncer"
	}
	switch {
	case cfg.AdminPort < 1 || cfg.AdminPort > 65535:
		return nil, fmt.Errorf("%w: AdminPort %d: want 1-65535", ErrConfig, cfg.AdminPort)
	case cfg.DatabasesFile == "" || !filepath.IsAbs(cfg.DatabasesFile):
		return nil, fmt.Errorf("%w: DatabasesFile %q: want the absolute path of the file pgbouncer.ini includes under [databases]", ErrConfig, cfg.DatabasesFile)
	case len(cfg.Databases) == 0:
		return nil, fmt.Errorf("%w: Databases: name at least one database to route", ErrConfig)
	case strings.ContainsAny(cfg.ConnectParams, "\n\r"):
		return nil, fmt.Errorf("%w: ConnectParams: must be one line", ErrConfig)
	}
	seen := map[string]bool{}
	for _, d := range cfg.Databases {
		if !dbName.MatchString(d) || strings.EqualFold(d, "pgbouncer") {
			return nil, fmt.Errorf("%w: database name %q: want letters, digits, _ . $ - (and not pgbouncer)", ErrConfig, d)
		}
		if seen[d] {
			return nil, fmt.Errorf("%w: database %q named twice", ErrConfig, d)
		}
		seen[d] = true
	}
	for _, kv := range strings.Fields(cfg.ConnectParams) {
		k, _, _ := strings.Cut(kv, "=")
		switch strings.ToLower(k) {
		case "host", "port", "dbname":
			return nil, fmt.Errorf("%w: ConnectParams: %s is set by the agent; leave it out", ErrConfig, k)
		}
	}
	if _, err := os.Stat(filepath.Dir(cfg.DatabasesFile)); err != nil {
		return nil, fmt.Errorf("%w: DatabasesFile %q: %v", ErrConfig, cfg.DatabasesFile, err)
	}
	if log == nil {
		log = slog.Default()
	}
	return &Bouncer{cfg: cfg, log: log.With("pgbouncer", fmt.Sprintf("%s:%d", cfg.AdminHost, cfg.AdminPort))}, nil
}

// admin opens a connection to the admin console. pgbouncer ignores or
// refuses most startup parameters there and knows no extended protocol, so
// the connection carries none and uses the simple protocol only.
func (b *Bouncer) admin(ctx context.Context) (*pgx.Conn, error) {
	cc, err := pgx.ParseConfig("sslmode=disable connect_timeout=5")
	if err != nil {
		return nil, err
	}
	cc.Host, cc.Port = b.cfg.AdminHost, uint16(b.cfg.AdminPort)
	cc.User, cc.Password, cc.Database = b.cfg.AdminUser, b.cfg.AdminPassword, "pgbouncer"
	cc.RuntimeParams = map[string]string{}
	cc.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
	cc.StatementCacheCapacity, cc.DescriptionCacheCapacity = 0, 0
	conn, err := pgx.ConnectConfig(ctx, cc)
	if errors.Is(err, syscall.ECONNREFUSED) {
		return nil, fmt.Errorf("%w: %w: %s:%d refuses connections", ErrAdmin, dbtarget.ErrBouncerDown, b.cfg.AdminHost, b.cfg.AdminPort)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: connect: %v", ErrAdmin, err)
	}
	return conn, nil
}

// adminExec runs one admin command; errors whose message contains one of
// ignore count as success.
func adminExec(ctx context.Context, conn *pgx.Conn, cmd string, ignore ...string) error {
	_, err := conn.Exec(ctx, cmd)
	if err == nil {
		return nil
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		for _, s := range ignore {
			if strings.Contains(pe.Message, s) {
				return nil
			}
		}
		return fmt.Errorf("%w: %s: %s", ErrAdmin, cmd, pe.Message)
	}
	if ctx.Err() != nil {
		return fmt.Errorf("%s: %w", cmd, ctx.Err())
	}
	return fmt.Errorf("%w: %s: %v", ErrAdmin, cmd, err)
}

// Pause issues PAUSE for each routed database and returns once the
// databases have no server connection left (in transaction pooling: once
// the transactions under way end; SHOW SERVERS confirms it). When ctx ends first, or a PAUSE fails,
// Pause resumes everything again and returns an error wrapping ErrPaused.
func (b *Bouncer) Pause(ctx context.Context) error {
	t0 := time.Now()
	err := b.pause(ctx)
	if err == nil {
		b.log.Info("paused", "took", time.Since(t0).Round(time.Millisecond))
		return nil
	}
	// A PAUSE cut off by the deadline stays in force in pgbouncer: undo it.
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if rerr := b.Resume(rctx); rerr != nil {
		return fmt.Errorf("%w: %v; resuming again failed too: %v", ErrPaused, err, rerr)
	}
	return fmt.Errorf("%w (resumed again): %v", ErrPaused, err)
}

func (b *Bouncer) pause(ctx context.Context) error {
	conn, err := b.admin(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	for _, d := range b.cfg.Databases {
		if err := adminExec(ctx, conn, "PAUSE "+d); err != nil {
			return err
		}
	}
	// pgbouncer 1.18 can answer a waiting PAUSE early: once WAIT_CLOSE
	// has been used on a database, it answers every waiting admin command
	// whenever no connection needs closing. So check that no server
	// connection is left.
	for {
		left, err := b.serverConns(ctx, conn)
		if err != nil {
			return err
		}
		if left.total == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%d server connections still open (transactions under way): %w", left.total, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// serverCount counts server connections of the routed databases.
type serverCount struct {
	total       int
	closeNeeded int // opened under entries a RELOAD changed
}

// serverConns reads SHOW SERVERS for the routed databases.
func (b *Bouncer) serverConns(ctx context.Context, conn *pgx.Conn) (serverCount, error) {
	var n serverCount
	rows, err := conn.Query(ctx, "SHOW SERVERS")
	if err != nil {
		return n, fmt.Errorf("%w: SHOW SERVERS: %v", ErrAdmin, err)
	}
	defer rows.Close()
	col := map[string]int{}
	for i, f := range rows.FieldDescriptions() {
		col[f.Name] = i
	}
	dbCol, ok := col["database"]
	if !ok {
		return n, fmt.Errorf("%w: SHOW SERVERS has no database column", ErrAdmin)
	}
	closeCol, haveClose := col["close_needed"]
	routed := map[string]bool{}
	for _, d := range b.cfg.Databases {
		routed[d] = true
	}
	for rows.Next() {
		raw := rows.RawValues()
		if !routed[string(raw[dbCol])] {
			continue
		}
		n.total++
		if haveClose && string(raw[closeCol]) == "1" {
			n.closeNeeded++
		}
	}
	if err := rows.Err(); err != nil {
		return n, fmt.Errorf("%w: SHOW SERVERS: %v", ErrAdmin, err)
	}
	return n, nil
}

// Resume issues RESUME for each routed database, and a plain RESUME in case
// the whole pgbouncer was paused. Databases that are not paused, or not
// configured yet, are fine.
func (b *Bouncer) Resume(ctx context.Context) error {
	conn, err := b.admin(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if err := adminExec(ctx, conn, "RESUME", "not paused"); err != nil {
		return err
	}
	for _, d := range b.cfg.Databases {
		if err := adminExec(ctx, conn, "RESUME "+d, "not paused", "no such database"); err != nil {
			return err
		}
	}
	b.log.Info("resumed")
	return nil
}

// render gives the include file's text for primary.
func (b *Bouncer) render(primary dbtarget.Endpoint) []byte {
	var s strings.Builder
	s.WriteString("# Written by gitraft's pgbouncer agent: every database routes to the primary.\n# Changes are overwritten.\n")
	for _, d := range b.cfg.Databases {
		fmt.Fprintf(&s, "%s = %s", d, connString("host", primary.Host, "port", strconv.Itoa(primary.Port), "dbname", d))
		if p := strings.TrimSpace(b.cfg.ConnectParams); p != "" {
			s.WriteString(" " + p)
		}
		s.WriteByte('\n')
	}
	return []byte(s.String())
}

// waitCloseTimeout bounds how long Point waits for server connections
// opened under the old entries to close.
const waitCloseTimeout = 5 * time.Second

// Point writes the include file so that every database routes to primary
// (atomically, keeping the file's owner and mode; a new file gets 0644),
// issues RELOAD, checks with SHOW DATABASES that pgbouncer routes there, and
// waits (at most 5s) until server connections opened under the old entries
// are closed.
func (b *Bouncer) Point(ctx context.Context, primary dbtarget.Endpoint) error {
	if primary.Host == "" || primary.Port < 1 || primary.Port > 65535 || strings.ContainsAny(primary.Host, " \t\n'\\=") {
		return fmt.Errorf("point: %w: primary %q", ErrConfig, primary)
	}
	mode, uid, gid := os.FileMode(0o644), -1, -1
	if fi, err := os.Stat(b.cfg.DatabasesFile); err == nil {
		mode = fi.Mode().Perm()
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			uid, gid = int(st.Uid), int(st.Gid)
		}
	}
	if err := atomicfile.WriteOwned(b.cfg.DatabasesFile, b.render(primary), mode, uid, gid); err != nil {
		return fmt.Errorf("point: %w", err)
	}
	conn, err := b.admin(ctx)
	if err != nil {
		return fmt.Errorf("point: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if err := adminExec(ctx, conn, "RELOAD"); err != nil {
		return fmt.Errorf("point: %w", err)
	}
	routes, err := showDatabases(ctx, conn)
	if err != nil {
		return fmt.Errorf("point: %w", err)
	}
	for _, d := range b.cfg.Databases {
		if got, ok := routes[d]; !ok || !sameEndpoint(got, primary) {
			return fmt.Errorf("point: %w: database %s routes to %s after RELOAD, want %s (is %s %%included under [databases]?)",
				ErrNotApplied, d, got, primary, b.cfg.DatabasesFile)
		}
	}
	// New transactions route to primary now. Server connections opened
	// under the old entries close as they are released (none exist under
	// PAUSE or after KILL); wait a while for them, but a long transaction
	// must not hold the agent. (Not with WAIT_CLOSE: pgbouncer 1.18 then
	// answers every later PAUSE at once.)
	deadline := time.Now().Add(waitCloseTimeout)
	for {
		left, err := b.serverConns(ctx, conn)
		if err != nil {
			return fmt.Errorf("point: %w", err)
		}
		if left.closeNeeded == 0 {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			b.log.Warn("pointed, but server connections under the old entries are still open (transactions under way)", "connections", left.closeNeeded)
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	b.log.Info("pointed", "primary", primary.String())
	return nil
}

// showDatabases reads SHOW DATABASES: where each database routes.
func showDatabases(ctx context.Context, conn *pgx.Conn) (map[string]dbtarget.Endpoint, error) {
	rows, err := conn.Query(ctx, "SHOW DATABASES")
	if err != nil {
		return nil, fmt.Errorf("%w: SHOW DATABASES: %v", ErrAdmin, err)
	}
	defer rows.Close()
	col := map[string]int{}
	for i, f := range rows.FieldDescriptions() {
		col[f.Name] = i
	}
	for _, c := range []string{"name", "host", "port"} {
		if _, ok := col[c]; !ok {
			return nil, fmt.Errorf("%w: SHOW DATABASES has no %s column", ErrAdmin, c)
		}
	}
	out := map[string]dbtarget.Endpoint{}
	for rows.Next() {
		raw := rows.RawValues()
		port, _ := strconv.Atoi(string(raw[col["port"]]))
		out[string(raw[col["name"]])] = dbtarget.Endpoint{Host: string(raw[col["host"]]), Port: port}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("%w: SHOW DATABASES: %v", ErrAdmin, err)
	}
	return out, nil
}

// Fence stops routing to any server without dropping clients where it can:
// PAUSE for each routed database (new queries wait, as under a planned
// pause, and pgbouncer closes each server connection once released), then
// it waits up to drain for the server connections to go. Only databases
// that still have one then (a transaction under way, which could still
// commit on the old primary) get KILL, which drops their clients: pgbouncer
// 1.18 can crash on KILL while a client logs in, so it is the last resort.
// It reports whether it had to KILL. A database stays paused until RESUME;
// Point followed by Resume ends a fence.
//
// A pgbouncer that does not run routes nothing: Fence then rewrites the
// include file without the routed databases, so that a pgbouncer started
// again routes nothing either until Point, and returns an error wrapping
// dbtarget.ErrBouncerDown.
func (b *Bouncer) Fence(ctx context.Context, drain time.Duration) (bool, error) {
	conn, err := b.admin(ctx)
	if err != nil {
		if errors.Is(err, dbtarget.ErrBouncerDown) {
			if werr := b.blank(); werr != nil {
				return false, fmt.Errorf("fence: %w; emptying %s failed: %v", err, b.cfg.DatabasesFile, werr)
			}
			b.log.Warn("fence: pgbouncer does not run; its include file now routes nothing until the agent points it again", "file", b.cfg.DatabasesFile)
		}
		return false, fmt.Errorf("fence: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	t0 := time.Now()
	// PAUSE waits for the database's server connections to be released:
	// bound that wait by drain, then look at what is left.
	dctx, cancel := context.WithTimeout(ctx, drain)
	perr := error(nil)
	for _, d := range b.cfg.Databases {
		if perr = adminExec(dctx, conn, "PAUSE "+d); perr != nil {
			break
		}
	}
	cancel()
	if perr != nil {
		// The PAUSE cut off by drain stays in force in pgbouncer; the
		// connection it ran on is gone, so open another.
		conn.Close(context.WithoutCancel(ctx))
		if conn, err = b.admin(ctx); err != nil {
			return false, fmt.Errorf("fence: %w", err)
		}
		// PAUSE each database again: one the loop did not reach is not
		// paused yet (a database paused already is fine).
		for _, d := range b.cfg.Databases {
			pctx, pcancel := context.WithTimeout(ctx, 50*time.Millisecond)
			err := adminExec(pctx, conn, "PAUSE "+d)
			pcancel()
			if err != nil && ctx.Err() == nil && !errors.Is(err, context.DeadlineExceeded) {
				var pe *pgconn.PgError
				if !errors.As(err, &pe) {
					// The connection broke on the cut-off PAUSE: reconnect.
					conn.Close(context.WithoutCancel(ctx))
					if conn, err = b.admin(ctx); err != nil {
						return false, fmt.Errorf("fence: %w", err)
					}
				}
			}
		}
	}
	// pgbouncer 1.18 can answer PAUSE before the server connections are
	// gone (see pause): wait for them by SHOW SERVERS, up to drain.
	var busy []string
	for {
		if conn.IsClosed() {
			if conn, err = b.admin(ctx); err != nil {
				return false, fmt.Errorf("fence: %w", err)
			}
		}
		if busy, err = b.busyDatabases(ctx, conn); err != nil {
			return false, fmt.Errorf("fence: %w", err)
		}
		if len(busy) == 0 || time.Since(t0) >= drain {
			break
		}
		select {
		case <-ctx.Done():
			return false, fmt.Errorf("fence: %w", ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	for _, d := range busy {
		if err := adminExec(ctx, conn, "KILL "+d); err != nil {
			return false, fmt.Errorf("fence: %w", err)
		}
	}
	if len(busy) > 0 {
		b.log.Warn("fenced: PAUSE, and KILL for databases whose server connections stayed busy", "killed", strings.Join(busy, ","), "drain", drain.String(), "took", time.Since(t0).Round(time.Millisecond))
		return true, nil
	}
	b.log.Info("fenced (paused, no server connection left)", "took", time.Since(t0).Round(time.Millisecond))
	return false, nil
}

// busyDatabases lists the routed databases that still have a server
// connection.
func (b *Bouncer) busyDatabases(ctx context.Context, conn *pgx.Conn) ([]string, error) {
	rows, err := conn.Query(ctx, "SHOW SERVERS")
	if err != nil {
		return nil, fmt.Errorf("%w: SHOW SERVERS: %v", ErrAdmin, err)
	}
	defer rows.Close()
	dbCol := -1
	for i, f := range rows.FieldDescriptions() {
		if f.Name == "database" {
			dbCol = i
		}
	}
	if dbCol < 0 {
		return nil, fmt.Errorf("%w: SHOW SERVERS has no database column", ErrAdmin)
	}
	busy := map[string]bool{}
	for rows.Next() {
		busy[string(rows.RawValues()[dbCol])] = true
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("%w: SHOW SERVERS: %v", ErrAdmin, err)
	}
	var out []string
	for _, d := range b.cfg.Databases {
		if busy[d] {
			out = append(out, d)
		}
	}
	return out, nil
}

// blank rewrites the include file without entries: a pgbouncer that starts
// with it routes none of the databases.
func (b *Bouncer) blank() error {
	mode, uid, gid := os.FileMode(0o644), -1, -1
	if fi, err := os.Stat(b.cfg.DatabasesFile); err == nil {
		mode = fi.Mode().Perm()
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			uid, gid = int(st.Uid), int(st.Gid)
		}
	}
	text := "# Written by gitraft's pgbouncer agent: fenced while pgbouncer did not run; it routes nothing until the agent points it at the primary.\n"
	return atomicfile.WriteOwned(b.cfg.DatabasesFile, []byte(text), mode, uid, gid)
}

// Ping checks that pgbouncer runs: its admin console answers. When it
// refuses connections the error wraps dbtarget.ErrBouncerDown.
func (b *Bouncer) Ping(ctx context.Context) error {
	conn, err := b.admin(ctx)
	if err != nil {
		return err
	}
	conn.Close(context.WithoutCancel(ctx))
	return nil
}

// Target reports where the include file routes the databases. Every routed
// database must route to the same server.
func (b *Bouncer) Target() (dbtarget.Endpoint, error) {
	f, err := os.Open(b.cfg.DatabasesFile)
	if err != nil {
		return dbtarget.Endpoint{}, fmt.Errorf("%w: %v", ErrNoTarget, err)
	}
	defer f.Close()
	routes := map[string]dbtarget.Endpoint{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		name, conn, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		var ep dbtarget.Endpoint
		for _, kv := range strings.Fields(conn) {
			k, v, _ := strings.Cut(kv, "=")
			v = strings.Trim(v, "'")
			switch k {
			case "host":
				ep.Host = v
			case "port":
				ep.Port, _ = strconv.Atoi(v)
			}
		}
		if ep.Port == 0 {
			ep.Port = 5432
		}
		routes[strings.TrimSpace(name)] = ep
	}
	if err := sc.Err(); err != nil {
		return dbtarget.Endpoint{}, fmt.Errorf("%w: %s: %v", ErrNoTarget, b.cfg.DatabasesFile, err)
	}
	var target dbtarget.Endpoint
	for i, d := range b.cfg.Databases {
		ep, ok := routes[d]
		switch {
		case !ok || ep.Host == "":
			return dbtarget.Endpoint{}, fmt.Errorf("%w: %s has no host for database %s", ErrNoTarget, b.cfg.DatabasesFile, d)
		case i == 0:
			target = ep
		case ep != target:
			return dbtarget.Endpoint{}, fmt.Errorf("%w: %s routes %s to %s but %s to %s", ErrNoTarget, b.cfg.DatabasesFile, b.cfg.Databases[0], target, d, ep)
		}
	}
	return target, nil
}
