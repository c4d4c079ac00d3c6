package main

import (
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	gossh "golang.org/x/crypto/ssh"

	"github.com/gitraft/gitraft/cluster/pki"
)

const defaultCADir = "gitraft-ca"

// newCACmd is `gitraft ca`: the cluster's certificate authority, which signs
// the node and admin certificates used for mutual TLS.
func newCACmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "ca",
		Short: "Create the cluster's CA, issue node and admin certificates, make the SSH host key",
		Long: `Create the cluster's certificate authority and issue certificates with it.
Nodes and the admin command line authenticate each other with mutual TLS:
every node needs a node certificate, and people (or tools) an admin one.
The cluster's SSH host key is made here too, once, and copied to every node
like its TLS key.`,
	}
	cmd.PersistentFlags().BoolVar(&asJSON, "json", false, "print the paths written as JSON")
	cmd.AddCommand(newCAInitCmd(&asJSON), newCAIssueCmd(&asJSON), newCAHostKeyCmd(&asJSON))
	return cmd
}

func newCAInitCmd(asJSON *bool) *cobra.Command {
	var (
		dir, name string
		days      int
	)
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Create a new CA (certificate and private key) in --dir",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cmd.SilenceUsage = true
			if days <= 0 {
				return fmt.Errorf("--days must be positive, not %d", days)
			}
			certPath, err := pki.InitCA(dir, name, time.Duration(days)*24*time.Hour)
			if err != nil {
				return fmt.Errorf("create CA in %s: %w", dir, err)
			}
			out := cmd.OutOrStdout()
			if *asJSON {
				return printJSON(out, map[string]any{"dir": absPath(dir), "name": name, "ca_cert": absPath(certPath), "ca_key": absPath(filepath.Join(dir, pki.CAKeyFile)), "days": days})
			}
			fmt.Fprintf(out, "created CA %q in %s, valid for %d days\n", name, dir, days)
			fmt.Fprintf(out, "  certificate: %s (every node and admin needs it)\n", certPath)
			fmt.Fprintf(out, "  private key: %s (signs certificates: keep it secret, off the nodes if you can)\n", filepath.Join(dir, pki.CAKeyFile))
			fmt.Fprintf(out, "next: %s\n", "gitraft ca issue node NODE_ID"+dirFlag(dir)+" --host HOST")
			fmt.Fprintf(out, "      %s\n", "gitraft ca issue admin NAME"+dirFlag(dir))
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", defaultCADir, "directory to create the CA in")
	cmd.Flags().StringVar(&name, "name", "gitraft", "cluster name, written into the CA's subject")
	cmd.Flags().IntVar(&days, "days", 3650, "validity of the CA certificate, in days")
	return cmd
}

// dirFlag is the " --dir DIR" to repeat in a suggested command, or "" for
// the default.
func dirFlag(dir string) string {
	if filepath.Clean(dir) == defaultCADir {
		return ""
	}
	return " --dir " + shellQuote(dir)
}

func newCAIssueCmd(asJSON *bool) *cobra.Command {
	var (
		dir, outDir string
		hosts       []string
		days        int
	)
	cmd := &cobra.Command{
		Use:   "issue node|admin NAME",
		Short: "Issue a node or admin certificate signed by the CA",
		Long: `Issue a certificate signed by the CA in --dir.

A node certificate's NAME is the node's ID; give every address other nodes and
clients reach it at with --host (IPs or DNS names, repeatable). An admin
certificate is for people and tools using the admin API.`,
		Example: `  gitraft ca issue node n1 --host 10.0.0.1 --host n1.example.com
  gitraft ca issue admin alice`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			cmd.SilenceUsage = true
			var role pki.Role
			switch args[0] {
			case string(pki.RoleNode):
				role = pki.RoleNode
			case string(pki.RoleAdmin):
				role = pki.RoleAdmin
			default:
				return fmt.Errorf("unknown certificate kind %q: use `gitraft ca issue node NAME` or `gitraft ca issue admin NAME`", args[0])
			}
			if days <= 0 {
				return fmt.Errorf("--days must be positive, not %d", days)
			}
			opt := pki.IssueOptions{Role: role, Name: args[1], Hosts: hosts, OutDir: outDir, Validity: time.Duration(days) * 24 * time.Hour}
			certPath, keyPath, err := pki.Issue(dir, opt)
			if err != nil {
				return fmt.Errorf("issue %s certificate %q with the CA in %s: %w", role, args[1], dir, err)
			}
			caPath := filepath.Join(dir, pki.CACertFile)
			return writeIssued(cmd.OutOrStdout(), *asJSON, role, args[1], caPath, certPath, keyPath)
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "dir", defaultCADir, "the CA's directory (from gitraft ca init)")
	f.StringVar(&outDir, "out", "", "directory to write the certificate and key to (default: the CA's directory)")
	f.StringArrayVar(&hosts, "host", nil, "IP address or DNS name the node is reached at (repeatable; node certificates)")
	f.IntVar(&days, "days", int(pki.DefaultValidity/(24*time.Hour)), "validity of the certificate, in days")
	return cmd
}

func newCAHostKeyCmd(asJSON *bool) *cobra.Command {
	var dir, out string
	cmd := &cobra.Command{
		Use:   "host-key",
		Short: "Make the cluster's SSH host key file (once; copy it to every node)",
		Long: `Make a new ed25519 SSH host key: the private key in --out (default
` + HostKeyFile + ` in the CA's directory, mode 0600) and the public key next to
it (.pub). Every node serves the same key, so one known_hosts line fits them all
and any load balancer in front: copy the file to each node, like its TLS key,
and name it in the node's configuration (git.host_key_files). The private key
never enters the Raft log or snapshots; only its public part does.

To rotate, make another key with a new --out and follow "Rotating the SSH host
key" in the README.`,
		Example: `  gitraft ca host-key
  gitraft ca host-key --out gitraft-ca/ssh_host_ed25519_key.2025`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cmd.SilenceUsage = true
			if out == "" {
				out = filepath.Join(dir, HostKeyFile)
			}
			b, err := newHostKeyPEM("gitraft cluster host key")
			if err != nil {
				return err
			}
			s, err := writeHostKeyFile(out, b, "gitraft-host-key")
			if err != nil {
				return fmt.Errorf("SSH host key: %w", err)
			}
			return writeHostKey(cmd.OutOrStdout(), *asJSON, out, s)
		},
	}
	cmd.Flags().StringVar(&dir, "dir", defaultCADir, "the CA's directory (the key goes there unless --out says otherwise)")
	cmd.Flags().StringVar(&out, "out", "", "file to write the private key to (default: DIR/"+HostKeyFile+")")
	return cmd
}

// writeHostKey prints what `ca host-key` (or `cluster host-key export`) wrote.
func writeHostKey(w io.Writer, asJSON bool, path string, s gossh.Signer) error {
	fp := gossh.FingerprintSHA256(s.PublicKey())
	if asJSON {
		return printJSON(w, map[string]string{"key": absPath(path), "public_key": absPath(path + ".pub"), "fingerprint": fp})
	}
	fmt.Fprintf(w, "SSH host key %s:\n  private key: %s (copy to every node, mode 0600, readable only by gitraft)\n  public key:  %s.pub\n", fp, path, path)
	fmt.Fprintf(w, "in every node's configuration:\ngit:\n  host_key_files: [%s]\n", absPath(path))
	return nil
}

// writeIssued prints what `ca issue` wrote and how to use it.
func writeIssued(w io.Writer, asJSON bool, role pki.Role, name, caPath, certPath, keyPath string) error {
	caAbs, certAbs, keyAbs := absPath(caPath), absPath(certPath), absPath(keyPath)
	if asJSON {
		return printJSON(w, map[string]string{"role": string(role), "name": name, "ca_cert": caAbs, "cert": certAbs, "key": keyAbs})
	}
	fmt.Fprintf(w, "issued %s certificate %q:\n  certificate: %s\n  private key: %s\n", role, name, certPath, keyPath)
	switch role {
	case pki.RoleAdmin:
		fmt.Fprintf(w, "to use it with the gitraft command line:\n")
		fmt.Fprintf(w, "export GITRAFT_CACERT=%s GITRAFT_CLIENT_CERT=%s GITRAFT_CLIENT_KEY=%s\n", shellQuote(caAbs), shellQuote(certAbs), shellQuote(keyAbs))
	case pki.RoleNode:
		fmt.Fprintf(w, "in node %s's configuration:\n", name)
		fmt.Fprintf(w, "tls:\n  ca_file: %s\n  cert_file: %s\n  key_file: %s\n", caAbs, certAbs, keyAbs)
	}
	return nil
}

func absPath(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}

// shellQuote quotes s for a POSIX shell when it needs it.
func shellQuote(s string) string {
	if s != "" && strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("/._-+:,=@%", r))
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
