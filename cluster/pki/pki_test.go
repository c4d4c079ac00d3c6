package pki

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// newCA creates a CA for cluster in a fresh directory.
func newCA(t *testing.T, cluster string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca-"+cluster)
	if _, err := InitCA(dir, cluster, 0); err != nil {
		t.Fatalf("InitCA: %v", err)
	}
	return dir
}

// issue issues a certificate from the CA in ca and returns its Files.
func issue(t *testing.T, ca string, role Role, name string, hosts ...string) Files {
	t.Helper()
	cert, key, err := Issue(ca, IssueOptions{Role: role, Name: name, Hosts: hosts})
	if err != nil {
		t.Fatalf("Issue %s %s: %v", role, name, err)
	}
	return Files{CA: filepath.Join(ca, CACertFile), Cert: cert, Key: key}
}

func load(t *testing.T, f Files) *Bundle {
	t.Helper()
	b, err := f.Load()
	if err != nil {
		t.Fatalf("Load %s: %v", f.Cert, err)
	}
	return b
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// readCA reads ca.crt and ca.key from dir without the package's helpers.
func readCA(t *testing.T, dir string) (*x509.Certificate, crypto.Signer) {
	t.Helper()
	blk, _ := pem.Decode(readFile(t, filepath.Join(dir, CACertFile)))
	if blk == nil || blk.Type != "CERTIFICATE" {
		t.Fatalf("%s: no PEM certificate", CACertFile)
	}
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ = pem.Decode(readFile(t, filepath.Join(dir, CAKeyFile)))
	if blk == nil || blk.Type != "PRIVATE KEY" {
		t.Fatalf("%s: no PEM private key", CAKeyFile)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		t.Fatalf("%s: %T is not a signer", CAKeyFile, k)
	}
	return cert, signer
}

func writePEMFile(t *testing.T, path, typ string, der []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode); err != nil {
		t.Fatal(err)
	}
}

// signLeaf makes a fresh key, signs tmpl with the given parent and writes
// <dir>/<name>.crt and .key.
func signLeaf(t *testing.T, dir, name string, tmpl, parent *x509.Certificate, parentKey crypto.Signer) (certPath, keyPath string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certPath, keyPath = filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	writePEMFile(t, certPath, "CERTIFICATE", der, 0o644)
	writePEMFile(t, keyPath, "PRIVATE KEY", kder, 0o600)
	return certPath, keyPath
}

func nodeTemplate(name string, notBefore, notAfter time.Time) *x509.Certificate {
	return &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: name, OrganizationalUnit: []string{"gitraft-node"}, Organization: []string{"gitraft"}},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
}

func wantErrContains(t *testing.T, what string, err error, subs ...string) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: no error", what)
		return
	}
	for _, s := range subs {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("%s: %q does not mention %q", what, err, s)
		}
	}
}

func Test_PKI_InitCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	certPath, err := InitCA(dir, "alpha", 0)
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(dir, CACertFile); certPath != want {
		t.Errorf("InitCA returned %s, want %s", certPath, want)
	}
	for name, mode := range map[string]os.FileMode{CACertFile: 0o644, CAKeyFile: 0o600} {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != mode {
			t.Errorf("%s mode %v, want %v", name, st.Mode().Perm(), mode)
		}
	}
	cert, _ := readCA(t, dir)
	if !cert.IsCA || !strings.Contains(cert.Subject.CommonName, "alpha") {
		t.Errorf("CA certificate: IsCA %v, subject %q", cert.IsCA, cert.Subject.CommonName)
	}
	if _, err := RoleOf(cert); !errors.Is(err, ErrBadRole) {
		t.Errorf("RoleOf(CA certificate) = %v, want ErrBadRole", err)
	}

	crt, key := readFile(t, filepath.Join(dir, CACertFile)), readFile(t, filepath.Join(dir, CAKeyFile))
	if _, err := InitCA(dir, "again", 0); !errors.Is(err, ErrExists) {
		t.Fatalf("second InitCA: %v, want ErrExists", err)
	}
	if !bytes.Equal(crt, readFile(t, filepath.Join(dir, CACertFile))) || !bytes.Equal(key, readFile(t, filepath.Join(dir, CAKeyFile))) {
		t.Fatal("a refused InitCA changed the CA files")
	}

	// Half a CA (the certificate lost) is not replaced either.
	if err := os.Remove(filepath.Join(dir, CACertFile)); err != nil {
		t.Fatal(err)
	}
	if _, err := InitCA(dir, "again", 0); !errors.Is(err, ErrExists) {
		t.Fatalf("InitCA over a lone ca.key: %v, want ErrExists", err)
	}
	if !bytes.Equal(key, readFile(t, filepath.Join(dir, CAKeyFile))) {
		t.Fatal("a refused InitCA replaced ca.key")
	}
}

func Test_PKI_Issue(t *testing.T) {
	ca := newCA(t, "alpha")

	nf := issue(t, ca, RoleNode, "n1", "10.0.0.7", "2001:db8::7", "git1.example.org")
	if nf.Cert != filepath.Join(ca, "n1.crt") || nf.Key != filepath.Join(ca, "n1.key") {
		t.Errorf("node files %s %s", nf.Cert, nf.Key)
	}
	node := load(t, nf)
	if r, err := RoleOf(node.Leaf); err != nil || r != RoleNode || node.Role != RoleNode {
		t.Errorf("node: RoleOf = %s, %v; Bundle.Role %s", r, err, node.Role)
	}
	if node.Leaf.Subject.CommonName != "n1" {
		t.Errorf("node CN %q", node.Leaf.Subject.CommonName)
	}
	var ips []string
	for _, ip := range node.Leaf.IPAddresses {
		ips = append(ips, ip.String())
	}
	if want := []string{"127.0.0.1", "::1", "10.0.0.7", "2001:db8::7"}; !slices.Equal(ips, want) {
		t.Errorf("node IP SANs %v, want %v", ips, want)
	}
	if want := []string{"localhost", "git1.example.org"}; !slices.Equal(node.Leaf.DNSNames, want) {
		t.Errorf("node DNS SANs %v, want %v", node.Leaf.DNSNames, want)
	}
	for _, u := range []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth} {
		if !slices.Contains(node.Leaf.ExtKeyUsage, u) {
			t.Errorf("node ext key usages %v lack %v", node.Leaf.ExtKeyUsage, u)
		}
	}
	for _, h := range []string{"127.0.0.1", "::1", "localhost", "10.0.0.7", "git1.example.org"} {
		if err := node.Leaf.VerifyHostname(h); err != nil {
			t.Errorf("node certificate not valid for %s: %v", h, err)
		}
	}

	admin := load(t, issue(t, ca, RoleAdmin, "alice"))
	if r, err := RoleOf(admin.Leaf); err != nil || r != RoleAdmin || admin.Role != RoleAdmin {
		t.Errorf("admin: RoleOf = %s, %v; Bundle.Role %s", r, err, admin.Role)
	}
	if !slices.Equal(admin.Leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) {
		t.Errorf("admin ext key usages %v, want only client auth", admin.Leaf.ExtKeyUsage)
	}
	if len(admin.Leaf.IPAddresses) != 0 || len(admin.Leaf.DNSNames) != 0 {
		t.Errorf("admin certificate has SANs %v %v", admin.Leaf.IPAddresses, admin.Leaf.DNSNames)
	}

	// Same name twice: refused, the first certificate kept.
	crt := readFile(t, nf.Cert)
	for _, role := range []Role{RoleNode, RoleAdmin} {
		if _, _, err := Issue(ca, IssueOptions{Role: role, Name: "n1"}); !errors.Is(err, ErrExists) {
			t.Errorf("issuing %s n1 again: %v, want ErrExists", role, err)
		}
	}
	if !bytes.Equal(crt, readFile(t, nf.Cert)) {
		t.Error("a refused Issue replaced n1.crt")
	}

	for _, bad := range []string{"", "../x", "a/b", ".x", "-x", "a b", strings.Repeat("a", 64)} {
		if _, _, err := Issue(ca, IssueOptions{Role: RoleNode, Name: bad}); !errors.Is(err, ErrBadName) {
			t.Errorf("name %q: %v, want ErrBadName", bad, err)
		}
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(ca), "x.crt")); err == nil {
		t.Error("name ../x wrote outside the CA directory")
	}
	if _, _, err := Issue(ca, IssueOptions{Role: RoleNode, Name: strings.Repeat("a", 63)}); err != nil {
		t.Errorf("63-character name: %v", err)
	}

	for _, role := range []Role{"", "root", "Node", "gitraft-node"} {
		if _, _, err := Issue(ca, IssueOptions{Role: role, Name: "x"}); !errors.Is(err, ErrBadRole) {
			t.Errorf("role %q: %v, want ErrBadRole", role, err)
		}
	}

	empty := t.TempDir()
	_, _, err := Issue(empty, IssueOptions{Role: RoleNode, Name: "x"})
	if !errors.Is(err, ErrNoCA) {
		t.Errorf("Issue without a CA: %v, want ErrNoCA", err)
	}
	wantErrContains(t, "Issue without a CA", err, "gitraft ca init")

	// OutDir: the files go there, and the CA directory stays clean.
	out := filepath.Join(t.TempDir(), "out")
	cert, key, err := Issue(ca, IssueOptions{Role: RoleNode, Name: "n9", OutDir: out})
	if err != nil || cert != filepath.Join(out, "n9.crt") || key != filepath.Join(out, "n9.key") {
		t.Fatalf("Issue with OutDir: %s %s %v", cert, key, err)
	}
	if _, err := os.Stat(filepath.Join(ca, "n9.crt")); err == nil {
		t.Error("Issue with OutDir wrote into the CA directory")
	}
	load(t, Files{CA: filepath.Join(ca, CACertFile), Cert: cert, Key: key})
}

func Test_PKI_LoadExplainsProblems(t *testing.T) {
	ca, other := newCA(t, "alpha"), newCA(t, "beta")
	good := issue(t, ca, RoleNode, "n1")
	foreign := issue(t, other, RoleNode, "n2")
	load(t, good)

	t.Run("other CA", func(t *testing.T) {
		_, err := Files{CA: good.CA, Cert: foreign.Cert, Key: foreign.Key}.Load()
		wantErrContains(t, "certificate from another CA", err, "n2.crt", CACertFile, "gitraft CA beta", "not signed")
	})

	t.Run("key mismatch", func(t *testing.T) {
		_, err := Files{CA: good.CA, Cert: good.Cert, Key: foreign.Key}.Load()
		wantErrContains(t, "key of another certificate", err, "n1.crt", "n2.key")
	})

	t.Run("missing file", func(t *testing.T) {
		dir := t.TempDir()
		for name, f := range map[string]Files{
			"ca.crt": {CA: filepath.Join(dir, "ca.crt"), Cert: good.Cert, Key: good.Key},
			"n7.crt": {CA: good.CA, Cert: filepath.Join(dir, "n7.crt"), Key: good.Key},
			"n7.key": {CA: good.CA, Cert: good.Cert, Key: filepath.Join(dir, "n7.key")},
		} {
			_, err := f.Load()
			if !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("missing %s: %v, want a not-exist error", name, err)
			}
			wantErrContains(t, "missing "+name, err, name)
		}
		_, err := Files{CA: good.CA, Cert: good.Cert}.Load()
		wantErrContains(t, "no key file", err, "no key file given")
	})

	t.Run("expired", func(t *testing.T) {
		caCert, caKey := readCA(t, ca)
		now := time.Now()
		cert, key := signLeaf(t, t.TempDir(), "old", nodeTemplate("old", now.Add(-48*time.Hour), now.Add(-24*time.Hour)), caCert, caKey)
		_, err := Files{CA: good.CA, Cert: cert, Key: key}.Load()
		wantErrContains(t, "expired certificate", err, "old.crt", "expired")
	})

	t.Run("not yet valid", func(t *testing.T) {
		caCert, caKey := readCA(t, ca)
		now := time.Now()
		cert, key := signLeaf(t, t.TempDir(), "future", nodeTemplate("future", now.Add(24*time.Hour), now.Add(48*time.Hour)), caCert, caKey)
		_, err := Files{CA: good.CA, Cert: cert, Key: key}.Load()
		wantErrContains(t, "not yet valid certificate", err, "future.crt", "not valid before")
		if err != nil && strings.Contains(err.Error(), "not signed") {
			t.Errorf("a not-yet-valid certificate is reported as foreign: %v", err)
		}
	})

	t.Run("expired CA", func(t *testing.T) {
		dir := t.TempDir()
		caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		now := time.Now()
		tmpl := &x509.Certificate{
			SerialNumber:          serial(),
			Subject:               pkix.Name{CommonName: "gitraft CA old"},
			NotBefore:             now.Add(-72 * time.Hour),
			NotAfter:              now.Add(-time.Hour),
			IsCA:                  true,
			BasicConstraintsValid: true,
			KeyUsage:              x509.KeyUsageCertSign,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, caKey.Public(), caKey)
		if err != nil {
			t.Fatal(err)
		}
		writePEMFile(t, filepath.Join(dir, CACertFile), "CERTIFICATE", der, 0o644)
		caCert, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		cert, key := signLeaf(t, dir, "n1", nodeTemplate("n1", now.Add(-time.Hour), now.Add(time.Hour)), caCert, caKey)
		_, err = Files{CA: filepath.Join(dir, CACertFile), Cert: cert, Key: key}.Load()
		wantErrContains(t, "expired CA", err, CACertFile, "CA certificate")
		if err != nil && strings.Contains(err.Error(), "not signed") {
			t.Errorf("an expired CA is reported as a foreign certificate: %v", err)
		}
	})

	t.Run("no role", func(t *testing.T) {
		caCert, caKey := readCA(t, ca)
		now := time.Now()
		tmpl := nodeTemplate("anon", now.Add(-time.Hour), now.Add(time.Hour))
		tmpl.Subject.OrganizationalUnit = []string{"gitraft-root"}
		cert, key := signLeaf(t, t.TempDir(), "anon", tmpl, caCert, caKey)
		_, err := Files{CA: good.CA, Cert: cert, Key: key}.Load()
		if !errors.Is(err, ErrBadRole) {
			t.Errorf("certificate without a role: %v, want ErrBadRole", err)
		}
	})
}

// side is one end of a handshake.
type side struct {
	state tls.ConnectionState
	err   error
}

// handshake connects a tls.Server and a tls.Client over loopback, runs both
// handshakes concurrently and exchanges one byte so that a refusal by the
// server (which, in TLS 1.3, the client only learns after its own handshake
// returned) reaches the client as an error too.
func handshake(t *testing.T, serverCfg, clientCfg *tls.Config) (srv, cli side) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	done := make(chan side, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- side{err: err}
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		tc := tls.Server(c, serverCfg)
		err = tc.Handshake()
		if err == nil {
			_, err = tc.Write([]byte{'k'})
		}
		done <- side{tc.ConnectionState(), err}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	tc := tls.Client(c, clientCfg)
	cli.err = tc.Handshake()
	if cli.err == nil {
		b := make([]byte, 1)
		if _, err := tc.Read(b); err != nil {
			cli.err = err
		} else if b[0] != 'k' {
			cli.err = errors.New("wrong byte from the server")
		}
	}
	cli.state = tc.ConnectionState()
	c.Close()
	srv = <-done
	return srv, cli
}

func Test_PKI_MutualTLS(t *testing.T) {
	ca, other := newCA(t, "alpha"), newCA(t, "beta")
	n1 := load(t, issue(t, ca, RoleNode, "n1"))
	n2 := load(t, issue(t, ca, RoleNode, "n2"))
	admin := load(t, issue(t, ca, RoleAdmin, "alice"))
	mallory := load(t, issue(t, other, RoleNode, "mallory"))
	server, err := n1.ServerConfig()
	if err != nil {
		t.Fatal(err)
	}
	if server.MinVersion != tls.VersionTLS13 || server.ClientAuth != tls.RequireAndVerifyClientCert {
		t.Errorf("server config: min version %x, client auth %v", server.MinVersion, server.ClientAuth)
	}

	t.Run("node to node", func(t *testing.T) {
		srv, cli := handshake(t, server, n2.ClientConfig(""))
		if srv.err != nil || cli.err != nil {
			t.Fatalf("server: %v; client: %v", srv.err, cli.err)
		}
		if srv.state.Version != tls.VersionTLS13 {
			t.Errorf("TLS version %x", srv.state.Version)
		}
		if r, name, err := PeerRole(srv.state); err != nil || r != RoleNode || name != "n2" {
			t.Errorf("server's PeerRole = %s, %q, %v; want node, n2", r, name, err)
		}
		if r, name, err := PeerRole(cli.state); err != nil || r != RoleNode || name != "n1" {
			t.Errorf("client's PeerRole = %s, %q, %v; want node, n1", r, name, err)
		}
	})

	t.Run("admin to node", func(t *testing.T) {
		srv, cli := handshake(t, server, admin.ClientConfig(""))
		if srv.err != nil || cli.err != nil {
			t.Fatalf("server: %v; client: %v", srv.err, cli.err)
		}
		if r, name, err := PeerRole(srv.state); err != nil || r != RoleAdmin || name != "alice" {
			t.Errorf("server's PeerRole = %s, %q, %v; want admin, alice", r, name, err)
		}
		if r, name, err := PeerRole(cli.state); err != nil || r != RoleNode || name != "n1" {
			t.Errorf("client's PeerRole = %s, %q, %v; want node, n1", r, name, err)
		}
	})

	t.Run("with a server name", func(t *testing.T) {
		if srv, cli := handshake(t, server, n2.ClientConfig("localhost")); srv.err != nil || cli.err != nil {
			t.Fatalf("server: %v; client: %v", srv.err, cli.err)
		}
		_, cli := handshake(t, server, n2.ClientConfig("elsewhere.example.org"))
		wantErrContains(t, "wrong server name", cli.err, "elsewhere.example.org")
	})

	t.Run("client certificate from another CA", func(t *testing.T) {
		// The client trusts our CA, so only the server can refuse.
		intruder := *mallory
		intruder.Pool = n2.Pool
		srv, cli := handshake(t, server, intruder.ClientConfig(""))
		if srv.err == nil {
			t.Fatalf("the server accepted a client certificate from another CA (client: %v)", cli.err)
		}
		if cli.err == nil {
			t.Error("the client saw no error although the server refused it")
		}
		t.Logf("server: %v; client: %v", srv.err, cli.err)

		// crypto/tls leaves out a client certificate the server's CA list
		// does not name; force it, so the server's chain check is what
		// refuses it.
		forced := intruder.ClientConfig("")
		forced.Certificates = nil
		forced.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &mallory.Cert, nil }
		srv, cli = handshake(t, server, forced)
		wantErrContains(t, "server given a certificate from another CA", srv.err, "unknown authority")
		if cli.err == nil {
			t.Error("the client saw no error although the server refused it")
		}
		t.Logf("forced: server: %v; client: %v", srv.err, cli.err)
	})

	t.Run("client trusts another CA", func(t *testing.T) {
		lost := *n2
		lost.Pool = mallory.Pool
		srv, cli := handshake(t, server, lost.ClientConfig(""))
		wantErrContains(t, "client trusting another CA", cli.err, `"n1"`, "CA")
		if srv.err == nil {
			t.Error("the server saw no error although the client refused it")
		}
		t.Logf("client: %v", cli.err)
	})

	t.Run("admin certificate cannot serve", func(t *testing.T) {
		cfg, err := admin.ServerConfig()
		if cfg != nil || err == nil {
			t.Fatalf("ServerConfig of an admin certificate: %v, %v", cfg, err)
		}
		wantErrContains(t, "admin ServerConfig", err, "admin", "node certificate")
	})

	t.Run("server with an admin certificate", func(t *testing.T) {
		fake := &tls.Config{
			MinVersion:   tls.VersionTLS13,
			Certificates: []tls.Certificate{admin.Cert},
			ClientAuth:   tls.RequireAndVerifyClientCert,
			ClientCAs:    admin.Pool,
		}
		_, cli := handshake(t, fake, n2.ClientConfig(""))
		// Refused for its role, not as a certificate from another CA.
		wantErrContains(t, "server with an admin certificate", cli.err, `"alice"`, "admin certificate", "want node")
		if cli.err != nil && strings.Contains(cli.err.Error(), "not from this cluster's CA") {
			t.Errorf("an admin certificate from this CA is reported as foreign: %v", cli.err)
		}
		t.Logf("client: %v", cli.err)
	})

	t.Run("PeerRole without a certificate", func(t *testing.T) {
		if _, _, err := PeerRole(tls.ConnectionState{}); err == nil {
			t.Error("PeerRole of a connection without a peer certificate succeeded")
		}
	})
}
