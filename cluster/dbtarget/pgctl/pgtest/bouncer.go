package pgtest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/gitraft/gitraft/cluster/dbtarget"
	"github.com/gitraft/gitraft/cluster/dbtarget/pgctl"
)

// AdminUser is pgbouncer's admin_users.
const AdminUser = "pgbouncer"

// Bouncer is one pgbouncer of the harness: transaction pooling, trust
// authentication (users in an auth_file), and an [databases] section that
// only %includes DatabasesFile.
type Bouncer struct {
	t             testing.TB
	acct          account
	Name          string
	Host          string
	Port          int
	Ini           string
	DatabasesFile string
	LogFile       string
	cmd           *exec.Cmd
	exited        chan struct{}
}

// BouncerSettings are extra [pgbouncer] settings lines for StartBouncer.
type BouncerSettings string

// StartBouncer writes dir/name.ini, points its include file at target
// (when not nil) and starts pgbouncer on a free port.
func StartBouncer(t testing.TB, dir, name string, target *Postgres, extra ...BouncerSettings) *Bouncer {
	t.Helper()
	b := &Bouncer{t: t, acct: postgresAccount(t), Name: name, Host: "127.0.0.1",
		Ini: filepath.Join(dir, name+".ini"), DatabasesFile: filepath.Join(dir, name+"-databases.ini"),
		LogFile: filepath.Join(dir, name+".log")}
	var dbs []byte
	if target != nil {
		dbs = []byte(fmt.Sprintf("%s = host=%s port=%d dbname=%s\n", Database, target.Host, target.Port, Database))
	}
	b.writeFile(b.DatabasesFile, dbs)
	users := filepath.Join(dir, name+"-users.txt")
	b.writeFile(users, []byte(fmt.Sprintf("%q \"\"\n%q \"\"\n", Superuser, AdminUser)))
	t.Cleanup(func() {
		b.Kill()
		if t.Failed() {
			log, _ := os.ReadFile(b.LogFile)
			t.Logf("---- last log lines of pgbouncer %s ----\n%s", b.Name, tail(log, 30))
		}
	})
	for attempt := 1; ; attempt++ {
		b.Port = FreePort(t)
		ini := fmt.Sprintf(`[databases]
%%include %s

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = trust
auth_file = %s
admin_users = %s
pool_mode = transaction
default_pool_size = 10
max_client_conn = 200
server_login_retry = 1
logfile = %s
`, b.DatabasesFile, b.Port, users, AdminUser, b.LogFile)
		for _, e := range extra {
			ini += string(e) + "\n"
		}
		b.writeFile(b.Ini, []byte(ini))
		err := b.start()
		if err == nil {
			return b
		}
		log, _ := os.ReadFile(b.LogFile)
		if attempt < 5 && bytes.Contains(log, []byte("Address already in use")) {
			continue
		}
		t.Fatalf("pgtest: starting pgbouncer %s: %v\n%s", name, err, tail(log, 20))
	}
}

func (b *Bouncer) writeFile(path string, data []byte) {
	b.t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		b.t.Fatal(err)
	}
	if os.Geteuid() == 0 {
		if err := os.Chown(path, b.acct.uid, b.acct.gid); err != nil {
			b.t.Fatal(err)
		}
	}
}

// start runs pgbouncer in the foreground as a child and waits until its
// admin console answers.
func (b *Bouncer) start() error {
	path, err := pgbouncerPath()
	if err != nil {
		return err
	}
	cmd := b.acct.command(path, b.Ini)
	cmd.SysProcAttr.Setpgid = true
	if err := cmd.Start(); err != nil {
		return err
	}
	b.cmd, b.exited = cmd, make(chan struct{})
	go func(ch chan struct{}) { cmd.Wait(); close(ch) }(b.exited)
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		conn, err := b.Admin(ctx)
		cancel()
		if err == nil {
			conn.Close(context.Background())
			return nil
		}
		select {
		case <-b.exited:
			b.cmd = nil
			return fmt.Errorf("pgbouncer exited: %s", cmd.ProcessState)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			b.Kill()
			return fmt.Errorf("pgbouncer admin console did not answer: %v", err)
		}
	}
}

// Restart starts a killed pgbouncer again on the same port and ini.
func (b *Bouncer) Restart() {
	b.t.Helper()
	if err := b.start(); err != nil {
		log, _ := os.ReadFile(b.LogFile)
		b.t.Fatalf("pgtest: restarting pgbouncer %s: %v\n%s", b.Name, err, tail(log, 20))
	}
}

// Kill stops pgbouncer with SIGKILL.
func (b *Bouncer) Kill() {
	if b.cmd == nil {
		return
	}
	syscall.Kill(-b.cmd.Process.Pid, syscall.SIGKILL)
	<-b.exited
	b.cmd = nil
}

// BouncerConfig is the driver configuration for this pgbouncer.
func (b *Bouncer) BouncerConfig() pgctl.BouncerConfig {
	return pgctl.BouncerConfig{AdminHost: b.Host, AdminPort: b.Port, AdminUser: AdminUser,
		DatabasesFile: b.DatabasesFile, Databases: []string{Database}}
}

// Admin opens a connection to the admin console.
func (b *Bouncer) Admin(ctx context.Context) (*pgx.Conn, error) {
	cc, err := pgx.ParseConfig("sslmode=disable connect_timeout=5")
	if err != nil {
		return nil, err
	}
	cc.Host, cc.Port, cc.User, cc.Database = b.Host, uint16(b.Port), AdminUser, "pgbouncer"
	cc.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
	return pgx.ConnectConfig(ctx, cc)
}

// Connect opens a client connection through pgbouncer to the harness
// database (simple protocol: transaction pooling keeps no prepared
// statements).
func (b *Bouncer) Connect(ctx context.Context) (*pgx.Conn, error) {
	return connect(ctx, b.Host, b.Port, Database)
}

// ServerPort asks, through pgbouncer, which server port answers a new
// transaction.
func (b *Bouncer) ServerPort(ctx context.Context) (int, error) {
	conn, err := b.Connect(ctx)
	if err != nil {
		return 0, err
	}
	defer conn.Close(context.Background())
	var port int
	err = conn.QueryRow(ctx, "SELECT inet_server_port()").Scan(&port)
	return port, err
}

// Endpoint is where clients reach pgbouncer.
func (b *Bouncer) Endpoint() dbtarget.Endpoint { return dbtarget.Endpoint{Host: b.Host, Port: b.Port} }
