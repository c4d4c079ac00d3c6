package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	dbv1 "github.com/gitraft/gitraft/proto/gitraft/db/v1"
	mailv1 "github.com/gitraft/gitraft/proto/gitraft/mail/v1"
	userv1 "github.com/gitraft/gitraft/proto/gitraft/user/v1"
)

// backupManifest is the part of a backup's manifest.json the tests read.
type backupManifest struct {
	Index        uint64                     `json:"index"`
	Repos        []backupRepo               `json:"repos"`
	Packs        map[string]json.RawMessage `json:"packs"`
	Bytes        uint64                     `json:"bytes"`
	BytesWritten uint64                     `json:"bytes_written"`
	PacksWritten int                        `json:"packs_written"`
}

type backupRepo struct {
	Name    string            `json:"name"`
	Version uint64            `json:"version"`
	Refs    map[string]string `json:"refs"`
	Packs   []string          `json:"packs"`
}

func readBackupManifest(t testing.TB, dir string) backupManifest {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		t.Fatal(err)
	}
	var m backupManifest
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("manifest.json: %v\n%s", err, b)
	}
	return m
}

// packFiles lists the pack files in a backup with their modification times.
func packFiles(t *testing.T, dir string) map[string]time.Time {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(dir, "packs"))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]time.Time{}
	for _, e := range entries {
		info, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = info.ModTime()
	}
	return out
}

// clusterView is what a restored cluster must serve as the source did:
// users, keys, grants, the database target and the mail hosts.
type clusterView struct {
	users  *userv1.ListUsersResponse
	keys   *userv1.ListKeysResponse
	grants map[string]*userv1.ListGrantsResponse
	db     *dbv1.State
	mail   *mailv1.ListHostsResponse
}

func (c *cluster) view(n *node, repos ...string) clusterView {
	c.t.Helper()
	conn := c.grpcConn(n, "admin")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	users := userv1.NewUserServiceClient(conn)
	v := clusterView{grants: map[string]*userv1.ListGrantsResponse{}}
	var err error
	if v.users, err = users.ListUsers(ctx, &userv1.ListUsersRequest{}); err != nil {
		c.t.Fatal(err)
	}
	if v.keys, err = users.ListKeys(ctx, &userv1.ListKeysRequest{}); err != nil {
		c.t.Fatal(err)
	}
	for _, r := range repos {
		g, err := users.ListGrants(ctx, &userv1.ListGrantsRequest{Repo: r})
		if err != nil {
			c.t.Fatal(err)
		}
		v.grants[r] = g
	}
	st, err := dbv1.NewDatabaseServiceClient(conn).GetStatus(ctx, &dbv1.GetStatusRequest{})
	if err != nil {
		c.t.Fatal(err)
	}
	v.db = st.GetState()
	if v.mail, err = mailv1.NewMailServiceClient(conn).ListHosts(ctx, &mailv1.ListHostsRequest{}); err != nil {
		c.t.Fatal(err)
	}
	// The index a read reflects differs between clusters; the rest must not.
	v.users.Index, v.keys.Index, v.mail.Index = 0, 0, 0
	for _, g := range v.grants {
		g.Index = 0
	}
	return v
}

func sameView(t *testing.T, got, want clusterView) {
	t.Helper()
	for _, p := range []struct {
		what      string
		got, want proto.Message
	}{{"users", got.users, want.users}, {"keys", got.keys, want.keys}, {"database target", got.db, want.db}, {"mail hosts", got.mail, want.mail}} {
		if !proto.Equal(p.got, p.want) {
			t.Errorf("restored %s differ:\n got %v\nwant %v", p.what, p.got, p.want)
		}
	}
	for r, g := range want.grants {
		if !proto.Equal(got.grants[r], g) {
			t.Errorf("restored grants of %s differ:\n got %v\nwant %v", r, got.grants[r], g)
		}
	}
}

// Push, back up, push more, back up again (only the new pack is copied),
// verify (and see verify fail on a damaged and a missing pack), restore
// into a fresh cluster, clone from it and compare refs, users, keys,
// grants, database target and mail state with the source.
func Test_E2E_BackupRestore(t *testing.T) {
	skipWithoutSSH(t)
	c := startCluster(t, 3)
	n1, n2 := c.nodes[0], c.nodes[1]
	u := c.addGitUser("alice")
	c.must(n1, "user", "add", "bob")
	repos := []string{"acme/site", "acme/docs"}
	for _, r := range repos {
		c.must(n1, "repo", "create", r)
		c.must(n1, "repo", "grant", r, "alice", "write")
	}
	c.must(n1, "repo", "grant", "acme/docs", "bob", "read")
	c.must(n1, "repo", "create", "acme/empty") // never pushed to
	c.must(n2, "db", "pause", "--reason", "backup drill")
	c.must(n2, "mail", "add", "mx1", "--address", "mx1.example.org", "--priority", "10")
	c.must(n2, "mail", "add", "mx2", "--address", "mx2.example.org", "--priority", "20")

	site := u.workTree(url(n1, "acme/site"))
	u.commit(site, "README", "hello\n")
	u.mustGit(site, "push", "-q", "origin", "main")
	u.mustGit(site, "tag", "v1")
	u.mustGit(site, "push", "-q", "origin", "v1")
	docs := u.workTree(url(n2, "acme/docs"))
	u.commit(docs, "index.md", "# docs\n")
	u.mustGit(docs, "push", "-q", "origin", "main")

	// A full backup, through the node that did not take the site's pushes.
	dest := filepath.Join(t.TempDir(), "backup")
	c.must(n2, "backup", "create", dest)
	m1 := readBackupManifest(t, dest)
	if len(m1.Repos) != 3 || m1.PacksWritten == 0 || m1.PacksWritten != len(m1.Packs) {
		t.Fatalf("first backup: %d repos, %d packs written of %d", len(m1.Repos), m1.PacksWritten, len(m1.Packs))
	}
	before := packFiles(t, dest)

	// A small push, then an incremental backup: only its pack is copied.
	u.commit(site, "NEWS", "more\n")
	u.mustGit(site, "push", "-q", "origin", "main")
	out := c.must(n2, "backup", "create", dest)
	m2 := readBackupManifest(t, dest)
	if m2.Index <= m1.Index {
		t.Fatalf("second backup at index %d, first at %d", m2.Index, m1.Index)
	}
	var added []string
	for sum := range m2.Packs {
		if _, ok := m1.Packs[sum]; !ok {
			added = append(added, sum)
		}
	}
	// The push's pack; and, under load, maybe a second one of the same
	// objects (the node fetched them before the push's own pack reached
	// it) or an earlier push's pack that reached this node late.
	if len(added) == 0 || m2.PacksWritten != len(added) {
		t.Fatalf("incremental backup wrote %d packs, with %d packs new since the first backup (want the push's): %s", m2.PacksWritten, len(added), out)
	}
	for _, r := range m2.Repos {
		for _, sum := range added {
			if r.Name != "acme/site" && slices.Contains(r.Packs, sum) {
				t.Errorf("new pack %s belongs to %s, which nobody pushed to", sum, r.Name)
			}
		}
	}
	after := packFiles(t, dest)
	for name, mtime := range before {
		if !after[name].Equal(mtime) {
			t.Errorf("incremental backup rewrote %s, which the first backup had written", name)
		}
	}
	if len(after) != len(before)+2*len(added) {
		t.Errorf("incremental backup: %d files in packs/, want %d (+ each new pack and its index)", len(after), len(before)+2*len(added))
	}
	if m2.BytesWritten >= m2.Bytes {
		t.Errorf("incremental backup wrote %d bytes of %d", m2.BytesWritten, m2.Bytes)
	}
	t.Logf("backups: full %d bytes; incremental wrote %d of %d bytes", m1.Bytes, m2.BytesWritten, m2.Bytes)

	// Every node exports the last backup.
	waitFor(t, "every node to export the last backup", 30*time.Second, func() bool {
		stamp := metricValue(c.nodes[0], "gitraft_backup_last_success_timestamp_seconds")
		if stamp <= 0 {
			return false
		}
		for _, n := range c.nodes {
			if metricValue(n, "gitraft_backup_last_success_timestamp_seconds") != stamp ||
				metricValue(n, "gitraft_backup_last_index") != metricValue(c.nodes[0], "gitraft_backup_last_index") {
				return false
			}
		}
		return true
	})
	if got := metricValue(n1, "gitraft_backup_last_written_bytes"); got <= 0 {
		t.Errorf("gitraft_backup_last_written_bytes = %v", got)
	}

	if out := c.must(nil, "backup", "verify", dest); !strings.Contains(out, "is good") {
		t.Fatalf("verify: %s", out)
	}

	// A damaged pack and a missing one fail verify, each named.
	sitePacks := m2.Repos[slices.IndexFunc(m2.Repos, func(r backupRepo) bool { return r.Name == "acme/site" })].Packs
	bad := filepath.Join(t.TempDir(), "bad")
	if r := runCmd(t, "", nil, time.Minute, "cp", "-a", dest, bad); r.code != 0 {
		t.Fatal(r)
	}
	damaged := filepath.Join(bad, "packs", "pack-"+sitePacks[0]+".pack")
	b, err := os.ReadFile(damaged)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0xff
	if err := os.WriteFile(damaged, b, 0o600); err != nil {
		t.Fatal(err)
	}
	r := c.run(nil, "backup", "verify", bad)
	if r.code == 0 || !strings.Contains(r.stdout, "pack "+sitePacks[0]) || !strings.Contains(r.stdout, "changed or damaged") || !strings.Contains(r.stdout, "acme/site") {
		t.Fatalf("verify of a damaged pack: %s", r)
	}
	missing := m1.Repos[0].Packs[0]
	os.Remove(filepath.Join(bad, "packs", "pack-"+missing+".pack"))
	r = c.run(nil, "backup", "verify", bad)
	if r.code == 0 || !strings.Contains(r.stdout, "pack-"+missing+".pack is missing") {
		t.Fatalf("verify of a missing pack: %s", r)
	}
	if r := c.run(nil, "backup", "restore", bad, "--node-id", "n1", "--data-dir", filepath.Join(t.TempDir(), "never"), "--raft-addr", "127.0.0.1:1", "--insecure"); r.code == 0 || !strings.Contains(r.stderr, "nothing was restored") {
		t.Fatalf("restore of a damaged backup: %s", r)
	}

	// Restore into a fresh cluster: new data dirs, new ports, the same CA.
	want := map[string]string{}
	for _, repo := range repos {
		want[repo] = u.sameEverywhere(repo)
	}
	wantView := c.view(n1, repos...)
	if !wantView.db.GetPaused() || len(wantView.mail.GetHosts()) != 2 || len(wantView.grants["acme/docs"].GetGrants()) != 2 {
		t.Fatalf("the source's state is not what the test set: %v %v %v", wantView.db, wantView.mail, wantView.grants)
	}
	rc := &cluster{t: t, dir: t.TempDir(), ca: c.ca}
	t.Cleanup(func() {
		for _, n := range rc.nodes {
			n.kill()
		}
		for _, n := range rc.nodes {
			n.checkRaces()
		}
		if t.Failed() {
			for _, n := range rc.nodes {
				n.dumpLog()
			}
		}
	})
	// Free ports may be taken by another process before a node binds them
	// (see startCluster): then restore and start again on other ports.
	var first *node
	for attempt := 1; ; attempt++ {
		first = &node{t: t, id: "n1", dir: filepath.Join(rc.dir, "n1"),
			raftAddr: freePort(t), grpcAddr: freePort(t), httpAddr: freePort(t), sshAdr: freePort(t)}
		first.args = []string{"serve",
			"--node-id", "n1", "--data-dir", first.dir,
			"--raft-addr", first.raftAddr, "--grpc-addr", first.grpcAddr, "--http-addr", first.httpAddr, "--ssh-addr", first.sshAdr,
			"--tls-ca-file", filepath.Join(c.ca, "ca.crt"),
			"--tls-cert-file", filepath.Join(c.ca, "n1.crt"), "--tls-key-file", filepath.Join(c.ca, "n1.key"),
			"--git-host-key-files", c.hostKey(),
			"--log-format", "json", "--log-level", "info",
			"--raft-heartbeat-timeout", "500ms", "--raft-election-timeout", "500ms", "--raft-leader-lease-timeout", "250ms",
		}
		restoreArgs := append([]string{"backup", "restore", dest}, first.args[1:]...)
		if out := rc.must(nil, restoreArgs...); !strings.Contains(out, "restored the backup") {
			t.Fatalf("restore: %s", out)
		}
		if r := rc.run(nil, restoreArgs...); r.code == 0 || !strings.Contains(r.stderr, "already holds a node") {
			t.Fatalf("restore into a data dir that holds a node: %s", r)
		}
		rc.nodes = append(rc.nodes, first)
		first.start()
		err := first.awaitReady(60 * time.Second)
		if err == nil {
			rc.addNode("n2", false)
			rc.addNode("n3", false)
			for _, n := range rc.nodes {
				if err = n.awaitReady(120 * time.Second); err != nil {
					break
				}
			}
		}
		if err == nil {
			break
		}
		if attempt == 3 || !rc.portTaken() {
			t.Fatal(err)
		}
		t.Logf("a port was taken (%v); restoring and starting the new cluster again on other ports", err)
		for _, n := range rc.nodes {
			n.kill()
			os.RemoveAll(n.dir)
			os.Remove(n.dir + ".log")
		}
		rc.nodes = nil
	}
	rc.waitVoters(3)

	ru := &gitUser{c: rc, name: "alice", key: u.key, knownHosts: filepath.Join(rc.dir, "known_hosts")}
	if err := os.WriteFile(ru.knownHosts, []byte(rc.knownHostsOf(first)), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, repo := range repos {
		if got := ru.sameEverywhere(repo); got != want[repo] {
			t.Errorf("restored %s serves\n%s\nthe source served\n%s", repo, got, want[repo])
		}
	}
	clone := ru.cloneAndCheck(rc.nodes[2], "acme/site")
	if got, want := strings.TrimSpace(ru.mustGit(clone, "rev-parse", "HEAD")), strings.TrimSpace(u.mustGit(site, "rev-parse", "HEAD")); got != want {
		t.Errorf("clone of the restored acme/site is at %s, the source at %s", got, want)
	}
	sameView(t, rc.view(rc.nodes[1], repos...), wantView)
	if got, want := rc.repoNames(rc.nodes[2]), c.repoNames(n1); !slices.Equal(got, want) {
		t.Errorf("restored repositories %v, the source has %v", got, want)
	}

	// A backup taken while pushes go on is consistent: it verifies, and
	// names the refs of one index.
	pushed := make(chan error, 1)
	gitIn := func(args ...string) error { // not runCmd: it may call t.Fatal, which is for the test's goroutine
		cmd := execCommand("git", args...)
		cmd.Dir, cmd.Env = docs, append(os.Environ(), u.env()...)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("git %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	go func() {
		for i := range 5 {
			if err := os.WriteFile(filepath.Join(docs, "page"), []byte(strings.Repeat("more\n", i+1)), 0o644); err != nil {
				pushed <- err
				return
			}
			for _, args := range [][]string{{"add", "page"}, {"commit", "-q", "-m", "page"}, {"push", "-q", "origin", "main"}} {
				if err := gitIn(args...); err != nil {
					pushed <- err
					return
				}
			}
		}
		pushed <- nil
	}()
	online := filepath.Join(t.TempDir(), "online")
	c.must(n1, "backup", "create", online)
	if err := <-pushed; err != nil {
		t.Fatal(err)
	}
	if out := c.must(nil, "backup", "verify", online); !strings.Contains(out, "is good") {
		t.Fatalf("verify of a backup taken during pushes: %s", out)
	}

	// The restored cluster takes pushes.
	u2 := &gitUser{c: rc, name: "alice", key: u.key, knownHosts: ru.knownHosts}
	u2.mustGit(site, "remote", "set-url", "origin", url(rc.nodes[1], "acme/site"))
	u2.commit(site, "AFTER", "restored\n")
	u2.mustGit(site, "push", "-q", "origin", "main")
	u2.sameEverywhere("acme/site")
}
