package pgtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/gitraft/gitraft/cluster/dbtarget"
	"github.com/gitraft/gitraft/cluster/dbtarget/pgctl"
)

// Names the harness uses.
const (
	// Database is the database the harness creates and routes through
	// pgbouncer.
	Database = "app"
	// Superuser is what tests and the drivers connect as.
	Superuser = "postgres"
	// ReplicationUser is the role standbys stream with.
	ReplicationUser = "replicator"
	// OSUser runs PostgreSQL and pgbouncer.
	OSUser = "postgres"
	// Table is the table Writer fills, created on the primary.
	Table = "rows"
)

// BinDir holds the PostgreSQL tools.
var BinDir = pgctl.DefaultBinDir

// Available reports why PostgreSQL 15 or pgbouncer cannot run here, or ""
// when they can.
func Available() string {
	if _, err := os.Stat(filepath.Join(BinDir, "pg_ctl")); err != nil {
		return "PostgreSQL 15 is not installed (" + BinDir + "/pg_ctl): install postgresql-15"
	}
	if _, err := pgbouncerPath(); err != nil {
		return "pgbouncer is not installed: install pgbouncer"
	}
	if os.Geteuid() == 0 {
		if _, err := user.Lookup(OSUser); err != nil {
			return "no " + OSUser + " OS user to run PostgreSQL as"
		}
	}
	return ""
}

func pgbouncerPath() (string, error) {
	if p, err := exec.LookPath("pgbouncer"); err == nil {
		return p, nil
	}
	if _, err := os.Stat("/usr/sbin/pgbouncer"); err == nil {
		return "/usr/sbin/pgbouncer", nil
	}
	return "", errors.New("pgbouncer not found")
}

// account is the OS user the servers run as.
type account struct {
	uid, gid int
	cred     *syscall.Credential
}

func postgresAccount(t testing.TB) account {
	t.Helper()
	if os.Geteuid() != 0 {
		return account{uid: os.Geteuid(), gid: os.Getegid()}
	}
	u, err := user.Lookup(OSUser)
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return account{uid: uid, gid: gid, cred: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
}

// command runs as the postgres account.
func (a account) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: a.cred}
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PG") && !strings.HasPrefix(kv, "LC_") && !strings.HasPrefix(kv, "LANG=") {
			env = append(env, kv)
		}
	}
	cmd.Env = append(env, "LC_ALL=C", "LANG=C")
	return cmd
}

// run runs a PostgreSQL tool as the postgres account and fails the test
// when it fails.
func (a account) run(t testing.TB, tool string, args ...string) string {
	t.Helper()
	out, err := a.tryRun(tool, args...)
	if err != nil {
		t.Fatalf("pgtest: %s %s: %v\n%s", tool, strings.Join(args, " "), err, out)
	}
	return out
}

func (a account) tryRun(tool string, args ...string) (string, error) {
	if !filepath.IsAbs(tool) {
		tool = filepath.Join(BinDir, tool)
	}
	cmd := a.command(tool, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	return out.String(), err
}

// Dir makes a directory the postgres account owns (mode 0755, under the
// system temp dir, which the account can traverse), removed when the test
// ends unless the environment sets PGTEST_KEEP.
func Dir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "pgtest-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if os.Getenv("PGTEST_KEEP") != "" {
			t.Logf("pgtest: kept %s (PGTEST_KEEP is set)", dir)
			return
		}
		os.RemoveAll(dir)
	})
	a := postgresAccount(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 {
		if err := os.Chown(dir, a.uid, a.gid); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// FreePort returns a loopback TCP port nobody listened on a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// Postgres is one PostgreSQL server of the harness.
type Postgres struct {
	t       testing.TB
	acct    account
	Name    string
	DataDir string
	LogFile string
	Host    string
	Port    int
	killed  []int
}

// Endpoint is where the server listens.
func (p *Postgres) Endpoint() dbtarget.Endpoint { return dbtarget.Endpoint{Host: p.Host, Port: p.Port} }

// settings every server of the harness gets. fsync is off: the tests kill
// processes, never the machine, so the page cache survives, and it keeps
// them fast on small machines.
const baseSettings = `
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
wal_log_hints = on
wal_keep_size = '128MB'
max_connections = 40
shared_buffers = '16MB'
fsync = off
synchronous_commit = on
log_line_prefix = '%m [%p] '
`

// StartPrimary initdbs a primary (with data checksums, for pg_rewind) in
// dir/name, starts it on a free port, and creates the replication role,
// the database and its table.
func StartPrimary(t testing.TB, dir, name string) *Postgres {
	t.Helper()
	p := &Postgres{t: t, acct: postgresAccount(t), Name: name, DataDir: filepath.Join(dir, name),
		LogFile: filepath.Join(dir, name+".log"), Host: "127.0.0.1"}
	p.acct.run(t, "initdb", "-D", p.DataDir, "--data-checksums", "-E", "UTF8", "--locale=C", "-U", Superuser, "--auth=trust", "--no-sync", "--no-instructions")
	p.appendConf(baseSettings)
	p.cleanupOnEnd()
	p.startOnFreePort()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p.MustExec(ctx, "postgres", "CREATE ROLE "+ReplicationUser+" WITH REPLICATION LOGIN")
	p.MustExec(ctx, "postgres", "CREATE DATABASE "+Database)
	p.MustExec(ctx, Database, "CREATE TABLE "+Table+" (id bigint PRIMARY KEY, writer int NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())")
	return p
}

// StartStandby makes a streaming standby of p in dir/name with
// pg_basebackup -R and a replication slot named after the standby, and
// starts it on a free port.
func (p *Postgres) StartStandby(t testing.TB, dir, name string) *Postgres {
	t.Helper()
	s := &Postgres{t: t, acct: p.acct, Name: name, DataDir: filepath.Join(dir, name),
		LogFile: filepath.Join(dir, name+".log"), Host: "127.0.0.1"}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p.MustExec(ctx, "postgres", "SELECT pg_create_physical_replication_slot('"+pgctl.SlotName(name)+"')")
	p.acct.run(t, "pg_basebackup", "-h", p.Host, "-p", strconv.Itoa(p.Port), "-U", ReplicationUser,
		"-D", s.DataDir, "-R", "-S", pgctl.SlotName(name), "-X", "stream", "-c", "fast", "--no-sync")
	s.cleanupOnEnd()
	s.startOnFreePort()
	var st string
	waitUntil(t, "standby "+name+" streaming", 30*time.Second, func() bool {
		err := s.QueryRow(ctx, "postgres", "SELECT coalesce((SELECT status FROM pg_stat_wal_receiver), 'none')").Scan(&st)
		return err == nil && st == "streaming"
	})
	return s
}

func (p *Postgres) appendConf(text string) {
	p.t.Helper()
	f, err := os.OpenFile(filepath.Join(p.DataDir, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		p.t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteString(text); err != nil {
		p.t.Fatal(err)
	}
}

// startOnFreePort picks a port and starts the server, again on another
// port when another process took it first.
func (p *Postgres) startOnFreePort() {
	p.t.Helper()
	for attempt := 1; ; attempt++ {
		p.Port = FreePort(p.t)
		p.appendConf(fmt.Sprintf("\n# pgtest\nport = %d\ncluster_name = '%s'\n", p.Port, p.Name))
		out, err := p.acct.tryRun("pg_ctl", "start", "-D", p.DataDir, "-l", p.LogFile, "-w", "-t", "60")
		if err == nil {
			return
		}
		log, _ := os.ReadFile(p.LogFile)
		if attempt < 5 && bytes.Contains(log, []byte("could not bind")) {
			continue
		}
		p.t.Fatalf("pgtest: starting %s: %v\n%s\n%s", p.Name, err, out, tail(log, 30))
	}
}

// cleanupOnEnd stops the server when the test ends, whatever its state,
// and prints its log's tail when the test failed.
func (p *Postgres) cleanupOnEnd() {
	p.t.Cleanup(func() {
		if p.t.Failed() {
			log, _ := os.ReadFile(p.LogFile)
			p.t.Logf("---- last log lines of PostgreSQL %s ----\n%s", p.Name, tail(log, 40))
		}
		if _, err := p.acct.tryRun("pg_ctl", "stop", "-D", p.DataDir, "-m", "immediate", "-w", "-t", "10"); err != nil {
			if pid := p.PostmasterPID(); pid > 0 {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
}

// PostmasterPID reads the postmaster's pid from postmaster.pid, or 0.
func (p *Postgres) PostmasterPID() int {
	b, err := os.ReadFile(filepath.Join(p.DataDir, "postmaster.pid"))
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	pid, _ := strconv.Atoi(strings.TrimSpace(line))
	return pid
}

// Kill sends SIGKILL to the postmaster, as a crash would, and waits until
// the server refuses connections. Its children (backends, walsenders, the
// checkpointer) exit when they notice; Start waits for them.
func (p *Postgres) Kill() {
	p.t.Helper()
	pid := p.PostmasterPID()
	if pid <= 0 {
		p.t.Fatalf("pgtest: %s has no postmaster.pid", p.Name)
	}
	p.killed = append(childrenOf(pid), pid)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		p.t.Fatalf("pgtest: kill %s postmaster %d: %v", p.Name, pid, err)
	}
	waitUntil(p.t, p.Name+" refusing connections", 30*time.Second, func() bool { return !p.Answers() })
}

// waitKilled waits until the processes Kill killed are gone (reaped): a
// new postmaster refuses to start while the old one's pid exists.
func (p *Postgres) waitKilled() {
	p.t.Helper()
	waitUntil(p.t, p.Name+"'s killed processes gone", 30*time.Second, func() bool {
		for _, c := range p.killed {
			if alive(c) {
				return false
			}
		}
		return true
	})
	p.killed = nil
}

// childrenOf lists the processes whose parent is pid.
func childrenOf(pid int) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		c, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so cut at the
		// last ')'.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) > 1 && f[1] == strconv.Itoa(pid) {
			out = append(out, c)
		}
	}
	return out
}

// alive reports whether a process exists, zombies included: a new
// postmaster refuses to start while the old one's pid exists.
func alive(pid int) bool {
	_, err := os.Stat(filepath.Join("/proc", strconv.Itoa(pid)))
	return err == nil
}

// PgCtl runs pg_ctl on the data directory as an operator would and returns
// what it printed and its error.
func (p *Postgres) PgCtl(args ...string) (string, error) {
	return p.acct.tryRun("pg_ctl", append(args[:1:1], append([]string{"-D", p.DataDir}, args[1:]...)...)...)
}

// Start starts the server directly with pg_ctl (as an operator or init
// system would) and fails the test when pg_ctl fails.
func (p *Postgres) Start() {
	p.t.Helper()
	p.waitKilled()
	if out, err := p.PgCtl("start", "-l", p.LogFile, "-w", "-t", "60"); err != nil {
		log, _ := os.ReadFile(p.LogFile)
		p.t.Fatalf("pgtest: pg_ctl start %s: %v\n%s\n%s", p.Name, err, out, tail(log, 30))
	}
}

// StartBeside starts the server like Start, for a server an agent may act
// on at once (an old primary its agent demotes as soon as it answers): the
// agent's stop can make pg_ctl's wait fail, so the error is returned, not
// fatal, and the caller checks the outcome it expects instead.
func (p *Postgres) StartBeside() error {
	p.t.Helper()
	p.waitKilled()
	if out, err := p.PgCtl("start", "-l", p.LogFile, "-w", "-t", "60"); err != nil {
		return fmt.Errorf("pg_ctl start %s: %v: %s", p.Name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Answers reports whether the server answers a query.
func (p *Postgres) Answers() bool {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var one int
	return p.QueryRow(ctx, "postgres", "SELECT 1").Scan(&one) == nil
}

// ServerConfig is the driver configuration for this server.
func (p *Postgres) ServerConfig() pgctl.ServerConfig {
	return pgctl.ServerConfig{
		BinDir: BinDir, DataDir: p.DataDir, OSUser: OSUser, LogFile: p.LogFile,
		Host: p.Host, Port: p.Port, User: Superuser, Database: "postgres",
		ReplicationUser: ReplicationUser, Name: p.Name, Timeout: 30 * time.Second,
	}
}

// Connect opens a connection to a database on the server as the
// superuser.
func (p *Postgres) Connect(ctx context.Context, db string) (*pgx.Conn, error) {
	return connect(ctx, p.Host, p.Port, db)
}

func connect(ctx context.Context, host string, port int, db string) (*pgx.Conn, error) {
	cc, err := pgx.ParseConfig("sslmode=disable connect_timeout=5")
	if err != nil {
		return nil, err
	}
	cc.Host, cc.Port, cc.User, cc.Database = host, uint16(port), Superuser, db
	cc.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
	return pgx.ConnectConfig(ctx, cc)
}

// row is a pgx.Row whose connection closes once it is scanned.
type row struct {
	conn *pgx.Conn
	row  pgx.Row
	err  error
}

func (r row) Scan(dest ...any) error {
	if r.err != nil {
		return r.err
	}
	defer r.conn.Close(context.Background())
	return r.row.Scan(dest...)
}

// QueryRow runs a query on its own connection.
func (p *Postgres) QueryRow(ctx context.Context, db, sql string, args ...any) pgx.Row {
	conn, err := p.Connect(ctx, db)
	if err != nil {
		return row{err: err}
	}
	return row{conn: conn, row: conn.QueryRow(ctx, sql, args...)}
}

// Exec runs statements on their own connection.
func (p *Postgres) Exec(ctx context.Context, db string, sql ...string) error {
	conn, err := p.Connect(ctx, db)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	for _, s := range sql {
		if _, err := conn.Exec(ctx, s); err != nil {
			return fmt.Errorf("%s: %w", s, err)
		}
	}
	return nil
}

// MustExec is Exec failing the test on error.
func (p *Postgres) MustExec(ctx context.Context, db string, sql ...string) {
	p.t.Helper()
	if err := p.Exec(ctx, db, sql...); err != nil {
		p.t.Fatalf("pgtest: %s: %v", p.Name, err)
	}
}

// InRecovery reports pg_is_in_recovery(), failing the test when the server
// does not answer.
func (p *Postgres) InRecovery() bool {
	p.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var r bool
	if err := p.QueryRow(ctx, "postgres", "SELECT pg_is_in_recovery()").Scan(&r); err != nil {
		p.t.Fatalf("pgtest: %s: %v", p.Name, err)
	}
	return r
}

// StreamingFrom reports whether the server is a standby whose WAL receiver
// streams from primary.
func (p *Postgres) StreamingFrom(primary *Postgres) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var status, host string
	var port int
	err := p.QueryRow(ctx, "postgres", "SELECT status, sender_host, sender_port FROM pg_stat_wal_receiver").Scan(&status, &host, &port)
	return err == nil && status == "streaming" && host == primary.Host && port == primary.Port
}

// IDs returns the ids in the writer's table on this server.
func (p *Postgres) IDs(ctx context.Context) (map[int64]bool, error) {
	conn, err := p.Connect(ctx, Database)
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.Background())
	rows, err := conn.Query(ctx, "SELECT id FROM "+Table)
	if err != nil {
		return nil, err
	}
	ids := map[int64]bool{}
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		ids[id] = true
	}
	return ids, rows.Err()
}

// waitUntil polls cond until it holds, failing the test after timeout.
func waitUntil(t testing.TB, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("pgtest: timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func tail(b []byte, n int) string {
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
