package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"gopkg.in/yaml.v3"

	"github.com/gitraft/gitraft/cluster"
)

// fileConfig is the YAML configuration of `gitraft serve`. Every field can
// be overridden by a GITRAFT_<NAME> environment variable (nested fields join
// with '_', e.g. GITRAFT_TLS_CA_FILE) and by a --<name> flag (e.g.
// --tls-ca-file); flags win over the environment, which wins over the file.
type fileConfig struct {
	NodeID        string        `yaml:"node_id" help:"this node's ID, unique in the cluster"`
	DataDir       string        `yaml:"data_dir" help:"directory for Raft log, snapshots and repositories"`
	RaftAddr      string        `yaml:"raft_addr" help:"listen address for Raft traffic"`
	RaftAdvertise string        `yaml:"raft_advertise" help:"Raft address peers dial (default: raft_addr)"`
	GRPCAddr      string        `yaml:"grpc_addr" help:"listen address for the admin and node gRPC API"`
	GRPCAdvertise string        `yaml:"grpc_advertise" help:"gRPC address peers dial (default: grpc_addr)"`
	HTTPAddr      string        `yaml:"http_addr" help:"listen address for /metrics, /healthz and /readyz"`
	SSHAddr       string        `yaml:"ssh_addr" help:"listen address for git over SSH"`
	SSHAdvertise  string        `yaml:"ssh_advertise" help:"SSH address clients use (default: ssh_addr)"`
	Bootstrap     bool          `yaml:"bootstrap" help:"found a new cluster with this node (only ever acts once)"`
	Join          []string      `yaml:"join" help:"gRPC addresses of members to ask for membership"`
	Insecure      bool          `yaml:"insecure" help:"no TLS; allowed only on loopback addresses"`
	LogFormat     string        `yaml:"log_format" help:"json or text"`
	LogLevel      string        `yaml:"log_level" help:"debug, info, warn or error"`
	LeaderWait    time.Duration `yaml:"leader_wait" help:"how long a write waits for a leader before failing"`
	DefaultLease  time.Duration `yaml:"default_lease" help:"lease of a write lock acquired without one"`

	TLS  cluster.TLSFiles   `yaml:"tls"`
	HTTP httpSettings       `yaml:"http"`
	Raft cluster.RaftTuning `yaml:"raft"`
	Git  gitSettings        `yaml:"git"`
	// Database configures the PostgreSQL and pgbouncer agents on this host.
	Database dbSettings `yaml:"database"`
	// Mail configures the Postfix drain agent on this host.
	Mail mailSettings `yaml:"mail"`
}

// httpSettings are what the HTTP port (http_addr) serves besides /metrics,
// /healthz and /readyz.
type httpSettings struct {
	// PProf serves /debug/pprof/. The HTTP port has no authentication.
	PProf bool `yaml:"pprof" help:"serve Go's profiler at /debug/pprof/ on the HTTP port, which has NO authentication: only where that port is private (default off)"`
}

// gitSettings are the git front end's limits and hooks.
type gitSettings struct {
	// HostKeyFiles are the node's SSH host keys (OpenSSH private key files,
	// mode 0600), the same on every node; made by `gitraft ca host-key`.
	HostKeyFiles []string      `yaml:"host_key_files" help:"SSH host key files (from gitraft ca host-key), the same on every node; the first key of each type is served, the rest only announced for known_hosts"`
	MaxPackBytes int64         `yaml:"max_pack_bytes" help:"largest pack a push may send, in bytes (0: no limit)"`
	MaxSessions  int           `yaml:"max_sessions" help:"concurrent SSH sessions per node"`
	IdleTimeout  time.Duration `yaml:"idle_timeout" help:"end an SSH session idle this long"`
	MaxTimeout   time.Duration `yaml:"max_timeout" help:"end any SSH session after this long"`
	PostReceive  string        `yaml:"post_receive" help:"shell command run once per accepted push, on the node that took it"`
	MinFreeBytes uint64        `yaml:"min_free_bytes" help:"below this much free disk a node hands pushes to a peer (default 100 MB)"`
	KeysCommand  string        `yaml:"keys_command" help:"command asked whose an unknown SSH key is (args: type, base64 key, fingerprint; prints a user name)"`
	// MaxRefsPerPush bounds one push's ref updates (0: no limit).
	MaxRefsPerPush int `yaml:"max_refs_per_push" help:"most ref updates one push may carry (0: no limit)"`
	// ServeStaleReads lets a node that cannot confirm it is current (no
	// quorum, cut off) serve its own copy with a warning instead of refusing.
	StuckAfter      time.Duration `yaml:"stuck_after" help:"a repository copy failing to catch up this long is stuck: /readyz 503, gitraft_repos_stuck (default 2m)"`
	ServeStaleReads bool          `yaml:"serve_stale_reads" help:"serve fetches from a copy that cannot be confirmed current, with a warning (default: refuse)"`
	// AllowAnySHA1InWant lets clients fetch objects no ref reaches (say, a
	// deleted branch's commits) by their ids.
	AllowAnySHA1InWant bool `yaml:"allow_any_sha1_in_want" help:"let clients fetch by id objects no branch or tag reaches, such as a deleted branch's commits (default: only reachable ones)"`

	MaxStartups              int           `yaml:"max_startups" help:"connections not yet authenticated, per node; more are closed at once (default 100, -1: no limit)"`
	PerSourceMaxStartups     int           `yaml:"per_source_max_startups" help:"connections not yet authenticated from one IP address (default 10, -1: no limit)"`
	LoginGraceTime           time.Duration `yaml:"login_grace_time" help:"close a connection that has not authenticated within this (default 30s, -1s: no limit)"`
	MaxSessionsPerUser       int           `yaml:"max_sessions_per_user" help:"concurrent SSH sessions of one user per node (default 16, -1: no limit)"`
	MaxSessionsPerConnection int           `yaml:"max_sessions_per_connection" help:"sessions open at once on one SSH connection (default 10, -1: no limit)"`
	MinRateBytes             int64         `yaml:"min_rate_bytes" help:"end a session that moves fewer bytes, both ways together, in a min_rate_window (default 128, -1: no floor)"`
	MinRateWindow            time.Duration `yaml:"min_rate_window" help:"the window of min_rate_bytes (default 5m)"`
	// Scrub is the background check of every copy on this node.
	Scrub scrubSettings `yaml:"scrub"`

	// Housekeeping is each node's repacking and pruning of its own copies.
	Housekeeping housekeepingSettings `yaml:"housekeeping"`
}

// scrubSettings pace the background scrub (ZFS's scrub is the model): every
// interval it reads every pack of every copy on the node, checks checksums
// and connectivity and compares refs with the state, and heals what it
// finds damaged.
type scrubSettings struct {
	Interval time.Duration `yaml:"interval" help:"start a scrub of every repository copy on this node this long after the last one finished (default 168h; -1s: never)"`
	Rate     int64         `yaml:"rate" help:"bytes of packs the scrub reads per second (default 8388608; -1: no limit)"`
}

// housekeepingSettings schedule a node's housekeeping of its copies
// (README: Housekeeping).
type housekeepingSettings struct {
	Enabled        bool          `yaml:"enabled" help:"repack and prune this node's repositories in the background (default true; gitraft repo housekeep works either way)"`
	Interval       time.Duration `yaml:"interval" help:"how often every repository's packs and loose objects are counted and those past a threshold housekept (default 10m)"`
	PackThreshold  int           `yaml:"pack_threshold" help:"housekeep a repository with at least this many packs (default 16)"`
	LooseThreshold int           `yaml:"loose_threshold" help:"housekeep a repository with at least this many loose objects (default 1024)"`
	PruneGrace     time.Duration `yaml:"prune_grace" help:"keep objects no ref reaches, and what failed pushes left, this long after they were written (default 1h)"`
	PruneInterval  time.Duration `yaml:"prune_interval" help:"prune (a full repack) each repository this often (default 24h)"`
}

func defaultFileConfig() fileConfig {
	return fileConfig{
		RaftAddr:  "127.0.0.1:7101",
		GRPCAddr:  "127.0.0.1:7102",
		HTTPAddr:  "127.0.0.1:7103",
		SSHAddr:   "127.0.0.1:7122",
		LogFormat: "json",
		LogLevel:  "info",
		Git:       gitSettings{MaxRefsPerPush: 10000, Housekeeping: housekeepingSettings{Enabled: true}},
	}
}

// field is one leaf setting of fileConfig, reachable by its path of yaml names.
type field struct {
	path []string
	v    reflect.Value
	help string
}

func (f field) env() string  { return "GITRAFT_" + strings.ToUpper(strings.Join(f.path, "_")) }
func (f field) flag() string { return strings.ReplaceAll(strings.Join(f.path, "-"), "_", "-") }

func fields(v reflect.Value, prefix []string) []field {
	var out []field
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		sf := t.Field(i)
		name := strings.Split(sf.Tag.Get("yaml"), ",")[0]
		if name == "" || name == "-" {
			continue
		}
		path := append(append([]string{}, prefix...), name)
		if sf.Type.Kind() == reflect.Struct {
			out = append(out, fields(v.Field(i), path)...)
			continue
		}
		help := sf.Tag.Get("help")
		if help == "" {
			help = strings.ReplaceAll(strings.Join(path, "."), "_", " ")
		}
		out = append(out, field{path: path, v: v.Field(i), help: help})
	}
	return out
}

func setValue(v reflect.Value, s string) error {
	switch v.Interface().(type) {
	case string:
		v.SetString(s)
	case bool:
		b, err := strconv.ParseBool(s)
		if err != nil {
			return err
		}
		v.SetBool(b)
	case time.Duration:
		d, err := time.ParseDuration(s)
		if err != nil {
			return err
		}
		v.SetInt(int64(d))
	case uint64:
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return err
		}
		v.SetUint(n)
	case int, int64:
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return err
		}
		v.SetInt(n)
	case []string:
		var parts []string
		for _, p := range strings.Split(s, ",") {
			if p = strings.TrimSpace(p); p != "" {
				parts = append(parts, p)
			}
		}
		v.Set(reflect.ValueOf(parts))
	default:
		return fmt.Errorf("unsupported setting type %s", v.Type())
	}
	return nil
}

// flagValue adapts a config field to pflag.
type flagValue struct {
	f   field
	set bool
	raw string
}

func (fv *flagValue) String() string { return fv.raw }
func (fv *flagValue) Set(s string) error {
	fv.set, fv.raw = true, s
	return nil
}
func (fv *flagValue) Type() string {
	switch fv.f.v.Interface().(type) {
	case bool:
		return "bool"
	case time.Duration:
		return "duration"
	case []string:
		return "list"
	case uint64:
		return "uint"
	case int, int64:
		return "int"
	}
	return "string"
}

// configFlags registers one flag per setting and returns a loader that
// applies file, environment and flags in that order.
func configFlags(fs *pflag.FlagSet) func() (fileConfig, error) {
	var path string
	fs.StringVarP(&path, "config", "c", os.Getenv("GITRAFT_CONFIG"), "YAML configuration file (env GITRAFT_CONFIG)")
	var shadow fileConfig
	var fvs []*flagValue
	for _, f := range fields(reflect.ValueOf(&shadow).Elem(), nil) {
		fv := &flagValue{f: f}
		fvs = append(fvs, fv)
		fl := fs.VarPF(fv, f.flag(), "", fmt.Sprintf("%s (env %s)", f.help, f.env()))
		if fv.Type() == "bool" {
			fl.NoOptDefVal = "true"
		}
	}
	return func() (fileConfig, error) {
		cfg := defaultFileConfig()
		if path != "" {
			b, err := os.ReadFile(path)
			if err != nil {
				return cfg, fmt.Errorf("config: %w", err)
			}
			dec := yaml.NewDecoder(bytes.NewReader(b))
			dec.KnownFields(true)
			if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
				return cfg, fmt.Errorf("config %s: %w", path, err)
			}
		}
		live := fields(reflect.ValueOf(&cfg).Elem(), nil)
		for i, f := range live {
			if s, ok := os.LookupEnv(f.env()); ok {
				if err := setValue(f.v, s); err != nil {
					return cfg, fmt.Errorf("%s=%q: %w", f.env(), s, err)
				}
			}
			if fvs[i].set {
				if err := setValue(f.v, fvs[i].raw); err != nil {
					return cfg, fmt.Errorf("--%s=%q: %w", f.flag(), fvs[i].raw, err)
				}
			}
		}
		return cfg, nil
	}
}

func (c fileConfig) clusterConfig() cluster.Config {
	return cluster.Config{
		NodeID: c.NodeID, DataDir: c.DataDir,
		RaftAddr: c.RaftAddr, RaftAdvertise: c.RaftAdvertise,
		GRPCAddr: c.GRPCAddr, GRPCAdvertise: c.GRPCAdvertise,
		HTTPAddr: c.HTTPAddr, PProf: c.HTTP.PProf,
		Bootstrap: c.Bootstrap, Join: c.Join,
		TLS: c.TLS, Insecure: c.Insecure,
		Raft:       c.Raft,
		LeaderWait: c.LeaderWait, DefaultLease: c.DefaultLease,
		Version: version,
	}
}

func newLogger(format, level string, w *os.File) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log_level %q: use debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "json", "":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("log_format %q: use json or text", format)
}
