package pgctl_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/gitraft/gitraft/cluster/dbtarget"
	"github.com/gitraft/gitraft/cluster/dbtarget/pgctl"
	"github.com/gitraft/gitraft/cluster/dbtarget/pgctl/pgtest"
)

// serverPort asks on an open client connection which server answers its
// next transaction.
func serverPort(t *testing.T, c *pgx.Conn) int {
	t.Helper()
	var port int
	if err := c.QueryRow(ctxT(t, 20*time.Second), "SELECT inet_server_port()").Scan(&port); err != nil {
		t.Fatal(err)
	}
	return port
}

// pausedDatabases reads SHOW DATABASES: whether each database is paused.
func pausedDatabases(t *testing.T, b *pgtest.Bouncer) map[string]bool {
	t.Helper()
	ctx := ctxT(t, 10*time.Second)
	conn, err := b.Admin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	rows, err := conn.Query(ctx, "SHOW DATABASES")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	col := map[string]int{}
	for i, f := range rows.FieldDescriptions() {
		col[f.Name] = i
	}
	out := map[string]bool{}
	for rows.Next() {
		raw := rows.RawValues()
		out[string(raw[col["name"]])] = string(raw[col["paused"]]) == "1"
	}
	return out
}

func connect(t *testing.T, b *pgtest.Bouncer) *pgx.Conn {
	t.Helper()
	c, err := b.Connect(ctxT(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

func Test_Bouncer_AdminConsole(t *testing.T) {
	needPostgres(t)
	dir := pgtest.Dir(t)
	p1 := pgtest.StartPrimary(t, dir, "pg1")
	p2 := p1.StartStandby(t, dir, "pg2")
	b := pgtest.StartBouncer(t, dir, "bouncer1", p1)
	bd := newBouncer(t, b)

	t.Run("point reroutes the next transaction of an open client connection", func(t *testing.T) {
		ctx := ctxT(t, 30*time.Second)
		c := connect(t, b)
		if got := serverPort(t, c); got != p1.Port {
			t.Fatalf("before Point: server port %d, want pg1's %d", got, p1.Port)
		}
		if err := bd.Point(ctx, p2.Endpoint()); err != nil {
			t.Fatal(err)
		}
		if got := serverPort(t, c); got != p2.Port {
			t.Fatalf("after Point: server port %d, want pg2's %d", got, p2.Port)
		}
		if ep, err := bd.Target(); err != nil || ep != p2.Endpoint() {
			t.Errorf("Target() = %v, %v; want %v", ep, err, p2.Endpoint())
		}
		if err := bd.Point(ctx, p1.Endpoint()); err != nil {
			t.Fatal(err)
		}
		if got := serverPort(t, c); got != p1.Port {
			t.Fatalf("after pointing back: server port %d, want pg1's %d", got, p1.Port)
		}
	})

	t.Run("pause waits for the transaction under way; queries wait for resume", func(t *testing.T) {
		ctx := ctxT(t, 30*time.Second)
		// pgbouncer 1.18 answers a waiting PAUSE at once after anyone has
		// used WAIT_CLOSE on the database; Pause must wait regardless.
		admin, err := b.Admin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := admin.Exec(ctx, "WAIT_CLOSE "+pgtest.Database); err != nil {
			t.Fatal(err)
		}
		admin.Close(ctx)
		inTx := connect(t, b)
		tx, err := inTx.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
		paused := make(chan time.Time, 1)
		go func() {
			if err := bd.Pause(ctx); err != nil {
				t.Error(err)
			}
			paused <- time.Now()
		}()
		waitUntil(t, "app paused in SHOW DATABASES", func() bool { return pausedDatabases(t, b)[pgtest.Database] })
		committed := time.Now()
		if err := tx.Commit(ctx); err != nil {
			t.Fatalf("the transaction under way could not commit while PAUSE waited: %v", err)
		}
		if at := <-paused; at.Before(committed) {
			t.Fatal("Pause returned before the transaction under way committed")
		}

		// A query during the pause waits, and runs once resumed.
		waiter := connect(t, b)
		answered := make(chan time.Time, 1)
		go func() {
			var one int
			if err := waiter.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
				t.Error("a query held by PAUSE failed:", err)
			}
			answered <- time.Now()
		}()
		resumed := time.Now()
		if err := bd.Resume(ctx); err != nil {
			t.Fatal(err)
		}
		if at := <-answered; at.Before(resumed) {
			t.Error("a query was answered while pgbouncer was paused")
		}
		if pausedDatabases(t, b)[pgtest.Database] {
			t.Error("still paused after Resume")
		}
		if err := bd.Resume(ctx); err != nil {
			t.Errorf("resuming a pgbouncer that is not paused: %v, want nil", err)
		}
	})

	t.Run("pause past its deadline resumes again", func(t *testing.T) {
		ctx := ctxT(t, 30*time.Second)
		inTx := connect(t, b)
		tx, err := inTx.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
		short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		err = bd.Pause(short)
		cancel()
		if !errors.Is(err, pgctl.ErrPaused) {
			t.Fatalf("Pause with a transaction open past the deadline: %v, want ErrPaused", err)
		}
		if pausedDatabases(t, b)[pgtest.Database] {
			t.Error("still paused after a Pause that timed out")
		}
		// Another client goes through at once, and the open transaction
		// still commits.
		if got := serverPort(t, connect(t, b)); got != p1.Port {
			t.Errorf("server port %d, want pg1's %d", got, p1.Port)
		}
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("fence holds clients without dropping them until point and resume", func(t *testing.T) {
		ctx := ctxT(t, 30*time.Second)
		idle := connect(t, b)
		serverPort(t, idle)
		killed, err := bd.Fence(ctx, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if killed {
			t.Error("Fence KILLed with no transaction under way")
		}
		if !pausedDatabases(t, b)[pgtest.Database] {
			t.Error("database not paused after Fence")
		}
		answered := make(chan int, 2)
		held := func(c *pgx.Conn) {
			var port int
			if err := c.QueryRow(ctx, "SELECT inet_server_port()").Scan(&port); err != nil {
				t.Error("a query held by the fence failed:", err)
			}
			answered <- port
		}
		go held(idle) // a client connected before the fence
		go func() {
			c, err := b.Connect(ctx)
			if err != nil {
				t.Error(err)
				answered <- 0
				return
			}
			defer c.Close(context.Background())
			held(c)
		}()
		time.Sleep(200 * time.Millisecond)
		if err := bd.Point(ctx, p2.Endpoint()); err != nil {
			t.Fatal(err)
		}
		if err := bd.Resume(ctx); err != nil {
			t.Fatal(err)
		}
		for range 2 {
			if port := <-answered; port != p2.Port {
				t.Errorf("after the fence a held query ran on port %d, want pg2's %d", port, p2.Port)
			}
		}
		if err := bd.Point(ctx, p1.Endpoint()); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("fence KILLs a transaction still under way after drain", func(t *testing.T) {
		ctx := ctxT(t, 30*time.Second)
		busy := connect(t, b)
		tx, err := busy.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, "SELECT 1"); err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		killed, err := bd.Fence(ctx, 300*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		if !killed {
			t.Error("Fence did not report the KILL of a transaction under way")
		}
		if took := time.Since(t0); took > 3*time.Second {
			t.Errorf("Fence took %s with a drain of 300ms", took)
		}
		if err := tx.Commit(ctx); err == nil {
			t.Error("the transaction under way committed after the fence")
		}
		if err := bd.Point(ctx, p1.Endpoint()); err != nil {
			t.Fatal(err)
		}
		if err := bd.Resume(ctx); err != nil {
			t.Fatal(err)
		}
		if got := serverPort(t, connect(t, b)); got != p1.Port {
			t.Errorf("server port %d after the fence ended, want pg1's %d", got, p1.Port)
		}
	})

	t.Run("a file pgbouncer does not include is not applied", func(t *testing.T) {
		cfg := b.BouncerConfig()
		cfg.DatabasesFile = filepath.Join(dir, "not-included.ini")
		other, err := pgctl.NewBouncer(cfg, testLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		err = other.Point(ctxT(t, 10*time.Second), p2.Endpoint())
		if !errors.Is(err, pgctl.ErrNotApplied) || !strings.Contains(err.Error(), "%included") {
			t.Errorf("Point through a file pgbouncer does not include: %v, want ErrNotApplied naming %%include", err)
		}
		if got := serverPort(t, connect(t, b)); got != p1.Port {
			t.Errorf("server port %d, want pg1's %d", got, p1.Port)
		}
	})

	t.Run("admin console unreachable", func(t *testing.T) {
		cfg := b.BouncerConfig()
		cfg.AdminPort = pgtest.FreePort(t)
		cfg.DatabasesFile = filepath.Join(dir, "gone-databases.ini")
		if err := os.WriteFile(cfg.DatabasesFile, []byte("app = host=127.0.0.1 port=5432 dbname=app\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		gone, err := pgctl.NewBouncer(cfg, testLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		for name, f := range map[string]func(context.Context) error{"Pause": gone.Pause, "Resume": gone.Resume, "Ping": gone.Ping} {
			if err := f(ctxT(t, 10*time.Second)); !errors.Is(err, pgctl.ErrAdmin) && !errors.Is(err, pgctl.ErrPaused) {
				t.Errorf("%s with no pgbouncer: %v, want ErrAdmin", name, err)
			}
		}
		if err := gone.Ping(ctxT(t, 10*time.Second)); !errors.Is(err, dbtarget.ErrBouncerDown) {
			t.Errorf("Ping with no pgbouncer: %v, want ErrBouncerDown", err)
		}
		// A pgbouncer that does not run is fenced as it is, and its include
		// file routes nothing when it starts again.
		if _, err := gone.Fence(ctxT(t, 10*time.Second), time.Second); !errors.Is(err, dbtarget.ErrBouncerDown) {
			t.Errorf("Fence with no pgbouncer: %v, want ErrBouncerDown", err)
		}
		if ep, err := gone.Target(); err == nil {
			t.Errorf("after Fence of a pgbouncer that does not run, its include file routes to %s, want nothing", ep)
		}
	})
}

func Test_Bouncer_Target(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "databases.ini")
	b, err := pgctl.NewBouncer(pgctl.BouncerConfig{AdminPort: 1, DatabasesFile: file, Databases: []string{"app", "jobs"}}, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Target(); !errors.Is(err, pgctl.ErrNoTarget) {
		t.Errorf("Target with no file: %v, want ErrNoTarget", err)
	}
	for _, c := range []struct {
		text string
		want dbtarget.Endpoint
		ok   bool
	}{
		{"app = host=10.0.0.5 port=5433 dbname=app\njobs = host=10.0.0.5 port=5433 dbname=jobs pool_size=5\n", dbtarget.Endpoint{Host: "10.0.0.5", Port: 5433}, true},
		{"; comment\n# comment\n\napp = host=db1 dbname=app\njobs = dbname=jobs host='db1'\n", dbtarget.Endpoint{Host: "db1", Port: 5432}, true},
		{"app = host=db1 dbname=app\njobs = host=db2 dbname=jobs\n", dbtarget.Endpoint{}, false},
		{"app = host=db1 dbname=app\n", dbtarget.Endpoint{}, false},
	} {
		if err := os.WriteFile(file, []byte(c.text), 0o644); err != nil {
			t.Fatal(err)
		}
		got, err := b.Target()
		if c.ok && (err != nil || got != c.want) {
			t.Errorf("Target of %q = %v, %v; want %v", c.text, got, err, c.want)
		}
		if !c.ok && !errors.Is(err, pgctl.ErrNoTarget) {
			t.Errorf("Target of %q = %v, %v; want ErrNoTarget", c.text, got, err)
		}
	}
}

func Test_Config_Refused(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "databases.ini")
	for name, cfg := range map[string]pgctl.BouncerConfig{
		"relative file":       {DatabasesFile: "databases.ini", Databases: []string{"app"}},
		"no directory":        {DatabasesFile: filepath.Join(dir, "missing", "db.ini"), Databases: []string{"app"}},
		"no databases":        {DatabasesFile: file},
		"bad database name":   {DatabasesFile: file, Databases: []string{"app; KILL"}},
		"admin database":      {DatabasesFile: file, Databases: []string{"pgbouncer"}},
		"database twice":      {DatabasesFile: file, Databases: []string{"app", "app"}},
		"host in params":      {DatabasesFile: file, Databases: []string{"app"}, ConnectParams: "host=elsewhere"},
		"newline in params":   {DatabasesFile: file, Databases: []string{"app"}, ConnectParams: "pool_size=5\nevil = host=x"},
		"port out of range":   {AdminPort: 70000, DatabasesFile: file, Databases: []string{"app"}},
		"negative admin port": {AdminPort: -1, DatabasesFile: file, Databases: []string{"app"}},
	} {
		if _, err := pgctl.NewBouncer(cfg, nil); !errors.Is(err, pgctl.ErrConfig) {
			t.Errorf("NewBouncer(%s): %v, want ErrConfig", name, err)
		}
	}
	bin := t.TempDir()
	for name, cfg := range map[string]pgctl.ServerConfig{
		"no data dir":       {Name: "pg1"},
		"relative data dir": {DataDir: "data", Name: "pg1"},
		"no name":           {DataDir: dir},
		"bad port":          {DataDir: dir, Name: "pg1", Port: 99999},
		"no pg_ctl":         {DataDir: dir, Name: "pg1", BinDir: bin},
	} {
		if _, err := pgctl.NewServer(cfg, nil); !errors.Is(err, pgctl.ErrConfig) {
			t.Errorf("NewServer(%s): %v, want ErrConfig", name, err)
		}
	}
	if got := pgctl.SlotName("PG-East.1"); got != "pg_east_1" {
		t.Errorf("SlotName(PG-East.1) = %q, want pg_east_1", got)
	}
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
