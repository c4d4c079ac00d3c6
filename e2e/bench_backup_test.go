package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	repov1 "github.com/gitraft/gitraft/proto/gitraft/repo/v1"
	userv1 "github.com/gitraft/gitraft/proto/gitraft/user/v1"
)

// dirBytes is the size of the regular files under dir.
func dirBytes(dir string) int64 {
	var n int64
	filepath.Walk(dir, func(_ string, info os.FileInfo, err error) error {
		if err == nil && info.Mode().IsRegular() {
			n += info.Size()
		}
		return nil
	})
	return n
}

// tarBytes runs GNU tar over a node's data dir into a file, incremental
// against snar (a --listed-incremental snapshot file; the first run makes
// it), and returns the time it took and the archive's size.
func tarBytes(b *testing.B, dataDir, snar, out string) (time.Duration, int64) {
	b.Helper()
	start := time.Now()
	if r := runCmd(b, "/", nil, 30*time.Minute, "tar", "--listed-incremental="+snar, "-cf", out, "-C", dataDir, "."); r.code != 0 && r.code != 1 {
		b.Fatalf("tar: %s", r)
	}
	took := time.Since(start)
	st, err := os.Stat(out)
	if err != nil {
		b.Fatal(err)
	}
	return took, st.Size()
}

// BenchmarkBackup measures gitraft backup create, full and incremental, for
// one big repository (the Go source tree, one commit) and for many small
// ones, next to GNU tar (full, then --listed-incremental) of one node's data
// dir as the baseline. GITRAFT_BACKUP_SMALL_REPOS (default 1000) and
// GITRAFT_BACKUP_TREE (default /usr/local/go/src; "none" skips it) make it
// smaller. Run it with ./e2e/bench.sh Backup.
func BenchmarkBackup(b *testing.B) {
	tree := os.Getenv("GITRAFT_BACKUP_TREE")
	if tree == "" {
		tree = "/usr/local/go/src"
	}
	small := envInt("GITRAFT_BACKUP_SMALL_REPOS", 1000)
	for range b.N {
		c := startCluster(b, 3)
		n := c.nodes[1] // the backup is served by a follower, as an operator would
		u := c.addGitUser("bench")
		conn := c.grpcConn(c.nodes[0], "admin")
		repos := repov1.NewRepoServiceClient(conn)
		users := userv1.NewUserServiceClient(conn)
		ctx := context.Background()
		create := func(name string) {
			if _, err := repos.CreateRepo(ctx, &repov1.CreateRepoRequest{Name: name}); err != nil {
				b.Fatal(err)
			}
			if _, err := users.SetAccess(ctx, &userv1.SetAccessRequest{Repo: name, User: "bench", Access: userv1.Access_ACCESS_WRITE}); err != nil {
				b.Fatal(err)
			}
		}
		type row struct {
			name                    string
			took, tarTook           time.Duration
			written, total, tarSize int64
		}
		var rows []row
		tmp := b.TempDir()
		measure := func(label, dest, snar string) {
			start := time.Now()
			c.must(n, "backup", "create", dest)
			took := time.Since(start)
			m := readBackupManifest(b, dest)
			tt, ts := tarBytes(b, n.dir, snar, filepath.Join(tmp, fmt.Sprintf("tar-%d.tar", len(rows))))
			rows = append(rows, row{label, took, tt, int64(m.BytesWritten), int64(m.Bytes), ts})
		}

		if tree != "none" {
			create("big/go")
			wt := u.workTree(url(c.nodes[0], "big/go"))
			if r := runCmd(b, "/", nil, 10*time.Minute, "cp", "-a", tree+"/.", wt); r.code != 0 {
				b.Fatal(r)
			}
			u.mustGit(wt, "add", "-A")
			u.mustGit(wt, "commit", "-q", "-m", "the tree")
			files := strings.Count(u.mustGit(wt, "ls-files"), "\n")
			start := time.Now()
			u.mustGit(wt, "push", "-q", "origin", "main")
			b.Logf("pushed %s (%d files) in %s", tree, files, time.Since(start).Round(time.Millisecond))
			dest := filepath.Join(tmp, "big")
			snar := filepath.Join(tmp, "big.snar")
			measure(fmt.Sprintf("big repo (%d files), full", files), dest, snar)
			u.commit(wt, "README.backup", "one more commit\n")
			u.mustGit(wt, "push", "-q", "origin", "main")
			measure("big repo, incremental after a small push", dest, snar)
		}

		// Many small repositories, each with a commit of its own.
		var mu sync.Mutex
		var firstErr error
		next := make(chan int)
		var wg sync.WaitGroup
		for w := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range next {
					name := fmt.Sprintf("small/r%04d", i)
					create(name)
					wt := u.workTree(url(c.nodes[w%3], name))
					u.commit(wt, "README", "repository "+strconv.Itoa(i)+"\n")
					if r := u.git(wt, "push", "-q", "origin", "main"); r.code != 0 {
						mu.Lock()
						if firstErr == nil {
							firstErr = fmt.Errorf("push %s: %s", name, r)
						}
						mu.Unlock()
					}
					os.RemoveAll(wt)
				}
			}()
		}
		start := time.Now()
		for i := range small {
			next <- i
		}
		close(next)
		wg.Wait()
		if firstErr != nil {
			b.Fatal(firstErr)
		}
		b.Logf("created and pushed %d small repositories in %s", small, time.Since(start).Round(time.Millisecond))
		dest := filepath.Join(tmp, "small")
		snar := filepath.Join(tmp, "small.snar")
		measure(fmt.Sprintf("%d small repos (+ big), full", small), dest, snar)
		for i := range 10 {
			name := fmt.Sprintf("small/r%04d", i*max(1, small/10))
			wt := u.workTree(url(c.nodes[0], name))
			u.mustGit(wt, "pull", "-q", "origin", "main")
			u.commit(wt, "NEWS", "more\n")
			u.mustGit(wt, "push", "-q", "origin", "main")
		}
		measure(fmt.Sprintf("%d small repos, incremental after 10 pushes", small), dest, snar)

		fmt.Printf("\ngitraft backup create vs GNU tar of one node's data dir (3-node cluster, 2 cores, backup served by a follower)\n")
		fmt.Printf("%-48s %10s %12s %12s | %10s %12s\n", "case", "backup", "written", "backup size", "tar", "tar size")
		for _, r := range rows {
			fmt.Printf("%-48s %10s %12s %12s | %10s %12s\n", r.name, r.took.Round(time.Millisecond), mib(r.written), mib(r.total), r.tarTook.Round(time.Millisecond), mib(r.tarSize))
		}
		fmt.Printf("(backup time includes starting the CLI, fsync of every file written and git fsck --connectivity-only of every repository whose refs or packs changed; tar fsyncs nothing and checks nothing; the node's data dir is %s)\n\n", mib(dirBytes(n.dir)))
	}
}

func mib(n int64) string { return fmt.Sprintf("%.2f MiB", float64(n)/(1<<20)) }
