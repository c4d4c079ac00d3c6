package replica

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	replicav1 "github.com/gitraft/gitraft/proto/gitraft/replica/v1"
)

// seed commits two commits on main (each in a pack of its own) to every
// node's copy and to the state, at version 2, and returns them.
func (c *fakeCluster) seed() (first, second string) {
	t := c.t
	t.Helper()
	work := t.TempDir()
	gitCmd(t, work, "init", "-q", "-b", "main")
	var oids []string
	for i := range 2 {
		os.WriteFile(filepath.Join(work, "f"), []byte(strings.Repeat("y", i+1)), 0o644)
		gitCmd(t, work, "add", "f")
		gitCmd(t, work, "commit", "-q", "-m", "c")
		oids = append(oids, gitCmd(t, work, "rev-parse", "HEAD"))
	}
	packs := [][]string{{oids[0]}, {oids[1], "^" + oids[0]}}
	for _, n := range c.nodes {
		for _, revs := range packs {
			base := filepath.Join(t.TempDir(), "p")
			pk := exec.Command("git", "pack-objects", "--revs", "-q", base)
			pk.Dir, pk.Stdin = work, strings.NewReader(strings.Join(revs, "\n")+"\n")
			out, err := pk.Output()
			if err != nil {
				t.Fatal(err)
			}
			p := base + "-" + strings.TrimSpace(string(out))
			pf, _ := os.Open(p + ".pack")
			xf, _ := os.Open(p + ".idx")
			if _, err := n.store.InstallPack(context.Background(), c.repo, pf, xf); err != nil {
				t.Fatal(err)
			}
			pf.Close()
			xf.Close()
		}
		if err := n.store.SetRefs(context.Background(), c.repo, map[string]string{"refs/heads/main": oids[1]}, "refs/heads/main"); err != nil {
			t.Fatal(err)
		}
		if err := n.store.SetVersion(c.repo, 7, 2); err != nil {
			t.Fatal(err)
		}
		n.r.copyOf(c.repo).reached(7, 2)
	}
	c.s.mu.Lock()
	c.s.repos[c.repo] = Target{Name: c.repo, ID: 7, Version: 2, Refs: map[string]string{"refs/heads/main": oids[1]}, Head: "refs/heads/main"}
	c.s.mu.Unlock()
	return oids[0], oids[1]
}

// setRefByHand writes a loose ref into node i's copy, as an edit behind
// gitraft's back would.
func (c *fakeCluster) setRefByHand(i int, ref, oid string) {
	c.t.Helper()
	p, _ := c.nodes[i].store.Path(c.repo)
	if err := os.WriteFile(filepath.Join(p, filepath.FromSlash(ref)), []byte(oid+"\n"), 0o644); err != nil {
		c.t.Fatal(err)
	}
}

func stateOf(r *Replicas, repo string) replicav1.ReplicaState {
	if rs := r.Report(repo).GetReplicas(); len(rs) == 1 {
		return rs[0].GetState()
	}
	return replicav1.ReplicaState_REPLICA_STATE_UNSPECIFIED
}

// A ref changed by hand at the copy's version: the scrub names it, and the
// heal puts the committed value back without fetching anything.
func Test_Scrub_RefChangedByHand(t *testing.T) {
	c := newFakeCluster(t, 3)
	first, second := c.seed()
	n := c.nodes[1]
	if resp := n.r.Scrub(context.Background(), c.repo); len(resp.GetFindings()) != 0 || resp.GetError() != "" {
		t.Fatalf("scrub of a sound copy: %+v", resp)
	}
	c.setRefByHand(1, "refs/heads/main", first)
	c.setRefByHand(1, "refs/heads/extra", first)
	resp := n.r.Scrub(context.Background(), c.repo)
	found := strings.Join(resp.GetFindings(), "\n")
	if !strings.Contains(found, "refs/heads/main: disk "+first+", state "+second) || !strings.Contains(found, "refs/heads/extra: disk "+first+", not in state") {
		t.Fatalf("findings = %q", found)
	}
	if !resp.GetHealed() || resp.GetError() != "" || resp.GetState() != replicav1.ReplicaState_REPLICA_STATE_CURRENT {
		t.Fatalf("scrub = %+v, want healed and current", resp)
	}
	refs, _ := n.store.Refs(context.Background(), c.repo)
	if len(refs) != 1 || refs["refs/heads/main"] != second {
		t.Fatalf("refs after the heal = %v", refs)
	}
	if st := n.r.ScrubStats(); st.Damaged != 1 || st.Healed != 1 || st.DamagedNow != 0 {
		t.Errorf("stats = %+v, want one damaged, one healed, none now", st)
	}
	if l, _ := n.store.Local(c.repo); l.Damaged != "" {
		t.Errorf("the marker still says damaged: %q", l.Damaged)
	}
}

// A read that finds the refs on disk are not the state's does not serve
// them: the copy is checked under its guard and healed first.
func Test_Read_RefChangedByHandNeverServed(t *testing.T) {
	c := newFakeCluster(t, 3)
	first, second := c.seed()
	n := c.nodes[2]
	c.setRefByHand(2, "refs/heads/main", first)
	path, peer, err := n.r.prepareRead(context.Background(), c.repo, noProgress)
	if err != nil || peer != "" || path == "" {
		t.Fatalf("prepareRead = %q, %q, %v; want the local copy, healed", path, peer, err)
	}
	refs, _ := n.store.Refs(context.Background(), c.repo)
	if refs["refs/heads/main"] != second {
		t.Fatalf("the read was served with main at %s, want %s", refs["refs/heads/main"], second)
	}
	if st := n.r.ScrubStats(); st.Damaged != 1 || st.Healed != 1 {
		t.Errorf("stats = %+v", st)
	}
}

// A copy that lost the pack under its tip is found by the connectivity
// check. Here it cannot heal (no fetch in this test): it stays damaged,
// is reported so, is no peer's source, sends its reads to a current peer,
// and a restart still knows.
func Test_Scrub_LostPackStaysDamagedUntilHealed(t *testing.T) {
	c := newFakeCluster(t, 3)
	first, _ := c.seed()
	n := c.nodes[1]
	p, _ := n.store.Path(c.repo)
	packs, _ := filepath.Glob(filepath.Join(p, "objects", "pack", "*.idx"))
	removed := 0
	for _, idx := range packs {
		base := strings.TrimSuffix(idx, ".idx")
		// The pack that holds the first commit (the history under the tip).
		f, _ := os.Open(idx)
		show := exec.Command("git", "show-index")
		show.Stdin = f
		list, err := show.Output()
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(list), first) {
			os.Remove(base + ".pack")
			os.Remove(base + ".idx")
			removed++
		}
	}
	if removed != 1 {
		t.Fatalf("removed %d packs, want the one holding %s", removed, first)
	}
	resp := n.r.Scrub(context.Background(), c.repo)
	if len(resp.GetFindings()) == 0 || !strings.Contains(strings.Join(resp.GetFindings(), " "), "fsck") {
		t.Fatalf("findings = %q, want git fsck's complaint", resp.GetFindings())
	}
	if resp.GetHealed() || resp.GetError() == "" || resp.GetState() != replicav1.ReplicaState_REPLICA_STATE_DAMAGED {
		t.Fatalf("scrub = %+v, want damaged, not healed, with the reason", resp)
	}
	tgt, _ := c.s.repo(c.repo)
	if n.r.copyOf(c.repo).currentAt(tgt) {
		t.Fatal("a damaged copy counts as current")
	}
	if peers := c.nodes[0].r.currentPeers(context.Background(), c.repo, tgt.Version); len(peers) != 1 || peers[0].GetId() != "n3" {
		t.Fatalf("n1 sees current peers %v, want only n3", peers)
	}
	_, peer, err := n.r.prepareRead(context.Background(), c.repo, noProgress)
	if err != nil || (peer != c.nodes[0].addr && peer != c.nodes[2].addr) {
		t.Fatalf("a read through the damaged copy: peer %q, err %v; want a current peer", peer, err)
	}
	if behind, _, _ := n.r.Health(); behind != 1 {
		t.Errorf("Health counts %d behind, want the damaged copy", behind)
	}
	again := New(Config{Store: n.store}, n.node, testLogger())
	if st := stateOf(again, c.repo); st != replicav1.ReplicaState_REPLICA_STATE_DAMAGED {
		t.Fatalf("after a restart the copy is %v, want damaged", st)
	}
}

func Test_DiffRefs(t *testing.T) {
	got := diffRefs(map[string]string{"a": "1", "b": "2", "x": "9"}, map[string]string{"a": "1", "b": "3", "c": "4"})
	want := []string{"b: disk 2, state 3", "c: disk -, state 4", "x: disk 9, not in state"}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("diffRefs = %q, want %q", got, want)
	}
}
