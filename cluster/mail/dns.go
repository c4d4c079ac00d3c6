package mail

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/gitraft/gitraft/cluster/atomicfile"
	mailv1 "github.com/gitraft/gitraft/proto/gitraft/mail/v1"
)

// ZoneFragment renders MX records as a zone-file fragment for $INCLUDE at
// the mail domain's origin: one "@ IN MX <priority> <address>" line each.
// An address with a dot gets a final dot (it is a full name).
func ZoneFragment(records []*mailv1.MXRecord) string {
	var b strings.Builder
	b.WriteString("; MX set of the forge's mail hosts, written by gitraft on every change; do not edit.\n")
	if len(records) == 0 {
		b.WriteString("; no active mail host: the MX set is empty.\n")
	}
	for _, r := range records {
		fmt.Fprintf(&b, "@\tIN\tMX\t%d\t%s\t; %s\n", r.GetPriority(), fqdn(r.GetAddress()), r.GetHost())
	}
	return b.String()
}

func fqdn(addr string) string {
	if strings.Contains(addr, ".") && !strings.HasSuffix(addr, ".") && net.ParseIP(addr) == nil {
		return addr + "."
	}
	return addr
}

// Hosts is what the agent and the DNS output read from the cluster.
type Hosts interface {
	// MailHosts returns the mail hosts by name. With fresh it first makes
	// sure this node has applied everything the leader had committed (a
	// linearizable read); without, it returns what this node last applied.
	MailHosts(ctx context.Context, fresh bool) ([]*mailv1.Host, error)
}

// OutputConfig configures the DNS outputs of a node.
type OutputConfig struct {
	// ZoneFile is where the zone fragment goes (replaced atomically).
	ZoneFile string
	// OnChange is run after each change of the fragment, with its path in
	// $GITRAFT_MX_ZONE_FILE. A plain command (a program and arguments with
	// no shell syntax, such as /usr/local/bin/push-dns) runs directly with
	// the path as its last argument; anything else runs with sh -c, the path
	// in $1.
	OnChange string
	// Poll is how often the local state is checked (default 250ms).
	Poll time.Duration
	// CommandTimeout bounds one run of OnChange (default 1m).
	CommandTimeout time.Duration
}

// Output keeps the zone fragment file in step with the MX set, and runs
// the on-change command after every change, retrying it with backoff until
// it succeeds.
type Output struct {
	cfg   OutputConfig
	hosts Hosts
	log   *slog.Logger
}

// NewOutput returns the DNS output; Run starts it.
func NewOutput(cfg OutputConfig, hosts Hosts, log *slog.Logger) (*Output, error) {
	if cfg.ZoneFile == "" {
		return nil, fmt.Errorf("mail DNS output: a zone file is required (mail.mx_zone_file)")
	}
	if !filepath.IsAbs(cfg.ZoneFile) {
		return nil, fmt.Errorf("mail DNS output: mail.mx_zone_file %q must be an absolute path", cfg.ZoneFile)
	}
	if cfg.Poll <= 0 {
		cfg.Poll = 250 * time.Millisecond
	}
	if cfg.CommandTimeout <= 0 {
		cfg.CommandTimeout = time.Minute
	}
	return &Output{cfg: cfg, hosts: hosts, log: log.With("zone_file", cfg.ZoneFile)}, nil
}

// Run writes the fragment on every change of the MX set until ctx ends.
// It starts with a linearizable read, so that a restarted node does not
// publish the MX set of an old log.
func (o *Output) Run(ctx context.Context) {
	t := time.NewTicker(o.cfg.Poll)
	defer t.Stop()
	fresh := true
	var written string
	if b, err := os.ReadFile(o.cfg.ZoneFile); err == nil {
		written = string(b) // unchanged at start: no need to push again
	}
	var pending bool // the command has not run (successfully) for the fragment
	var retryAt time.Time
	backoff := time.Second
	for {
		hosts, err := o.hosts.MailHosts(ctx, fresh)
		if err == nil {
			fresh = false
			frag := ZoneFragment(MXSet(hosts))
			if frag != written {
				if err := atomicfile.Write(o.cfg.ZoneFile, []byte(frag), 0o644); err != nil {
					o.log.Error("writing the MX zone fragment failed; will retry", "err", err)
				} else {
					o.log.Info("wrote the MX zone fragment", "mx", mxSummary(MXSet(hosts)))
					written, pending, retryAt, backoff = frag, o.cfg.OnChange != "", time.Time{}, time.Second
				}
			}
		} else if ctx.Err() == nil && fresh {
			o.log.Debug("waiting for a consistent read of the mail hosts", "err", err)
		}
		if pending && !time.Now().Before(retryAt) {
			if err := o.runOnChange(ctx); err != nil {
				o.log.Warn("mail.on_change failed; will retry", "err", err, "retry_in", backoff)
				retryAt = time.Now().Add(backoff)
				backoff = min(backoff*2, 5*time.Minute)
			} else {
				pending = false
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (o *Output) runOnChange(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, o.cfg.CommandTimeout)
	defer cancel()
	argv := onChangeArgv(o.cfg.OnChange, o.cfg.ZoneFile)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), "GITRAFT_MX_ZONE_FILE="+o.cfg.ZoneFile)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s: %w: %s", o.cfg.OnChange, err, strings.TrimSpace(tail(out.String(), 500)))
	}
	o.log.Info("ran mail.on_change", "command", o.cfg.OnChange)
	return nil
}

// shellSyntax are the characters that make a command need the shell.
const shellSyntax = "$`'\"\\;&|<>(){}[]*?~#!\n"

// onChangeArgv turns mail.on_change into the command to run with the
// zone file: a plain program and its arguments run directly with the file
// as the last argument (so the README's `on_change: /usr/local/bin/push-dns`
// gets it as $1); a command with shell syntax runs as `sh -c CMD sh FILE`,
// where it can use "$1".
func onChangeArgv(command, file string) []string {
	f := strings.Fields(command)
	if len(f) > 0 && !strings.ContainsAny(command, shellSyntax) && !strings.Contains(f[0], "=") {
		return append(f, file)
	}
	return []string{"sh", "-c", command, "sh", file}
}

func mxSummary(rs []*mailv1.MXRecord) string {
	if len(rs) == 0 {
		return "(empty)"
	}
	parts := make([]string, len(rs))
	for i, r := range rs {
		parts[i] = r.GetHost() + "/" + strconv.Itoa(int(r.GetPriority()))
	}
	return strings.Join(parts, " ")
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}
