package cluster

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	userv1 "github.com/gitraft/gitraft/proto/gitraft/user/v1"
	"github.com/gitraft/gitraft/storage"
)

// HostKey returns the SSH host key an older gitraft kept in the replicated
// state, while its private part is still there. Nodes without host key
// files serve it until it is moved to files and forgotten.
func (n *Node) HostKey() (*fsmv1.HostKey, bool) {
	var hk *fsmv1.HostKey
	n.fsm.Read(func(s *State) { hk = s.HostKey() })
	if len(hk.GetPrivateKey()) == 0 {
		return nil, false
	}
	return hk, true
}

// HostPublicKeys lists the public SSH host keys the cluster serves (see
// State.HostPublicKeys).
func (n *Node) HostPublicKeys() []HostPublicKey {
	var keys []HostPublicKey
	n.fsm.Read(func(s *State) { keys = s.HostPublicKeys() })
	return keys
}

// hostKeyMismatch says which members serve other SSH host keys than the
// rest, or "" when all serve the same ones. A member that announces none
// serves the key in the state (stateKey, its authorized_keys line) if there
// is one, else nothing (it runs an older gitraft, or has no key).
func hostKeyMismatch(members []*fsmv1.Member, stateKey string) string {
	if len(members) < 2 {
		return ""
	}
	sets := map[string][]string{}
	var order []string
	for _, m := range members {
		var fps []string
		for _, k := range m.GetSshHostKeys() {
			fps = append(fps, fingerprintOf(k))
		}
		set := strings.Join(fps, ",")
		switch {
		case set == "" && stateKey != "":
			set = fingerprintOf(stateKey) // the same key as in a file
		case set == "":
			set = "none"
		}
		if _, ok := sets[set]; !ok {
			order = append(order, set)
		}
		sets[set] = append(sets[set], m.GetId())
	}
	if len(sets) < 2 {
		return ""
	}
	var parts []string
	for _, set := range order {
		parts = append(parts, fmt.Sprintf("%s: %s", strings.Join(sets[set], ","), set))
	}
	return "members serve different SSH host keys (" + strings.Join(parts, "; ") + "); clients, and a load balancer in front, meet different keys on different nodes"
}

// fingerprintOf is the SHA256 fingerprint of an authorized_keys line, or
// the line itself if it does not parse.
func fingerprintOf(line string) string {
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(line))
	if err != nil {
		return line
	}
	return ssh.FingerprintSHA256(pub)
}

// watchHostKeys logs a warning when the members announce different SSH
// host keys, once per distinct difference, on every node.
func (n *Node) watchHostKeys() {
	last := ""
	for {
		select {
		case <-n.stop:
			return
		case <-time.After(10 * time.Second):
		}
		var msg string
		n.fsm.Read(func(s *State) { msg = hostKeyMismatch(s.Members(), s.stateHostPublicKey()) })
		if msg != "" && msg != last {
			n.log.Warn(msg + "; give every node the same git.host_key_files (see gitraft cluster status)")
		}
		last = msg
	}
}

// Refusals of a public key offered for a user.
var (
	ErrNotAKey = errors.New(`not an SSH public key in authorized_keys form (like "ssh-ed25519 AAAA... you@host")`)
	// ErrKeyOptions: the line has authorized_keys options (from=,
	// command=, no-port-forwarding, ...). gitraft would not enforce them,
	// so it refuses the key rather than accept it without its restrictions.
	ErrKeyOptions = errors.New("gitraft does not apply authorized_keys options")
)

// ParseAuthorizedKey reads one authorized_keys line into the form the state
// stores: the key, its SHA256 fingerprint and comment. A line with options
// is refused (ErrKeyOptions), naming them.
func ParseAuthorizedKey(line string) (*fsmv1.SSHKey, error) {
	pub, comment, options, _, err := ssh.ParseAuthorizedKey([]byte(strings.TrimSpace(line)))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNotAKey, err)
	}
	if len(options) > 0 {
		names := make([]string, len(options))
		for i, o := range options {
			if name, _, hasValue := strings.Cut(o, "="); hasValue {
				names[i] = name + "="
			} else {
				names[i] = o
			}
		}
		return nil, fmt.Errorf("%w: this key line has %s, which gitraft would not enforce; add the key without them (the line from %q on) if it may be used without those restrictions", ErrKeyOptions, strings.Join(names, ", "), pub.Type())
	}
	return &fsmv1.SSHKey{
		PublicKey:   strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub))),
		Fingerprint: ssh.FingerprintSHA256(pub),
		Comment:     comment,
	}, nil
}

type userService struct {
	userv1.UnimplementedUserServiceServer
	n *Node
}

func userToAPI(u *fsmv1.User, keys int) *userv1.User {
	return &userv1.User{Name: u.GetName(), CreatedAt: timestamppb.New(time.Unix(0, u.GetCreatedUnixNano())), KeyCount: int32(keys)}
}

func keyToAPI(k *fsmv1.SSHKey) *userv1.SSHKey {
	return &userv1.SSHKey{User: k.GetUser(), PublicKey: k.GetPublicKey(), Fingerprint: k.GetFingerprint(), Comment: k.GetComment(), AddedAt: timestamppb.New(time.Unix(0, k.GetAddedUnixNano()))}
}

func (s *userService) CreateUser(ctx context.Context, req *userv1.CreateUserRequest) (*userv1.CreateUserResponse, error) {
	if err := ValidateUserName(req.GetName()); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	r, err := s.n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_AddUser{AddUser: &fsmv1.AddUser{Name: req.GetName()}}})
	if err != nil {
		return nil, err
	}
	var u *fsmv1.User
	s.n.fsm.Read(func(st *State) { u, _ = st.User(req.GetName()) })
	if u == nil { // deleted again meanwhile
		u = &fsmv1.User{Name: req.GetName()}
	}
	return &userv1.CreateUserResponse{User: userToAPI(u, 0), Index: r.GetIndex()}, nil
}

func (s *userService) DeleteUser(ctx context.Context, req *userv1.DeleteUserRequest) (*userv1.DeleteUserResponse, error) {
	r, err := s.n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_RemoveUser{RemoveUser: &fsmv1.RemoveUser{Name: req.GetName()}}})
	if err != nil {
		return nil, err
	}
	return &userv1.DeleteUserResponse{Index: r.GetIndex()}, nil
}

func (s *userService) ListUsers(ctx context.Context, _ *userv1.ListUsersRequest) (*userv1.ListUsersResponse, error) {
	if _, err := s.n.ReadBarrier(ctx); err != nil {
		return nil, err
	}
	resp := &userv1.ListUsersResponse{}
	s.n.fsm.Read(func(st *State) {
		for _, u := range st.Users() {
			resp.Users = append(resp.Users, userToAPI(u, len(st.Keys(u.GetName()))))
		}
		resp.Index = st.Index()
	})
	return resp, nil
}

func (s *userService) AddKey(ctx context.Context, req *userv1.AddKeyRequest) (*userv1.AddKeyResponse, error) {
	k, err := ParseAuthorizedKey(req.GetPublicKey())
	if err != nil {
		return nil, err
	}
	k.User = req.GetUser()
	r, err := s.n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_AddKey{AddKey: &fsmv1.AddKey{Key: k}}})
	if err != nil {
		return nil, err
	}
	return &userv1.AddKeyResponse{Key: keyToAPI(k), Index: r.GetIndex()}, nil
}

func (s *userService) RemoveKey(ctx context.Context, req *userv1.RemoveKeyRequest) (*userv1.RemoveKeyResponse, error) {
	r, err := s.n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_RemoveKey{RemoveKey: &fsmv1.RemoveKey{Fingerprint: req.GetFingerprint()}}})
	if err != nil {
		return nil, err
	}
	return &userv1.RemoveKeyResponse{Index: r.GetIndex()}, nil
}

func (s *userService) ListKeys(ctx context.Context, req *userv1.ListKeysRequest) (*userv1.ListKeysResponse, error) {
	if _, err := s.n.ReadBarrier(ctx); err != nil {
		return nil, err
	}
	resp := &userv1.ListKeysResponse{}
	var missing bool
	s.n.fsm.Read(func(st *State) {
		if req.GetUser() != "" {
			_, ok := st.User(req.GetUser())
			missing = !ok
		}
		for _, k := range st.Keys(req.GetUser()) {
			resp.Keys = append(resp.Keys, keyToAPI(k))
		}
		resp.Index = st.Index()
	})
	if missing {
		return nil, status.Errorf(codes.NotFound, "user %q not found", req.GetUser())
	}
	return resp, nil
}

func (s *userService) SetAccess(ctx context.Context, req *userv1.SetAccessRequest) (*userv1.SetAccessResponse, error) {
	name, err := storage.CanonicalName(req.GetRepo())
	if err != nil {
		return nil, err
	}
	if req.GetAccess() == userv1.Access_ACCESS_UNSPECIFIED {
		return nil, status.Error(codes.InvalidArgument, "access must be read, write, admin or none")
	}
	r, err := s.n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_SetGrant{SetGrant: &fsmv1.SetGrant{Repo: name, User: req.GetUser(), Access: fsmv1.Access(req.GetAccess())}}})
	if err != nil {
		return nil, err
	}
	return &userv1.SetAccessResponse{Index: r.GetIndex()}, nil
}

func (s *userService) ListGrants(ctx context.Context, req *userv1.ListGrantsRequest) (*userv1.ListGrantsResponse, error) {
	name, err := storage.CanonicalName(req.GetRepo())
	if err != nil {
		return nil, err
	}
	if _, err := s.n.ReadBarrier(ctx); err != nil {
		return nil, err
	}
	resp := &userv1.ListGrantsResponse{}
	var found bool
	s.n.fsm.Read(func(st *State) {
		_, found = st.Repo(name)
		for _, g := range st.Grants(name) {
			resp.Grants = append(resp.Grants, &userv1.Grant{Repo: g.GetRepo(), User: g.GetUser(), Access: userv1.Access(g.GetAccess())})
		}
		resp.Index = st.Index()
	})
	if !found {
		return nil, status.Errorf(codes.NotFound, "repository %q not found", name)
	}
	return resp, nil
}

func (s *userService) GetHostKey(ctx context.Context, _ *userv1.GetHostKeyRequest) (*userv1.GetHostKeyResponse, error) {
	if _, err := s.n.ReadBarrier(ctx); err != nil {
		return nil, err
	}
	keys := s.n.HostPublicKeys()
	if len(keys) == 0 {
		return nil, status.Error(codes.FailedPrecondition, "no member has announced an SSH host key yet: nodes announce the keys of their git.host_key_files (made with `gitraft ca host-key`) a moment after they join")
	}
	resp := &userv1.GetHostKeyResponse{}
	for _, k := range keys {
		resp.HostKeys = append(resp.HostKeys, &userv1.HostKey{PublicKey: k.PublicKey, Fingerprint: fingerprintOf(k.PublicKey), Members: k.Members, InState: k.InState})
	}
	resp.PublicKey, resp.Fingerprint = resp.HostKeys[0].GetPublicKey(), resp.HostKeys[0].GetFingerprint()
	return resp, nil
}

func (s *userService) ExportStateHostKey(ctx context.Context, _ *userv1.ExportStateHostKeyRequest) (*userv1.ExportStateHostKeyResponse, error) {
	if _, err := s.n.ReadBarrier(ctx); err != nil {
		return nil, err
	}
	hk, ok := s.n.HostKey()
	if !ok {
		return nil, status.Error(codes.NotFound, "the replicated state holds no private SSH host key (none was ever made there, or it was forgotten)")
	}
	s.n.log.Warn("the SSH host key in the replicated state was exported", "fingerprint", hk.GetFingerprint())
	return &userv1.ExportStateHostKeyResponse{PrivateKey: hk.GetPrivateKey(), PublicKey: hk.GetPublicKey(), Fingerprint: hk.GetFingerprint()}, nil
}

func (s *userService) ForgetStateHostKey(ctx context.Context, req *userv1.ForgetStateHostKeyRequest) (*userv1.ForgetStateHostKeyResponse, error) {
	r, err := s.n.commit(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_ForgetHostPrivateKey{ForgetHostPrivateKey: &fsmv1.ForgetHostPrivateKey{Force: req.GetForce()}}})
	if err != nil {
		return nil, err
	}
	s.n.log.Info("forgot the private SSH host key in the replicated state; it leaves the disk with the next snapshot", "index", r.GetIndex())
	return &userv1.ForgetStateHostKeyResponse{Index: r.GetIndex()}, nil
}
