package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

func Test_Config_FileThenEnvThenFlags(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gitraft.yaml")
	os.WriteFile(path, []byte(`node_id: from-file
data_dir: /var/lib/gitraft
grpc_addr: 10.0.0.1:7102
join: [a:1, b:2]
tls:
  ca_file: /file/ca.crt
raft:
  heartbeat_timeout: 2s
  snapshot_bytes: 1048576
http:
  pprof: true
git:
  max_sessions: 9
  max_startups: 50
  login_grace_time: 20s
  min_rate_bytes: 512
`), 0o600)
	t.Setenv("GITRAFT_GRPC_ADDR", "10.0.0.2:7102")
	t.Setenv("GITRAFT_TLS_CA_FILE", "/env/ca.crt")
	t.Setenv("GITRAFT_RAFT_ELECTION_TIMEOUT", "3s")
	t.Setenv("GITRAFT_GIT_PER_SOURCE_MAX_STARTUPS", "3")
	t.Setenv("GITRAFT_GIT_MAX_SESSIONS_PER_CONNECTION", "4")
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	load := configFlags(fs)
	if err := fs.Parse([]string{"--config", path, "--tls-ca-file", "/flag/ca.crt", "--bootstrap", "--git-max-pack-bytes", "1000",
		"--git-max-sessions-per-user", "-1", "--git-min-rate-window", "2m"}); err != nil {
		t.Fatal(err)
	}
	cfg, err := load()
	if err != nil {
		t.Fatal(err)
	}
	checks := map[string][2]any{
		"node_id from the file":                 {cfg.NodeID, "from-file"},
		"grpc_addr from env":                    {cfg.GRPCAddr, "10.0.0.2:7102"},
		"tls.ca_file from flag":                 {cfg.TLS.CAFile, "/flag/ca.crt"},
		"raft heartbeat (file)":                 {cfg.Raft.HeartbeatTimeout, 2 * time.Second},
		"raft election (env)":                   {cfg.Raft.ElectionTimeout, 3 * time.Second},
		"bootstrap flag":                        {cfg.Bootstrap, true},
		"join list":                             {strings.Join(cfg.Join, ","), "a:1,b:2"},
		"git.max_sessions (file)":               {cfg.Git.MaxSessions, 9},
		"git.max_pack_bytes":                    {cfg.Git.MaxPackBytes, int64(1000)},
		"default http_addr":                     {cfg.HTTPAddr, "127.0.0.1:7103"},
		"git.max_startups (file)":               {cfg.Git.MaxStartups, 50},
		"git.login_grace_time":                  {cfg.Git.LoginGraceTime, 20 * time.Second},
		"git.min_rate_bytes":                    {cfg.Git.MinRateBytes, int64(512)},
		"git.per_source_max_startups (env)":     {cfg.Git.PerSourceMaxStartups, 3},
		"git.max_sessions_per_connection (env)": {cfg.Git.MaxSessionsPerConnection, 4},
		"git.max_sessions_per_user (flag, -1)":  {cfg.Git.MaxSessionsPerUser, -1},
		"git.min_rate_window (flag)":            {cfg.Git.MinRateWindow, 2 * time.Minute},
		"raft.snapshot_bytes (file)":            {cfg.Raft.SnapshotBytes, uint64(1 << 20)},
		"http.pprof (file)":                     {cfg.HTTP.PProf, true},
		"http.pprof reaches the node":           {cfg.clusterConfig().PProf, true},
	}
	for what, c := range checks {
		if c[0] != c[1] {
			t.Errorf("%s = %v, want %v", what, c[0], c[1])
		}
	}
}

func Test_Config_RefusesUnknownKeysAndBadValues(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gitraft.yaml")
	os.WriteFile(path, []byte("node_id: n1\nnode_idd: typo\n"), 0o600)
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	load := configFlags(fs)
	fs.Parse([]string{"--config", path})
	if _, err := load(); err == nil || !strings.Contains(err.Error(), "node_idd") {
		t.Fatalf("unknown key: %v", err)
	}
	t.Setenv("GITRAFT_RAFT_HEARTBEAT_TIMEOUT", "soon")
	fs = pflag.NewFlagSet("serve", pflag.ContinueOnError)
	load = configFlags(fs)
	if _, err := load(); err == nil || !strings.Contains(err.Error(), "GITRAFT_RAFT_HEARTBEAT_TIMEOUT") {
		t.Fatalf("bad duration in env: %v", err)
	}
}
