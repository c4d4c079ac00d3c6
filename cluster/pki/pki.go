package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// Role says what a certificate may do in the cluster.
type Role string

const (
	RoleNode  Role = "node"  // a cluster node: server and client auth
	RoleAdmin Role = "admin" // an operator or tool: client auth only
)

// File names inside a CA directory.
const (
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"
)

// DefaultValidity of issued certificates.
const DefaultValidity = 825 * 24 * time.Hour

var (
	ErrExists  = errors.New("already exists")
	ErrNoCA    = errors.New("no CA")
	ErrBadRole = errors.New("unknown certificate role")
	ErrBadName = errors.New("invalid certificate name")
)

const ouPrefix = "gitraft-"

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// InitCA creates a new cluster CA in dir: ca.crt and ca.key. It refuses to
// overwrite an existing one.
func InitCA(dir, clusterName string, validity time.Duration) (string, error) {
	if validity <= 0 {
		validity = 10 * 365 * 24 * time.Hour
	}
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	for _, p := range []string{certPath, keyPath} {
		if _, err := os.Stat(p); err == nil {
			return "", fmt.Errorf("%s: %w (refusing to replace a CA: every certificate it issued would stop working)", p, ErrExists)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "gitraft CA " + clusterName, Organization: []string{"gitraft"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(validity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return "", err
	}
	if err := writeKey(keyPath, key); err != nil {
		return "", err
	}
	if err := writePEM(certPath, "CERTIFICATE", der, 0o644); err != nil {
		return "", err
	}
	return certPath, nil
}

// IssueOptions for Issue.
type IssueOptions struct {
	Role     Role
	Name     string   // node ID or admin name
	Hosts    []string // extra SANs; node certs always get 127.0.0.1, ::1, localhost
	Validity time.Duration
	OutDir   string // default: the CA dir
}

// Issue signs a node or admin certificate with the CA in caDir and writes
// <OutDir>/<Name>.crt and .key. It refuses to overwrite.
func Issue(caDir string, opt IssueOptions) (certPath, keyPath string, err error) {
	if opt.Role != RoleNode && opt.Role != RoleAdmin {
		return "", "", fmt.Errorf("%w %q: use node or admin", ErrBadRole, opt.Role)
	}
	if !nameRE.MatchString(opt.Name) {
		return "", "", fmt.Errorf("%w %q: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit", ErrBadName, opt.Name)
	}
	caCert, caKey, err := loadCA(caDir)
	if err != nil {
		return "", "", err
	}
	out := opt.OutDir
	if out == "" {
		out = caDir
	}
	certPath, keyPath = filepath.Join(out, opt.Name+".crt"), filepath.Join(out, opt.Name+".key")
	for _, p := range []string{certPath, keyPath} {
		if _, err := os.Stat(p); err == nil {
			return "", "", fmt.Errorf("%s: %w", p, ErrExists)
		}
	}
	if opt.Validity <= 0 {
		opt.Validity = DefaultValidity
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: opt.Name, OrganizationalUnit: []string{ouPrefix + string(opt.Role)}, Organization: []string{"gitraft"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(opt.Validity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	hosts := opt.Hosts
	if opt.Role == RoleNode {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		hosts = append([]string{"127.0.0.1", "::1", "localhost"}, hosts...)
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if h != "" {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, key.Public(), caKey)
	if err != nil {
		return "", "", err
	}
	if err := os.MkdirAll(out, 0o700); err != nil {
		return "", "", err
	}
	if err := writeKey(keyPath, key); err != nil {
		return "", "", err
	}
	if err := writePEM(certPath, "CERTIFICATE", der, 0o644); err != nil {
		return "", "", err
	}
	return certPath, keyPath, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err)
	}
	return n
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "PRIVATE KEY", der, 0o600)
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		if os.IsExist(err) {
			return fmt.Errorf("%s: %w", path, ErrExists)
		}
		return err
	}
	if err := pem.Encode(f, &pem.Block{Type: typ, Bytes: der}); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func loadCA(dir string) (*x509.Certificate, crypto.Signer, error) {
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	cert, err := readCert(certPath)
	if err != nil {
		if os.IsNotExist(errors.Unwrap(err)) || os.IsNotExist(err) {
			return nil, nil, fmt.Errorf("%w in %s (create one with `gitraft ca init --dir %s`)", ErrNoCA, dir, dir)
		}
		return nil, nil, err
	}
	b, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: cannot read CA key: %v", ErrNoCA, err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, nil, fmt.Errorf("%s holds no PEM key", keyPath)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", keyPath, err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, nil, fmt.Errorf("%s: not a signing key", keyPath)
	}
	return cert, signer, nil
}

func readCert(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%s holds no PEM certificate", path)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// RoleOf reads the role from a certificate's OU.
func RoleOf(cert *x509.Certificate) (Role, error) {
	for _, ou := range cert.Subject.OrganizationalUnit {
		if r := Role(strings.TrimPrefix(ou, ouPrefix)); strings.HasPrefix(ou, ouPrefix) && (r == RoleNode || r == RoleAdmin) {
			return r, nil
		}
	}
	return "", fmt.Errorf("%w: certificate %q has no gitraft-node or gitraft-admin OU; issue it with `gitraft ca issue`", ErrBadRole, cert.Subject.CommonName)
}

// Files names the three PEM files a TLS endpoint needs.
type Files struct{ CA, Cert, Key string }

// Bundle is a loaded, checked set of Files.
type Bundle struct {
	Pool *x509.CertPool
	Cert tls.Certificate
	Leaf *x509.Certificate
	Role Role
}

// Load reads the files and checks that the certificate chains to the CA, is
// within its validity, matches the key and carries a role.
func (f Files) Load() (*Bundle, error) {
	for flag, p := range map[string]string{"CA certificate": f.CA, "certificate": f.Cert, "key": f.Key} {
		if p == "" {
			return nil, fmt.Errorf("no %s file given", flag)
		}
	}
	ca, err := readCert(f.CA)
	if err != nil {
		return nil, fmt.Errorf("CA certificate: %w", err)
	}
	pair, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		if os.IsNotExist(errors.Unwrap(err)) {
			return nil, err
		}
		return nil, fmt.Errorf("key %s does not match certificate %s, or one is unreadable: %w", filepath.Base(f.Key), filepath.Base(f.Cert), err)
	}
	leaf := pair.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(pair.Certificate[0]); err != nil {
			return nil, err
		}
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	now := time.Now()
	if now.After(leaf.NotAfter) {
		return nil, fmt.Errorf("certificate %s expired on %s; issue a new one with `gitraft ca issue`", filepath.Base(f.Cert), leaf.NotAfter.Format("2006-01-02"))
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}, CurrentTime: now}); err != nil {
		return nil, fmt.Errorf("certificate %s is not signed by the CA in %s (issuer %q, expected %q)",
			filepath.Base(f.Cert), filepath.Base(f.CA), leaf.Issuer.CommonName, ca.Subject.CommonName)
	}
	role, err := RoleOf(leaf)
	if err != nil {
		return nil, err
	}
	return &Bundle{Pool: pool, Cert: pair, Leaf: leaf, Role: role}, nil
}

// ServerConfig is the TLS config of a node's listener: TLS 1.3, and a client
// certificate from the cluster CA is required.
func (b *Bundle) ServerConfig() (*tls.Config, error) {
	if b.Role != RoleNode {
		return nil, fmt.Errorf("a %s certificate cannot serve; servers need a node certificate", b.Role)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{b.Cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    b.Pool,
	}, nil
}

// ClientConfig is the TLS config for dialing a node. With serverName "" the
// server's chain is checked against the cluster CA but not its host name
// (nodes are dialed by the addresses in the replicated state, and the CA is
// the cluster's own); the server must hold a node certificate either way.
func (b *Bundle) ClientConfig(serverName string) *tls.Config {
	c := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{b.Cert},
		RootCAs:      b.Pool,
		ServerName:   serverName,
	}
	pool := b.Pool
	if serverName == "" {
		c.InsecureSkipVerify = true // replaced by VerifyConnection below
		c.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("server sent no certificate")
			}
			inter := x509.NewCertPool()
			for _, ic := range cs.PeerCertificates[1:] {
				inter.AddCert(ic)
			}
			leaf := cs.PeerCertificates[0]
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
				return fmt.Errorf("server certificate %q is not from this cluster's CA: %w", leaf.Subject.CommonName, err)
			}
			return requireRole(leaf, RoleNode)
		}
	} else {
		c.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("server sent no certificate")
			}
			return requireRole(cs.PeerCertificates[0], RoleNode)
		}
	}
	return c
}

func requireRole(cert *x509.Certificate, want Role) error {
	r, err := RoleOf(cert)
	if err != nil {
		return err
	}
	if r != want {
		return fmt.Errorf("peer %q has a %s certificate, want %s", cert.Subject.CommonName, r, want)
	}
	return nil
}

// PeerRole returns the role and name of the verified peer in a connection.
func PeerRole(cs tls.ConnectionState) (Role, string, error) {
	var leaf *x509.Certificate
	switch {
	case len(cs.VerifiedChains) > 0 && len(cs.VerifiedChains[0]) > 0:
		leaf = cs.VerifiedChains[0][0]
	case len(cs.PeerCertificates) > 0:
		leaf = cs.PeerCertificates[0]
	default:
		return "", "", errors.New("peer presented no certificate")
	}
	r, err := RoleOf(leaf)
	if err != nil {
		return "", leaf.Subject.CommonName, err
	}
	return r, leaf.Subject.CommonName, nil
}
