package storage

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Errors of the repository store.
var (
	ErrNotFound       = errors.New("repository not on this node")
	ErrDiskFull       = errors.New("disk full")
	ErrCorrupt        = errors.New("corrupt data")
	ErrGit            = errors.New("git command failed")
	ErrMissingObjects = errors.New("objects missing")
)

// trashDir under Root holds repositories on their way out; homeDir is the
// HOME every git command runs with, so no user configuration applies.
const (
	trashDir = ".trash"
	homeDir  = ".home"
)

// MarkerFile in a repository records which incarnation of it this is and
// the version the node's copy has reached.
const MarkerFile = "gitraft-replica.json"

// Config configures a Store.
type Config struct {
	// Root holds the repositories (created 0700).
	Root string
	// Git is the git executable (default: "git" from PATH).
	Git string
}

// Store is a node's repositories on disk. Operations on one repository are
// not serialised here: the caller holds a per-repository lock, so that no two
// calls that change the same repository run at once. Calls on different
// repositories may run concurrently.
type Store struct {
	root string
	git  *Git
	log  *slog.Logger
	conn connectedCache

	// prunes holds, per repository path, a channel closed when the
	// pruning repack under way there ends (Housekeep with Prune);
	// refChanges counts the SetRefs under way. The two exclude each other.
	pmu        sync.Mutex
	prunes     map[string]chan struct{}
	refChanges map[string]int
}

// Replica is what a node's disk holds of one repository.
type Replica struct {
	Name    string `json:"name"`
	ID      uint64 `json:"id"`
	Version uint64 `json:"version"`
	// Damaged says why a scrub found the copy damaged (MarkDamaged); empty
	// for a sound copy. SetVersion, which a heal ends with, clears it.
	Damaged string `json:"damaged,omitempty"`
}

// Open prepares the store, checking that a git recent enough is installed
// (2.36 for core.fsync).
func Open(cfg Config, logger *slog.Logger) (*Store, error) {
	if cfg.Git == "" {
		cfg.Git = "git"
	}
	gitPath, err := exec.LookPath(cfg.Git)
	if err != nil {
		return nil, fmt.Errorf("git is not installed (%v); gitraft runs the real git, 2.36 or later", err)
	}
	out, err := exec.Command(gitPath, "version").Output()
	if err != nil {
		return nil, fmt.Errorf("%s version: %w", gitPath, err)
	}
	if major, minor, ok := gitVersion(string(out)); !ok || major < 2 || major == 2 && minor < 36 {
		return nil, fmt.Errorf("%s is %q; gitraft needs git 2.36 or later", gitPath, strings.TrimSpace(string(out)))
	}
	if cfg.Root == "" {
		return nil, errors.New("storage: no root directory configured")
	}
	if err := os.MkdirAll(cfg.Root, 0o700); err != nil {
		return nil, wrapIO("create root", err)
	}
	home := filepath.Join(cfg.Root, homeDir)
	if err := os.MkdirAll(home, 0o700); err != nil {
		return nil, wrapIO("create git home", err)
	}
	if logger == nil {
		logger = slog.Default()
	}
	s := &Store{root: cfg.Root, git: &Git{path: gitPath, home: home}, log: logger}
	s.emptyTrash()
	// Packs of loose objects a backup made (OpenPacks) and a crash left.
	if stale, err := filepath.Glob(filepath.Join(cfg.Root, ".backup-*")); err == nil {
		for _, p := range stale {
			s.removeLater(p)
		}
	}
	return s, nil
}

// emptyTrash removes, in the background, whatever a previous run left in the
// trash (a crash can interrupt a removal).
func (s *Store) emptyTrash() {
	entries, err := os.ReadDir(filepath.Join(s.root, trashDir))
	if err != nil {
		return
	}
	for _, e := range entries {
		s.removeLater(filepath.Join(s.root, trashDir, e.Name()))
	}
}

func (s *Store) removeLater(path string) {
	go func() {
		if err := os.RemoveAll(path); err != nil {
			s.log.Warn("removing a deleted repository failed", "path", path, "err", err)
		}
	}()
}

var gitVersionRE = regexp.MustCompile(`(\d+)\.(\d+)`)

func gitVersion(s string) (int, int, bool) {
	m := gitVersionRE.FindStringSubmatch(s)
	if m == nil {
		return 0, 0, false
	}
	a, _ := strconv.Atoi(m[1])
	b, _ := strconv.Atoi(m[2])
	return a, b, true
}

// Root is the directory holding the repositories.
func (s *Store) Root() string { return s.root }

// Path is where a repository lives.
func (s *Store) Path(name string) (string, error) { return PathIn(s.root, name) }

// Git is the runner every git command of this node uses (one environment
// policy, HOME under the root).
func (s *Store) Git() *Git { return s.git }

// command prepares git to run in dir. When dir is a repository, GIT_DIR
// names it, so that git never goes looking for a repository in the
// directories above a damaged one.
func (s *Store) command(ctx context.Context, dir string, env []string, args ...string) *exec.Cmd {
	if dir != "" {
		env = append(slices.Clip(env), "GIT_DIR=.")
	}
	return s.git.Command(ctx, dir, env, args...)
}

// run runs git in dir (a repository, or "" for none) and returns stdout.
func (s *Store) run(ctx context.Context, dir string, stdin []byte, env []string, args ...string) ([]byte, error) {
	c := s.command(ctx, dir, env, args...)
	if stdin != nil {
		c.Stdin = bytes.NewReader(stdin)
	}
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	if err := RunNice(c); err != nil {
		return stdout.Bytes(), gitError(ctx, args, err, stderr.String())
	}
	return stdout.Bytes(), nil
}

// gitError describes a failed git command: ErrGit (or ErrDiskFull when git
// ran out of space), the command, and git's trimmed stderr. A cancelled or
// expired ctx is wrapped too.
func gitError(ctx context.Context, args []string, err error, stderr string) error {
	msg := strings.TrimSpace(stderr)
	if len(msg) > 600 {
		msg = msg[:600] + "..."
	}
	if msg == "" {
		msg = "(no output)"
	}
	base := ErrGit
	if strings.Contains(msg, "No space left on device") || strings.Contains(msg, "Disk quota exceeded") || isDiskFull(err) {
		base = ErrDiskFull
	}
	cmd := strings.Join(args, " ")
	if len(cmd) > 200 {
		cmd = cmd[:200] + "..."
	}
	if cerr := ctx.Err(); cerr != nil {
		return fmt.Errorf("%w: git %s: %w: %s", base, cmd, cerr, msg)
	}
	return fmt.Errorf("%w: git %s: %v: %s", base, cmd, err, msg)
}

func isDiskFull(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}

// wrapIO marks a filesystem error as ErrDiskFull when it is one.
func wrapIO(what string, err error) error {
	if err == nil {
		return nil
	}
	if isDiskFull(err) {
		return fmt.Errorf("%w: %s: %v", ErrDiskFull, what, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// repoConfig is set in every repository gitraft creates.
var repoConfig = [][2]string{
	// Durability: git fsyncs objects, packs and refs itself.
	{"core.fsync", "objects,reference,derived-metadata"},
	{"core.fsyncMethod", "fsync"},
	// Every push lands as one pack in quarantine, which is what gitraft
	// ships to its peers; never as loose objects.
	{"receive.unpackLimit", "1"},
	{"transfer.unpackLimit", "1"},
	{"receive.advertisePushOptions", "true"},
	{"receive.advertiseAtomic", "true"},
	{"receive.denyDeletes", "false"},
	{"receive.denyNonFastForwards", "false"},
	// Peers fetch exact objects from each other when catching up. (Not
	// uploadpack.allowRefInWant: with git 2.39 it breaks shallow clones.)
	{"uploadpack.allowAnySHA1InWant", "true"},
	{"uploadpack.allowFilter", "true"},
	{"gc.auto", "0"},
	{"core.logAllRefUpdates", "false"},
	{"repack.writeBitmaps", "true"},
}

// writeSkeleton writes a new, empty bare repository into dir without
// running git: what `git init --bare` makes that git needs (HEAD, config,
// objects/, refs/), configured with repoConfig and HEAD at refs/heads/main.
// A node creating thousands of repositories takes no process per create.
func writeSkeleton(dir string) error {
	for _, d := range []string{"objects/info", "objects/pack", "refs/heads", "refs/tags", "info"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return wrapIO("create repository", err)
		}
	}
	var cfg strings.Builder
	cfg.WriteString("[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = true\n")
	section := "core"
	for _, kv := range repoConfig {
		sec, key, _ := strings.Cut(kv[0], ".")
		if sec != section {
			fmt.Fprintf(&cfg, "[%s]\n", sec)
			section = sec
		}
		fmt.Fprintf(&cfg, "\t%s = %s\n", key, kv[1])
	}
	files := map[string]string{
		"HEAD":   "ref: " + "refs/heads/main" + "\n",
		"config": cfg.String(),
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			return wrapIO("create repository", err)
		}
	}
	return nil
}

// Init creates the bare repository for incarnation id (the Raft index that
// created it), at version 1 with no refs and HEAD at refs/heads/main: that
// is the state at creation. It is idempotent for the same id; a directory
// left by another incarnation (or without a readable marker) is moved to the
// trash first. The repository is built under a temporary name, configured
// (repoConfig), fsynced, and renamed into place, so a crash never leaves a
// half-made repository under the real name.
func (s *Store) Init(ctx context.Context, name string, id uint64) error {
	path, err := s.Path(name)
	if err != nil {
		return err
	}
	if id == 0 {
		return fmt.Errorf("storage: Init(%q): id starts at 1", name)
	}
	if r, err := s.Local(name); err == nil {
		if r.ID == id {
			return nil
		}
		if err := s.trash(name, path, r.ID); err != nil {
			return err
		}
	} else if _, serr := os.Stat(path); serr == nil {
		if err := s.trash(name, path, 0); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return wrapIO("create parent directory", err)
	}
	// The repository is built under one fixed temporary name: the caller
	// serialises Inits of a name, so what is there is the half-made
	// repository of an Init that crashed. (Listing the parent directory to
	// find it cost a node O(repositories) per create.)
	s.conn.forget(path)
	tmp := path + ".init-tmp"
	if err := os.RemoveAll(tmp); err != nil {
		return wrapIO("remove a half-made repository", err)
	}
	if err := writeSkeleton(tmp); err != nil {
		os.RemoveAll(tmp)
		return err
	}
	// git does not fsync its config or the skeleton it creates; a repository
	// that loses its config in a crash would silently lose core.fsync.
	if err := syncTree(tmp); err != nil {
		os.RemoveAll(tmp)
		return err
	}
	if err := writeMarker(filepath.Join(tmp, MarkerFile), Replica{Name: name, ID: id, Version: 1}); err != nil {
		os.RemoveAll(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.RemoveAll(tmp)
		return wrapIO("install repository", err)
	}
	return syncDir(filepath.Dir(path))
}

// syncTree fsyncs every file and directory under dir (a new, small
// repository).
func syncTree(dir string) error {
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && !d.Type().IsRegular() {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		return wrapIO("fsync "+p, f.Sync())
	})
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// Local reads what this node's copy of a repository holds, from its marker
// file. ErrNotFound when there is no copy (a directory without a marker is
// not a copy: Init replaces it); ErrCorrupt when the marker is unreadable.
func (s *Store) Local(name string) (Replica, error) {
	path, err := s.Path(name)
	if err != nil {
		return Replica{}, err
	}
	b, err := os.ReadFile(filepath.Join(path, MarkerFile))
	if errors.Is(err, fs.ErrNotExist) {
		return Replica{}, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	if err != nil {
		return Replica{}, err
	}
	r, err := parseMarker(b)
	if err == nil && r.Name != name {
		err = fmt.Errorf("it names repository %q", r.Name)
	}
	if err != nil {
		return Replica{}, fmt.Errorf("%w: %s: %v", ErrCorrupt, filepath.Join(path, MarkerFile), err)
	}
	return r, nil
}

func parseMarker(b []byte) (Replica, error) {
	var r Replica
	if err := json.Unmarshal(b, &r); err != nil {
		return Replica{}, err
	}
	if r.ID == 0 || r.Version == 0 || r.Name == "" {
		return Replica{}, errors.New("id, version or name missing")
	}
	return r, nil
}

// List returns every repository on this node, sorted by name. It skips the
// trash, half-made repositories and anything without a readable marker.
func (s *Store) List() ([]Replica, error) {
	var out []Replica
	err := filepath.WalkDir(s.root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() || p == s.root {
			return nil
		}
		base := d.Name()
		rel, _ := filepath.Rel(s.root, p)
		if strings.HasPrefix(base, ".") || strings.Contains(base, ".git.init-") {
			return filepath.SkipDir
		}
		if name, ok := strings.CutSuffix(filepath.ToSlash(rel), ".git"); ok {
			if b, err := os.ReadFile(filepath.Join(p, MarkerFile)); err == nil {
				r, err := parseMarker(b)
				if err == nil && r.Name != name {
					err = fmt.Errorf("it names repository %q", r.Name)
				}
				if err != nil {
					s.log.Warn("skipping a repository with a bad marker", "path", p, "err", err)
				} else {
					out = append(out, r)
				}
			}
			return filepath.SkipDir
		}
		if strings.Count(rel, string(filepath.Separator)) >= MaxSegments-1 {
			return filepath.SkipDir // deeper than any valid name
		}
		return nil
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, err
}

// SetVersion records, durably, the version a copy has reached: the marker
// is written to a temporary file, fsynced, renamed over the old one, and the
// directory fsynced. ErrNotFound when the repository is not here.
func (s *Store) SetVersion(name string, id, version uint64) error {
	path, err := s.existing(name)
	if err != nil {
		return err
	}
	if id == 0 || version == 0 {
		return fmt.Errorf("storage: SetVersion(%q, id %d, version %d): id and version start at 1", name, id, version)
	}
	return writeMarker(filepath.Join(path, MarkerFile), Replica{Name: name, ID: id, Version: version})
}

func writeMarker(path string, r Replica) error {
	b, _ := json.Marshal(r)
	return writeFileSync(path, append(b, '\n'))
}

func writeFileSync(path string, b []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return wrapIO("write "+filepath.Base(path), err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		os.Remove(tmp)
		return wrapIO("write "+filepath.Base(path), err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(tmp)
		return wrapIO("fsync "+filepath.Base(path), err)
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return wrapIO("close "+filepath.Base(path), err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return wrapIO("rename "+filepath.Base(path), err)
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return wrapIO("fsync "+dir, d.Sync())
}

// Refs returns the refs under refs/, refname to object id.
func (s *Store) Refs(ctx context.Context, name string) (map[string]string, error) {
	path, err := s.existing(name)
	if err != nil {
		return nil, err
	}
	// Read the files; git only for what that does not cover (and a
	// cancelled ctx or a damaged repository fail as git fails).
	if ctx.Err() == nil {
		if refs, ok, err := readRefs(path); err != nil || ok {
			return refs, err
		}
	}
	out, err := s.run(ctx, path, nil, nil, "for-each-ref", "--format=%(objectname) %(refname)", "refs/")
	if err != nil {
		return nil, err
	}
	refs := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if oid, ref, ok := strings.Cut(line, " "); ok {
			refs[ref] = oid
		}
	}
	return refs, nil
}

// Head returns HEAD's target, such as "refs/heads/main".
func (s *Store) Head(ctx context.Context, name string) (string, error) {
	path, err := s.existing(name)
	if err != nil {
		return "", err
	}
	out, err := s.run(ctx, path, nil, nil, "symbolic-ref", "HEAD")
	return strings.TrimSpace(string(out)), err
}

func (s *Store) existing(name string) (string, error) {
	path, err := s.Path(name)
	if err != nil {
		return "", err
	}
	if _, err := os.Stat(path); err != nil {
		return "", fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	return path, nil
}

// Missing returns which of oids the repository lacks, in the order given,
// each once: those not in its object store, and those that are but whose
// history is not all there (say, the pack of a later push arrived while an
// earlier one never did). Pointing a ref at either would publish a broken
// repository. Every oid must be a full, lowercase hex object id.
//
// One `git rev-list --objects --not --all` checks, as git does after a
// fetch, that everything the oids reach and the refs do not is there. Only
// when it is not does `git cat-file --batch-check` say which objects are
// absent, and the present ones are checked in halves to name the incomplete
// ones. What passed is remembered for a while, so that SetRefs, or a
// Missing, right after need not walk it again: a peer that checked a
// pushed tip before acking records the push without starting git.
func (s *Store) Missing(ctx context.Context, name string, oids []string) ([]string, error) {
	path, err := s.existing(name)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var in bytes.Buffer
	var uniq []string
	for _, o := range oids {
		if o == "" || seen[o] {
			continue
		}
		if !isOID(o) {
			return nil, fmt.Errorf("storage: %q is not an object id", o)
		}
		seen[o] = true
		if s.conn.has(path, o) {
			continue // found whole moments ago (a peer's PutPack check, say)
		}
		uniq = append(uniq, o)
		in.WriteString(o + "\n")
	}
	if len(uniq) == 0 {
		return nil, nil
	}
	// The usual answer, "nothing missing", takes one git process.
	checked := time.Now()
	ok, err := s.connected(ctx, path, uniq)
	if err != nil {
		return nil, err
	}
	if ok {
		s.conn.add(path, uniq, checked)
		return nil, nil
	}
	out, err := s.run(ctx, path, in.Bytes(), nil, "cat-file", "--batch-check=%(objectname)")
	if err != nil {
		return nil, err
	}
	lacks := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if oid, ok := strings.CutSuffix(line, " missing"); ok {
			lacks[oid] = true
		}
	}
	var present []string
	for _, o := range uniq {
		if !lacks[o] {
			present = append(present, o)
		}
	}
	partial, err := s.incomplete(ctx, path, present)
	if err != nil {
		return nil, err
	}
	for _, o := range partial {
		lacks[o] = true
	}
	for _, o := range present {
		if !lacks[o] {
			s.conn.add(path, []string{o}, checked)
		}
	}
	var missing []string
	for _, o := range uniq {
		if lacks[o] {
			missing = append(missing, o)
		}
	}
	return missing, nil
}

// DropBrokenRefs deletes the refs of a copy whose objects are gone (a lost
// pack, a disk error). Such refs make every check that trusts the refs
// (`--not --all`) fail, so the copy could never catch up; the replicated
// state says what they must be, and SetRefs puts them back. It returns the
// refs it dropped.
func (s *Store) DropBrokenRefs(ctx context.Context, name string) ([]string, error) {
	path, err := s.existing(name)
	if err != nil {
		return nil, err
	}
	refs, err := s.Refs(ctx, name)
	if err != nil {
		return nil, err
	}
	var in bytes.Buffer
	names := slices.Sorted(maps.Keys(refs))
	for _, ref := range names {
		in.WriteString(refs[ref] + "\n")
	}
	if len(names) == 0 {
		return nil, nil
	}
	out, err := s.run(ctx, path, in.Bytes(), nil, "cat-file", "--batch-check=%(objectname)")
	if err != nil {
		return nil, err
	}
	gone := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if oid, ok := strings.CutSuffix(line, " missing"); ok {
			gone[oid] = true
		}
	}
	var tx bytes.Buffer
	var dropped []string
	tx.WriteString("start\n")
	for _, ref := range names {
		if gone[refs[ref]] {
			fmt.Fprintf(&tx, "delete %s\n", ref)
			dropped = append(dropped, ref)
		}
	}
	if len(dropped) == 0 {
		return nil, nil
	}
	tx.WriteString("prepare\ncommit\n")
	if _, err := s.run(ctx, path, tx.Bytes(), nil, "update-ref", "--stdin"); err != nil {
		return nil, err
	}
	s.conn.forget(path)
	return dropped, syncRefDirs(path, dropped)
}

// MissingWhole is Missing without trusting the copy's refs: each object's
// whole history is walked (one `git rev-list --objects` per object), so a
// copy whose refs point at lost objects still answers for the objects it
// does hold. It is slow on a large history; repair uses it.
func (s *Store) MissingWhole(ctx context.Context, name string, oids []string) ([]string, error) {
	path, err := s.existing(name)
	if err != nil {
		return nil, err
	}
	var missing []string
	for _, o := range oids {
		if !isOID(o) {
			return nil, fmt.Errorf("storage: %q is not an object id", o)
		}
		_, err := s.run(ctx, path, nil, nil, "rev-list", "--objects", "--quiet", o)
		switch {
		case err == nil:
		case ctx.Err() != nil || errors.Is(err, ErrDiskFull):
			return nil, err
		default:
			missing = append(missing, o)
		}
	}
	return missing, nil
}

// MissingInQuarantine is Missing for a push in flight: it judges oids
// against the repository plus the objects git received into quarantine (the
// GIT_QUARANTINE_PATH of a pre-receive hook), the way receive-pack checks
// each command's new value before it runs the hook. Nothing is remembered:
// the quarantine may yet be thrown away.
func (s *Store) MissingInQuarantine(ctx context.Context, name, quarantine string, oids []string) ([]string, error) {
	path, err := s.existing(name)
	if err != nil {
		return nil, err
	}
	if quarantine == "" {
		return s.Missing(ctx, name, oids)
	}
	qpath, err := filepath.Abs(quarantine)
	if err != nil {
		return nil, err
	}
	objects := filepath.Join(path, "objects")
	if rel, err := filepath.Rel(objects, qpath); err != nil || rel == "." || strings.HasPrefix(rel, "..") {
		return nil, fmt.Errorf("storage: quarantine %s is not inside %s", quarantine, objects)
	}
	env := []string{"GIT_OBJECT_DIRECTORY=" + qpath, "GIT_ALTERNATE_OBJECT_DIRECTORIES=" + objects}
	var uniq []string
	seen := map[string]bool{}
	for _, o := range oids {
		if o == "" || seen[o] {
			continue
		}
		if !isOID(o) {
			return nil, fmt.Errorf("storage: %q is not an object id", o)
		}
		seen[o] = true
		uniq = append(uniq, o)
	}
	check := func(batch []string) (bool, error) {
		in := strings.Join(batch, "\n") + "\n"
		_, err := s.run(ctx, path, []byte(in), env, "rev-list", "--objects", "--stdin", "--not", "--all", "--quiet")
		switch {
		case err == nil:
			return true, nil
		case ctx.Err() != nil || errors.Is(err, ErrDiskFull):
			return false, err
		}
		return false, nil
	}
	if len(uniq) == 0 {
		return nil, nil
	}
	// The usual push is proven whole in-process (connect.go); git walks
	// the rest.
	if refs, ok, err := readRefs(path); err == nil && ok {
		packs, _ := filepath.Glob(filepath.Join(qpath, "pack", "*.pack"))
		if proveConnected(path, packs, refs, uniq) {
			return nil, nil
		}
	}
	ok, err := check(uniq)
	if err != nil || ok {
		return nil, err
	}
	// As receive-pack does when the whole set fails: each on its own.
	var missing []string
	for _, o := range uniq {
		ok, err := check([]string{o})
		if err != nil {
			return nil, err
		}
		if !ok {
			missing = append(missing, o)
		}
	}
	return missing, nil
}

// RemoveStaleLocks removes the lock files a killed git left in a
// repository's refs (refs/**/*.lock, packed-refs.lock, HEAD.lock). Without
// this, one interrupted update-ref makes every later ref change fail with
// "File exists" for good. Call it only while nothing else can be changing
// the repository's refs (the caller's per-repository guard and write lock).
// It returns how many it removed.
func (s *Store) RemoveStaleLocks(name string) (int, error) {
	path, err := s.existing(name)
	if err != nil {
		return 0, err
	}
	removed := 0
	for _, f := range []string{"packed-refs.lock", "HEAD.lock"} {
		switch err := os.Remove(filepath.Join(path, f)); {
		case err == nil:
			removed++
		case !errors.Is(err, fs.ErrNotExist):
			return removed, wrapIO("remove stale lock", err)
		}
	}
	err = filepath.WalkDir(filepath.Join(path, "refs"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if !d.IsDir() && strings.HasSuffix(d.Name(), ".lock") {
			if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return wrapIO("remove stale lock", err)
			}
			removed++
		}
		return nil
	})
	return removed, err
}

// incomplete returns which of oids are not connected: not there, or
// reaching objects that are not there and that no ref reaches. The refs
// themselves are taken to be complete (SetRefs keeps them so).
func (s *Store) incomplete(ctx context.Context, path string, oids []string) ([]string, error) {
	if len(oids) == 0 {
		return nil, nil
	}
	ok, err := s.connected(ctx, path, oids)
	if err != nil || ok {
		return nil, err
	}
	if len(oids) == 1 {
		return oids, nil
	}
	half := len(oids) / 2
	a, err := s.incomplete(ctx, path, oids[:half])
	if err != nil {
		return nil, err
	}
	b, err := s.incomplete(ctx, path, oids[half:])
	if err != nil {
		return nil, err
	}
	return append(a, b...), nil
}

// connected runs git's own connectivity check (what `git fetch` and `git
// receive-pack` run on new tips): walk everything oids reach that the refs
// do not, and fail on the first object that is not there.
func (s *Store) connected(ctx context.Context, path string, oids []string) (bool, error) {
	in := strings.Join(oids, "\n") + "\n"
	_, err := s.run(ctx, path, []byte(in), nil, "rev-list", "--objects", "--stdin", "--not", "--all", "--quiet")
	switch {
	case err == nil:
		return true, nil
	case ctx.Err() != nil || errors.Is(err, ErrDiskFull) || strings.Contains(err.Error(), "not a git repository"):
		return false, err
	default:
		// "bad object", "missing blob object", "Could not read",
		// "Failed to traverse parents", ...: something is not there.
		return false, nil
	}
}

// isOID reports whether s is a full SHA-1 or SHA-256 object id in lowercase
// hex (the form the replicated state holds).
func isOID(s string) bool {
	if len(s) != 40 && len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// checkRefName refuses what cannot be a ref under refs/ in an update-ref
// transaction (git checks the finer rules itself).
func checkRefName(ref string) error {
	if !strings.HasPrefix(ref, "refs/") || len(ref) == len("refs/") {
		return fmt.Errorf("storage: ref %q is not under refs/", ref)
	}
	for _, r := range ref {
		if r <= ' ' || r == 0x7f {
			return fmt.Errorf("storage: ref %q contains a space or control character", ref)
		}
	}
	return nil
}

func firstFew(oids []string) string {
	if len(oids) > 3 {
		return strings.Join(oids[:3], ", ") + fmt.Sprintf(" and %d more", len(oids)-3)
	}
	return strings.Join(oids, ", ")
}

// SetRefs makes the refs under refs/ exactly want, in one `git update-ref
// --stdin` transaction whose every create, update and delete names the old
// value read just before, and then points HEAD at head (when not ""). A
// change of a few loose refs (a push's) is written here the way git writes
// it, lock files and all (writeLooseRefs), without starting git.
//
// Nothing changes if an object is missing, or its history is incomplete:
// the new values are first put through git's connectivity check (the one
// Missing uses; values Missing passed moments ago are not walked again), and
// the error (wrapping ErrMissingObjects and ErrGit) lists the first few that
// fail. Refs are fsynced by git (core.fsync=reference),
// their directories here.
func (s *Store) SetRefs(ctx context.Context, name string, want map[string]string, head string) error {
	path, err := s.existing(name)
	if err != nil {
		return err
	}
	for ref, oid := range want {
		if err := checkRefName(ref); err != nil {
			return err
		}
		if !isOID(oid) || strings.Trim(oid, "0") == "" {
			return fmt.Errorf("storage: ref %s: %q is not an object id", ref, oid)
		}
	}
	if head != "" {
		if err := checkRefName(head); err != nil {
			return fmt.Errorf("HEAD: %w", err)
		}
	}
	have, err := s.Refs(ctx, name)
	if err != nil {
		return err
	}
	// No prune runs while refs take new values: it could drop an object,
	// unreachable and old, that a new value is about to name (a catch-up
	// that finds the pack of an earlier, failed push of the same commits).
	// Deletions, and a call that changes nothing (the usual one after a
	// push, whose refs git has set), do not wait.
	for ref, oid := range want {
		if have[ref] != oid {
			end, err := s.beginRefChange(ctx, path)
			if err != nil {
				return err
			}
			defer end()
			if have, err = s.Refs(ctx, name); err != nil {
				return err
			}
			break
		}
	}
	var tx bytes.Buffer
	tx.WriteString("start\n")
	var changed, newOIDs []string
	for ref, oid := range want {
		if have[ref] == oid {
			continue
		}
		changed = append(changed, ref)
		newOIDs = append(newOIDs, oid)
		if old, ok := have[ref]; ok {
			fmt.Fprintf(&tx, "update %s %s %s\n", ref, oid, old)
		} else {
			fmt.Fprintf(&tx, "create %s %s\n", ref, oid)
		}
	}
	for ref, old := range have {
		if _, ok := want[ref]; !ok {
			changed = append(changed, ref)
			fmt.Fprintf(&tx, "delete %s %s\n", ref, old)
		}
	}
	tx.WriteString("prepare\ncommit\n")
	newOIDs = slices.DeleteFunc(newOIDs, func(o string) bool { return s.conn.has(path, o) })
	if len(newOIDs) > 0 {
		// git checks that a new value exists, not that its history does.
		sort.Strings(newOIDs)
		newOIDs = slices.Compact(newOIDs)
		ok, err := s.connected(ctx, path, newOIDs)
		if err != nil {
			return err
		}
		if !ok {
			bad, err := s.incomplete(ctx, path, newOIDs)
			if err != nil {
				return err
			}
			return fmt.Errorf("%w (%w): refs would point at objects, or history, that %s lacks: %s", ErrMissingObjects, ErrGit, name, firstFew(bad))
		}
	}
	if len(changed) >= packedRefsThreshold {
		if err := writeAllPacked(path, want); err != nil {
			return err
		}
	} else if len(changed) > 0 {
		// A few loose refs are written here, as git would (the usual push:
		// one branch), without starting git; the rest is git's.
		change := make(map[string]string, len(changed))
		for _, ref := range changed {
			change[ref] = want[ref]
		}
		done, err := writeLooseRefs(path, have, change)
		if err != nil {
			return err
		}
		if !done {
			_, err = s.run(ctx, path, tx.Bytes(), nil, "update-ref", "--stdin")
		}
		if err != nil {
			if strings.Contains(err.Error(), "nonexistent object") {
				if missing, merr := s.Missing(ctx, name, newOIDs); merr == nil && len(missing) > 0 {
					return fmt.Errorf("%w: %s: %w", ErrMissingObjects, firstFew(missing), err)
				}
				return fmt.Errorf("%w: %w", ErrMissingObjects, err)
			}
			return err
		}
		if err := syncRefDirs(path, changed); err != nil {
			return err
		}
	}
	if head != "" {
		if cur, err := s.headFile(path); err != nil || cur != head {
			if _, err := s.run(ctx, path, nil, nil, "symbolic-ref", "HEAD", head); err != nil {
				return err
			}
			if err := syncFile(filepath.Join(path, "HEAD")); err != nil {
				return err
			}
			if err := syncDir(path); err != nil {
				return err
			}
		}
	}
	return nil
}

// SyncRefs makes durable the ref changes git made itself (receive-pack
// setting a push's refs): git fsyncs the ref files (core.fsync=reference)
// but not the directories they were renamed into or removed from. Call it
// before recording a version that stands for those changes.
func (s *Store) SyncRefs(name string, refs []string) error {
	path, err := s.existing(name)
	if err != nil {
		return err
	}
	for _, ref := range refs {
		if err := checkRefName(ref); err != nil {
			return err
		}
	}
	return syncRefDirs(path, refs)
}

// syncRefDirs makes the renames behind a ref transaction durable. git
// fsyncs the ref files it writes (core.fsync=reference) but not the
// directories they are renamed into, and a version recorded after a ref
// change must never outlive the change in a crash. It fsyncs the directory
// of each changed loose ref (or the nearest one left, when git removed empty
// ones) and the repository's own (packed-refs).
func syncRefDirs(repo string, refs []string) error {
	dirs := map[string]bool{repo: true}
	for _, ref := range refs {
		d := filepath.Dir(filepath.Join(repo, filepath.FromSlash(ref)))
		for len(d) > len(repo) && !exists(d) {
			d = filepath.Dir(d)
		}
		dirs[d] = true
	}
	for d := range dirs {
		if err := syncDir(d); err != nil {
			return err
		}
	}
	return nil
}

func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return wrapIO("fsync "+path, f.Sync())
}

// headFile reads HEAD's target without running git.
func (s *Store) headFile(path string) (string, error) {
	b, err := os.ReadFile(filepath.Join(path, "HEAD"))
	if err != nil {
		return "", err
	}
	ref, ok := strings.CutPrefix(strings.TrimSpace(string(b)), "ref: ")
	if !ok {
		return "", fmt.Errorf("%w: HEAD is not a symbolic ref", ErrCorrupt)
	}
	return ref, nil
}

// Fetch fetches objects by id from a remote into the repository without
// touching any ref (no FETCH_HEAD, no tags, no gc). The url may be a path, or
// an ext:: url (allowed for this command only); env is added for the
// command it runs. Objects already present are not asked for, and nothing
// runs if none is missing. ErrMissingObjects if the remote did not send them
// all. The remote must serve objects by id (uploadpack.allowAnySHA1InWant,
// which Init sets).
func (s *Store) Fetch(ctx context.Context, name, url string, env []string, oids []string) error {
	path, err := s.existing(name)
	if err != nil {
		return err
	}
	missing, err := s.Missing(ctx, name, oids)
	if err != nil || len(missing) == 0 {
		return err
	}
	args := append([]string{"-c", "protocol.ext.allow=always", "-c", "fetch.fsckObjects=true", "fetch", "--no-tags", "--no-write-fetch-head", "--no-auto-gc", "--quiet", "--", url}, missing...)
	packDir := filepath.Join(path, "objects", "pack")
	before := tmpPacks(packDir)
	if _, err := s.run(ctx, path, nil, env, args...); err != nil {
		removeNewTmpPacks(packDir, before)
		return err
	}
	// git fsyncs the pack it keeps (transfer.unpackLimit=1 keeps every
	// fetch as a pack) but not the directory it is renamed into.
	if err := syncDir(packDir); err != nil {
		return err
	}
	still, err := s.Missing(ctx, name, missing)
	if err != nil {
		return err
	}
	if len(still) > 0 {
		return fmt.Errorf("%w after fetching from %s: %s", ErrMissingObjects, url, firstFew(still))
	}
	return nil
}

// Delete moves a repository to <root>/.trash (one rename, so it is gone
// atomically) and removes it in the background. ErrNotFound if absent.
func (s *Store) Delete(name string) error {
	path, err := s.existing(name)
	if err != nil {
		return err
	}
	var id uint64
	if r, err := s.Local(name); err == nil {
		id = r.ID
	}
	return s.trash(name, path, id)
}

func (s *Store) trash(name, path string, id uint64) error {
	dir := filepath.Join(s.root, trashDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return wrapIO("trash", err)
	}
	dst := filepath.Join(dir, fmt.Sprintf("%s-%d-%d", strings.ReplaceAll(name, "/", "_"), id, time.Now().UnixNano()))
	if err := os.Rename(path, dst); err != nil {
		return wrapIO("move to trash", err)
	}
	s.conn.forget(path)
	if err := syncDir(filepath.Dir(path)); err != nil {
		return err
	}
	s.log.Info("repository moved to the trash", "repo", name, "id", id)
	s.removeLater(dst)
	return nil
}

// FreeBytes is the space on the store's filesystem that an unprivileged
// writer may still use.
func (s *Store) FreeBytes() (uint64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(s.root, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", s.root, err)
	}
	unit := uint64(st.Frsize)
	if unit == 0 {
		unit = uint64(st.Bsize)
	}
	return st.Bavail * unit, nil
}

// connectedCache remembers, for a few minutes, object ids whose history a
// connectivity check found complete in a repository. Objects leave a
// repository only in a pruning Housekeep (gc.auto=0 otherwise): what was
// checked before a prune ended is forgotten then, and a repository's
// entries go when it is deleted or replaced; all expire, so a repository
// changed behind gitraft's back is not trusted for long.
type connectedCache struct {
	mu sync.Mutex
	m  map[string]time.Time // repository path + "\x00" + oid -> when the check began
	// pruned is when the last prune of a repository (by path) ended.
	pruned map[string]time.Time
}

const (
	connectedTTL = 5 * time.Minute
	connectedMax = 100_000
)

// add records oids as found whole by a check that began at checked.
func (c *connectedCache) add(path string, oids []string, checked time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	if c.m == nil || len(c.m) >= connectedMax {
		for k, t := range c.m {
			if now.Sub(t) > connectedTTL {
				delete(c.m, k)
			}
		}
		if c.m == nil || len(c.m) >= connectedMax {
			c.m = map[string]time.Time{}
		}
	}
	if p, ok := c.pruned[path]; ok && !checked.After(p) {
		return // the prune may have taken what the check saw
	}
	for _, o := range oids {
		c.m[path+"\x00"+o] = checked
	}
}

func (c *connectedCache) has(path, oid string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	t, ok := c.m[path+"\x00"+oid]
	if p, pok := c.pruned[path]; pok && !t.After(p) {
		return false
	}
	return ok && time.Since(t) <= connectedTTL
}

func (c *connectedCache) forget(path string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k := range c.m {
		if strings.HasPrefix(k, path+"\x00") {
			delete(c.m, k)
		}
	}
}

// pruneEnded forgets what was checked in a repository before a prune there
// ended, including checks still running now.
func (c *connectedCache) pruneEnded(path string) {
	c.forget(path)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pruned == nil {
		c.pruned = map[string]time.Time{}
	}
	c.pruned[path] = time.Now()
}
