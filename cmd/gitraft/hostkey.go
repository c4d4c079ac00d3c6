package main

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	gossh "golang.org/x/crypto/ssh"

	"github.com/gitraft/gitraft/cluster"
)

// HostKeyFile is the name `gitraft ca host-key` gives the cluster's SSH
// host key by default, as OpenSSH names its own.
const HostKeyFile = "ssh_host_ed25519_key"

// loadHostKeys reads the node's SSH host key files (OpenSSH private keys,
// unencrypted). Like sshd, it refuses a file that others may read.
func loadHostKeys(files []string) ([]gossh.Signer, error) {
	var out []gossh.Signer
	seen := map[string]string{}
	for _, f := range files {
		fi, err := os.Stat(f)
		if err != nil {
			return nil, fmt.Errorf("SSH host key file: %w", err)
		}
		if fi.Mode().Perm()&0o077 != 0 {
			return nil, fmt.Errorf("SSH host key file %s is readable by others (mode %04o): chmod 600 it, it is the key that tells clients they reach this cluster", f, fi.Mode().Perm())
		}
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("SSH host key file: %w", err)
		}
		s, err := gossh.ParsePrivateKey(b)
		if err != nil {
			var pp *gossh.PassphraseMissingError
			if errors.As(err, &pp) {
				return nil, fmt.Errorf("SSH host key file %s is encrypted with a passphrase; a node cannot ask for it: store it without one (0600, readable only by gitraft)", f)
			}
			return nil, fmt.Errorf("SSH host key file %s: %w", f, err)
		}
		fp := gossh.FingerprintSHA256(s.PublicKey())
		if prev, ok := seen[fp]; ok {
			return nil, fmt.Errorf("SSH host key files %s and %s hold the same key (%s)", prev, f, fp)
		}
		seen[fp] = f
		out = append(out, s)
	}
	return out, nil
}

// publicKeyLines are the keys' public parts in authorized_keys form.
func publicKeyLines(keys []gossh.Signer) []string {
	out := make([]string, len(keys))
	for i, k := range keys {
		out[i] = cluster.NormalizePublicKey(string(gossh.MarshalAuthorizedKey(k.PublicKey())))
	}
	return out
}

// writeHostKeyFile writes an OpenSSH private key to path (0600) and its
// public key to path.pub, refusing to overwrite either.
func writeHostKeyFile(path string, pemBytes []byte, comment string) (gossh.Signer, error) {
	s, err := gossh.ParsePrivateKey(pemBytes)
	if err != nil {
		return nil, err
	}
	for _, p := range []string{path, path + ".pub"} {
		if _, err := os.Stat(p); err == nil {
			return nil, fmt.Errorf("%s exists; not overwriting a host key (give another --out for a new key)", p)
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	if err := writeNew(path, pemBytes, 0o600); err != nil {
		return nil, err
	}
	line := strings.TrimSpace(string(gossh.MarshalAuthorizedKey(s.PublicKey()))) + " " + comment + "\n"
	if err := writeNew(path+".pub", []byte(line), 0o644); err != nil {
		return nil, err
	}
	return s, nil
}

// writeNew creates a file that must not exist yet, and syncs it.
func writeNew(path string, b []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, mode)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// newHostKeyPEM makes a new ed25519 host key as an OpenSSH PEM block.
func newHostKeyPEM(comment string) ([]byte, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	blk, err := gossh.MarshalPrivateKey(priv, comment)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(blk), nil
}

// ensureHostKeyFile makes a host key file at path unless one is there.
func ensureHostKeyFile(path, comment string) error {
	if _, err := os.Stat(path); err == nil {
		return nil
	}
	b, err := newHostKeyPEM(comment)
	if err != nil {
		return err
	}
	_, err = writeHostKeyFile(path, b, comment)
	return err
}
