package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"

	"github.com/gitraft/gitraft/cluster"
	"github.com/gitraft/gitraft/gitproto"
	"github.com/gitraft/gitraft/storage"
)

// runningNode is one node with its git front end, as serve and dev run it.
type runningNode struct {
	node   *cluster.Node
	ssh    *gitproto.Server
	cancel context.CancelFunc
	log    *slog.Logger
}

// startNode wires storage, the cluster node and the SSH front end.
func startNode(cfg fileConfig, logger *slog.Logger) (*runningNode, error) {
	sshLn, err := net.Listen("tcp", cfg.SSHAddr)
	if err != nil {
		return nil, fmt.Errorf("ssh listen: %w", err)
	}
	store, err := storage.Open(storage.Config{Root: filepath.Join(cfg.DataDir, "repos")}, logger)
	if err != nil {
		sshLn.Close()
		return nil, err
	}
	exe, err := os.Executable()
	if err != nil {
		sshLn.Close()
		return nil, err
	}
	ccfg := cfg.clusterConfig()
	ccfg.SSHAdvertise = cfg.SSHAdvertise
	if ccfg.SSHAdvertise == "" {
		ccfg.SSHAdvertise = sshLn.Addr().String()
	}
	hostKeys, err := loadHostKeys(cfg.Git.HostKeyFiles)
	if err != nil {
		sshLn.Close()
		return nil, err
	}
	ccfg.SSHHostKeys = publicKeyLines(hostKeys)
	var running atomic.Pointer[cluster.Node]
	ccfg.Git = &cluster.GitConfig{Store: store, Binary: exe, MinFreeBytes: cfg.Git.MinFreeBytes, ServeStaleReads: cfg.Git.ServeStaleReads, StuckAfter: cfg.Git.StuckAfter,
		ScrubInterval: cfg.Git.Scrub.Interval, ScrubRate: cfg.Git.Scrub.Rate,
		HostSigners: hostSigners(hostKeys, &running, logger),
		Housekeeping: cluster.HousekeepConfig{Off: !cfg.Git.Housekeeping.Enabled, Interval: cfg.Git.Housekeeping.Interval,
			PackThreshold: cfg.Git.Housekeeping.PackThreshold, LooseThreshold: cfg.Git.Housekeeping.LooseThreshold,
			PruneGrace: cfg.Git.Housekeeping.PruneGrace, PruneInterval: cfg.Git.Housekeeping.PruneInterval}}
	n, err := cluster.New(ccfg, logger)
	if err != nil {
		sshLn.Close()
		return nil, err
	}
	running.Store(n)
	srv, err := gitproto.New(gitproto.Config{
		NodeID: cfg.NodeID, Listener: sshLn, StateDir: cfg.DataDir, Git: store.Git(),
		KeysCommand: cfg.Git.KeysCommand, PostReceive: cfg.Git.PostReceive,
		MaxPackBytes: cfg.Git.MaxPackBytes, MaxSessions: cfg.Git.MaxSessions,
		IdleTimeout: cfg.Git.IdleTimeout, MaxTimeout: cfg.Git.MaxTimeout,
		MaxRefsPerPush: cfg.Git.MaxRefsPerPush,
		MaxStartups:    cfg.Git.MaxStartups, PerSourceMaxStartups: cfg.Git.PerSourceMaxStartups,
		LoginGraceTime:     cfg.Git.LoginGraceTime,
		MaxSessionsPerUser: cfg.Git.MaxSessionsPerUser, MaxSessionsPerConnection: cfg.Git.MaxSessionsPerConnection,
		MinRateBytes: cfg.Git.MinRateBytes, MinRateWindow: cfg.Git.MinRateWindow,
		AllowAnySHA1InWant: cfg.Git.AllowAnySHA1InWant,
	}, n.Replicas(), logger)
	if err != nil {
		n.Close()
		sshLn.Close()
		return nil, err
	}
	n.Replicas().SetSessionHandler(func(ctx context.Context, service, repo, user string, publicKey []byte, gitProtocol string, stdin io.Reader, stdout, stderr io.Writer) int {
		return srv.ServeProxied(ctx, service, repo, user, publicKey, gitProtocol, stdin, stdout, stderr)
	})
	ctx, cancel := context.WithCancel(context.Background())
	r := &runningNode{node: n, ssh: srv, cancel: cancel, log: logger}
	if err := startDatabaseAgents(ctx, cfg, n, logger); err != nil {
		cancel()
		srv.Close()
		n.Close()
		return nil, err
	}
	if err := startMailAgent(ctx, cfg, n, logger); err != nil {
		cancel()
		srv.Close()
		n.Close()
		return nil, err
	}
	go func() {
		if err := srv.Serve(ctx); err != nil && ctx.Err() == nil {
			logger.Error("ssh server stopped", "node", cfg.NodeID, "err", err)
		}
	}()
	return r, nil
}

// SSHAddr is where the node takes git over SSH.
func (r *runningNode) SSHAddr() string { return r.ssh.Addr() }

func (r *runningNode) Close() error {
	r.cancel()
	err := r.ssh.Close()
	if cerr := r.node.Close(); cerr != nil {
		err = errors.Join(err, cerr)
	}
	return err
}
