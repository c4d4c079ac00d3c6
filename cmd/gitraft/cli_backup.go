package main

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/gitraft/gitraft/cluster/backup"
	backupv1 "github.com/gitraft/gitraft/proto/gitraft/backup/v1"
)

func newBackupCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "backup",
		Short: "Back up a cluster, check a backup, restore one as a new cluster",
		Long: `Back up the whole cluster into a directory of plain files (gitraft backup
create DEST), check such a directory (gitraft backup verify DEST), and bring it
up as a new cluster (gitraft backup restore DEST --config n1.yaml).

A backup holds the replicated state at one Raft index (users, keys, grants,
repositories and their refs, the database target, the mail state) and every
repository's packs. Backing up into the same directory again copies only the
packs it lacks.`,
	}
	cmd.AddCommand(newBackupCreateCmd(), newBackupVerifyCmd(), newBackupRestoreCmd())
	return cmd
}

func newBackupCreateCmd() *cobra.Command {
	g := &globalOpts{}
	var parallel int
	cmd := &cobra.Command{
		Use:   "create DEST",
		Short: "Take an online backup of the whole cluster into directory DEST",
		Long: `Take a consistent backup of the whole cluster into directory DEST without
stopping pushes: the replicated state at one Raft index (a read barrier on the
node at --addr), and every repository's packs at the version that index names.
When DEST holds an earlier backup, only packs it lacks are copied; packs and
states the new backup no longer names are removed once it is complete. The
manifest is written last: a backup that is cut off is never taken for a
complete one. The finished backup is recorded in the cluster, which every node
exports as gitraft_backup_last_success_timestamp_seconds.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, conn, done, err := g.connect(cmd)
			if err != nil {
				return err
			}
			defer done()
			ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
			defer stop()
			out := cmd.OutOrStdout()
			client := backupv1.NewBackupServiceClient(conn)
			m, err := backup.Create(ctx, backup.CreateOptions{
				Dir: args[0], Client: client, Parallel: parallel, Version: version,
				Progress: func(s string) { fmt.Fprintln(cmd.ErrOrStderr(), s) },
			})
			if err != nil {
				// Streams pass no unary interceptor: explain a node that
				// cannot be reached here.
				return rpcError("backup into "+args[0], g.explainConnError(err, conn.GetState()))
			}
			rec := m.Record()
			if g.JSON {
				if err := printProtoJSON(out, rec); err != nil {
					return err
				}
			} else {
				fmt.Fprintf(out, "backup of index %d written to %s in %s: %d repositories, %d packs, %s (%d packs, %s written)\n",
					m.Index, args[0], m.Finished.Sub(m.Started).Round(time.Millisecond), len(m.Repos), len(m.Packs), byteSize(int64(m.Bytes)), m.PacksWritten, byteSize(int64(m.BytesWritten)))
			}
			if _, err := client.RecordBackup(ctx, &backupv1.RecordBackupRequest{Backup: rec}); err != nil {
				return rpcError("the backup is complete, but recording it in the cluster failed (gitraft_backup_last_success_timestamp_seconds does not show it)", err)
			}
			return nil
		},
	}
	g.register(cmd.Flags())
	if f := cmd.Flags().Lookup("timeout"); f != nil {
		f.DefValue = "0s"
		f.Value.Set("0s")
		f.Usage = "how long the backup may take (0: no limit)"
	}
	cmd.Flags().IntVar(&parallel, "parallel", 4, "repositories copied at once")
	return cmd
}

func newBackupVerifyCmd() *cobra.Command {
	var parallel int
	cmd := &cobra.Command{
		Use:   "verify DEST",
		Short: "Check a backup: checksums, git verify-pack, refs connected, state decodes",
		Long: `Check the backup in directory DEST: the state file's checksum, that it decodes
and lists the repositories, versions and refs of the manifest; every pack's
size and SHA-256, and git verify-pack on it; and that each repository's refs
resolve in its packs with their whole history (git fsck --connectivity-only).
Every problem is printed, one a line; the exit status is 1 when there is any.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cmd.SilenceUsage = true
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			v, err := backup.Verify(ctx, backup.VerifyOptions{Dir: args[0], Parallel: parallel})
			if err != nil {
				return fmt.Errorf("verify %s: %w", args[0], err)
			}
			m := v.Manifest
			for _, p := range v.Problems {
				fmt.Fprintln(cmd.OutOrStdout(), "error: "+p.String())
			}
			if len(v.Problems) > 0 {
				return fmt.Errorf("backup %s (index %d) has %d problems", args[0], m.Index, len(v.Problems))
			}
			fmt.Fprintf(cmd.OutOrStdout(), "backup %s is good: index %d, taken %s, %d repositories, %d packs, %s\n",
				args[0], m.Index, m.Finished.Format(time.RFC3339), len(m.Repos), len(m.Packs), byteSize(int64(m.Bytes)))
			return nil
		},
	}
	cmd.Flags().IntVar(&parallel, "parallel", 4, "packs and repositories checked at once")
	return cmd
}

func newBackupRestoreCmd() *cobra.Command {
	var parallel int
	cmd := &cobra.Command{
		Use:   "restore DEST --config NODE.yaml",
		Short: "Make the data dir of the first node of a new cluster from a backup",
		Long: `Verify the backup in directory DEST, then make the data dir of the first node
of a NEW cluster from it: every repository at the backup's version, and the
replicated state as the node's initial Raft snapshot, with that node as the
only voter. The node's settings are serve's (--config, GITRAFT_*, flags):
node_id, data_dir (new and empty), raft_addr/raft_advertise and tls.

Then start it with gitraft serve and the same settings (no --bootstrap
needed), and start the other nodes with empty data dirs and --join: they fill
from it as any joining node does. The old cluster's members and write locks
are not restored.`,
		Args: cobra.ExactArgs(1),
	}
	load := configFlags(cmd.Flags())
	cmd.Flags().IntVar(&parallel, "parallel", 4, "packs and repositories checked at once")
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		cmd.SilenceUsage = true
		cfg, err := load()
		if err != nil {
			return err
		}
		logger, err := newLogger("text", "warn", os.Stderr)
		if err != nil {
			return err
		}
		ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		m, err := backup.Restore(ctx, backup.RestoreOptions{
			Dir: args[0], Node: cfg.clusterConfig(), Parallel: parallel, Logger: logger,
			Progress: func(s string) { fmt.Fprintln(cmd.ErrOrStderr(), s) },
		})
		if errors.Is(err, backup.ErrBadBackup) {
			return err
		}
		if err != nil {
			return fmt.Errorf("restore %s into %s: %w", args[0], cfg.DataDir, err)
		}
		fmt.Fprintf(cmd.OutOrStdout(), "restored the backup of index %d (%d repositories) into %s as node %s; start it with gitraft serve and the same settings, then join the other nodes to it\n",
			m.Index, len(m.Repos), cfg.DataDir, cfg.NodeID)
		return nil
	}
	return cmd
}
