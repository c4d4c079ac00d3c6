package main

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"sync/atomic"
	"time"

	"github.com/spf13/cobra"
	gossh "golang.org/x/crypto/ssh"

	"github.com/gitraft/gitraft/cluster"
	"github.com/gitraft/gitraft/cluster/pki"
	"github.com/gitraft/gitraft/cluster/replica"
)

// hostSigners returns the node's host key files. A node without any
// serves the key an older gitraft kept in the replicated state, if there is
// one, and says how to move it to a file. n is set once the node runs.
func hostSigners(hostKeys []gossh.Signer, n *atomic.Pointer[cluster.Node], log *slog.Logger) func(context.Context) ([]gossh.Signer, error) {
	return func(ctx context.Context) ([]gossh.Signer, error) {
		if len(hostKeys) > 0 {
			return hostKeys, nil
		}
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			if node := n.Load(); node != nil {
				if hk, ok := node.HostKey(); ok {
					s, err := gossh.ParsePrivateKey(hk.GetPrivateKey())
					if err != nil {
						return nil, err
					}
					log.Warn("serving the SSH host key kept in the replicated state, where every raft.db and snapshot holds it in cleartext: "+
						"export it once with `gitraft cluster host-key export --out FILE`, copy FILE to every node (mode 0600) and set git.host_key_files, "+
						"then run `gitraft cluster host-key forget-private`", "fingerprint", hk.GetFingerprint())
					return []gossh.Signer{s}, nil
				}
				if ok, _ := node.Ready(); ok {
					return nil, errors.New("no SSH host key: set git.host_key_files to a key made with `gitraft ca host-key` (the same file on every node)")
				}
			}
			select {
			case <-ctx.Done():
				return nil, ctx.Err()
			case <-t.C:
			}
		}
	}
}

// newNodeGitCmd is `gitraft node-git ADDR SERVICE REPO`, the command git's
// ext:: transport runs when a node fetches objects from a peer.
func newNodeGitCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "node-git ADDR SERVICE REPO",
		Short:  "Node-to-node git transport (run by git when a node catches up, not by people)",
		Hidden: true,
		Args:   cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			tlsFiles := pki.Files{
				CA:   os.Getenv("GITRAFT_TLS_CA_FILE"),
				Cert: os.Getenv("GITRAFT_TLS_CERT_FILE"),
				Key:  os.Getenv("GITRAFT_TLS_KEY_FILE"),
			}
			insecure := envBool("GITRAFT_INSECURE")
			os.Exit(replica.RunNodeGit(cmd.Context(), args[0], args[1], args[2], tlsFiles, insecure, os.Stdin, os.Stdout, os.Stderr))
			return nil
		},
	}
}
