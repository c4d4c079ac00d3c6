package backup

import (
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"

	backupv1 "github.com/gitraft/gitraft/proto/gitraft/backup/v1"
	"github.com/gitraft/gitraft/storage"
)

// gitRepo makes a repository with n commits, each in a pack of its own (as
// gitraft keeps pushes), and returns the packs' directory, their checksums
// oldest first, and the last commit.
func gitRepo(t *testing.T, n int) (string, []string, string) {
	t.Helper()
	dir := t.TempDir()
	git := func(stdin string, args ...string) string {
		t.Helper()
		c := exec.Command("git", args...)
		c.Dir = dir
		c.Stdin = strings.NewReader(stdin)
		c.Env = append(os.Environ(), "GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@example.org", "GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@example.org", "GIT_CONFIG_GLOBAL=/dev/null", "GIT_CONFIG_NOSYSTEM=1")
		out, err := c.Output()
		if err != nil {
			t.Fatalf("git %s: %v", strings.Join(args, " "), err)
		}
		return strings.TrimSpace(string(out))
	}
	git("", "init", "-q", "-b", "main")
	packDir := filepath.Join(t.TempDir(), "pack")
	if err := os.MkdirAll(packDir, 0o755); err != nil {
		t.Fatal(err)
	}
	var packs []string
	prev, head := "", ""
	for i := range n {
		if err := os.WriteFile(filepath.Join(dir, "f"), []byte(strings.Repeat("x", i+1)+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		git("", "add", "f")
		git("", "commit", "-q", "-m", "c")
		head = git("", "rev-parse", "HEAD")
		revs := head + "\n"
		if prev != "" {
			revs += "^" + prev + "\n"
		}
		packs = append(packs, git(revs, "pack-objects", "-q", "--revs", filepath.Join(packDir, "pack")))
		prev = head
	}
	return packDir, packs, head
}

// fakeNode serves CopyRepo from a directory of packs, as a node does.
type fakeNode struct {
	backupv1.BackupServiceClient
	packDir string
	packs   []string
	mu      sync.Mutex
	asked   [][]string // the have list of every call
}

func (f *fakeNode) CopyRepo(ctx context.Context, req *backupv1.CopyRepoRequest, _ ...grpc.CallOption) (grpc.ServerStreamingClient[backupv1.CopyRepoResponse], error) {
	f.mu.Lock()
	f.asked = append(f.asked, req.GetHave())
	f.mu.Unlock()
	var msgs []*backupv1.CopyRepoResponse
	for _, sum := range f.packs {
		if slices.Contains(req.GetHave(), sum) {
			continue
		}
		pack, _ := os.ReadFile(filepath.Join(f.packDir, "pack-"+sum+".pack"))
		idx, _ := os.ReadFile(filepath.Join(f.packDir, "pack-"+sum+".idx"))
		msgs = append(msgs,
			&backupv1.CopyRepoResponse{Msg: &backupv1.CopyRepoResponse_Pack{Pack: &backupv1.PackStart{Name: sum, PackSize: int64(len(pack)), IdxSize: int64(len(idx))}}},
			&backupv1.CopyRepoResponse{Msg: &backupv1.CopyRepoResponse_PackChunk{PackChunk: pack[:len(pack)/2]}},
			&backupv1.CopyRepoResponse{Msg: &backupv1.CopyRepoResponse_PackChunk{PackChunk: pack[len(pack)/2:]}},
			&backupv1.CopyRepoResponse{Msg: &backupv1.CopyRepoResponse_IdxChunk{IdxChunk: idx}})
	}
	msgs = append(msgs, &backupv1.CopyRepoResponse{Msg: &backupv1.CopyRepoResponse_Done{Done: &backupv1.RepoPacks{Packs: f.packs, Version: 2}}})
	return &fakeStream{msgs: msgs}, nil
}

type fakeStream struct {
	grpc.ClientStream
	msgs []*backupv1.CopyRepoResponse
}

func (s *fakeStream) Recv() (*backupv1.CopyRepoResponse, error) {
	if len(s.msgs) == 0 {
		return nil, io.EOF
	}
	m := s.msgs[0]
	s.msgs = s.msgs[1:]
	return m, nil
}

// A second backup into the same directory tells the node which packs it
// has, and writes only the new one; the repository's refs check against
// what was written.
func Test_Backup_IncrementalCopiesOnlyNewPacks(t *testing.T) {
	packDir, packs, head := gitRepo(t, 3)
	dest := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dest, PacksDir), 0o700); err != nil {
		t.Fatal(err)
	}
	f := &fakeNode{packDir: packDir, packs: packs[:2]}
	opt := CreateOptions{Dir: dest, Client: f}
	repo := Repo{Name: "acme/site", ID: 1, Version: 2, Refs: map[string]string{}}
	all, written, err := copyRepo(context.Background(), opt, nil, &repo)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 2 || len(written) != 2 || len(f.asked[0]) != 0 {
		t.Fatalf("first backup: %d packs, %d written, had %v", len(all), len(written), f.asked[0])
	}
	prev := &Manifest{Format: manifestV1, Index: 10, Repos: []Repo{repo}, Packs: all}

	f.packs = packs
	repo2 := Repo{Name: "acme/site", ID: 1, Version: 3, Refs: map[string]string{"refs/heads/main": head}, Head: "refs/heads/main"}
	all, written, err = copyRepo(context.Background(), opt, prev, &repo2)
	if err != nil {
		t.Fatal(err)
	}
	if got := f.asked[1]; !slices.Equal(got, slices.Sorted(slices.Values(packs[:2]))) {
		t.Errorf("second backup told the node it had %v, want %v", got, packs[:2])
	}
	if len(written) != 1 || written[packs[2]] == (Pack{}) || len(all) != 3 {
		t.Fatalf("second backup wrote %v of %v", written, all)
	}
	if err := checkConnected(context.Background(), storage.DefaultGit(), dest, repo2); err != nil {
		t.Fatal(err)
	}

	// Unchanged refs over the same packs need no second walk; other refs do.
	checked := &Manifest{Format: manifestV1, Repos: []Repo{repo2}, Packs: all}
	if !checked.checked(repo2) {
		t.Error("an unchanged repository is walked again")
	}
	moved := repo2
	moved.Refs = map[string]string{"refs/heads/main": packs[0]}
	if checked.checked(moved) || (*Manifest)(nil).checked(repo2) {
		t.Error("changed refs, or no earlier backup, count as checked")
	}

	// A pack whose file was lost is not claimed: the node sends it again.
	os.Remove(PackPath(dest, packs[0], ".pack"))
	prev = &Manifest{Format: manifestV1, Repos: []Repo{repo2}, Packs: all}
	if got := have(prev, dest, "acme/site"); slices.Contains(got, packs[0]) || len(got) != 2 {
		t.Errorf("have = %v, with pack %s gone", got, packs[0])
	}
	// Refs that name an object the packs lack fail the check.
	repo2.Packs = packs[1:]
	if err := checkConnected(context.Background(), storage.DefaultGit(), dest, repo2); err == nil {
		t.Error("refs checked against packs that lack their history")
	}
}

// A pack damaged on the way, or an index of another pack, is refused and
// leaves nothing behind.
func Test_Backup_PackWriterChecksums(t *testing.T) {
	packDir, packs, _ := gitRepo(t, 2)
	read := func(sum, ext string) []byte {
		b, err := os.ReadFile(filepath.Join(packDir, "pack-"+sum+ext))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	dest := t.TempDir()
	try := func(sum string, pack, idx []byte) error {
		w, err := newPackWriter(dest, sum)
		if err != nil {
			return err
		}
		w.pack.Write(pack)
		w.idx.Write(idx)
		_, err = w.finish(int64(len(pack)), int64(len(idx)))
		return err
	}
	if err := try(packs[0], read(packs[0], ".pack"), read(packs[0], ".idx")); err != nil {
		t.Fatal(err)
	}
	bad := read(packs[1], ".pack")
	bad[len(bad)/2] ^= 1
	if err := try(packs[1], bad, read(packs[1], ".idx")); !errors.Is(err, ErrCorrupt) {
		t.Errorf("damaged pack: %v", err)
	}
	if err := try(packs[1], read(packs[1], ".pack"), read(packs[0], ".idx")); !errors.Is(err, ErrCorrupt) {
		t.Errorf("another pack's index: %v", err)
	}
	if err := try("../../etc", nil, nil); !errors.Is(err, ErrCorrupt) {
		t.Errorf("a pack name that is no checksum: %v", err)
	}
	entries, _ := os.ReadDir(dest)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if want := []string{"pack-" + packs[0] + ".idx", "pack-" + packs[0] + ".pack"}; !slices.Equal(names, want) {
		t.Errorf("left %v, want %v", names, want)
	}
}

// The manifest is the mark of a complete backup: without it there is no
// backup; written, it reads back; files it does not name are the ones a
// new backup removes.
func Test_Backup_Manifest(t *testing.T) {
	dir := t.TempDir()
	if _, err := ReadManifest(dir); !errors.Is(err, ErrNoBackup) {
		t.Fatalf("empty dir: %v", err)
	}
	os.WriteFile(filepath.Join(dir, ManifestFile+".tmp"), []byte("{"), 0o600) // a write cut off
	if _, err := ReadManifest(dir); !errors.Is(err, ErrNoBackup) {
		t.Fatalf("a manifest never renamed into place: %v", err)
	}
	keep, drop := strings.Repeat("a", 40), strings.Repeat("b", 40)
	m := &Manifest{Format: manifestV1, Index: 42, Node: "n2", Started: time.Unix(100, 0).UTC(), Finished: time.Unix(160, 0).UTC(),
		State: StateFile{File: "state-42.bin", Size: 3, SHA256: "x"},
		Repos: []Repo{{Name: "acme/site", ID: 5, Version: 9, Refs: map[string]string{"refs/heads/main": keep}, Packs: []string{keep}}},
		Packs: map[string]Pack{keep: {PackSize: 1, IdxSize: 1}}}
	if err := writeManifest(dir, m); err != nil {
		t.Fatal(err)
	}
	got, err := ReadManifest(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got.Index != 42 || got.Repos[0].Refs["refs/heads/main"] != keep || !got.Finished.Equal(m.Finished) {
		t.Errorf("read back %+v", got)
	}
	if r := m.Record(); r.GetDurationNanos() != int64(time.Minute) || r.GetIndex() != 42 || r.GetPacks() != 1 {
		t.Errorf("record %v", r)
	}
	os.MkdirAll(filepath.Join(dir, PacksDir), 0o700)
	for _, f := range []string{"packs/pack-" + keep + ".pack", "packs/pack-" + keep + ".idx", "packs/pack-" + drop + ".pack", "packs/pack-" + drop + ".idx",
		"packs/tmp-" + drop + "-1.pack", "state-41.bin", "state-42.bin", "state-123.tmp", lockFile, ManifestFile + ".tmp"} {
		os.WriteFile(filepath.Join(dir, f), nil, 0o600)
	}
	old, err := unnamed(dir, m)
	if err != nil {
		t.Fatal(err)
	}
	for i := range old {
		old[i], _ = filepath.Rel(dir, old[i])
	}
	want := []string{ManifestFile + ".tmp", "packs/pack-" + drop + ".idx", "packs/pack-" + drop + ".pack", "packs/tmp-" + drop + "-1.pack", "state-123.tmp", "state-41.bin"}
	slices.Sort(want)
	if !slices.Equal(old, want) {
		t.Errorf("unnamed = %v\nwant %v", old, want)
	}
	os.WriteFile(filepath.Join(dir, ManifestFile), []byte(`{"format": 9}`), 0o600)
	if _, err := ReadManifest(dir); err == nil || !strings.Contains(err.Error(), "format 9") {
		t.Errorf("a manifest from a newer gitraft: %v", err)
	}
}
