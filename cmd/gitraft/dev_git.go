package main

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strings"

	gossh "golang.org/x/crypto/ssh"

	"github.com/gitraft/gitraft/cluster"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

// devGitInfo is how to reach a dev cluster with git.
type devGitInfo struct {
	User       string   `json:"user"`
	Key        string   `json:"key"`
	KnownHosts string   `json:"known_hosts"`
	SSHCommand string   `json:"ssh_command"`
	Repo       string   `json:"repo"`
	CloneURLs  []string `json:"clone_urls"`
}

// devGitSetup registers the user's own SSH key (or makes one under dir),
// writes a known_hosts file for the cluster host key (hostPub, its public
// key file), and creates a demo
// repository the user may push to.
func devGitSetup(ctx context.Context, n *cluster.Node, dir, hostPub string, nodes []devNodeInfo) (devGitInfo, error) {
	var info devGitInfo
	name := "dev"
	if u, err := user.Current(); err == nil && cluster.ValidateUserName(strings.ToLower(u.Username)) == nil {
		name = strings.ToLower(u.Username)
	}
	info.User = name
	pub, priv, err := devKey(dir)
	if err != nil {
		return info, err
	}
	info.Key = priv
	line, err := os.ReadFile(pub)
	if err != nil {
		return info, err
	}
	key, err := cluster.ParseAuthorizedKey(string(line))
	if err != nil {
		return info, err
	}
	key.User = name
	propose := func(e *fsmv1.Entry) error {
		r, err := n.Propose(ctx, e)
		if err != nil {
			return err
		}
		if rf := r.GetRefusal(); rf != nil && rf.GetReason() != fsmv1.Reason_REASON_ALREADY_EXISTS {
			return errors.New(rf.GetMessage())
		}
		return nil
	}
	info.Repo = "demo"
	for _, e := range []*fsmv1.Entry{
		{Command: &fsmv1.Entry_AddUser{AddUser: &fsmv1.AddUser{Name: name}}},
		{Command: &fsmv1.Entry_AddKey{AddKey: &fsmv1.AddKey{Key: key}}},
		{Command: &fsmv1.Entry_CreateRepo{CreateRepo: &fsmv1.CreateRepo{Name: info.Repo}}},
		{Command: &fsmv1.Entry_SetGrant{SetGrant: &fsmv1.SetGrant{Repo: info.Repo, User: name, Access: fsmv1.Access_ACCESS_ADMIN}}},
	} {
		if err := propose(e); err != nil {
			return info, err
		}
	}
	hk, err := readPublicKeyFile(hostPub)
	if err != nil {
		return info, fmt.Errorf("the cluster's SSH host key: %w", err)
	}
	var hosts []string
	for _, nd := range nodes {
		hosts = append(hosts, "["+strings.Replace(nd.SSHAddr, ":", "]:", 1))
		info.CloneURLs = append(info.CloneURLs, fmt.Sprintf("ssh://git@%s/%s.git", nd.SSHAddr, info.Repo))
	}
	info.KnownHosts = filepath.Join(dir, "known_hosts")
	if err := os.WriteFile(info.KnownHosts, []byte(strings.Join(hosts, ",")+" "+cluster.NormalizePublicKey(string(gossh.MarshalAuthorizedKey(hk)))+"\n"), 0o600); err != nil {
		return info, err
	}
	info.SSHCommand = fmt.Sprintf("ssh -i %s -o IdentitiesOnly=yes -o UserKnownHostsFile=%s", priv, info.KnownHosts)
	return info, nil
}

// devKey finds the user's SSH key, or makes one in dir.
func devKey(dir string) (pub, priv string, err error) {
	if home, err := os.UserHomeDir(); err == nil {
		for _, name := range []string{"id_ed25519", "id_ecdsa", "id_rsa"} {
			p := filepath.Join(home, ".ssh", name)
			if _, err := os.Stat(p + ".pub"); err == nil {
				if _, err := os.Stat(p); err == nil {
					return p + ".pub", p, nil
				}
			}
		}
	}
	priv = filepath.Join(dir, "id_ed25519")
	if _, err := os.Stat(priv); err == nil {
		return priv + ".pub", priv, nil
	}
	pk, sk, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return "", "", err
	}
	blk, err := gossh.MarshalPrivateKey(sk, "gitraft-dev")
	if err != nil {
		return "", "", err
	}
	sp, err := gossh.NewPublicKey(pk)
	if err != nil {
		return "", "", err
	}
	if err := os.WriteFile(priv, pem.EncodeToMemory(blk), 0o600); err != nil {
		return "", "", err
	}
	line := strings.TrimSpace(string(gossh.MarshalAuthorizedKey(sp))) + " gitraft-dev\n"
	if err := os.WriteFile(priv+".pub", []byte(line), 0o644); err != nil {
		return "", "", err
	}
	return priv + ".pub", priv, nil
}

func shellQuoteArg(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }
