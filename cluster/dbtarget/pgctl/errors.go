package pgctl

import "errors"

var (
	// ErrConfig means a ServerConfig or BouncerConfig is incomplete or
	// invalid; the error says which field.
	ErrConfig = errors.New("invalid configuration")
	// ErrTool means a PostgreSQL tool (pg_ctl, pg_controldata, pg_rewind)
	// failed; the error carries what it printed.
	ErrTool = errors.New("PostgreSQL tool failed")
	// ErrNotRunning means the server does not answer.
	ErrNotRunning = errors.New("server not running")
	// ErrPromote means the server did not leave recovery.
	ErrPromote = errors.New("promotion failed")
	// ErrNotStreaming means a demoted server started but its WAL receiver
	// did not connect to the new primary in time.
	ErrNotStreaming = errors.New("standby not streaming")
	// ErrAdmin means pgbouncer's admin console refused a command or could
	// not be reached.
	ErrAdmin = errors.New("pgbouncer admin console")
	// ErrPaused means a PAUSE did not complete before its deadline; the
	// pgbouncer was resumed again.
	ErrPaused = errors.New("pgbouncer pause not complete")
	// ErrNotApplied means pgbouncer, after RELOAD, does not route a database
	// where the include file says.
	ErrNotApplied = errors.New("pgbouncer did not apply the target")
	// ErrNoTarget means the include file is missing or names no usable
	// target.
	ErrNoTarget = errors.New("no target in the databases file")
)
