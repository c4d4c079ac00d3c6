package gitproto

import (
	"context"
	"errors"
	"io"
	"strings"

	gossh "golang.org/x/crypto/ssh"
)

// Access is what a user may do with a repository.
type Access int

const (
	AccessNone Access = iota
	AccessRead
	AccessWrite
	AccessAdmin
)

// Errors a Backend returns; the front end turns them into one-line messages.
var (
	ErrRepoNotFound = errors.New("repository not found")
	ErrUnknownKey   = errors.New("unknown key")
	// ErrNotCurrent: the node cannot confirm its state is current (no
	// quorum from here); the session is refused with the error's message.
	ErrNotCurrent = errors.New("node not current")
)

// Redirect is returned by BeginPush when another node should take the
// push; the front end then proxies the session there.
type Redirect struct {
	Peer, PeerID, Reason string
}

func (r *Redirect) Error() string { return r.Reason + "; handing the push to " + r.PeerID }

// RefUpdate is one ref change of a push, as git's pre-receive hook sees it.
// Old or New is "" for a created or deleted ref.
type RefUpdate struct {
	Ref, Old, New string
}

// ParseRefUpdates reads pre-receive input: "<old> <new> <ref>" per line,
// with git's all-zero id meaning absent.
func ParseRefUpdates(r io.Reader) ([]RefUpdate, error) {
	b, err := io.ReadAll(io.LimitReader(r, 64<<20))
	if err != nil {
		return nil, err
	}
	var out []RefUpdate
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if line == "" {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 3 || !isOID(f[0]) || !isOID(f[1]) {
			return nil, errors.New("malformed pre-receive line: " + line)
		}
		out = append(out, RefUpdate{Ref: f[2], Old: zeroToEmpty(f[0]), New: zeroToEmpty(f[1])})
	}
	return out, nil
}

func isOID(s string) bool {
	if len(s) != 40 && len(s) != 64 {
		return false
	}
	for _, r := range s {
		if !(r >= '0' && r <= '9' || r >= 'a' && r <= 'f') {
			return false
		}
	}
	return true
}

func zeroToEmpty(oid string) string {
	if strings.Trim(oid, "0") == "" {
		return ""
	}
	return oid
}

// ReadPlan says where a read is served: from Path on this node, or by
// proxying to Peer when this node could not catch up in time.
type ReadPlan struct {
	Path string
	Peer string
}

// PushTx is one push holding its repository's write lock on this node.
type PushTx interface {
	// Path is the local bare repository git receive-pack runs in.
	Path() string
	// Commit decides, ref by ref, what git will accept of updates (the
	// same checks receive-pack makes after the hook), makes the quarantined
	// objects durable on a quorum and commits the accepted changes through
	// Raft, all or nothing. It returns the committed changes: git refuses
	// the others itself and tells the client why. With atomic (the client
	// asked for it), one refused ref refuses the push. A refusal (stale ref,
	// lost lock, no quorum) is an error whose message is for the pusher.
	Commit(ctx context.Context, quarantine string, updates []RefUpdate, atomic bool, progress func(string)) ([]RefUpdate, error)
	// Finish ends the push once git is done (ok: receive-pack succeeded),
	// records the local version and releases the write lock.
	Finish(ok bool)
	// Version is the version the push committed (0 before Commit).
	Version() uint64
}

// Backend is what the SSH front end needs from the cluster.
type Backend interface {
	// HostSigners returns the node's SSH host keys, in the order configured.
	// The server offers the first key of each type; further keys of a type
	// are only announced (to known_hosts), which lets an operator roll a new
	// key out to clients before the nodes serve it.
	HostSigners(ctx context.Context) ([]gossh.Signer, error)
	// UserForKey says whose key this is (ErrUnknownKey if nobody's). With
	// ErrNotCurrent it also names the user the node's own, possibly stale,
	// state knows, so the session can be refused with a message.
	UserForKey(ctx context.Context, key gossh.PublicKey) (string, error)
	// Access returns the user's access to a repository (canonical name),
	// after a read barrier; ErrRepoNotFound if there is no such repository.
	Access(ctx context.Context, repo, user string) (Access, error)
	// PrepareRead makes sure a read is not stale: this node's copy is at the
	// committed version (catching up first), or a current peer is named.
	PrepareRead(ctx context.Context, repo string, progress func(string)) (ReadPlan, error)
	// Unreachable returns which of oids (full, lowercase object ids) no ref
	// of the repository reaches on this node's copy, objects it lacks
	// included: what a client may not fetch by id.
	Unreachable(ctx context.Context, repo string, oids []string) ([]string, error)
	// BeginPush takes the repository's write lock for this node and brings
	// the local copy to the committed version.
	BeginPush(ctx context.Context, repo, user, pushID string, progress func(string)) (PushTx, error)
	// Proxy runs the session on a peer and returns git's exit code there.
	// The peer checks the key and the access again (ServeProxied).
	Proxy(ctx context.Context, peer string, svc Service, repo, user string, publicKey []byte, gitProtocol string, stdin io.Reader, stdout, stderr io.Writer) (int, error)
}
