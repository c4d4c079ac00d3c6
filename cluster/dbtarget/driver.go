package dbtarget

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// LSN is a PostgreSQL write-ahead log position.
type LSN uint64

// ParseLSN parses PostgreSQL's text form, "16/B374D848".
func ParseLSN(s string) (LSN, error) {
	hi, lo, ok := strings.Cut(strings.TrimSpace(s), "/")
	if !ok {
		return 0, fmt.Errorf("LSN %q: want HI/LO in hex", s)
	}
	h, err := strconv.ParseUint(hi, 16, 32)
	if err != nil {
		return 0, fmt.Errorf("LSN %q: %w", s, err)
	}
	l, err := strconv.ParseUint(lo, 16, 32)
	if err != nil {
		return 0, fmt.Errorf("LSN %q: %w", s, err)
	}
	return LSN(h<<32 | l), nil
}

// String gives PostgreSQL's text form.
func (l LSN) String() string { return fmt.Sprintf("%X/%X", uint64(l)>>32, uint64(l)&0xffffffff) }

// Health is what a postgres agent sees of its own server.
type Health struct {
	// Running: the postmaster answers queries.
	Running bool
	// InRecovery: the server is a standby (pg_is_in_recovery()).
	InRecovery bool
	// Timeline the server is on.
	Timeline uint32
	// WriteLSN: on a primary, pg_current_wal_lsn(); on a standby, the last
	// WAL position received (pg_last_wal_receive_lsn()).
	WriteLSN LSN
	// ReplayLSN: on a standby, pg_last_wal_replay_lsn(); on a primary, the
	// same as WriteLSN.
	ReplayLSN LSN
	// Streaming: a standby's WAL receiver is connected to a primary.
	Streaming bool
	// Upstream: where a streaming standby's WAL receiver is connected
	// (pg_stat_wal_receiver sender_host and sender_port): the primary, or
	// another standby it cascades through. Zero when not streaming.
	Upstream Endpoint
	// SynchronousStandbyNames: synchronous_standby_names as it is in force
	// (on a standby, what it would be once promoted).
	SynchronousStandbyNames string
	// Synchronous: on a primary, the standbys that are synchronous now
	// (pg_stat_replication sync_state sync or quorum), by
	// application_name.
	Synchronous []string
	// Replicas: on a primary, the standbys streaming from it, by
	// application_name.
	Replicas []string
	// Err says why the server is not running or could not be asked.
	Err string
}

// Endpoint is where clients reach a PostgreSQL server.
type Endpoint struct {
	Host string
	Port int
}

func (e Endpoint) String() string { return fmt.Sprintf("%s:%d", e.Host, e.Port) }

// Server drives one PostgreSQL server on the agent's host. Implementations
// run the real PostgreSQL tools (pg_ctl, pg_controldata, pg_rewind) and SQL.
type Server interface {
	// Health asks the server how it is; it never fails, Health.Err says why.
	Health(ctx context.Context) Health
	// Stop shuts the server down with a fast shutdown (fencing it) and
	// returns the checkpoint location pg_controldata reports afterwards: the
	// last WAL position the server wrote. Stopping a stopped server returns
	// that location too.
	Stop(ctx context.Context) (LSN, error)
	// Checkpoint runs CHECKPOINT on a running server, so that a fast stop
	// soon after has few dirty buffers left to write.
	Checkpoint(ctx context.Context) error
	// SetSynchronousStandbyNames sets synchronous_standby_names on a
	// running server, primary or standby (ALTER SYSTEM, then
	// pg_reload_conf) to value, a setting as FormatSyncNames gives it (""
	// resets it).
	SetSynchronousStandbyNames(ctx context.Context, value string) error
	// Start starts the server as its data directory says (primary, or a
	// standby when standby.signal is present) and waits until it answers.
	Start(ctx context.Context) error
	// Promote promotes a standby and waits until it accepts writes.
	Promote(ctx context.Context) error
	// Demote turns this server into a streaming standby of primary. A
	// running standby is first pointed at primary in place
	// (primary_conninfo, reload); otherwise, or if it does not stream from
	// primary then, it stops it if it runs, rewinds it with pg_rewind when
	// its history diverged, writes standby.signal and primary_conninfo, and
	// starts it. A standby already streaming from primary is left alone.
	Demote(ctx context.Context, primary Endpoint) error
}

// ErrBouncerDown means pgbouncer does not run: its admin console refuses
// connections. A pgbouncer that does not run routes nothing.
var ErrBouncerDown = errors.New("pgbouncer does not run")

// Bouncer drives one pgbouncer through its admin console and the file of
// [databases] entries it includes.
type Bouncer interface {
	// Pause issues PAUSE, which returns once every server connection is
	// released; ctx bounds the wait.
	Pause(ctx context.Context) error
	// Resume issues RESUME. Resuming a pgbouncer that is not paused is not
	// an error.
	Resume(ctx context.Context) error
	// Point writes the [databases] entries so that every database routes to
	// primary, and issues RELOAD.
	Point(ctx context.Context, primary Endpoint) error
	// Fence stops routing to any server: new queries wait (PAUSE, clients
	// see no error), and server connections still busy after drain are
	// dropped with their clients (KILL); it reports whether it had to.
	// Point followed by Resume ends it. A pgbouncer that does not run is
	// fenced as it is: Fence makes sure that it routes nothing when it
	// starts again and returns an error wrapping ErrBouncerDown.
	Fence(ctx context.Context, drain time.Duration) (killed bool, err error)
	// Ping checks that pgbouncer runs; an error wraps ErrBouncerDown when
	// it does not (its admin console refuses connections).
	Ping(ctx context.Context) error
	// Target reports where the include file currently routes.
	Target() (Endpoint, error)
}
