package main

import "github.com/spf13/cobra"

func newDBCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{Use: "db", Short: "PostgreSQL primary, switchover and failover", Hidden: true}
}
