package mail

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/gitraft/gitraft/cluster/atomicfile"
)

// MTA is what the agent needs from the mail server on its host. Every
// method is idempotent: the agent applies the replicated state again after
// restarts and leader changes.
type MTA interface {
	// SetDefer makes the server answer new mail with a temporary error
	// (4xx, so senders try the next MX), or take mail again.
	SetDefer(ctx context.Context, on bool) error
	// SetHandoff sends all queued mail to nexthop (a Postfix next hop such
	// as "[10.0.0.2]:25"); "" restores normal routing.
	SetHandoff(ctx context.Context, nexthop string) error
	// Flush asks for delivery of every queued message now.
	Flush(ctx context.Context) error
	// QueueSize counts the queued messages (every queue, hold included).
	QueueSize(ctx context.Context) (int, error)
	// OldSessions counts the SMTP server processes started under an older
	// configuration than the one in effect: sessions that began before the
	// last change (such as the defer) and may still take mail as the old
	// configuration allowed. Such a process exits when its session ends.
	OldSessions(ctx context.Context) (int, error)
}

// ErrPostfix is wrapped by failures of Postfix's commands.
var ErrPostfix = errors.New("postfix")

// PostfixConfig configures the Postfix driver.
type PostfixConfig struct {
	// ConfigDir is Postfix's config_directory (postfix -c); "" for the
	// default, /etc/postfix.
	ConfigDir string
	// Services are the master.cf services ("smtp/inet") whose smtpd is to
	// answer 4xx while draining; empty for every inet or pass service that
	// runs smtpd.
	Services []string
	// StateFile records the master.cf overrides the agent replaced, so it
	// can put them back; it survives restarts.
	StateFile string
	// CommandDir holds postconf, postfix and postqueue ("" to search PATH,
	// then /usr/sbin).
	CommandDir string
	// Timeout bounds one Postfix command (default 30s), and the wait for
	// a reload to take effect.
	Timeout time.Duration
	// Proc is where the process table is read ("" for /proc).
	Proc string
}

// Postfix drives a Postfix instance with its own commands. While draining,
// each smtpd service gets a master.cf override `-o
// smtpd_client_restrictions=defer` (postconf -P), so new mail gets 450 and
// senders try the next MX; a handoff overrides the transports of the
// trivial-rewrite service, so every queued message goes to the peer. An
// override the operator had set is saved in StateFile and restored later.
// Postfix reloads after each change (if it runs).
type Postfix struct {
	cfg PostfixConfig
	log *slog.Logger
	mu  sync.Mutex
	// reloaded: this process has reloaded Postfix since it started, so a
	// change written to master.cf by an earlier process that died before
	// its reload is in effect.
	reloaded bool
	queueDir string // queue_directory, read once
}

// DeferRestriction is the smtpd_client_restrictions value that answers new
// mail with defer_code (450).
const DeferRestriction = "defer"

// handoffParams are the trivial-rewrite settings a handoff overrides.
var handoffParams = []string{
	"default_transport", "relay_transport", "local_transport", "virtual_transport",
	"transport_maps", "sender_dependent_default_transport_maps", "sender_dependent_relayhost_maps",
}

// NewPostfix returns the Postfix driver.
func NewPostfix(cfg PostfixConfig, log *slog.Logger) (*Postfix, error) {
	if cfg.StateFile == "" {
		return nil, fmt.Errorf("%w: the driver needs a state file", ErrPostfix)
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 30 * time.Second
	}
	if cfg.Proc == "" {
		cfg.Proc = "/proc"
	}
	for _, s := range cfg.Services {
		if name, typ, ok := strings.Cut(s, "/"); !ok || name == "" || typ == "" || strings.Contains(typ, "/") {
			return nil, fmt.Errorf("%w: service %q: use master.cf's name/type, such as smtp/inet", ErrPostfix, s)
		}
	}
	return &Postfix{cfg: cfg, log: log}, nil
}

func (p *Postfix) command(name string) string {
	if p.cfg.CommandDir != "" {
		return filepath.Join(p.cfg.CommandDir, name)
	}
	if path, err := exec.LookPath(name); err == nil {
		return path
	}
	return filepath.Join("/usr/sbin", name)
}

// run runs a Postfix command with -c when a config dir is set.
func (p *Postfix) run(ctx context.Context, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	if p.cfg.ConfigDir != "" {
		args = append([]string{"-c", p.cfg.ConfigDir}, args...)
	}
	cmd := exec.CommandContext(ctx, p.command(name), args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%w: %s %s: %v: %s", ErrPostfix, name, strings.Join(args, " "), err, strings.TrimSpace(tail(errb.String(), 500)))
	}
	return out.String(), nil
}

// Check makes sure the commands work and the config can be read: it runs
// postconf once and lists the services it would defer.
func (p *Postfix) Check(ctx context.Context) ([]string, error) {
	svcs, err := p.smtpdServices(ctx)
	if err != nil {
		return nil, err
	}
	if len(svcs) == 0 {
		return nil, fmt.Errorf("%w: master.cf of %s has no inet service running smtpd; set mail.postfix_services", ErrPostfix, p.dir())
	}
	return svcs, nil
}

func (p *Postfix) dir() string {
	if p.cfg.ConfigDir == "" {
		return "/etc/postfix"
	}
	return p.cfg.ConfigDir
}

// masterService is one master.cf entry as postconf -M prints it.
type masterService struct{ name, typ, command string }

func (p *Postfix) services(ctx context.Context) ([]masterService, error) {
	out, err := p.run(ctx, "postconf", "-M")
	if err != nil {
		return nil, err
	}
	return parseMasterServices(out), nil
}

// parseMasterServices reads postconf -M output: one service per logical
// line (continuations start with white space).
func parseMasterServices(out string) []masterService {
	var logical []string
	for _, line := range strings.Split(out, "\n") {
		if strings.TrimSpace(line) == "" || strings.HasPrefix(strings.TrimSpace(line), "#") {
			continue
		}
		if (line[0] == ' ' || line[0] == '\t') && len(logical) > 0 {
			logical[len(logical)-1] += " " + strings.TrimSpace(line)
			continue
		}
		logical = append(logical, line)
	}
	var svcs []masterService
	for _, l := range logical {
		f := strings.Fields(l)
		if len(f) < 8 {
			continue
		}
		svcs = append(svcs, masterService{name: f[0], typ: f[1], command: f[7]})
	}
	return svcs
}

func (p *Postfix) smtpdServices(ctx context.Context) ([]string, error) {
	if len(p.cfg.Services) > 0 {
		return p.cfg.Services, nil
	}
	all, err := p.services(ctx)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, s := range all {
		if (s.typ == "inet" || s.typ == "pass") && s.command == "smtpd" {
			out = append(out, s.name+"/"+s.typ)
		}
	}
	return out, nil
}

func (p *Postfix) rewriteService(ctx context.Context) (string, error) {
	all, err := p.services(ctx)
	if err != nil {
		return "", err
	}
	for _, s := range all {
		if s.command == "trivial-rewrite" && s.typ == "unix" {
			return s.name + "/" + s.typ, nil
		}
	}
	return "", fmt.Errorf("%w: master.cf of %s has no trivial-rewrite service", ErrPostfix, p.dir())
}

// overrides reads every master.cf parameter override ("svc/type/param" ->
// value), from postconf -P.
func (p *Postfix) overrides(ctx context.Context) (map[string]string, error) {
	out, err := p.run(ctx, "postconf", "-P")
	if err != nil {
		return nil, err
	}
	m := map[string]string{}
	for _, line := range strings.Split(out, "\n") {
		k, v, ok := strings.Cut(line, " = ")
		if !ok {
			k, ok = strings.CutSuffix(strings.TrimSpace(line), " =")
		}
		if ok {
			m[strings.TrimSpace(k)] = v
		}
	}
	return m, nil
}

// savedOverride is what a key held before the agent changed it.
type savedOverride struct {
	Had   bool   `json:"had"`
	Value string `json:"value"`
}

func (p *Postfix) loadSaved() (map[string]savedOverride, error) {
	m := map[string]savedOverride{}
	b, err := os.ReadFile(p.cfg.StateFile)
	if errors.Is(err, os.ErrNotExist) {
		return m, nil
	}
	if err != nil {
		return nil, fmt.Errorf("%w: read state file: %v", ErrPostfix, err)
	}
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%w: state file %s is damaged (%v); check master.cf's overrides (postconf -P) by hand, then remove it", ErrPostfix, p.cfg.StateFile, err)
	}
	return m, nil
}

func (p *Postfix) storeSaved(m map[string]savedOverride) error {
	if err := os.MkdirAll(filepath.Dir(p.cfg.StateFile), 0o700); err != nil {
		return err
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(p.cfg.StateFile, b, 0o644)
}

// override is one wanted master.cf parameter override: set to value, or
// (restore) put back what the agent replaced, where value is what the agent
// would have set ("" when unknown).
type override struct {
	set   bool
	value string
}

// apply sets or restores master.cf overrides, saving what it replaces
// first, and reloads Postfix if anything changed.
func (p *Postfix) apply(ctx context.Context, want map[string]override) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	cur, err := p.overrides(ctx)
	if err != nil {
		return err
	}
	saved, err := p.loadSaved()
	if err != nil {
		return err
	}
	var set, remove []string
	dirty := false
	for _, key := range slices.Sorted(maps.Keys(want)) {
		v, have := cur[key]
		w := want[key]
		if w.set {
			if have && v == w.value {
				continue
			}
			if _, ok := saved[key]; !ok {
				saved[key] = savedOverride{Had: have, Value: v}
				dirty = true
			}
			set = append(set, key+"="+w.value)
			continue
		}
		orig, ok := saved[key]
		switch {
		case !ok && have && w.value != "" && v == w.value:
			// Ours, though the state file forgot it (lost or restored).
			remove = append(remove, key)
		case !ok:
			// Never ours.
		case orig.Had && (!have || v != orig.Value):
			set = append(set, key+"="+orig.Value)
		case !orig.Had && have:
			remove = append(remove, key)
		}
		if ok {
			delete(saved, key)
			dirty = true
		}
	}
	if dirty {
		// Saved before master.cf changes, so a crash in between loses no
		// operator setting.
		if err := p.storeSaved(saved); err != nil {
			return fmt.Errorf("%w: save replaced overrides: %v", ErrPostfix, err)
		}
	}
	if len(set) > 0 {
		if _, err := p.run(ctx, "postconf", append([]string{"-P"}, set...)...); err != nil {
			return err
		}
	}
	if len(remove) > 0 {
		if _, err := p.run(ctx, "postconf", append([]string{"-PX"}, remove...)...); err != nil {
			return err
		}
	}
	if len(set)+len(remove) == 0 {
		if p.reloaded {
			return nil
		}
		// The first apply of this process: an earlier one may have died
		// between changing master.cf and reloading.
		return p.reload(ctx)
	}
	p.log.Info("changed Postfix master.cf overrides", "config_dir", p.dir(), "set", set, "removed", remove)
	return p.reload(ctx)
}

// reload makes a running Postfix read its config again, and returns once
// the master has (a stopped Postfix reads it when it starts). `postfix
// reload` only signals the master; the master then replaces the status
// channel of every service, so the reload has taken effect when the
// master's sockets changed. Until then it may still start smtpd processes
// of the old configuration.
func (p *Postfix) reload(ctx context.Context) error {
	if _, err := p.run(ctx, "postfix", "status"); err != nil {
		p.log.Warn("Postfix is not running; the change takes effect when it starts", "config_dir", p.dir())
		p.reloaded = true
		return nil
	}
	master, err := p.masterPID(ctx)
	if err != nil {
		return err
	}
	var before map[string]bool
	if master != 0 {
		if before, err = p.sockets(master); err != nil {
			return err
		}
	}
	if _, err := p.run(ctx, "postfix", "reload"); err != nil {
		return err
	}
	deadline := time.Now().Add(p.cfg.Timeout)
	for master != 0 {
		now, err := p.masterPID(ctx)
		if err != nil {
			return err
		}
		if now != master {
			break // restarted: it read the new config at start
		}
		after, err := p.sockets(master)
		if err != nil {
			return err
		}
		if !maps.Equal(before, after) {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w: postfix reload: the master (pid %d) did not reload within %s", ErrPostfix, master, p.cfg.Timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	p.reloaded = true
	return nil
}

// SetDefer implements MTA.
func (p *Postfix) SetDefer(ctx context.Context, on bool) error {
	svcs, err := p.smtpdServices(ctx)
	if err != nil {
		return err
	}
	if len(svcs) == 0 {
		return fmt.Errorf("%w: master.cf of %s has no inet service running smtpd; set mail.postfix_services", ErrPostfix, p.dir())
	}
	want := map[string]override{}
	for _, s := range svcs {
		want[s+"/smtpd_client_restrictions"] = override{set: on, value: DeferRestriction}
	}
	if !on {
		// Also put back services deferred under an older configuration.
		saved, err := p.loadSaved()
		if err != nil {
			return err
		}
		for key := range saved {
			if strings.HasSuffix(key, "/smtpd_client_restrictions") {
				want[key] = override{value: DeferRestriction}
			}
		}
	}
	return p.apply(ctx, want)
}

// SetHandoff implements MTA.
func (p *Postfix) SetHandoff(ctx context.Context, nexthop string) error {
	svc, err := p.rewriteService(ctx)
	if err != nil {
		return err
	}
	want := map[string]override{}
	for _, param := range handoffParams {
		key := svc + "/" + param
		switch {
		case nexthop == "":
			want[key] = override{}
		case strings.HasSuffix(param, "_transport"):
			want[key] = override{set: true, value: "smtp:" + nexthop}
		default:
			want[key] = override{set: true}
		}
	}
	return p.apply(ctx, want)
}

// masterPID returns the pid of the running master process of this
// instance (from queue_directory/pid/master.pid), or 0 when none runs.
func (p *Postfix) masterPID(ctx context.Context) (int, error) {
	if p.queueDir == "" {
		out, err := p.run(ctx, "postconf", "-h", "queue_directory")
		if err != nil {
			return 0, err
		}
		p.queueDir = strings.TrimSpace(out)
	}
	b, err := os.ReadFile(filepath.Join(p.queueDir, "pid", "master.pid"))
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("%w: read the master's pid: %v", ErrPostfix, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("%w: %s/pid/master.pid holds %.40q, not a pid", ErrPostfix, p.queueDir, b)
	}
	st, err := readStat(p.cfg.Proc, pid)
	if err != nil || st.comm != "master" {
		return 0, nil // a stale pid file
	}
	return pid, nil
}

// sockets returns the sockets a process holds open ("socket:[inode]").
func (p *Postfix) sockets(pid int) (map[string]bool, error) {
	dir := filepath.Join(p.cfg.Proc, strconv.Itoa(pid), "fd")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("%w: list the open files of Postfix's master: %v (the agent must run as root, as postfix reload needs)", ErrPostfix, err)
	}
	out := map[string]bool{}
	for _, e := range ents {
		l, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err == nil && strings.HasPrefix(l, "socket:") {
			out[l] = true
		}
	}
	return out, nil
}

// statusFD is the descriptor on which a Postfix daemon holds its status
// channel to the master (MASTER_STATUS_FD in Postfix's master_proto.h).
const statusFD = 5

// procStat is what the agent reads of /proc/PID/stat.
type procStat struct {
	comm string
	ppid int
}

func readStat(proc string, pid int) (procStat, error) {
	b, err := os.ReadFile(filepath.Join(proc, strconv.Itoa(pid), "stat"))
	if err != nil {
		return procStat{}, err
	}
	return parseStat(string(b))
}

// parseStat reads "pid (comm) state ppid ...": comm may hold spaces and
// parentheses, so it ends at the last ')'.
func parseStat(s string) (procStat, error) {
	open, end := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if open < 0 || end < open {
		return procStat{}, fmt.Errorf("unreadable stat %.80q", s)
	}
	f := strings.Fields(s[end+1:])
	if len(f) < 2 {
		return procStat{}, fmt.Errorf("unreadable stat %.80q", s)
	}
	ppid, err := strconv.Atoi(f[1])
	if err != nil {
		return procStat{}, fmt.Errorf("unreadable stat %.80q", s)
	}
	return procStat{comm: s[open+1 : end], ppid: ppid}, nil
}

// OldSessions implements MTA. On a reload the master opens a new status
// channel for each service and lets the processes of the old one finish:
// an smtpd holds the channel of its generation until it exits, after its
// current session. So an smtpd child of the master whose status channel the
// master no longer holds began under an older configuration.
func (p *Postfix) OldSessions(ctx context.Context) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	master, err := p.masterPID(ctx)
	if err != nil || master == 0 {
		return 0, err
	}
	current, err := p.sockets(master)
	if err != nil {
		return 0, err
	}
	ents, err := os.ReadDir(p.cfg.Proc)
	if err != nil {
		return 0, fmt.Errorf("%w: list processes: %v", ErrPostfix, err)
	}
	old := 0
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := readStat(p.cfg.Proc, pid)
		if err != nil || st.ppid != master || st.comm != "smtpd" {
			continue // gone, or not ours
		}
		l, err := os.Readlink(filepath.Join(p.cfg.Proc, e.Name(), "fd", strconv.Itoa(statusFD)))
		switch {
		case errors.Is(err, os.ErrNotExist):
			continue // exited meanwhile
		case err != nil:
			return 0, fmt.Errorf("%w: read the status channel of smtpd %d: %v (the agent must run as root, as postfix reload needs)", ErrPostfix, pid, err)
		case !current[l]:
			old++
		}
	}
	return old, nil
}

// Flush implements MTA.
func (p *Postfix) Flush(ctx context.Context) error {
	_, err := p.run(ctx, "postqueue", "-f")
	return err
}

// QueueSize implements MTA: postqueue -j prints one JSON object per
// message.
func (p *Postfix) QueueSize(ctx context.Context) (int, error) {
	out, err := p.run(ctx, "postqueue", "-j")
	if err != nil {
		return 0, err
	}
	return countQueueJSON(out)
}

func countQueueJSON(out string) (int, error) {
	n := 0
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		var m struct {
			QueueID string `json:"queue_id"`
		}
		if err := json.Unmarshal([]byte(line), &m); err != nil || m.QueueID == "" {
			return 0, fmt.Errorf("%w: postqueue -j printed a line that is not a queued message: %.200q", ErrPostfix, line)
		}
		n++
	}
	return n, sc.Err()
}
