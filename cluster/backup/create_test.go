package backup

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/gitraft/gitraft/cluster"
	backupv1 "github.com/gitraft/gitraft/proto/gitraft/backup/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

// failingNode answers CopyRepo with an error after ExportState succeeded:
// a backup that fails midway.
type failingNode struct {
	*fakeNode
	fail bool
}

func (f *failingNode) CopyRepo(ctx context.Context, req *backupv1.CopyRepoRequest, opts ...grpc.CallOption) (grpc.ServerStreamingClient[backupv1.CopyRepoResponse], error) {
	if f.fail {
		return nil, errors.New("the node went away")
	}
	return f.fakeNode.CopyRepo(ctx, req, opts...)
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// A backup that fails after it began leaves the previous complete backup
// as it was: same manifest, and it still verifies. The state comes from a
// real node (its BackupService); the packs from a fake.
func Test_Create_FailureLeavesThePreviousBackup(t *testing.T) {
	n, err := cluster.New(cluster.Config{NodeID: "n1", DataDir: t.TempDir(), RaftAddr: freeAddr(t), GRPCAddr: "127.0.0.1:0", Insecure: true, Bootstrap: true},
		slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := n.WaitLeader(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Propose(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_CreateRepo{CreateRepo: &fsmv1.CreateRepo{Name: "acme/site"}}}); err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(n.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	packDir, packs, _ := gitRepo(t, 2)
	f := &failingNode{fakeNode: &fakeNode{BackupServiceClient: backupv1.NewBackupServiceClient(conn), packDir: packDir, packs: packs}}
	dest := filepath.Join(t.TempDir(), "backup")
	first, err := Create(ctx, CreateOptions{Dir: dest, Client: f})
	if err != nil {
		t.Fatal(err)
	}
	if len(first.Repos) != 1 || len(first.Repos[0].Packs) != 2 || first.PacksWritten != 2 {
		t.Fatalf("first backup: %+v", first)
	}
	manifest, _ := os.ReadFile(filepath.Join(dest, ManifestFile))

	if _, err := n.Propose(ctx, &fsmv1.Entry{Command: &fsmv1.Entry_CreateRepo{CreateRepo: &fsmv1.CreateRepo{Name: "acme/docs"}}}); err != nil {
		t.Fatal(err)
	}
	f.fail = true
	if _, err := Create(ctx, CreateOptions{Dir: dest, Client: f}); err == nil {
		t.Fatal("a backup whose repository copy failed succeeded")
	}
	if after, _ := os.ReadFile(filepath.Join(dest, ManifestFile)); string(after) != string(manifest) {
		t.Fatal("a failed backup changed the manifest")
	}
	v, err := Verify(ctx, VerifyOptions{Dir: dest})
	if err != nil || len(v.Problems) != 0 || v.Manifest.Index != first.Index {
		t.Fatalf("the previous backup after a failed one: %v %v", err, v)
	}

	// The next run succeeds and clears what the failed one left.
	f.fail = false
	second, err := Create(ctx, CreateOptions{Dir: dest, Client: f})
	if err != nil {
		t.Fatal(err)
	}
	if len(second.Repos) != 2 || second.Index <= first.Index {
		t.Fatalf("second backup: %+v", second)
	}
	states, _ := filepath.Glob(filepath.Join(dest, "state-*"))
	if len(states) != 1 || filepath.Base(states[0]) != second.State.File {
		t.Errorf("state files %v, want only %s", states, second.State.File)
	}
}
