package cluster

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gitraft/gitraft/gitproto"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
	"github.com/gitraft/gitraft/storage"
)

// A push through a real Raft cluster in this process: the git side takes
// the write lock through Raft, ships the pack to the other voters over
// gitraft.replica.v1, commits the ref change, and every node's reconciler
// brings its copy to the new version from the pack it was sent.
func Test_MultiNode_Push(t *testing.T) {
	stores := map[string]*storage.Store{}
	c := mustNewCluster(t, 3, func(cfg *Config) {
		st, err := storage.Open(storage.Config{Root: filepath.Join(cfg.DataDir, "repos")}, testLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		stores[cfg.NodeID] = st
		cfg.Git = &GitConfig{Store: st, SyncInterval: 100 * time.Millisecond}
	})
	leader := c.waitLeader()
	propose(t, leader, &fsmv1.Entry{Command: &fsmv1.Entry_CreateRepo{CreateRepo: &fsmv1.CreateRepo{Name: "r"}}})
	for id, n := range c.nodes {
		waitFor(t, id+" to hold the new repository", 10*time.Second, func() bool {
			rep := n.Replicas().Report("r").GetReplicas()
			return len(rep) == 1 && rep[0].GetState() == replicav1.ReplicaState_REPLICA_STATE_CURRENT
		})
	}
	taker := c.follower()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tx, err := taker.Replicas().BeginPush(ctx, "r", "alice", "p1", func(string) {})
	if err != nil {
		t.Fatal(err)
	}
	quarantine, tip := quarantinedCommit(t, tx.Path())
	update := gitproto.RefUpdate{Ref: "refs/heads/main", New: tip}
	got, err := tx.Commit(ctx, quarantine, []gitproto.RefUpdate{update}, true, func(string) {})
	if err != nil || len(got) != 1 {
		t.Fatalf("Commit: %v, %v", got, err)
	}
	// git migrates the quarantine once the hook accepts.
	migrated := filepath.Join(tx.Path(), "objects", "pack")
	packs, _ := filepath.Glob(filepath.Join(quarantine, "pack", "*"))
	for _, f := range packs {
		if err := os.Rename(f, filepath.Join(migrated, filepath.Base(f))); err != nil {
			t.Fatal(err)
		}
	}
	tx.Finish(true)
	if tx.Version() != 2 {
		t.Fatalf("committed version %d, want 2", tx.Version())
	}
	// The taker, a follower, recorded the version itself (it waited to
	// apply the commit), so its next push needs no catch-up.
	if rep := taker.Replicas().Report("r").GetReplicas(); len(rep) != 1 || rep[0].GetVersion() != 2 {
		t.Fatalf("right after Finish the taker reports %v, want version 2", rep)
	}
	for id, n := range c.nodes {
		waitFor(t, id+" to reach version 2", 10*time.Second, func() bool {
			rep := n.Replicas().Report("r").GetReplicas()
			return len(rep) == 1 && rep[0].GetVersion() == 2
		})
		refs, err := stores[id].Refs(context.Background(), "r")
		if err != nil || refs["refs/heads/main"] != tip {
			t.Errorf("%s: refs %v, %v", id, refs, err)
		}
	}
	// The lock went with the push: another push takes it at once.
	tx2, err := leader.Replicas().BeginPush(ctx, "r", "alice", "p2", func(string) {})
	if err != nil {
		t.Fatal(err)
	}
	tx2.Finish(false)
}

// quarantinedCommit writes a first commit's objects as a pack into a new
// quarantine directory of the repository at path, as receive-pack does.
func quarantinedCommit(t *testing.T, path string) (quarantine, tip string) {
	t.Helper()
	work := t.TempDir()
	git := func(stdin string, args ...string) string {
		c := exec.Command("git", args...)
		c.Dir = work
		c.Env = append(os.Environ(), "GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@example.org",
			"GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@example.org", "HOME="+work, "GIT_CONFIG_NOSYSTEM=1")
		c.Stdin = strings.NewReader(stdin)
		out, err := c.CombinedOutput()
		if err != nil {
			t.Fatalf("git %v: %v\n%s", args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	git("", "init", "-q", "-b", "main")
	os.WriteFile(filepath.Join(work, "f"), []byte("hello\n"), 0o644)
	git("", "add", "f")
	git("", "commit", "-q", "-m", "first")
	tip = git("", "rev-parse", "HEAD")
	quarantine, err := os.MkdirTemp(filepath.Join(path, "objects"), "tmp_objdir-incoming-")
	if err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(quarantine, "pack"), 0o755)
	git(tip+"\n", "pack-objects", "-q", "--revs", filepath.Join(quarantine, "pack", "pack"))
	return quarantine, tip
}
