package gitproto

import (
	"errors"
	"fmt"
	"strings"
)

// Service is a git service a client may ask for.
type Service string

const (
	UploadPack    Service = "upload-pack"
	ReceivePack   Service = "receive-pack"
	UploadArchive Service = "upload-archive"
)

// ErrBadCommand is wrapped by every refusal of an SSH command.
var ErrBadCommand = errors.New("unsupported command")

// Command is a parsed git command from an SSH session.
type Command struct {
	Service Service
	// Repo as the client wrote it (quotes removed); see storage.CanonicalName.
	Repo string
}

// ParseCommand reads the command line of an SSH exec request, in either form
// git uses ("git-upload-pack 'repo.git'" or "git upload-pack '/repo'"), with
// single or double quotes. Anything else is refused.
func ParseCommand(args []string) (Command, error) {
	if len(args) == 0 {
		return Command{}, fmt.Errorf("%w: this is a git server; interactive shells are not offered (try: git clone ssh://HOST/REPO)", ErrBadCommand)
	}
	var svc, repo string
	switch {
	case len(args) == 2 && strings.HasPrefix(args[0], "git-"):
		svc, repo = strings.TrimPrefix(args[0], "git-"), args[1]
	case len(args) == 3 && args[0] == "git":
		svc, repo = args[1], args[2]
	default:
		return Command{}, fmt.Errorf("%w %q: only git-upload-pack, git-receive-pack and git-upload-archive are served", ErrBadCommand, strings.Join(args, " "))
	}
	switch Service(svc) {
	case UploadPack, ReceivePack, UploadArchive:
	default:
		return Command{}, fmt.Errorf("%w %q: only git-upload-pack, git-receive-pack and git-upload-archive are served", ErrBadCommand, "git-"+svc)
	}
	if repo == "" {
		return Command{}, fmt.Errorf("%w: no repository named", ErrBadCommand)
	}
	return Command{Service: Service(svc), Repo: repo}, nil
}
