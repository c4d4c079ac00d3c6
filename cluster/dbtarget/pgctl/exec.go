package pgctl

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// osUser is the account the PostgreSQL tools run as. When the agent is not
// root it runs them as itself (cred is nil).
type osUser struct {
	name     string
	home     string
	uid, gid int
	cred     *syscall.Credential
}

func lookupOSUser(name string) (osUser, error) {
	if os.Geteuid() != 0 {
		u, err := user.Current()
		if err != nil {
			return osUser{}, fmt.Errorf("%w: current user: %v", ErrConfig, err)
		}
		return osUser{name: u.Username, home: u.HomeDir, uid: os.Geteuid(), gid: os.Getegid()}, nil
	}
	if name == "root" {
		return osUser{}, fmt.Errorf("%w: OSUser: PostgreSQL refuses to run as root; name its account (usually postgres)", ErrConfig)
	}
	u, err := user.Lookup(name)
	if err != nil {
		return osUser{}, fmt.Errorf("%w: OSUser %q: %v", ErrConfig, name, err)
	}
	uid, err := strconv.Atoi(u.Uid)
	if err != nil {
		return osUser{}, fmt.Errorf("%w: OSUser %q: uid %q", ErrConfig, name, u.Uid)
	}
	gid, err := strconv.Atoi(u.Gid)
	if err != nil {
		return osUser{}, fmt.Errorf("%w: OSUser %q: gid %q", ErrConfig, name, u.Gid)
	}
	return osUser{name: name, home: u.HomeDir, uid: uid, gid: gid,
		cred: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}, nil
}

// toolEnv is the environment of the PostgreSQL tools: the agent's, without
// libpq's and PostgreSQL's own variables (PGDATA, PGHOST, ... would
// override what the agent passes), in the C locale so their output parses.
func (u osUser) toolEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "PG") || k == "HOME" || k == "USER" || k == "LOGNAME" || strings.HasPrefix(k, "LC_") || k == "LANG" {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "HOME="+u.home, "USER="+u.name, "LOGNAME="+u.name, "LC_ALL=C", "LANG=C")
}

// toolError is a tool that ran and exited with a non-zero code.
type toolError struct {
	tool   string
	code   int
	output string
}

func (e *toolError) Error() string {
	out := strings.TrimSpace(e.output)
	if len(out) > 2000 {
		out = "..." + out[len(out)-2000:]
	}
	return fmt.Sprintf("%s exited %d: %s", e.tool, e.code, out)
}

func (e *toolError) Unwrap() error { return ErrTool }

// run runs one of the PostgreSQL tools in bin as the OS user and returns
// what it printed (stdout and stderr together).
func (u osUser) run(ctx context.Context, bin, tool string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(bin, tool), args...)
	cmd.Dir = "/"
	cmd.Env = u.toolEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: u.cred}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	// pg_ctl start leaves the postmaster running; it writes to its log
	// file, but should it keep our pipe open, do not wait for it forever.
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return out.String(), nil
	case errors.As(err, &ee) && ee.Exited():
		return out.String(), &toolError{tool: tool, code: ee.ExitCode(), output: out.String()}
	case ctx.Err() != nil:
		return out.String(), fmt.Errorf("%s: %w (%v)", tool, ctx.Err(), err)
	default:
		return out.String(), fmt.Errorf("%w: %s: %v: %s", ErrTool, tool, err, strings.TrimSpace(out.String()))
	}
}

// exitCode returns the exit code of a tool that ran, or -1.
func exitCode(err error) int {
	var te *toolError
	if errors.As(err, &te) {
		return te.code
	}
	return -1
}

// quoteConnValue quotes a libpq keyword/value connection string value.
func quoteConnValue(v string) string {
	if v != "" && !strings.ContainsAny(v, " \t\n\r'\\") {
		return v
	}
	r := strings.NewReplacer(`\`, `\\`, `'`, `\'`)
	return "'" + r.Replace(v) + "'"
}

// connString builds a libpq keyword/value connection string from pairs,
// leaving out empty values.
func connString(kv ...string) string {
	var b strings.Builder
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] == "" {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(kv[i] + "=" + quoteConnValue(kv[i+1]))
	}
	return b.String()
}
