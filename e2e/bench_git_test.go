package e2e

import (
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// plainSSHD runs OpenSSH's sshd on loopback with its own config, host key
// and authorized_keys, serving the bare repos under dir: the baseline.
type plainSSHD struct {
	port string
	dir  string
	cmd  *exec.Cmd
}

// plainUser is the account the baseline serves git as: the classic setup,
// a dedicated user whose login shell is git-shell (so no shell start-up
// files slow the baseline down).
const plainAccount = "gitbench"

func startPlainSSHD(b *testing.B, pubKey string) *plainSSHD {
	b.Helper()
	sshd := "/usr/sbin/sshd"
	if _, err := os.Stat(sshd); err != nil {
		b.Fatalf("%s is missing; run ./e2e/bench.sh, which installs openssh-server", sshd)
	}
	if runCmd(b, "/", nil, time.Minute, "id", plainAccount).code != 0 {
		shell, err := exec.LookPath("git-shell")
		if err != nil {
			shell = "/usr/bin/git-shell"
		}
		if r := runCmd(b, "/", nil, time.Minute, "useradd", "--system", "--create-home", "--shell", shell, plainAccount); r.code != 0 {
			b.Fatalf("creating the %s account for the baseline (needs root): %s", plainAccount, r)
		}
	}
	// useradd locks the new account's password, and sshd without PAM refuses
	// locked accounts even for key logins: set "no password" instead.
	runCmd(b, "/", nil, time.Minute, "usermod", "-p", "*", plainAccount)
	dir, err := os.MkdirTemp("", "gitraft-bench-plain-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	os.MkdirAll("/run/sshd", 0o755) // privilege separation directory
	hostKey := filepath.Join(dir, "ssh_host_ed25519_key")
	if r := runCmd(b, dir, nil, time.Minute, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", hostKey); r.code != 0 {
		b.Fatal(r)
	}
	pub, _ := os.ReadFile(pubKey)
	os.WriteFile(filepath.Join(dir, "authorized_keys"), pub, 0o644)
	addr := freePort(b)
	_, port, _ := strings.Cut(addr, ":")
	cfg := filepath.Join(dir, "sshd_config")
	os.WriteFile(cfg, []byte(fmt.Sprintf(`Port %s
ListenAddress 127.0.0.1
HostKey %s
AuthorizedKeysFile %s
PidFile %s
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin no
AllowUsers %s
AcceptEnv GIT_PROTOCOL
MaxStartups 100:30:200
MaxSessions 100
`, port, hostKey, filepath.Join(dir, "authorized_keys"), filepath.Join(dir, "sshd.pid"), plainAccount)), 0o600)
	cmd := exec.Command(sshd, "-D", "-e", "-f", cfg)
	log, _ := os.Create(filepath.Join(dir, "sshd.log"))
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitFor(b, "sshd to listen", 10*time.Second, func() bool {
		c, err := (&netDialer{}).dial(addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	return &plainSSHD{port: port, dir: dir, cmd: cmd}
}

func (p *plainSSHD) url(repo string) string {
	return fmt.Sprintf("ssh://%s@127.0.0.1:%s%s", plainAccount, p.port, filepath.Join(p.dir, repo+".git"))
}

// initBare makes a bare repo with the same durability settings gitraft uses
// (objects and refs fsynced), so the baseline is not cheating on fsync.
func (p *plainSSHD) initBare(b *testing.B, repo string) {
	path := filepath.Join(p.dir, repo+".git")
	for _, args := range [][]string{
		{"init", "-q", "--bare", path},
		{"-C", path, "config", "core.fsync", "objects,reference,derived-metadata"},
		{"-C", path, "config", "core.fsyncMethod", "fsync"},
		{"-C", path, "config", "uploadpack.allowFilter", "true"},
		{"-C", path, "config", "gc.auto", "0"},
	} {
		if r := runCmd(b, p.dir, nil, time.Minute, "git", args...); r.code != 0 {
			b.Fatal(r)
		}
	}
	if r := runCmd(b, p.dir, nil, time.Minute, "chown", "-R", plainAccount, path); r.code != 0 {
		b.Fatal(r)
	}
}

type timing []time.Duration

func (t timing) pct(p float64) time.Duration {
	s := append(timing(nil), t...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

func timed(b *testing.B, fn func() result) time.Duration {
	b.Helper()
	start := time.Now()
	if r := fn(); r.code != 0 {
		b.Fatal(r)
	}
	return time.Since(start)
}

// goSourceRepo builds a work tree from $(go env GOROOT)/src committed in
// steps: data every machine here has.
func goSourceRepo(b *testing.B, u *gitUser, dir string) string {
	b.Helper()
	src := filepath.Join(runtime.GOROOT(), "src")
	wt := filepath.Join(dir, "gosrc")
	if r := runCmd(b, dir, nil, 5*time.Minute, "cp", "-r", src, wt); r.code != 0 {
		b.Fatal(r)
	}
	u.mustGit(wt, "init", "-q", "-b", "main")
	entries, _ := os.ReadDir(wt)
	var names []string
	for _, e := range entries {
		if e.Name() != ".git" {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	step := (len(names) + 3) / 4
	for i := 0; i < len(names); i += step {
		u.mustGit(wt, append([]string{"add", "-f", "--"}, names[i:min(i+step, len(names))]...)...)
		u.mustGit(wt, "commit", "-q", "-m", fmt.Sprintf("go source, step %d", i/step+1))
	}
	return wt
}

type gitRow struct {
	name           string
	plain, gitraft time.Duration
	unit           string
}

// BenchmarkGit compares a 3-node gitraft cluster with plain git over
// OpenSSH's sshd on the same machine, in one run.
func BenchmarkGit(b *testing.B) {
	c := startCluster(b, 3)
	u := c.addGitUser("bench")
	if benchGitFailoverOnly() {
		benchGitFailover(b, c, u)
		return
	}
	lead := c.leader()
	follower := c.other(lead)
	via := follower // pushes and clones go through a follower: the harder case
	plain := startPlainSSHD(b, u.key+".pub")
	plainUser := &gitUser{c: c, name: "bench", key: u.key, knownHosts: filepath.Join(plain.dir, "known_hosts")}
	pk, _ := os.ReadFile(filepath.Join(plain.dir, "ssh_host_ed25519_key.pub"))
	os.WriteFile(plainUser.knownHosts, []byte("[127.0.0.1]:"+plain.port+" "+string(pk)), 0o600)

	if benchGitConcurrentOnly() {
		benchGitConcurrent(b, c, u, plain, plainUser)
		return
	}
	for _, repo := range []string{"small", "big", "gosrc"} {
		c.must(lead, "repo", "create", repo)
		c.must(lead, "repo", "grant", repo, "bench", "write")
		plain.initBare(b, repo)
	}
	var rows []gitRow
	remotes := func(repo string) (string, string) { return plain.url(repo), url(via, repo) }

	// Small pushes: 50 rounds, each pushing one small commit to each
	// server and then running ls-remote of the same repository there. The
	// servers take turns going first, so that whatever else the machine
	// does weighs on both alike (the two figures are a few milliseconds
	// apart, and this machine's load swings by tens). Each push also
	// counts the processes the whole machine started meanwhile (client
	// included, the same client for both).
	const pushes = 50
	var lat, ls [2]timing
	var procs [2][]uint64
	whos := [2]*gitUser{plainUser, u}
	pu, gu := remotes("small")
	urls := [2]string{pu, gu}
	var wts [2]string
	for k, who := range whos {
		wts[k] = who.workTree(urls[k])
	}
	for i := range pushes {
		for j := range 2 {
			k := (i + j) % 2
			who, wt := whos[k], wts[k]
			who.commit(wt, "f.txt", fmt.Sprintf("change %d\n", i))
			// Let the previous push's stragglers (peers catching up) end.
			time.Sleep(200 * time.Millisecond)
			before := forks(b)
			lat[k] = append(lat[k], timed(b, func() result { return who.git(wt, "push", "-q", "origin", "main") }))
			// Peers record the version just after the push: count them too.
			time.Sleep(300 * time.Millisecond)
			procs[k] = append(procs[k], forks(b)-before)
			ls[k] = append(ls[k], timed(b, func() result { return who.git(c.dir, "ls-remote", urls[k]) }))
		}
	}
	rows = append(rows,
		gitRow{"small push p50 (50 pushes)", lat[0].pct(0.5), lat[1].pct(0.5), "latency"},
		gitRow{"small push p99 (50 pushes)", lat[0].pct(0.99), lat[1].pct(0.99), "latency"},
		gitRow{"ls-remote p50 (50 runs, same repository)", ls[0].pct(0.5), ls[1].pct(0.5), "latency"},
		gitRow{"a small push's own work (push p50 - ls-remote p50)", lat[0].pct(0.5) - ls[0].pct(0.5), lat[1].pct(0.5) - ls[1].pct(0.5), "latency"})
	if os.Getenv("GITRAFT_BENCH_GIT") == "push" {
		// Only the push-cost figures.
		printGitTable(rows, procs)
		return
	}

	// One push of 100 MB of incompressible data.
	data := make([]byte, 100<<20)
	rand.Read(data)
	var bigPush [2]time.Duration
	for k, who := range []*gitUser{plainUser, u} {
		pu, gu := remotes("big")
		wt := who.workTree([]string{pu, gu}[k])
		os.WriteFile(filepath.Join(wt, "blob.bin"), data, 0o644)
		who.mustGit(wt, "add", "blob.bin")
		who.mustGit(wt, "commit", "-q", "-m", "100 MB")
		bigPush[k] = timed(b, func() result { return who.git(wt, "push", "-q", "origin", "main") })
	}
	rows = append(rows, gitRow{"push of 100 MB", bigPush[0], bigPush[1], "time"})

	// A large repository (the Go source tree, 4 commits): push it, then a
	// full clone through a follower, an incremental fetch and ls-remote.
	wt := goSourceRepo(b, u, c.dir)
	size := strings.Fields(runCmd(b, wt, nil, time.Minute, "du", "-sm", ".git").stdout)[0]
	pu, gu = remotes("gosrc")
	plainUser.mustGit(wt, "push", "-q", pu, "main")
	u.mustGit(wt, "push", "-q", gu, "main")
	var clone [2]time.Duration
	var clones [2]string
	for k, r := range []string{pu, gu} {
		who := []*gitUser{plainUser, u}[k]
		clones[k] = filepath.Join(b.TempDir(), "clone")
		clone[k] = timed(b, func() result { return who.git(c.dir, "clone", "-q", "--no-checkout", r, clones[k]) })
	}
	rows = append(rows, gitRow{fmt.Sprintf("full clone of Go source (%s MB .git) via follower", size), clone[0], clone[1], "time"})
	// Incremental fetch: one more small commit, fetched into the clones.
	u.commit(wt, "README.gitraft", "one more\n")
	plainUser.mustGit(wt, "push", "-q", pu, "main")
	u.mustGit(wt, "push", "-q", gu, "main")
	var fetch [2]time.Duration
	for k := range clones {
		who := []*gitUser{plainUser, u}[k]
		fetch[k] = timed(b, func() result { return who.git(clones[k], "fetch", "-q", "origin") })
	}
	rows = append(rows, gitRow{"incremental fetch (1 small commit)", fetch[0], fetch[1], "time"})
	printGitTable(rows, procs)
	benchGitConcurrent(b, c, u, plain, plainUser)
	benchGitFailover(b, c, u)
	b.ReportMetric(lat[1].pct(0.5).Seconds()/lat[0].pct(0.5).Seconds(), "small-push-p50-ratio")
	b.ReportMetric(clone[0].Seconds()/clone[1].Seconds(), "clone-throughput-ratio")
}

// printGitTable prints BenchmarkGit's table and its process counts.
func printGitTable(rows []gitRow, procs [2][]uint64) {
	fmt.Printf("\ngit over SSH on one machine (2 cores, loopback): plain git + OpenSSH sshd vs a 3-node gitraft cluster (TLS, fsync, quorum)\n")
	fmt.Printf("%-52s %12s %12s %8s\n", "measurement", "plain", "gitraft", "ratio")
	for _, r := range rows {
		fmt.Printf("%-52s %12s %12s %7.2fx\n", r.name, r.plain.Round(100*time.Microsecond), r.gitraft.Round(100*time.Microsecond), r.gitraft.Seconds()/r.plain.Seconds())
	}
	fmt.Printf("(ratio = gitraft/plain time; for throughput targets, throughput ratio = 1/ratio)\n")
	fmt.Printf("%-52s %12d %12d\n", "processes started per small push, whole machine (min)", minOf(procs[0]), minOf(procs[1]))
	fmt.Printf("%-52s %12d %12d\n", "processes started per small push, whole machine (p50)", p50Of(procs[0]), p50Of(procs[1]))
	fmt.Printf("(the same client for both: git push, ssh, pack-objects; /proc/stat counts threads started too; on a shared machine other work adds to p50, not to min)\n\n")
}

// forks is how many processes the machine has started since boot
// (/proc/stat "processes").
func forks(b *testing.B) uint64 {
	b.Helper()
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "processes "); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
			if err != nil {
				b.Fatal(err)
			}
			return n
		}
	}
	b.Fatal("/proc/stat has no processes line")
	return 0
}

func minOf(s []uint64) uint64 { return slices.Min(s) }

func p50Of(s []uint64) uint64 {
	s = slices.Clone(s)
	slices.Sort(s)
	return s[len(s)/2]
}
