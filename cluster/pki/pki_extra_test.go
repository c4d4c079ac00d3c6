package pki

// Tests of details beyond pki_test.go: the internal issueAt clock, CA
// consistency checks, SAN de-duplication, validity capped at the CA's, and
// the server refusing a role-less client. Helpers here are prefixed "x" so
// they cannot collide with pki_test.go's.

import (
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

func xCA(t *testing.T, name string, validity time.Duration) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	if _, err := InitCA(dir, name, validity); err != nil {
		t.Fatal(err)
	}
	return dir
}

func xWant(t *testing.T, what string, err error, subs ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: no error", what)
	}
	for _, s := range subs {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("%s: %q does not mention %q", what, err, s)
		}
	}
}

func Test_PKI_Extra_ExpiredViaIssueAt(t *testing.T) {
	ca := xCA(t, "dev", 0)
	cert, key, err := issueAt(ca, IssueOptions{Role: RoleNode, Name: "node1", Validity: 24 * time.Hour}, time.Now().Add(-72*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	for p, mode := range map[string]os.FileMode{cert: 0o644, key: 0o600} {
		if st, err := os.Stat(p); err != nil || st.Mode().Perm() != mode {
			t.Errorf("%s: %v, mode %v, want %v", p, err, st.Mode().Perm(), mode)
		}
	}
	_, err = Files{CA: filepath.Join(ca, CACertFile), Cert: cert, Key: key}.Load()
	xWant(t, "expired", err, "certificate node1.crt expired on "+time.Now().Add(-48*time.Hour).UTC().Format("2006-01-02"))
}

func Test_PKI_Extra_CAChecks(t *testing.T) {
	t.Run("CA key does not match", func(t *testing.T) {
		a, b := xCA(t, "a", 0), xCA(t, "b", 0)
		if err := os.Remove(filepath.Join(a, CAKeyFile)); err != nil {
			t.Fatal(err)
		}
		kb, _ := os.ReadFile(filepath.Join(b, CAKeyFile))
		os.WriteFile(filepath.Join(a, CAKeyFile), kb, 0o600)
		_, _, err := Issue(a, IssueOptions{Role: RoleNode, Name: "n1"})
		xWant(t, "mismatched CA key", err, CAKeyFile, "does not match")
		if _, err := os.Stat(filepath.Join(a, "n1.key")); err == nil {
			t.Error("a failed Issue left n1.key behind")
		}
	})
	t.Run("CA key missing", func(t *testing.T) {
		a := xCA(t, "a", 0)
		os.Remove(filepath.Join(a, CAKeyFile))
		_, _, err := Issue(a, IssueOptions{Role: RoleNode, Name: "n1"})
		if !errors.Is(err, ErrNoCA) {
			t.Fatalf("%v, want ErrNoCA", err)
		}
		xWant(t, "no CA key", err, CAKeyFile)
	})
	t.Run("leaf given as CA", func(t *testing.T) {
		a := xCA(t, "a", 0)
		cert, key, err := Issue(a, IssueOptions{Role: RoleNode, Name: "n1"})
		if err != nil {
			t.Fatal(err)
		}
		_, err = Files{CA: cert, Cert: cert, Key: key}.Load()
		xWant(t, "leaf as CA", err, "n1.crt is not a CA certificate")
	})
	t.Run("cert and key swapped", func(t *testing.T) {
		a := xCA(t, "a", 0)
		cert, key, err := Issue(a, IssueOptions{Role: RoleAdmin, Name: "ops"})
		if err != nil {
			t.Fatal(err)
		}
		_, err = Files{CA: filepath.Join(a, CACertFile), Cert: key, Key: cert}.Load()
		xWant(t, "swapped", err, "ops.key holds no PEM certificate")
	})
	t.Run("another CA of the same name", func(t *testing.T) {
		a, b := xCA(t, "dev", 0), xCA(t, "dev", 0)
		cert, key, err := Issue(b, IssueOptions{Role: RoleNode, Name: "node1"})
		if err != nil {
			t.Fatal(err)
		}
		_, err = Files{CA: filepath.Join(a, CACertFile), Cert: cert, Key: key}.Load()
		xWant(t, "same-name CA", err, `certificate node1.crt is not signed by the CA in ca.crt (issuer "gitraft CA dev", expected "gitraft CA dev")`, "same name")
	})
	t.Run("no CA file given", func(t *testing.T) {
		_, err := Files{Cert: "x.crt", Key: "x.key"}.Load()
		xWant(t, "empty Files", err, "no CA certificate file given")
	})
}

func Test_PKI_Extra_IssueDetails(t *testing.T) {
	ca := xCA(t, "dev", 48*time.Hour)
	cert, key, err := Issue(ca, IssueOptions{Role: RoleNode, Name: "n1", Hosts: []string{"localhost", "127.0.0.1", " 10.1.2.3 ", "", "Git.Example.org", "git.example.org"}})
	if err != nil {
		t.Fatal(err)
	}
	b, err := Files{CA: filepath.Join(ca, CACertFile), Cert: cert, Key: key}.Load()
	if err != nil {
		t.Fatal(err)
	}
	var ips []string
	for _, ip := range b.Leaf.IPAddresses {
		ips = append(ips, ip.String())
	}
	if got := strings.Join(ips, ","); got != "127.0.0.1,::1,10.1.2.3" {
		t.Errorf("IP SANs %s", got)
	}
	if got := strings.Join(b.Leaf.DNSNames, ","); got != "localhost,Git.Example.org" {
		t.Errorf("DNS SANs %s", got)
	}
	// The CA lives 48h; an 825-day certificate is cut to the CA's expiry.
	caCert, _, err := loadCA(ca)
	if err != nil {
		t.Fatal(err)
	}
	if !b.Leaf.NotAfter.Equal(caCert.NotAfter) {
		t.Errorf("leaf expires %v, CA %v", b.Leaf.NotAfter, caCert.NotAfter)
	}
	if b.Leaf.SerialNumber.Sign() <= 0 || b.Leaf.SerialNumber.BitLen() > 128 {
		t.Errorf("serial %v", b.Leaf.SerialNumber)
	}
}

func Test_PKI_Extra_ServerRefusesRolelessClient(t *testing.T) {
	ca := xCA(t, "dev", 0)
	load := func(role Role, name string) *Bundle {
		cert, key, err := Issue(ca, IssueOptions{Role: role, Name: name})
		if err != nil {
			t.Fatal(err)
		}
		b, err := Files{CA: filepath.Join(ca, CACertFile), Cert: cert, Key: key}.Load()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	srvB, cliB := load(RoleNode, "n1"), load(RoleNode, "n2")
	// Re-sign n2's key with the CA, without an OU: chains, but has no role.
	caCert, caKey, err := loadCA(ca)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := *cliB.Leaf
	tmpl.Subject.OrganizationalUnit = nil
	tmpl.RawSubject, tmpl.Subject.Names, tmpl.ExtraExtensions, tmpl.Extensions = nil, nil, nil, nil
	tmpl.SerialNumber = serial()
	der, err := x509.CreateCertificate(nil, &tmpl, caCert, cliB.Leaf.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	roleless := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: cliB.Cert.PrivateKey}

	server, err := srvB.ServerConfig()
	if err != nil {
		t.Fatal(err)
	}
	client := cliB.ClientConfig("")
	client.Certificates = []tls.Certificate{roleless}

	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	deadline := time.Now().Add(5 * time.Second)
	a.SetDeadline(deadline)
	b.SetDeadline(deadline)
	serr := make(chan error, 1)
	go func() {
		s := tls.Server(a, server)
		err := s.Handshake()
		a.Close()
		serr <- err
	}()
	c := tls.Client(b, client)
	if err := c.Handshake(); err == nil {
		c.Read(make([]byte, 1))
	}
	if err := <-serr; err == nil || !strings.Contains(err.Error(), "unknown certificate role") {
		t.Fatalf("server accepted a client certificate without a role: %v", err)
	}
}
