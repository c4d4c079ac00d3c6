package main

import (
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/gitraft/gitraft/cluster/pki"
	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
)

func TestCAInitAndIssue(t *testing.T) {
	clearEnv(t)
	dir := filepath.Join(t.TempDir(), "ca")

	out, err := run(t, "ca", "init", "--dir", dir, "--name", "prod", "--days", "30")
	if err != nil {
		t.Fatalf("ca init: %v", err)
	}
	for _, want := range []string{`created CA "prod"`, filepath.Join(dir, pki.CACertFile), filepath.Join(dir, pki.CAKeyFile), "gitraft ca issue node"} {
		if !strings.Contains(out, want) {
			t.Errorf("ca init output lacks %q:\n%s", want, out)
		}
	}
	// A second init refuses to replace the CA.
	if _, err := run(t, "ca", "init", "--dir", dir); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Errorf("second ca init: %v", err)
	}

	out, err = run(t, "ca", "issue", "node", "n1", "--dir", dir, "--host", "10.0.0.1", "--host", "n1.example.com")
	if err != nil {
		t.Fatalf("ca issue node: %v", err)
	}
	nodeCert, nodeKey := filepath.Join(dir, "n1.crt"), filepath.Join(dir, "n1.key")
	for _, want := range []string{`issued node certificate "n1"`, nodeCert, nodeKey, "cert_file: "} {
		if !strings.Contains(out, want) {
			t.Errorf("ca issue node output lacks %q:\n%s", want, out)
		}
	}
	b, err := pki.Files{CA: filepath.Join(dir, pki.CACertFile), Cert: nodeCert, Key: nodeKey}.Load()
	if err != nil {
		t.Fatalf("load the node certificate: %v", err)
	}
	if b.Role != pki.RoleNode || b.Leaf.Subject.CommonName != "n1" || len(b.Leaf.DNSNames) == 0 {
		t.Errorf("node certificate: role %s, CN %q, DNS %v", b.Role, b.Leaf.Subject.CommonName, b.Leaf.DNSNames)
	}
	hasIP := false
	for _, ip := range b.Leaf.IPAddresses {
		hasIP = hasIP || ip.Equal(net.ParseIP("10.0.0.1"))
	}
	if !hasIP {
		t.Errorf("node certificate lacks --host 10.0.0.1: %v", b.Leaf.IPAddresses)
	}

	outDir := filepath.Join(t.TempDir(), "alice")
	out, err = run(t, "ca", "issue", "admin", "alice", "--dir", dir, "--out", outDir, "--days", "7")
	if err != nil {
		t.Fatalf("ca issue admin: %v", err)
	}
	adminCert, adminKey := filepath.Join(outDir, "alice.crt"), filepath.Join(outDir, "alice.key")
	wantExport := "export GITRAFT_CACERT=" + filepath.Join(dir, pki.CACertFile) + " GITRAFT_CLIENT_CERT=" + adminCert + " GITRAFT_CLIENT_KEY=" + adminKey + "\n"
	if !strings.Contains(out, wantExport) {
		t.Errorf("ca issue admin output lacks %q:\n%s", wantExport, out)
	}
	b, err = pki.Files{CA: filepath.Join(dir, pki.CACertFile), Cert: adminCert, Key: adminKey}.Load()
	if err != nil || b.Role != pki.RoleAdmin {
		t.Fatalf("load the admin certificate: %v", err)
	}
	if days := b.Leaf.NotAfter.Sub(b.Leaf.NotBefore).Hours() / 24; days < 7 || days > 8 {
		t.Errorf("--days 7 made a certificate valid %.1f days", days)
	}

	// --json prints the paths.
	out, err = run(t, "ca", "issue", "admin", "bob", "--dir", dir, "--json")
	if err != nil {
		t.Fatal(err)
	}
	var paths map[string]string
	if err := json.Unmarshal([]byte(out), &paths); err != nil || paths["cert"] != filepath.Join(dir, "bob.crt") || paths["role"] != "admin" {
		t.Errorf("ca issue --json = %q (%v)", out, err)
	}

	// Mistakes.
	if _, err := run(t, "ca", "issue", "root", "x", "--dir", dir); err == nil || !strings.Contains(err.Error(), "node NAME") {
		t.Errorf("ca issue root: %v", err)
	}
	if _, err := run(t, "ca", "issue", "node", "../evil", "--dir", dir); err == nil || !strings.Contains(err.Error(), "invalid certificate name") {
		t.Errorf("ca issue node ../evil: %v", err)
	}
	if _, err := run(t, "ca", "issue", "node", "n2", "--dir", filepath.Join(t.TempDir(), "none")); err == nil || !strings.Contains(err.Error(), "gitraft ca init") {
		t.Errorf("ca issue without a CA: %v", err)
	}
}

func TestShellQuote(t *testing.T) {
	for in, want := range map[string]string{
		"/etc/gitraft/ca.crt": "/etc/gitraft/ca.crt",
		"/my certs/ca.crt":    "'/my certs/ca.crt'",
		"it's":                `'it'\''s'`,
		"":                    "''",
	} {
		if got := shellQuote(in); got != want {
			t.Errorf("shellQuote(%q) = %s, want %s", in, got, want)
		}
	}
}

// TestTLS runs commands against an mTLS server with certificates made by
// `gitraft ca`, and checks the errors for the wrong CA or no TLS.
func TestTLS(t *testing.T) {
	clearEnv(t)
	tmp := t.TempDir()
	caDir, otherDir := filepath.Join(tmp, "ca"), filepath.Join(tmp, "other")
	for _, args := range [][]string{
		{"ca", "init", "--dir", caDir},
		{"ca", "issue", "node", "n1", "--dir", caDir},
		{"ca", "issue", "admin", "alice", "--dir", caDir},
		{"ca", "init", "--dir", otherDir},
		{"ca", "issue", "admin", "mallory", "--dir", otherDir},
	} {
		if _, err := run(t, args...); err != nil {
			t.Fatalf("%v: %v", args, err)
		}
	}
	b, err := pki.Files{CA: filepath.Join(caDir, pki.CACertFile), Cert: filepath.Join(caDir, "n1.crt"), Key: filepath.Join(caDir, "n1.key")}.Load()
	if err != nil {
		t.Fatal(err)
	}
	sc, err := b.ServerConfig()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer(grpc.Creds(credentials.NewTLS(sc)))
	repov1.RegisterRepoServiceServer(s, &fakeRepos{repos: map[string]*repov1.Repo{}})
	go s.Serve(ln)
	t.Cleanup(s.Stop)
	addr := ln.Addr().String()

	creds := func(ca, dir, name string) []string {
		return []string{"--addr", addr, "--ca-cert", filepath.Join(ca, pki.CACertFile), "--client-cert", filepath.Join(dir, name+".crt"), "--client-key", filepath.Join(dir, name+".key")}
	}

	// The right credentials.
	out, err := run(t, append([]string{"repo", "ls"}, creds(caDir, caDir, "alice")...)...)
	if err != nil || out != "no repositories\n" {
		t.Fatalf("repo ls over mTLS = %q, %v", out, err)
	}
	// The same from the environment.
	t.Setenv(envAddr, addr)
	t.Setenv(envCACert, filepath.Join(caDir, pki.CACertFile))
	t.Setenv(envClientCert, filepath.Join(caDir, "alice.crt"))
	t.Setenv(envClientKey, filepath.Join(caDir, "alice.key"))
	if out, err := run(t, "repo", "ls"); err != nil || out != "no repositories\n" {
		t.Fatalf("repo ls with credentials from the environment = %q, %v", out, err)
	}
	clearEnv(t)

	// Our CA is not the server's: the client rejects the server.
	_, err = run(t, append([]string{"repo", "ls"}, creds(otherDir, otherDir, "mallory")...)...)
	if err == nil || !strings.HasPrefix(err.Error(), "TLS handshake with "+addr+" failed: ") || !strings.Contains(err.Error(), "--ca-cert the cluster's CA") {
		t.Errorf("wrong CA: %v", err)
	}
	t.Logf("wrong CA: %v", err)

	// A client certificate not signed by --ca-cert is caught before dialing.
	_, err = run(t, append([]string{"repo", "ls"}, creds(caDir, otherDir, "mallory")...)...)
	if err == nil || !strings.Contains(err.Error(), "not signed by the CA") {
		t.Errorf("foreign client certificate: %v", err)
	}
	t.Logf("foreign client certificate: %v", err)

	// A server that trusts another CA for clients rejects ours.
	strict := sc.Clone()
	ob, err := pki.Files{CA: filepath.Join(otherDir, pki.CACertFile), Cert: filepath.Join(otherDir, "mallory.crt"), Key: filepath.Join(otherDir, "mallory.key")}.Load()
	if err != nil {
		t.Fatal(err)
	}
	strict.ClientCAs = ob.Pool
	ln2, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s2 := grpc.NewServer(grpc.Creds(credentials.NewTLS(strict)))
	repov1.RegisterRepoServiceServer(s2, &fakeRepos{repos: map[string]*repov1.Repo{}})
	go s2.Serve(ln2)
	t.Cleanup(s2.Stop)
	args := creds(caDir, caDir, "alice")
	args[1] = ln2.Addr().String()
	_, err = run(t, append([]string{"repo", "ls", "--timeout", "3s"}, args...)...)
	if err == nil || !strings.HasPrefix(err.Error(), "TLS handshake with "+args[1]+" failed: ") {
		t.Errorf("server rejects the client certificate: %v", err)
	}
	t.Logf("server rejects the client certificate: %v", err)

	// --insecure against a TLS server (on loopback).
	_, err = run(t, "repo", "ls", "--addr", addr, "--insecure", "--timeout", "3s")
	if err == nil || !strings.Contains(err.Error(), addr) {
		t.Errorf("insecure against TLS: %v", err)
	}
	t.Logf("insecure against TLS: %v", err)

	// TLS against a plaintext server.
	plainAddr, _ := startFake(t)
	args = creds(caDir, caDir, "alice")
	args[1] = plainAddr
	_, err = run(t, append([]string{"repo", "ls"}, args...)...)
	if err == nil || !strings.HasPrefix(err.Error(), "TLS handshake with "+plainAddr+" failed") {
		t.Errorf("TLS against plaintext: %v", err)
	}
	t.Logf("TLS against plaintext: %v", err)

	// Missing files.
	args = creds(caDir, caDir, "nobody")
	_, err = run(t, append([]string{"repo", "ls"}, args...)...)
	if err == nil || !strings.Contains(err.Error(), "nobody.crt") {
		t.Errorf("missing certificate: %v", err)
	}
	t.Logf("missing certificate: %v", err)
	if _, err := os.Stat(filepath.Join(caDir, "nobody.crt")); err == nil {
		t.Fatal("nobody.crt exists")
	}
}
