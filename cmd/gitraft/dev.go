package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/gitraft/gitraft/cluster"
	"github.com/gitraft/gitraft/cluster/pki"
)

// devNodeInfo is one node of a dev cluster, as printed and written to
// cluster.json.
type devNodeInfo struct {
	ID       string `json:"id"`
	RaftAddr string `json:"raft_addr"`
	GRPCAddr string `json:"grpc_addr"`
	HTTPAddr string `json:"http_addr"`
	SSHAddr  string `json:"ssh_addr"`
	DataDir  string `json:"data_dir"`
	Cert     string `json:"cert"`
	Key      string `json:"key"`
}

// devClusterInfo is what `gitraft dev` writes to <dir>/cluster.json.
type devClusterInfo struct {
	Dir       string        `json:"dir"`
	Leader    string        `json:"leader"`
	CACert    string        `json:"ca_cert"`
	AdminCert string        `json:"admin_cert"`
	AdminKey  string        `json:"admin_key"`
	Nodes     []devNodeInfo `json:"nodes"`
	Env       []string      `json:"env"`
	PID       int           `json:"pid"`
	StartedAt time.Time     `json:"started_at"`
	LogFile   string        `json:"log_file"`
	Git       devGitInfo    `json:"git"`
}

func newDevCmd() *cobra.Command {
	var (
		dir      string
		nodes    int
		basePort int
		verbose  bool
	)
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run a local 3-node cluster on loopback, for trying gitraft out",
		Long: `Run a whole gitraft cluster in this one process, on loopback: its own CA and
certificates, its own ports and data dirs under --dir (a new temporary
directory by default). It waits for a leader, prints how to point the CLI at
the cluster, writes the same facts to <dir>/cluster.json, and stops cleanly on
Ctrl-C. Nothing needs to be installed but this binary.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if nodes < 1 || nodes > 9 {
				return fmt.Errorf("--nodes %d: use 1 to 9", nodes)
			}
			if dir == "" {
				d, err := os.MkdirTemp("", "gitraft-dev-")
				if err != nil {
					return err
				}
				dir = d
			}
			dir, err := filepath.Abs(dir)
			if err != nil {
				return err
			}
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return runDev(ctx, cmd.OutOrStdout(), dir, nodes, basePort, verbose)
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "directory for the cluster's data, certificates and log (default: a new temporary directory)")
	cmd.Flags().IntVar(&nodes, "nodes", 3, "number of nodes")
	cmd.Flags().IntVar(&basePort, "base-port", 0, "first port; node i uses base+10*i .. +2 (default: free ports)")
	cmd.Flags().BoolVarP(&verbose, "verbose", "v", false, "also print the nodes' info logs here (they always go to <dir>/gitraft.log)")
	return cmd
}

func runDev(ctx context.Context, out io.Writer, dir string, count, basePort int, verbose bool) error {
	caDir := filepath.Join(dir, "ca")
	caCert := filepath.Join(caDir, pki.CACertFile)
	if _, err := os.Stat(caCert); os.IsNotExist(err) {
		if _, err := pki.InitCA(caDir, "dev", 10*365*24*time.Hour); err != nil {
			return err
		}
	}
	adminCert, adminKey, err := ensureCert(caDir, pki.RoleAdmin, "admin")
	if err != nil {
		return err
	}
	// The SSH host key file, as `gitraft ca host-key` makes it: every node
	// serves it; only its public part enters the replicated state.
	hostKey := filepath.Join(caDir, HostKeyFile)
	if err := ensureHostKeyFile(hostKey, "gitraft-dev-host-key"); err != nil {
		return err
	}

	logPath := filepath.Join(dir, "gitraft.log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer logFile.Close()
	consoleLevel := slog.LevelError // Raft warns at every start while nodes find each other
	if verbose {
		consoleLevel = slog.LevelInfo
	}
	logger := slog.New(slog.NewMultiHandler(
		slog.NewTextHandler(logFile, &slog.HandlerOptions{Level: slog.LevelInfo}),
		slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: consoleLevel}),
	))

	// A restarted dev cluster must keep its addresses: they are in the Raft
	// configuration.
	var previous devClusterInfo
	if b, err := os.ReadFile(filepath.Join(dir, "cluster.json")); err == nil {
		if err := json.Unmarshal(b, &previous); err != nil {
			return fmt.Errorf("%s: %w", filepath.Join(dir, "cluster.json"), err)
		}
	}

	var running []*runningNode
	defer func() {
		for i := len(running) - 1; i >= 0; i-- {
			running[i].Close()
		}
	}()
	info := devClusterInfo{Dir: dir, CACert: caCert, AdminCert: adminCert, AdminKey: adminKey, PID: os.Getpid(), StartedAt: time.Now().UTC(), LogFile: logPath}
	for i := 1; i <= count; i++ {
		id := "n" + strconv.Itoa(i)
		cert, key, err := ensureCert(caDir, pki.RoleNode, id)
		if err != nil {
			return err
		}
		addr := func(k int) (string, error) {
			if basePort == 0 {
				return freePort()
			}
			return net.JoinHostPort("127.0.0.1", strconv.Itoa(basePort+10*(i-1)+k)), nil
		}
		var addrs [4]string
		if i <= len(previous.Nodes) && previous.Nodes[i-1].SSHAddr != "" {
			p := previous.Nodes[i-1]
			addrs = [4]string{p.RaftAddr, p.GRPCAddr, p.HTTPAddr, p.SSHAddr}
		} else {
			for k := range addrs {
				if addrs[k], err = addr(k); err != nil {
					return err
				}
			}
		}
		cfg := fileConfig{
			NodeID: id, DataDir: filepath.Join(dir, id),
			RaftAddr: addrs[0], GRPCAddr: addrs[1], HTTPAddr: addrs[2], SSHAddr: addrs[3],
			TLS:       cluster.TLSFiles{CAFile: caCert, CertFile: cert, KeyFile: key},
			Bootstrap: i == 1,
			Git:       gitSettings{HostKeyFiles: []string{hostKey}},
		}
		if i > 1 {
			cfg.Join = []string{running[0].node.GRPCAddr()}
		}
		r, err := startNode(cfg, logger)
		if err != nil {
			return fmt.Errorf("start %s: %w", id, err)
		}
		running = append(running, r)
		n := r.node
		info.Nodes = append(info.Nodes, devNodeInfo{ID: id, RaftAddr: n.RaftAddr(), GRPCAddr: n.GRPCAddr(), HTTPAddr: n.HTTPAddr(), SSHAddr: r.SSHAddr(), DataDir: cfg.DataDir, Cert: cert, Key: key})
	}

	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	leader, err := running[0].node.WaitLeader(wctx)
	if err != nil {
		return err
	}
	for _, r := range running {
		if err := waitReady(wctx, r.node); err != nil {
			return fmt.Errorf("node %s: %w", r.node.ID(), err)
		}
	}
	gitInfo, err := devGitSetup(wctx, running[0].node, dir, hostKey+".pub", info.Nodes)
	if err != nil {
		return fmt.Errorf("setting up git access: %w", err)
	}
	info.Git = gitInfo
	info.Leader = leader
	info.Env = []string{
		"GITRAFT_ADDR=" + info.Nodes[0].GRPCAddr,
		"GITRAFT_CACERT=" + caCert,
		"GITRAFT_CLIENT_CERT=" + adminCert,
		"GITRAFT_CLIENT_KEY=" + adminKey,
	}
	b, _ := json.MarshalIndent(info, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, "cluster.json"), append(b, '\n'), 0o600); err != nil {
		return err
	}
	envFile := filepath.Join(dir, "env")
	var env string
	for _, e := range info.Env {
		env += "export " + e + "\n"
	}
	if err := os.WriteFile(envFile, []byte(env), 0o600); err != nil {
		return err
	}

	fmt.Fprintf(out, "gitraft dev cluster is up: %d nodes, leader %s, data in %s\n\n", count, leader, dir)
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tRAFT\tGRPC (admin API)\tHTTP (metrics, health)")
	for _, n := range info.Nodes {
		fmt.Fprintf(tw, "%s\t%s\t%s\thttp://%s/metrics\n", n.ID, n.RaftAddr, n.GRPCAddr, n.HTTPAddr)
	}
	tw.Flush()
	fmt.Fprintf(out, "\nPoint the CLI at it (or: source %s):\n\n", envFile)
	fmt.Fprintf(out, "  %s\n\n", "export "+joinSpace(info.Env))
	fmt.Fprintf(out, "  gitraft cluster status\n  gitraft repo ls\n\n")
	fmt.Fprintf(out, "Git over SSH, as user %q with %s (any node will do):\n\n", gitInfo.User, gitInfo.Key)
	fmt.Fprintf(out, "  export GIT_SSH_COMMAND=%s\n", shellQuoteArg(gitInfo.SSHCommand))
	fmt.Fprintf(out, "  git clone %s\n\n", gitInfo.CloneURLs[0])
	fmt.Fprintf(out, "Logs: %s. The same facts as JSON: %s\nPress Ctrl-C to stop.\n", logPath, filepath.Join(dir, "cluster.json"))

	<-ctx.Done()
	fmt.Fprintln(out, "\nstopping the dev cluster ...")
	for i := len(running) - 1; i >= 0; i-- {
		if err := running[i].Close(); err != nil {
			logger.Warn("stopping node", "node", running[i].node.ID(), "err", err)
		}
	}
	running = nil
	fmt.Fprintf(out, "stopped; data kept in %s (run `gitraft dev --dir %s` to start it again)\n", dir, dir)
	return nil
}

func joinSpace(ss []string) string {
	out := ""
	for i, s := range ss {
		if i > 0 {
			out += " "
		}
		out += s
	}
	return out
}

func ensureCert(caDir string, role pki.Role, name string) (string, string, error) {
	cert, key := filepath.Join(caDir, name+".crt"), filepath.Join(caDir, name+".key")
	if _, err := os.Stat(cert); err == nil {
		return cert, key, nil
	}
	return pki.Issue(caDir, pki.IssueOptions{Role: role, Name: name})
}

func freePort() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

func waitReady(ctx context.Context, n *cluster.Node) error {
	for {
		if ok, _ := n.Ready(); ok {
			return nil
		}
		select {
		case <-ctx.Done():
			_, why := n.Ready()
			return fmt.Errorf("not ready: %s", why)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
