package cluster

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
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

// ensureHostKey gives the cluster its SSH host key, once: the first leader
// makes one and commits it; every node then serves the same key, so one
// known_hosts line fits all of them and any load balancer in front.
func (n *Node) ensureHostKey(ctx context.Context) error {
	var have bool
	n.fsm.Read(func(s *State) { have = s.HostKey() != nil })
	if have {
		return nil
	}
	hk, err := newHostKey()
	if err != nil {
		return err
	}
	r, err := n.Propose(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_SetHostKey{SetHostKey: &fsmv1.SetHostKey{HostKey: hk}}})
	if err != nil {
		return err
	}
	if rf := r.GetRefusal(); rf != nil && rf.GetReason() != fsmv1.Reason_REASON_ALREADY_EXISTS {
		return refusal(r)
	}
	if r.GetRefusal() == nil {
		n.log.Info("created the cluster SSH host key", "fingerprint", hk.GetFingerprint(), "index", r.GetIndex())
	}
	return nil
}

func newHostKey() (*fsmv1.HostKey, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	blk, err := ssh.MarshalPrivateKey(priv, "gitraft cluster host key")
	if err != nil {
		return nil, err
	}
	sp, err := ssh.NewPublicKey(pub)
	if err != nil {
		return nil, err
	}
	return &fsmv1.HostKey{
		PrivateKey:  pem.EncodeToMemory(blk),
		PublicKey:   strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sp))),
		Fingerprint: ssh.FingerprintSHA256(sp),
	}, nil
}

// HostKey returns the cluster's SSH host key once it exists.
func (n *Node) HostKey() (*fsmv1.HostKey, bool) {
	var hk *fsmv1.HostKey
	n.fsm.Read(func(s *State) { hk = s.HostKey() })
	return hk, hk != nil
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
	hk, ok := s.n.HostKey()
	if !ok {
		return nil, status.Error(codes.Unavailable, "the cluster has no SSH host key yet; the leader makes one when it starts leading")
	}
	return &userv1.GetHostKeyResponse{PublicKey: hk.GetPublicKey(), Fingerprint: hk.GetFingerprint()}, nil
}
