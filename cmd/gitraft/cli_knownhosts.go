package main

import (
	"fmt"
	"net"
	"strings"

	"github.com/spf13/cobra"

	clusterv1 "github.com/gitraft/gitraft/proto/gitraft/cluster/v1"
	userv1 "github.com/gitraft/gitraft/proto/gitraft/user/v1"
)

// newClusterKnownHostsCmd prints known_hosts lines for the cluster's one SSH
// host key at every member's SSH address.
func newClusterKnownHostsCmd(g *globalOpts) *cobra.Command {
	var extra []string
	cmd := &cobra.Command{
		Use:   "known-hosts",
		Short: "Print known_hosts lines for the cluster's SSH host key (one key for every node)",
		Long: `Print a known_hosts line for the cluster's SSH host key, listing every
member's SSH address (and --host names, e.g. a load balancer). Every node
serves the same key, so one line fits them all:

  gitraft cluster known-hosts >> ~/.ssh/known_hosts`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			hk, err := userv1.NewUserServiceClient(conn).GetHostKey(ctx, &userv1.GetHostKeyRequest{})
			if err != nil {
				return rpcError("get the SSH host key", err)
			}
			st, err := clusterv1.NewClusterServiceClient(conn).GetStatus(ctx, &clusterv1.GetStatusRequest{})
			if err != nil {
				return rpcError("cluster status", err)
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
			fmt.Fprintf(cmd.OutOrStdout(), "%s %s\n", strings.Join(hosts, ","), hk.GetPublicKey())
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
