package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/spf13/cobra"
	gossh "golang.org/x/crypto/ssh"

	"github.com/gitraft/gitraft/cluster"
	"github.com/gitraft/gitraft/gitproto"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	"github.com/gitraft/gitraft/storage"
)

// gitBackend adapts a cluster node and its repositories to what the SSH
// front end needs.
type gitBackend struct {
	n        *cluster.Node
	store    *storage.Store
	hostKeys []gossh.Signer // from git.host_key_files
	log      *slog.Logger
}

// HostSigners returns the node's host key files. A node without any
// serves the key an older gitraft kept in the replicated state, if there is
// one, and says how to move it to a file.
func (b gitBackend) HostSigners(ctx context.Context) ([]gossh.Signer, error) {
	if len(b.hostKeys) > 0 {
		return b.hostKeys, nil
	}
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		if hk, ok := b.n.HostKey(); ok {
			s, err := gossh.ParsePrivateKey(hk.GetPrivateKey())
			if err != nil {
				return nil, err
			}
			b.log.Warn("serving the SSH host key kept in the replicated state, where every raft.db and snapshot holds it in cleartext: "+
				"export it once with `gitraft cluster host-key export --out FILE`, copy FILE to every node (mode 0600) and set git.host_key_files, "+
				"then run `gitraft cluster host-key forget-private`", "fingerprint", hk.GetFingerprint())
			return []gossh.Signer{s}, nil
		}
		if ok, _ := b.n.Ready(); ok {
			return nil, errors.New("no SSH host key: set git.host_key_files to a key made with `gitraft ca host-key` (the same file on every node)")
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}

func (b gitBackend) UserForKey(ctx context.Context, key gossh.PublicKey) (string, error) {
	u, err := b.n.UserForKey(ctx, gossh.FingerprintSHA256(key))
	if errors.Is(err, cluster.ErrUnknownKey) {
		return "", gitproto.ErrUnknownKey
	}
	if errors.Is(err, cluster.ErrNotCurrent) {
		return u, notCurrent{err}
	}
	return u, err
}

// notCurrent carries the cluster's explanation as gitproto.ErrNotCurrent.
type notCurrent struct{ err error }

func (e notCurrent) Error() string        { return e.err.Error() }
func (e notCurrent) Is(target error) bool { return target == gitproto.ErrNotCurrent }
func (e notCurrent) Unwrap() error        { return e.err }

func (b gitBackend) Access(ctx context.Context, repo, user string) (gitproto.Access, error) {
	a, err := b.n.RepoAccess(ctx, repo, user)
	if errors.Is(err, cluster.ErrRepoNotFound) {
		return gitproto.AccessNone, gitproto.ErrRepoNotFound
	}
	if err != nil {
		return gitproto.AccessNone, err
	}
	switch a {
	case fsmv1.Access_ACCESS_READ:
		return gitproto.AccessRead, nil
	case fsmv1.Access_ACCESS_WRITE:
		return gitproto.AccessWrite, nil
	case fsmv1.Access_ACCESS_ADMIN:
		return gitproto.AccessAdmin, nil
	}
	return gitproto.AccessNone, nil
}

func (b gitBackend) PrepareRead(ctx context.Context, repo string, progress func(string)) (gitproto.ReadPlan, error) {
	path, peer, err := b.n.PrepareRead(ctx, repo, progress)
	return gitproto.ReadPlan{Path: path, Peer: peer}, err
}

func (b gitBackend) Unreachable(ctx context.Context, repo string, oids []string) ([]string, error) {
	return b.store.Unreachable(ctx, repo, oids)
}

func (b gitBackend) BeginPush(ctx context.Context, repo, user, pushID string, progress func(string)) (gitproto.PushTx, error) {
	p, err := b.n.BeginPush(ctx, repo, user, pushID, progress)
	if errors.Is(err, cluster.ErrRepoNotFound) {
		return nil, gitproto.ErrRepoNotFound
	}
	var re *cluster.RedirectError
	if errors.As(err, &re) {
		return nil, &gitproto.Redirect{Peer: re.PeerAddr, PeerID: re.PeerID, Reason: re.Reason}
	}
	if err != nil {
		return nil, err
	}
	return pushTx{p}, nil
}

func (b gitBackend) Proxy(ctx context.Context, peer string, svc gitproto.Service, repo, user string, publicKey []byte, gitProtocol string, stdin io.Reader, stdout, stderr io.Writer) (int, error) {
	return b.n.ProxyGit(ctx, peer, string(svc), repo, user, publicKey, gitProtocol, stdin, stdout, stderr)
}

type pushTx struct{ p *cluster.Push }

func (t pushTx) Path() string    { return t.p.Path() }
func (t pushTx) Finish(ok bool)  { t.p.Finish(ok) }
func (t pushTx) Version() uint64 { return t.p.Version() }
func (t pushTx) Commit(ctx context.Context, quarantine string, updates []gitproto.RefUpdate, atomic bool, progress func(string)) ([]gitproto.RefUpdate, error) {
	changes := make([]cluster.RefChange, len(updates))
	for i, u := range updates {
		changes[i] = cluster.RefChange{Ref: u.Ref, Old: u.Old, New: u.New}
	}
	verdicts, err := t.p.Judge(ctx, quarantine, changes)
	if err != nil {
		return nil, err
	}
	committed, err := t.p.Commit(ctx, quarantine, verdicts, atomic, progress)
	out := make([]gitproto.RefUpdate, len(committed))
	for i, c := range committed {
		out[i] = gitproto.RefUpdate{Ref: c.Ref, Old: c.Old, New: c.New}
	}
	return out, err
}

// newHookCmd is `gitraft hook pre-receive`, which git runs inside a push.
func newHookCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "hook pre-receive",
		Short:  "Git hook entry point (run by git inside a push, not by people)",
		Hidden: true,
		Args:   cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			os.Exit(gitproto.RunHook(args[0], os.Stdin, os.Stderr, os.Getenv))
			return nil
		},
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
			tlsFiles := cluster.TLSFiles{
				CAFile:   os.Getenv("GITRAFT_TLS_CA_FILE"),
				CertFile: os.Getenv("GITRAFT_TLS_CERT_FILE"),
				KeyFile:  os.Getenv("GITRAFT_TLS_KEY_FILE"),
			}
			insecure := envBool("GITRAFT_INSECURE")
			os.Exit(cluster.RunNodeGit(cmd.Context(), args[0], args[1], args[2], tlsFiles, insecure, os.Stdin, os.Stdout, os.Stderr))
			return nil
		},
	}
}
