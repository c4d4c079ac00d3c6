package pki

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func mustCA(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	if _, err := InitCA(dir, "test", 0); err != nil {
		t.Fatal(err)
	}
	return dir
}

func mustIssue(t *testing.T, ca string, role Role, name string, hosts ...string) Files {
	t.Helper()
	cert, key, err := Issue(ca, IssueOptions{Role: role, Name: name, Hosts: hosts})
	if err != nil {
		t.Fatal(err)
	}
	return Files{CA: filepath.Join(ca, CACertFile), Cert: cert, Key: key}
}

func mustLoad(t *testing.T, f Files) *Bundle {
	t.Helper()
	b, err := f.Load()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func Test_PKI_InitCA(t *testing.T) {
	dir := mustCA(t)
	for name, mode := range map[string]os.FileMode{CACertFile: 0o644, CAKeyFile: 0o600} {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil || st.Mode().Perm() != mode {
			t.Fatalf("%s: %v mode %v, want %v", name, err, st.Mode().Perm(), mode)
		}
	}
	before, _ := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if _, err := InitCA(dir, "again", 0); !errors.Is(err, ErrExists) {
		t.Fatalf("second InitCA: %v, want ErrExists", err)
	}
	after, _ := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if string(before) != string(after) {
		t.Fatal("a refused InitCA replaced the CA key")
	}
}

func Test_PKI_Issue(t *testing.T) {
	ca := mustCA(t)
	node := mustLoad(t, mustIssue(t, ca, RoleNode, "n1", "10.0.0.1", "git1.example.org"))
	if node.Role != RoleNode || node.Leaf.Subject.CommonName != "n1" {
		t.Fatalf("node cert role %s name %s", node.Role, node.Leaf.Subject.CommonName)
	}
	var ips []string
	for _, ip := range node.Leaf.IPAddresses {
		ips = append(ips, ip.String())
	}
	if got := strings.Join(ips, ","); got != "127.0.0.1,::1,10.0.0.1" {
		t.Errorf("node IP SANs %s", got)
	}
	if got := strings.Join(node.Leaf.DNSNames, ","); got != "localhost,git1.example.org" {
		t.Errorf("node DNS SANs %s", got)
	}
	admin := mustLoad(t, mustIssue(t, ca, RoleAdmin, "alice"))
	if admin.Role != RoleAdmin || len(admin.Leaf.ExtKeyUsage) != 1 || admin.Leaf.ExtKeyUsage[0] != x509.ExtKeyUsageClientAuth {
		t.Fatalf("admin cert: role %s usages %v", admin.Role, admin.Leaf.ExtKeyUsage)
	}
	if _, _, err := Issue(ca, IssueOptions{Role: RoleNode, Name: "n1"}); !errors.Is(err, ErrExists) {
		t.Errorf("issuing n1 twice: %v", err)
	}
	for _, bad := range []string{"", "../x", "a/b", ".x", strings.Repeat("a", 64)} {
		if _, _, err := Issue(ca, IssueOptions{Role: RoleNode, Name: bad}); !errors.Is(err, ErrBadName) {
			t.Errorf("name %q: %v, want ErrBadName", bad, err)
		}
	}
	if _, _, err := Issue(ca, IssueOptions{Role: "root", Name: "x"}); !errors.Is(err, ErrBadRole) {
		t.Errorf("bad role: %v", err)
	}
	empty := t.TempDir()
	if _, _, err := Issue(empty, IssueOptions{Role: RoleNode, Name: "x"}); !errors.Is(err, ErrNoCA) || !strings.Contains(err.Error(), "gitraft ca init") {
		t.Errorf("no CA: %v", err)
	}
}

func Test_PKI_LoadExplainsProblems(t *testing.T) {
	ca, other := mustCA(t), mustCA(t)
	good := mustIssue(t, ca, RoleNode, "n1")
	foreign := mustIssue(t, other, RoleNode, "n2")
	cases := map[string]struct {
		f    Files
		want []string
	}{
		"other CA":     {Files{CA: good.CA, Cert: foreign.Cert, Key: foreign.Key}, []string{"n2.crt", "ca.crt", "not signed"}},
		"key mismatch": {Files{CA: good.CA, Cert: good.Cert, Key: foreign.Key}, []string{"n2.key", "n1.crt", "does not match"}},
		"missing file": {Files{CA: good.CA, Cert: good.Cert + ".nope", Key: good.Key}, []string{"no such file"}},
	}
	for name, tc := range cases {
		_, err := tc.f.Load()
		if err == nil {
			t.Errorf("%s: loaded", name)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: %q lacks %q", name, err, w)
			}
		}
	}
	// An expired certificate.
	caCert, caKey, err := loadCA(ca)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: serial(), NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-24 * time.Hour)}
	tmpl.Subject.CommonName, tmpl.Subject.OrganizationalUnit = "old", []string{"gitraft-node"}
	pair := mustIssue(t, ca, RoleNode, "old-key-donor")
	kp, err := tls.LoadX509KeyPair(pair.Cert, pair.Key)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificate(nil, tmpl, caCert, kp.PrivateKey.(crypto.Signer).Public(), caKey)
	if err == nil {
		expired := filepath.Join(t.TempDir(), "expired.crt")
		writePEM(expired, "CERTIFICATE", der, 0o644)
		if _, err := (Files{CA: good.CA, Cert: expired, Key: pair.Key}).Load(); err == nil || !strings.Contains(err.Error(), "expired") {
			t.Errorf("expired cert: %v", err)
		}
	} else {
		t.Fatal(err)
	}
}

// handshake runs a TLS handshake between a server and a client config over
// loopback and returns both sides' states and errors.
func handshake(t *testing.T, server, client *tls.Config) (tls.ConnectionState, tls.ConnectionState, error, error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		cs  tls.ConnectionState
		err error
	}
	srv := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			srv <- res{err: err}
			return
		}
		defer c.Close()
		tc := tls.Server(c, server)
		err = tc.Handshake()
		if err == nil {
			// TLS 1.3 clients finish first; read once so a client-side
			// refusal reaches the server as an error.
			tc.SetReadDeadline(time.Now().Add(time.Second))
			tc.Read(make([]byte, 1))
		}
		srv <- res{tc.ConnectionState(), err}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tc := tls.Client(c, client)
	cerr := tc.Handshake()
	if cerr == nil {
		tc.Write([]byte{1})
	}
	s := <-srv
	return s.cs, tc.ConnectionState(), s.err, cerr
}

func Test_PKI_MutualTLS(t *testing.T) {
	ca, other := mustCA(t), mustCA(t)
	n1 := mustLoad(t, mustIssue(t, ca, RoleNode, "n1"))
	n2 := mustLoad(t, mustIssue(t, ca, RoleNode, "n2"))
	admin := mustLoad(t, mustIssue(t, ca, RoleAdmin, "alice"))
	intruder := mustLoad(t, mustIssue(t, other, RoleAdmin, "mallory"))
	srvCfg, err := n2.ServerConfig()
	if err != nil {
		t.Fatal(err)
	}

	scs, ccs, serr, cerr := handshake(t, srvCfg, n1.ClientConfig(""))
	if serr != nil || cerr != nil {
		t.Fatalf("node to node: server %v, client %v", serr, cerr)
	}
	if r, name, err := PeerRole(scs); err != nil || r != RoleNode || name != "n1" {
		t.Errorf("server sees %s %s %v", r, name, err)
	}
	if r, name, err := PeerRole(ccs); err != nil || r != RoleNode || name != "n2" {
		t.Errorf("client sees %s %s %v", r, name, err)
	}

	scs, _, serr, cerr = handshake(t, srvCfg, admin.ClientConfig(""))
	if serr != nil || cerr != nil {
		t.Fatalf("admin to node: server %v, client %v", serr, cerr)
	}
	if r, _, _ := PeerRole(scs); r != RoleAdmin {
		t.Errorf("server sees role %s, want admin", r)
	}

	if _, _, serr, cerr = handshake(t, srvCfg, intruder.ClientConfig("")); serr == nil && cerr == nil {
		t.Fatal("a client with a certificate from another CA was accepted")
	}
	trustsOther := intruder.ClientConfig("")
	if _, _, _, cerr = handshake(t, srvCfg, trustsOther); cerr == nil || !strings.Contains(cerr.Error(), "CA") && !strings.Contains(cerr.Error(), "certificate") {
		t.Errorf("a client trusting another CA accepted the server: %v", cerr)
	}
	if _, err := admin.ServerConfig(); err == nil {
		t.Error("an admin certificate can serve")
	}
	// A server presenting an admin certificate is refused by node clients.
	fake := &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{admin.Cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: admin.Pool}
	if _, _, _, cerr = handshake(t, fake, n1.ClientConfig("")); cerr == nil || !strings.Contains(cerr.Error(), `"alice"`) {
		t.Errorf("client accepted a server with an admin certificate: %v", cerr)
	}
}
