package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	gossh "golang.org/x/crypto/ssh"

	clusterv1 "github.com/gitraft/gitraft/proto/gitraft/cluster/v1"
	userv1 "github.com/gitraft/gitraft/proto/gitraft/user/v1"
)

// newClusterKnownHostsCmd prints known_hosts lines for the cluster's SSH
// host keys at every member's SSH address.
func newClusterKnownHostsCmd(g *globalOpts) *cobra.Command {
	var extra []string
	cmd := &cobra.Command{
		Use:   "known-hosts",
		Short: "Print known_hosts lines for the cluster's SSH host keys (the same keys on every node)",
		Long: `Print known_hosts lines for the cluster's SSH host keys, each listing every
member's SSH address (and --host names, e.g. a load balancer). Every node
serves the same keys, so the lines fit them all:

  gitraft cluster known-hosts >> ~/.ssh/known_hosts

There is one line per key the nodes announce (git.host_key_files): while a
key is being rotated, both the old and the new one, so clients can learn the
new key before the nodes serve it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			hk, err := userv1.NewUserServiceClient(conn).GetHostKey(ctx, &userv1.GetHostKeyRequest{})
			if err != nil {
				return rpcError("get the SSH host keys", err)
			}
			st, err := clusterv1.NewClusterServiceClient(conn).GetStatus(ctx, &clusterv1.GetStatusRequest{})
			if err != nil {
				return rpcError("cluster status", err)
			}
			if msg := st.GetSshHostKeyMismatch(); msg != "" {
				fmt.Fprintf(cmd.ErrOrStderr(), "warning: %s\n", msg)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), hk)
			}
			var hosts []string
			for _, m := range st.GetMembers() {
				if a := m.GetSshAddr(); a != "" {
					hosts = append(hosts, knownHostsName(a))
				}
			}
			for _, h := range extra {
				hosts = append(hosts, knownHostsName(h))
			}
			if len(hosts) == 0 {
				return fmt.Errorf("no member has an SSH address yet")
			}
			keys := hk.GetHostKeys()
			if len(keys) == 0 { // an older node answered
				keys = []*userv1.HostKey{{PublicKey: hk.GetPublicKey()}}
			}
			for _, k := range keys {
				fmt.Fprintf(cmd.OutOrStdout(), "%s %s\n", strings.Join(hosts, ","), k.GetPublicKey())
			}
			return nil
		},
	}
	cmd.Flags().StringArrayVar(&extra, "host", nil, "another name clients use (host or host:port), e.g. a load balancer")
	return cmd
}

// knownHostsName writes host:port the way OpenSSH's known_hosts does.
func knownHostsName(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	if port == "22" {
		return host
	}
	return "[" + host + "]:" + port
}

// newClusterHostKeyCmd is `gitraft cluster host-key`: moving the SSH host
// key an older gitraft kept in the replicated state to files.
func newClusterHostKeyCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "host-key",
		Short: "Move the SSH host key an older gitraft kept in the replicated state to files",
		Long: `Older gitraft kept the cluster's SSH host key, private part included, in the
replicated state, so every raft.db and snapshot held it in cleartext. Now each
node reads its host key from files (git.host_key_files). To move an old
cluster's key without changing what clients see:

  gitraft cluster host-key export --out ssh_host_ed25519_key
  # copy the file to every node (mode 0600), set git.host_key_files, restart
  # the nodes one at a time; gitraft cluster status warns while they differ
  gitraft cluster host-key forget-private

After forget-private, new snapshots no longer hold the private key. Raft log
entries written before still do until the log is compacted past them (after
the next snapshot), and old snapshot files and backups keep it for good.`,
	}
	var out string
	export := &cobra.Command{
		Use:   "export",
		Short: "Write the private SSH host key in the replicated state to a file (0600)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return fmt.Errorf("--out FILE is required: the file to write the private key to")
			}
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := userv1.NewUserServiceClient(conn).ExportStateHostKey(ctx, &userv1.ExportStateHostKeyRequest{})
			if err != nil {
				return rpcError("export the SSH host key", err)
			}
			s, err := writeHostKeyFile(out, resp.GetPrivateKey(), "gitraft-host-key")
			if err != nil {
				return fmt.Errorf("SSH host key: %w", err)
			}
			if err := writeHostKey(cmd.OutOrStdout(), g.JSON, out, s); err != nil {
				return err
			}
			if !g.JSON {
				fmt.Fprintf(cmd.OutOrStdout(), "when every node has it: gitraft cluster host-key forget-private\n")
			}
			return nil
		},
	}
	export.Flags().StringVar(&out, "out", "", "file to write the private key to (and FILE.pub the public key)")
	var force bool
	forget := &cobra.Command{
		Use:   "forget-private",
		Short: "Drop the private SSH host key from the replicated state (once every node has a key file)",
		Long: `Drop the private SSH host key from the replicated state. Refused while a
member announces no host key file of its own (it may still serve the key from
the state), unless --force. Snapshots taken afterwards no longer hold it; log
entries written before do until the log is compacted past them, and old
snapshots and backups keep it: if they may have leaked, rotate the key too.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			resp, err := userv1.NewUserServiceClient(conn).ForgetStateHostKey(ctx, &userv1.ForgetStateHostKeyRequest{Force: force})
			if err != nil {
				return rpcError("forget the private SSH host key", err)
			}
			if g.JSON {
				return printProtoJSON(cmd.OutOrStdout(), resp)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "the replicated state holds no private SSH host key from index %d on; snapshots taken from now on hold none\n", resp.GetIndex())
			return nil
		},
	}
	forget.Flags().BoolVar(&force, "force", false, "forget it even while members have no host key file")
	cmd.AddCommand(export, forget)
	return cmd
}

// readPublicKeyFile reads an authorized_keys-form public key file.
func readPublicKeyFile(path string) (gossh.PublicKey, error) {
	b, err := os.ReadFile(filepath.Clean(path))
	if err != nil {
		return nil, err
	}
	pub, _, _, _, err := gossh.ParseAuthorizedKey(b)
	return pub, err
}
