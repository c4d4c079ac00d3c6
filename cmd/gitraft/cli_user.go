package main

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	gossh "golang.org/x/crypto/ssh"

	"github.com/gitraft/gitraft/cluster"
	userv1 "github.com/gitraft/gitraft/proto/gitraft/user/v1"
)

// newUserCmd is `gitraft user`: the people who push and clone.
func newUserCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{Use: "user", Short: "Add, list and remove users"}
	cmd.AddCommand(
		&cobra.Command{
			Use: "add NAME", Short: "Add a user", Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				ctx, conn, done, err := g.connect(cmd)
				if err != nil {
					return err
				}
				defer done()
				resp, err := userv1.NewUserServiceClient(conn).CreateUser(ctx, &userv1.CreateUserRequest{Name: args[0]})
				if err != nil {
					return rpcError("add user "+strconv.Quote(args[0]), err)
				}
				if g.JSON {
					return printProtoJSON(cmd.OutOrStdout(), resp)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "added user %s at index %d; next: gitraft key add %s ~/.ssh/id_ed25519.pub\n", args[0], resp.GetIndex(), args[0])
				return nil
			},
		},
		&cobra.Command{
			Use: "ls", Aliases: []string{"list"}, Short: "List users", Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				ctx, conn, done, err := g.connect(cmd)
				if err != nil {
					return err
				}
				defer done()
				resp, err := userv1.NewUserServiceClient(conn).ListUsers(ctx, &userv1.ListUsersRequest{})
				if err != nil {
					return rpcError("list users", err)
				}
				if g.JSON {
					return printProtoJSON(cmd.OutOrStdout(), resp)
				}
				if len(resp.GetUsers()) == 0 {
					fmt.Fprintln(cmd.OutOrStdout(), "no users")
					return nil
				}
				t := newTable(cmd.OutOrStdout(), "NAME", "KEYS", "CREATED")
				for _, u := range resp.GetUsers() {
					t.row(u.GetName(), strconv.Itoa(int(u.GetKeyCount())), ago(time.Now(), u.GetCreatedAt()))
				}
				return t.flush()
			},
		},
		&cobra.Command{
			Use: "rm NAME", Aliases: []string{"remove"}, Short: "Remove a user with their keys and grants", Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				ctx, conn, done, err := g.connect(cmd)
				if err != nil {
					return err
				}
				defer done()
				resp, err := userv1.NewUserServiceClient(conn).DeleteUser(ctx, &userv1.DeleteUserRequest{Name: args[0]})
				if err != nil {
					return rpcError("remove user "+strconv.Quote(args[0]), err)
				}
				if g.JSON {
					return printProtoJSON(cmd.OutOrStdout(), resp)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "removed user %s with their keys and grants at index %d\n", args[0], resp.GetIndex())
				return nil
			},
		},
	)
	return cmd
}

// readKeyArg reads an authorized_keys line from a file, or stdin for "-".
func readKeyArg(cmd *cobra.Command, arg string) (string, error) {
	var b []byte
	var err error
	if arg == "-" {
		b, err = io.ReadAll(io.LimitReader(cmd.InOrStdin(), 64<<10))
	} else {
		b, err = os.ReadFile(arg)
		if os.IsNotExist(err) && (strings.HasPrefix(arg, "ssh-") || isKeyLine(arg)) {
			return arg, nil // the key itself, quoted on the command line
		}
	}
	if err != nil {
		return "", fmt.Errorf("read public key: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
			return line, nil
		}
	}
	return "", fmt.Errorf("no public key in %s", arg)
}

// isKeyLine reports whether s parses as an authorized_keys line (with or
// without options).
func isKeyLine(s string) bool {
	_, _, _, _, err := gossh.ParseAuthorizedKey([]byte(s))
	return err == nil
}

// newKeyCmd is `gitraft key`: users' SSH public keys.
func newKeyCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{Use: "key", Short: "Add, list and remove users' SSH keys"}
	cmd.AddCommand(
		&cobra.Command{
			Use:   "add USER FILE|-|'ssh-ed25519 AAAA...'",
			Short: "Register a public key for a user (from a .pub file, stdin, or the key itself)",
			Args:  cobra.ExactArgs(2),
			RunE: func(cmd *cobra.Command, args []string) error {
				line, err := readKeyArg(cmd, args[1])
				if err != nil {
					return err
				}
				// The node checks too; checking here says it before
				// connecting, and against a node that does not.
				if _, err := cluster.ParseAuthorizedKey(line); err != nil {
					return fmt.Errorf("add key for %q: %w", args[0], err)
				}
				ctx, conn, done, err := g.connect(cmd)
				if err != nil {
					return err
				}
				defer done()
				resp, err := userv1.NewUserServiceClient(conn).AddKey(ctx, &userv1.AddKeyRequest{User: args[0], PublicKey: line})
				if err != nil {
					return rpcError("add key for "+strconv.Quote(args[0]), err)
				}
				if g.JSON {
					return printProtoJSON(cmd.OutOrStdout(), resp)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "added key %s for %s at index %d\n", resp.GetKey().GetFingerprint(), args[0], resp.GetIndex())
				return nil
			},
		},
		&cobra.Command{
			Use: "ls [USER]", Aliases: []string{"list"}, Short: "List keys (of one user, or all)", Args: cobra.MaximumNArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				user := ""
				if len(args) == 1 {
					user = args[0]
				}
				ctx, conn, done, err := g.connect(cmd)
				if err != nil {
					return err
				}
				defer done()
				resp, err := userv1.NewUserServiceClient(conn).ListKeys(ctx, &userv1.ListKeysRequest{User: user})
				if err != nil {
					return rpcError("list keys", err)
				}
				if g.JSON {
					return printProtoJSON(cmd.OutOrStdout(), resp)
				}
				if len(resp.GetKeys()) == 0 {
					fmt.Fprintln(cmd.OutOrStdout(), "no keys")
					return nil
				}
				t := newTable(cmd.OutOrStdout(), "USER", "FINGERPRINT", "TYPE", "COMMENT", "ADDED")
				for _, k := range resp.GetKeys() {
					typ, _, _ := strings.Cut(k.GetPublicKey(), " ")
					t.row(k.GetUser(), k.GetFingerprint(), typ, k.GetComment(), ago(time.Now(), k.GetAddedAt()))
				}
				return t.flush()
			},
		},
		&cobra.Command{
			Use: "rm FINGERPRINT", Aliases: []string{"remove"}, Short: "Remove a key by its SHA256 fingerprint", Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				ctx, conn, done, err := g.connect(cmd)
				if err != nil {
					return err
				}
				defer done()
				resp, err := userv1.NewUserServiceClient(conn).RemoveKey(ctx, &userv1.RemoveKeyRequest{Fingerprint: args[0]})
				if err != nil {
					return rpcError("remove key "+args[0], err)
				}
				if g.JSON {
					return printProtoJSON(cmd.OutOrStdout(), resp)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "removed key %s at index %d\n", args[0], resp.GetIndex())
				return nil
			},
		},
	)
	return cmd
}

func parseAccess(s string) (userv1.Access, error) {
	switch strings.ToLower(s) {
	case "read", "r":
		return userv1.Access_ACCESS_READ, nil
	case "write", "w", "rw":
		return userv1.Access_ACCESS_WRITE, nil
	case "admin":
		return userv1.Access_ACCESS_ADMIN, nil
	}
	return 0, fmt.Errorf("access %q: use read, write or admin", s)
}

func accessName(a userv1.Access) string {
	return strings.ToLower(strings.TrimPrefix(a.String(), "ACCESS_"))
}

// newRepoGrantCmd is `gitraft repo grant REPO USER read|write|admin`.
func newRepoGrantCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "grant REPO USER read|write|admin",
		Short: "Give a user access to a repository",
		Args:  cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			a, err := parseAccess(args[2])
			if err != nil {
				return err
			}
			return setAccess(cmd, g, args[0], args[1], a)
		},
	}
}

// newRepoRevokeCmd is `gitraft repo revoke REPO USER`.
func newRepoRevokeCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "revoke REPO USER",
		Short: "Take a user's access to a repository away",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return setAccess(cmd, g, args[0], args[1], userv1.Access_ACCESS_NONE)
		},
	}
}

func setAccess(cmd *cobra.Command, g *globalOpts, repo, user string, a userv1.Access) error {
	ctx, conn, done, err := g.connect(cmd)
	if err != nil {
		return err
	}
	defer done()
	resp, err := userv1.NewUserServiceClient(conn).SetAccess(ctx, &userv1.SetAccessRequest{Repo: repo, User: user, Access: a})
	if err != nil {
		return rpcError(fmt.Sprintf("set %s's access to %s", user, repo), err)
	}
	if g.JSON {
		return printProtoJSON(cmd.OutOrStdout(), resp)
	}
	if a == userv1.Access_ACCESS_NONE {
		fmt.Fprintf(cmd.OutOrStdout(), "revoked %s's access to %s at index %d\n", user, repo, resp.GetIndex())
	} else {
		fmt.Fprintf(cmd.OutOrStdout(), "%s has %s access to %s (index %d)\n", user, accessName(a), repo, resp.GetIndex())
	}
	return nil
}
