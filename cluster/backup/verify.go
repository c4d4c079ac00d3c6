package backup

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/gitraft/gitraft/cluster"
	"github.com/gitraft/gitraft/storage"
)

// Problem is one thing wrong with a backup.
type Problem struct {
	// What is the part: "manifest", "state", "pack <sum>", "repository <name>".
	What string
	Msg  string
}

func (p Problem) String() string { return p.What + ": " + p.Msg }

// VerifyOptions configures Verify.
type VerifyOptions struct {
	Dir string
	// Parallel is how many packs and repositories are checked at once
	// (default 4).
	Parallel int
	Git      *storage.Git
	Progress func(string)
}

// Verified is what Verify read and found.
type Verified struct {
	Manifest *Manifest
	State    *cluster.BackupState
	Problems []Problem
}

// Verify checks a backup directory: the manifest reads; the state file
// matches its checksum and decodes, at the manifest's index, with the
// repositories, versions and refs the manifest lists; every pack is there
// with the sizes and SHA-256 sums recorded, and `git verify-pack` passes
// (every object decodes and hashes to its name); and each repository's
// refs resolve in its packs with their whole history (`git fsck
// --connectivity-only`). It returns every problem found, not only the
// first; an error means it could not check at all.
func Verify(ctx context.Context, opt VerifyOptions) (*Verified, error) {
	if opt.Parallel <= 0 {
		opt.Parallel = 4
	}
	if opt.Git == nil {
		opt.Git = storage.DefaultGit()
	}
	m, err := ReadManifest(opt.Dir)
	if err != nil {
		return nil, err
	}
	v := &Verified{Manifest: m}
	var mu sync.Mutex
	problem := func(what, format string, args ...any) {
		mu.Lock()
		v.Problems = append(v.Problems, Problem{What: what, Msg: fmt.Sprintf(format, args...)})
		mu.Unlock()
	}

	// The state.
	statePath := filepath.Join(opt.Dir, m.State.File)
	if sum, size, err := fileSHA256(statePath); err != nil {
		problem("state", "%v", err)
	} else if sum != m.State.SHA256 || size != m.State.Size {
		problem("state", "%s has %d bytes with SHA-256 %s; the manifest recorded %d bytes with %s: the file was changed or damaged", m.State.File, size, sum, m.State.Size, m.State.SHA256)
	} else if f, err := os.Open(statePath); err != nil {
		problem("state", "%v", err)
	} else {
		st, err := cluster.ReadBackupState(f)
		f.Close()
		switch {
		case err != nil:
			problem("state", "%s does not decode: %v", m.State.File, err)
		case st.Index != m.Index:
			problem("state", "%s holds index %d, the manifest says %d", m.State.File, st.Index, m.Index)
		default:
			v.State = st
			checkReposAgainstState(m, st, problem)
		}
	}

	// Packs.
	users := map[string][]string{}
	for _, r := range m.Repos {
		for _, sum := range r.Packs {
			users[sum] = append(users[sum], r.Name)
			if _, ok := m.Packs[sum]; !ok {
				problem("repository "+r.Name, "names pack %s, which the manifest does not list", sum)
			}
		}
	}
	bad := map[string]bool{}
	sums := slices.Sorted(maps.Keys(m.Packs))
	run(opt.Parallel, len(sums), func(i int) {
		sum := sums[i]
		p := m.Packs[sum]
		what := "pack " + sum
		if len(users[sum]) > 0 {
			what += " (of " + strings.Join(users[sum], ", ") + ")"
		}
		fail := func(format string, args ...any) {
			problem(what, format, args...)
			mu.Lock()
			bad[sum] = true
			mu.Unlock()
		}
		for _, f := range []struct {
			ext, want string
			size      int64
		}{{".pack", p.PackSHA256, p.PackSize}, {".idx", p.IdxSHA256, p.IdxSize}} {
			path := PackPath(opt.Dir, sum, f.ext)
			got, size, err := fileSHA256(path)
			switch {
			case os.IsNotExist(err):
				fail("%s is missing", path)
				return
			case err != nil:
				fail("%v", err)
				return
			case got != f.want || size != f.size:
				fail("%s has %d bytes with SHA-256 %s; the manifest recorded %d bytes with %s: the file was changed or damaged", path, size, got, f.size, f.want)
				return
			}
		}
		if err := verifyPack(ctx, opt.Git, opt.Dir, sum); err != nil {
			fail("%v", err)
		}
	})

	// Repositories: refs against their packs.
	run(opt.Parallel, len(m.Repos), func(i int) {
		r := m.Repos[i]
		for _, sum := range r.Packs {
			if bad[sum] {
				problem("repository "+r.Name, "not checked further: its pack %s is missing or damaged", sum)
				return
			}
		}
		if err := checkConnected(ctx, opt.Git, opt.Dir, r); err != nil {
			problem("repository "+r.Name, "%v", err)
		}
	})
	sort.SliceStable(v.Problems, func(i, j int) bool { return v.Problems[i].What < v.Problems[j].What })
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return v, nil
}

// checkReposAgainstState reports repositories whose id, version or refs in
// the manifest differ from the state's.
func checkReposAgainstState(m *Manifest, st *cluster.BackupState, problem func(what, format string, args ...any)) {
	inState := map[string]bool{}
	listed := map[string]Repo{}
	for _, r := range m.Repos {
		listed[r.Name] = r
	}
	for _, r := range st.Repos() {
		inState[r.GetName()] = true
		mr, ok := listed[r.GetName()]
		what := "repository " + r.GetName()
		if !ok {
			problem(what, "in the state but not in the manifest: its objects are not in the backup")
			continue
		}
		if mr.ID != r.GetId() || mr.Version != r.GetVersion() {
			problem(what, "the manifest has id %d version %d, the state id %d version %d", mr.ID, mr.Version, r.GetId(), r.GetVersion())
		}
		refs := map[string]string{}
		for _, ref := range r.GetRefs() {
			refs[ref.GetName()] = ref.GetOid()
		}
		if !maps.Equal(refs, mr.Refs) {
			problem(what, "the manifest's refs differ from the state's (%d refs in the manifest, %d in the state)", len(mr.Refs), len(refs))
		}
	}
	for _, r := range m.Repos {
		if !inState[r.Name] {
			problem("repository "+r.Name, "in the manifest but not in the state")
		}
	}
}

// run calls fn(0..n-1) on up to parallel goroutines and waits for them.
func run(parallel, n int, fn func(i int)) {
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(parallel, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				fn(i)
			}
		}()
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
}
