package cluster

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	backupv1 "github.com/gitraft/gitraft/proto/gitraft/backup/v1"
	fsmv1 "github.com/gitraft/gitraft/proto/gitraft/fsm/v1"
)

func backupClient(t *testing.T, n *Node) backupv1.BackupServiceClient {
	t.Helper()
	conn, err := grpc.NewClient(n.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return backupv1.NewBackupServiceClient(conn)
}

// A backup recorded through one node is exported by every node, with the
// entry's leader time; an older backup does not move the record back.
func Test_Backup_RecordedOnEveryNode(t *testing.T) {
	c := mustNewCluster(t, 3)
	leader := c.waitLeader()
	var follower *Node
	for _, n := range c.nodes {
		if n != leader {
			follower = n
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	before := time.Now()
	rec := &fsmv1.BackupRecord{Index: 7, DurationNanos: int64(90 * time.Second), Bytes: 1 << 20, BytesWritten: 4096, Repos: 2, Packs: 3, PacksWritten: 1, Node: "n2"}
	if _, err := backupClient(t, follower).RecordBackup(ctx, &backupv1.RecordBackupRequest{Backup: rec}); err != nil {
		t.Fatal(err)
	}
	var stamp string
	waitFor(t, "every node to export the backup", 10*time.Second, func() bool {
		for _, n := range c.nodes {
			_, body := httpGet(t, "http://"+n.HTTPAddr()+"/metrics")
			got := metricLine(body, "gitraft_backup_last_success_timestamp_seconds")
			if got == "" || got == "0" || (stamp != "" && got != stamp) || metricLine(body, "gitraft_backup_last_duration_seconds") != "90" {
				return false
			}
			stamp = got
		}
		return true
	})
	var b *fsmv1.BackupRecord
	follower.fsm.Read(func(s *State) { b = s.LastBackup() })
	if at := time.Unix(0, b.GetFinishedUnixNano()); at.Before(before.Add(-time.Second)) || at.After(time.Now().Add(time.Second)) {
		t.Errorf("recorded at %s, not the entry's time", at)
	}
	rec.Index = 3
	_, err := backupClient(t, leader).RecordBackup(ctx, &backupv1.RecordBackupRequest{Backup: rec})
	if err == nil || !strings.Contains(err.Error(), "older index 3") {
		t.Fatalf("an older backup: %v", err)
	}
	if _, err := backupClient(t, leader).RecordBackup(ctx, &backupv1.RecordBackupRequest{Backup: &fsmv1.BackupRecord{}}); err == nil {
		t.Fatal("a record without an index was taken")
	}
}

func metricLine(body, name string) string {
	for _, l := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(l, name+" "); ok {
			return v
		}
	}
	return ""
}

// The state a node exports restores into a new data dir as its initial
// snapshot: the node starts alone, elects itself, holds the same users,
// grants and repositories (without the old members and locks), and goes on
// after the backup's index.
func Test_Backup_ExportedStateStartsANewCluster(t *testing.T) {
	c := mustNewCluster(t, 1)
	n := c.waitLeader()
	propose(t, n, addUser("alice"))
	propose(t, n, create("acme/site"))
	propose(t, n, grant("acme/site", "alice", fsmv1.Access_ACCESS_WRITE))
	propose(t, n, acquire("acme/site", "n1/push", time.Hour))

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := backupClient(t, n).ExportState(ctx, &backupv1.ExportStateRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	var index uint64
	for {
		m, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if m.GetIndex() != 0 {
			index = m.GetIndex()
		}
		buf.Write(m.GetChunk())
	}
	data := bytes.Clone(buf.Bytes())
	b, err := ReadBackupState(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if b.Index != index || index < n.AppliedIndex()-1 {
		t.Fatalf("exported index %d, announced %d, node at %d", b.Index, index, n.AppliedIndex())
	}
	if _, err := ReadBackupState(bytes.NewReader(data[:len(data)-3])); err == nil {
		t.Fatal("a state cut off decoded")
	}

	cfg := Config{NodeID: "r1", DataDir: filepath.Join(t.TempDir(), "r1"), RaftAddr: "127.0.0.1:0", GRPCAddr: "127.0.0.1:0", Insecure: true,
		Raft: RaftTuning{HeartbeatTimeout: 300 * time.Millisecond, ElectionTimeout: 300 * time.Millisecond, LeaderLeaseTimeout: 150 * time.Millisecond}}
	// Port 0 is no address for peers: restore with the address the node
	// will listen on, as an operator does.
	cfg.RaftAddr = freeAddr(t)
	if err := RestoreDataDir(cfg, b, testLogger(t)); err != nil {
		t.Fatal(err)
	}
	if err := RestoreDataDir(cfg, b, testLogger(t)); err == nil || !errors.Is(err, ErrRestore) {
		t.Fatalf("restore over a restored data dir: %v", err)
	}
	r, err := New(cfg, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	waitFor(t, "the restored node to lead", 15*time.Second, func() bool { return r.IsLeader() && r.leaderReady.Load() })
	res := propose(t, r, addUser("bob"))
	if res.GetIndex() <= b.Index {
		t.Errorf("the restored cluster wrote index %d, at or before the backup's %d", res.GetIndex(), b.Index)
	}
	r.fsm.Read(func(s *State) {
		if _, ok := s.User("alice"); !ok {
			t.Error("alice was not restored")
		}
		if s.Access("acme/site", "alice") != fsmv1.Access_ACCESS_WRITE {
			t.Error("alice's grant was not restored")
		}
		if _, ok := s.Repo("acme/site"); !ok {
			t.Error("acme/site was not restored")
		}
		if len(s.Locks()) != 0 {
			t.Errorf("the old cluster's locks came back: %v", s.Locks())
		}
		for _, m := range s.Members() {
			if m.GetId() != "r1" {
				t.Errorf("the old cluster's member %s came back", m.GetId())
			}
		}
	})
}

// freeAddr is a loopback address with a port free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
