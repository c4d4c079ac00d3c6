package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
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

// DefaultValidity of issued certificates (IssueOptions.Validity zero).
const DefaultValidity = 825 * 24 * time.Hour

// defaultCAValidity is used when InitCA is given no validity.
const defaultCAValidity = 10 * 365 * 24 * time.Hour

// clockSkew backdates NotBefore so that a certificate issued on one machine
// is immediately usable on another whose clock is slightly behind.
const clockSkew = time.Hour

var (
	ErrExists  = errors.New("already exists")           // refusing to overwrite
	ErrNoCA    = errors.New("no CA")                    // dir has no ca.crt/ca.key
	ErrBadRole = errors.New("unknown certificate role") // neither node nor admin
	ErrBadName = errors.New("invalid certificate name") // see IssueOptions.Name
)

const ouPrefix = "gitraft-"

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// InitCA creates a new cluster CA in dir (created 0700 if missing): a
// self-signed ECDSA P-256 certificate ca.crt (0644) named
// "gitraft CA <clusterName>" and its key ca.key (0600). It refuses, with
// ErrExists, to replace either file. validity zero means ten years. It returns
// the path of ca.crt.
func InitCA(dir, clusterName string, validity time.Duration) (string, error) {
	if validity <= 0 {
		validity = defaultCAValidity
	}
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	for _, p := range []string{certPath, keyPath} {
		if _, err := os.Lstat(p); err == nil {
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
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(validity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return "", err
	}
	if err := writePair(certPath, keyPath, der, key); err != nil {
		return "", err
	}
	return certPath, nil
}

// IssueOptions for Issue.
type IssueOptions struct {
	Role Role
	// Name is the node ID or admin name, the certificate's CommonName and the
	// files' base name: [A-Za-z0-9][A-Za-z0-9._-]{0,62}, else ErrBadName.
	Name string
	// Hosts are extra SANs: IPs are parsed as IPs, everything else is a DNS
	// name. Node certificates always also get 127.0.0.1, ::1 and localhost.
	Hosts    []string
	Validity time.Duration // DefaultValidity if zero
	OutDir   string        // where to write; default the CA dir
}

// Issue signs a node or admin certificate with the CA in caDir and writes
// <OutDir>/<Name>.crt (0644) and <OutDir>/<Name>.key (0600). It refuses, with
// ErrExists, to overwrite either. A certificate never outlives its CA: its
// validity is cut at the CA's expiry.
func Issue(caDir string, opt IssueOptions) (certPath, keyPath string, err error) {
	return issueAt(caDir, opt, time.Now())
}

// issueAt is Issue as if it ran at now (tests use it for expired certificates).
func issueAt(caDir string, opt IssueOptions, now time.Time) (certPath, keyPath string, err error) {
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
		if _, err := os.Lstat(p); err == nil {
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
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject: pkix.Name{
			CommonName:         opt.Name,
			Organization:       []string{"gitraft"},
			OrganizationalUnit: []string{ouPrefix + string(opt.Role)},
		},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(opt.Validity),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	if tmpl.NotAfter.After(caCert.NotAfter) {
		tmpl.NotAfter = caCert.NotAfter
	}
	hosts := opt.Hosts
	if opt.Role == RoleNode {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
		hosts = append([]string{"127.0.0.1", "::1", "localhost"}, hosts...)
	}
	seen := map[string]bool{}
	for _, h := range hosts {
		h = strings.TrimSpace(h)
		if ip := net.ParseIP(h); ip != nil {
			if !seen[ip.String()] {
				seen[ip.String()] = true
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			}
		} else if h != "" && !seen[strings.ToLower(h)] {
			seen[strings.ToLower(h)] = true
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
	if err := writePair(certPath, keyPath, der, key); err != nil {
		return "", "", err
	}
	return certPath, keyPath, nil
}

// serial is a random, positive 128-bit serial number.
func serial() *big.Int {
	max := new(big.Int).Lsh(big.NewInt(1), 128)
	for {
		n, err := rand.Int(rand.Reader, max)
		if err != nil {
			panic(err) // crypto/rand does not fail
		}
		if n.Sign() > 0 {
			return n
		}
	}
}

// writePair writes the key (0600) and certificate (0644), refusing to
// overwrite either; it leaves neither behind on failure.
func writePair(certPath, keyPath string, certDER []byte, key *ecdsa.PrivateKey) error {
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := writePEM(keyPath, "PRIVATE KEY", keyDER, 0o600); err != nil {
		return err
	}
	if err := writePEM(certPath, "CERTIFICATE", certDER, 0o644); err != nil {
		os.Remove(keyPath)
		return err
	}
	return nil
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%s: %w", path, ErrExists)
		}
		return err
	}
	err = pem.Encode(f, &pem.Block{Type: typ, Bytes: der})
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
	}
	return err
}

func loadCA(dir string) (*x509.Certificate, crypto.Signer, error) {
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	certPEM, err := os.ReadFile(certPath)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, fmt.Errorf("%w in %s: it has no %s (create one with `gitraft ca init --dir %s`)", ErrNoCA, dir, CACertFile, dir)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("cannot read CA certificate: %w", err)
	}
	keyPEM, err := os.ReadFile(keyPath)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, fmt.Errorf("%w in %s: it has %s but no %s; certificates can only be issued where the CA key is", ErrNoCA, dir, CACertFile, CAKeyFile)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("cannot read CA key: %w", err)
	}
	certs, err := parseCerts(certPEM, certPath)
	if err != nil {
		return nil, nil, err
	}
	cert := certs[0]
	if !cert.IsCA {
		return nil, nil, fmt.Errorf("%s is not a CA certificate (it is %q's)", certPath, cert.Subject.CommonName)
	}
	key, err := parseKey(keyPEM, keyPath)
	if err != nil {
		return nil, nil, err
	}
	if !publicKeyEqual(cert.PublicKey, key.Public()) {
		return nil, nil, fmt.Errorf("CA key %s does not match CA certificate %s", keyPath, certPath)
	}
	return cert, key, nil
}

// parseCerts returns the certificates in a PEM file, in order.
func parseCerts(b []byte, path string) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s holds a broken certificate: %w", path, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("%s holds no PEM certificate (is it a key?)", path)
	}
	return certs, nil
}

// parseKey returns the first private key in a PEM file.
func parseKey(b []byte, path string) (crypto.Signer, error) {
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return nil, fmt.Errorf("%s holds no PEM private key (is it a certificate?)", path)
		}
		if !strings.HasSuffix(blk.Type, "PRIVATE KEY") {
			continue
		}
		var k any
		var err error
		switch blk.Type {
		case "EC PRIVATE KEY":
			k, err = x509.ParseECPrivateKey(blk.Bytes)
		case "RSA PRIVATE KEY":
			k, err = x509.ParsePKCS1PrivateKey(blk.Bytes)
		default:
			k, err = x509.ParsePKCS8PrivateKey(blk.Bytes)
		}
		if err != nil {
			return nil, fmt.Errorf("%s holds a broken private key: %w", path, err)
		}
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("%s: %T is not a signing key", path, k)
		}
		return s, nil
	}
}

func publicKeyEqual(a, b crypto.PublicKey) bool {
	switch a := a.(type) {
	case *ecdsa.PublicKey:
		return a.Equal(b)
	case *rsa.PublicKey:
		return a.Equal(b)
	case ed25519.PublicKey:
		return a.Equal(b)
	}
	return false
}

// RoleOf reads the role from a (verified) certificate's OU, "gitraft-node" or
// "gitraft-admin"; anything else is ErrBadRole.
func RoleOf(cert *x509.Certificate) (Role, error) {
	if cert == nil {
		return "", fmt.Errorf("%w: no certificate", ErrBadRole)
	}
	for _, ou := range cert.Subject.OrganizationalUnit {
		if r, ok := strings.CutPrefix(ou, ouPrefix); ok && (Role(r) == RoleNode || Role(r) == RoleAdmin) {
			return Role(r), nil
		}
	}
	return "", fmt.Errorf("%w: certificate %q has no gitraft-node or gitraft-admin OU; issue it with `gitraft ca issue`", ErrBadRole, cert.Subject.CommonName)
}

// Files names the three PEM files a TLS endpoint needs.
type Files struct{ CA, Cert, Key string }

// Bundle is a loaded, checked set of Files.
type Bundle struct {
	Pool *x509.CertPool    // the cluster CA
	Cert tls.Certificate   // this endpoint's certificate and key
	Leaf *x509.Certificate // Cert's leaf, parsed
	Role Role              // Leaf's role
}

// Load reads the files and checks that the certificate chains to the CA, is
// within its validity, matches the key and carries a role. Its errors name
// the files and say what is wrong.
func (f Files) Load() (*Bundle, error) {
	for _, x := range []struct{ what, path string }{{"CA certificate", f.CA}, {"certificate", f.Cert}, {"key", f.Key}} {
		if x.path == "" {
			return nil, fmt.Errorf("no %s file given", x.what)
		}
	}
	caPEM, err := readPEMFile("CA certificate", f.CA)
	if err != nil {
		return nil, err
	}
	certPEM, err := readPEMFile("certificate", f.Cert)
	if err != nil {
		return nil, err
	}
	keyPEM, err := readPEMFile("key", f.Key)
	if err != nil {
		return nil, err
	}
	caName, certName, keyName := filepath.Base(f.CA), filepath.Base(f.Cert), filepath.Base(f.Key)

	cas, err := parseCerts(caPEM, caName)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	for _, c := range cas {
		if !c.IsCA {
			return nil, fmt.Errorf("%s is not a CA certificate (it is %q's); give the cluster's %s", caName, c.Subject.CommonName, CACertFile)
		}
		pool.AddCert(c)
	}
	ca := cas[0]
	chain, err := parseCerts(certPEM, certName)
	if err != nil {
		return nil, err
	}
	leaf := chain[0]
	key, err := parseKey(keyPEM, keyName)
	if err != nil {
		return nil, err
	}
	if !publicKeyEqual(leaf.PublicKey, key.Public()) {
		return nil, fmt.Errorf("key %s does not match certificate %s", keyName, certName)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("certificate %s and key %s: %w", certName, keyName, err)
	}
	pair.Leaf = leaf

	now := time.Now()
	if now.After(leaf.NotAfter) {
		return nil, fmt.Errorf("certificate %s expired on %s; issue a new one with `gitraft ca issue`", certName, leaf.NotAfter.UTC().Format("2006-01-02"))
	}
	// Verify below also fails on these; without them its failure would be
	// reported as a certificate from another CA.
	if now.Before(leaf.NotBefore) {
		return nil, fmt.Errorf("certificate %s is not valid before %s; is this machine's clock right?", certName, leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	if now.After(ca.NotAfter) || now.Before(ca.NotBefore) {
		return nil, fmt.Errorf("CA certificate %s is valid only from %s to %s; every certificate it issued stops working with it", caName, ca.NotBefore.UTC().Format("2006-01-02"), ca.NotAfter.UTC().Format("2006-01-02"))
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}, CurrentTime: now}); err != nil {
		msg := fmt.Sprintf("certificate %s is not signed by the CA in %s (issuer %q, expected %q)", certName, caName, leaf.Issuer.CommonName, ca.Subject.CommonName)
		if leaf.Issuer.String() == ca.Subject.String() {
			msg += "; it comes from another CA of the same name, e.g. one made by a second `gitraft ca init`"
		}
		return nil, errors.New(msg)
	}
	role, err := RoleOf(leaf)
	if err != nil {
		return nil, fmt.Errorf("certificate %s: %w", certName, err)
	}
	return &Bundle{Pool: pool, Cert: pair, Leaf: leaf, Role: role}, nil
}

// readPEMFile reads one of Files, naming it and its path on failure.
func readPEMFile(what, path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return nil, fmt.Errorf("cannot read %s %s: %w", what, path, err)
	}
	return b, nil
}

// ServerConfig is the TLS config of a node's listener: TLS 1.3 and a client
// certificate from the cluster CA, with a role, are required. Only node
// certificates can serve. Callers may replace VerifyConnection with a
// stricter check (e.g. node peers only).
func (b *Bundle) ServerConfig() (*tls.Config, error) {
	if b.Role != RoleNode {
		return nil, fmt.Errorf("a %s certificate (%q) cannot serve; servers need a node certificate", b.Role, b.Leaf.Subject.CommonName)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{b.Cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    b.Pool,
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, _, err := PeerRole(cs)
			return err
		},
	}, nil
}

// ClientConfig is the TLS config for dialing a node. With serverName "" the
// server's chain is checked against the cluster CA but not its host name
// (nodes are dialed by the addresses in the replicated state, and the CA is
// the cluster's own); with a serverName the host name is checked too. Either
// way the server must hold a node certificate.
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
			// The chain first, for any usage: an admin certificate (client
			// auth only) from this CA is refused for its role below, not
			// reported as coming from another CA.
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
				return fmt.Errorf("server certificate %q (issuer %q) is not from this cluster's CA: %w", leaf.Subject.CommonName, leaf.Issuer.CommonName, err)
			}
			if err := requireRole(leaf, RoleNode); err != nil {
				return err
			}
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
				return fmt.Errorf("server certificate %q may not serve: %w", leaf.Subject.CommonName, err)
			}
			return nil
		}
	} else {
		// crypto/tls has verified the chain and host name before this runs.
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

// PeerRole returns the role and CommonName of the peer's leaf certificate:
// VerifiedChains[0][0] when crypto/tls verified it (server side), else
// PeerCertificates[0], which on the client side ClientConfig's
// VerifyConnection has verified. It is an error if there is no peer
// certificate or it has no role. Only use it on connections made with this
// package's configs: it cannot tell whether PeerCertificates were verified.
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
