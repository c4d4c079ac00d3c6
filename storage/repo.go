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
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
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
// not serialised here: the caller holds a per-repository lock.
type Store struct {
	root string
	git  string
	home string
	log  *slog.Logger
}

// Replica is what a node's disk holds of one repository.
type Replica struct {
	Name    string `json:"name"`
	ID      uint64 `json:"id"`
	Version uint64 `json:"version"`
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
	if err := os.MkdirAll(cfg.Root, 0o700); err != nil {
		return nil, err
	}
	home := filepath.Join(cfg.Root, ".home")
	if err := os.MkdirAll(home, 0o700); err != nil {
		return nil, err
	}
	if logger == nil {
		logger = slog.Default()
	}
	return &Store{root: cfg.Root, git: gitPath, home: home, log: logger}, nil
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

// env is the environment every git command here runs with: no prompts,
// no user or system configuration, the C locale.
func (s *Store) env(extra ...string) []string {
	env := []string{
		"PATH=" + os.Getenv("PATH"), "HOME=" + s.home, "GIT_TERMINAL_PROMPT=0",
		"GIT_CONFIG_NOSYSTEM=1", "LC_ALL=C",
	}
	return append(env, extra...)
}

// run runs git in dir (a repository) and returns stdout.
func (s *Store) run(ctx context.Context, dir string, stdin []byte, env []string, args ...string) ([]byte, error) {
	c := exec.CommandContext(ctx, s.git, args...)
	c.Dir = dir
	c.Env = s.env(env...)
	if stdin != nil {
		c.Stdin = bytes.NewReader(stdin)
	}
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	if err := c.Run(); err != nil {
		return stdout.Bytes(), gitError(args, err, stderr.String())
	}
	return stdout.Bytes(), nil
}

func gitError(args []string, err error, stderr string) error {
	msg := strings.TrimSpace(stderr)
	if len(msg) > 600 {
		msg = msg[:600] + "..."
	}
	base := ErrGit
	if strings.Contains(msg, "No space left on device") || strings.Contains(msg, "Disk quota exceeded") || isDiskFull(err) {
		base = ErrDiskFull
	}
	return fmt.Errorf("%w: git %s: %v: %s", base, strings.Join(args, " "), err, msg)
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

// Init creates the bare repository for incarnation id, at version 1 with no
// refs. It is idempotent for the same id; a directory left by another
// incarnation is moved to the trash first.
func (s *Store) Init(ctx context.Context, name string, id uint64) error {
	path, err := s.Path(name)
	if err != nil {
		return err
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
	tmp := path + ".init-" + randHex(4)
	if _, err := s.run(ctx, "", nil, nil, "init", "--bare", "--quiet", tmp); err != nil {
		os.RemoveAll(tmp)
		return err
	}
	for _, kv := range repoConfig {
		if _, err := s.run(ctx, tmp, nil, nil, "config", kv[0], kv[1]); err != nil {
			os.RemoveAll(tmp)
			return err
		}
	}
	if _, err := s.run(ctx, tmp, nil, nil, "symbolic-ref", "HEAD", "refs/heads/main"); err != nil {
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

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// Local reads what this node's copy of a repository holds.
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
	var r Replica
	if err := json.Unmarshal(b, &r); err != nil || r.ID == 0 {
		return Replica{}, fmt.Errorf("%w: %s: %v", ErrCorrupt, filepath.Join(path, MarkerFile), err)
	}
	return r, nil
}

// List returns every repository on this node, by name.
func (s *Store) List() ([]Replica, error) {
	var out []Replica
	err := filepath.WalkDir(s.root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			return nil
		}
		base := d.Name()
		if p != s.root && strings.HasPrefix(base, ".") {
			return filepath.SkipDir
		}
		if strings.HasSuffix(base, ".git") {
			if b, err := os.ReadFile(filepath.Join(p, MarkerFile)); err == nil {
				var r Replica
				if json.Unmarshal(b, &r) == nil && r.ID != 0 {
					out = append(out, r)
				}
			}
			return filepath.SkipDir
		}
		return nil
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, err
}

// SetVersion records, durably, the version a copy has reached.
func (s *Store) SetVersion(name string, id, version uint64) error {
	path, err := s.Path(name)
	if err != nil {
		return err
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

// Refs returns the refs under refs/.
func (s *Store) Refs(ctx context.Context, name string) (map[string]string, error) {
	path, err := s.existing(name)
	if err != nil {
		return nil, err
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

// Head returns HEAD's target.
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

// Missing returns which of oids the repository lacks.
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
		seen[o] = true
		uniq = append(uniq, o)
		in.WriteString(o + "\n")
	}
	if len(uniq) == 0 {
		return nil, nil
	}
	out, err := s.run(ctx, path, in.Bytes(), nil, "cat-file", "--batch-check=%(objectname)")
	if err != nil {
		return nil, err
	}
	var missing []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if oid, ok := strings.CutSuffix(line, " missing"); ok {
			missing = append(missing, oid)
		}
	}
	return missing, nil
}

// SetRefs makes the refs under refs/ exactly want, in one transaction, and
// points HEAD at head (when not ""). Nothing changes if an object is missing
// (git refuses to point a ref at an object it does not have); callers that
// fetch first check with Missing.
func (s *Store) SetRefs(ctx context.Context, name string, want map[string]string, head string) error {
	path, err := s.existing(name)
	if err != nil {
		return err
	}
	have, err := s.Refs(ctx, name)
	if err != nil {
		return err
	}
	var tx bytes.Buffer
	tx.WriteString("start\n")
	changed := false
	for ref, oid := range want {
		if have[ref] == oid {
			continue
		}
		changed = true
		if old, ok := have[ref]; ok {
			fmt.Fprintf(&tx, "update %s %s %s\n", ref, oid, old)
		} else {
			fmt.Fprintf(&tx, "create %s %s\n", ref, oid)
		}
	}
	for ref, old := range have {
		if _, ok := want[ref]; !ok {
			changed = true
			fmt.Fprintf(&tx, "delete %s %s\n", ref, old)
		}
	}
	tx.WriteString("prepare\ncommit\n")
	if changed {
		if _, err := s.run(ctx, path, tx.Bytes(), nil, "update-ref", "--stdin"); err != nil {
			if strings.Contains(err.Error(), "nonexistent object") {
				return fmt.Errorf("%w: %v", ErrMissingObjects, err)
			}
			return err
		}
	}
	if head != "" {
		if cur, err := s.headFile(path); err != nil || cur != head {
			if _, err := s.run(ctx, path, nil, nil, "symbolic-ref", "HEAD", head); err != nil {
				return err
			}
		}
	}
	return nil
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
// touching any ref. The url may be an ext:: url; env is added for its command.
func (s *Store) Fetch(ctx context.Context, name, url string, env []string, oids []string) error {
	path, err := s.existing(name)
	if err != nil {
		return err
	}
	missing, err := s.Missing(ctx, name, oids)
	if err != nil || len(missing) == 0 {
		return err
	}
	args := append([]string{"-c", "protocol.ext.allow=always", "fetch", "--no-tags", "--no-write-fetch-head", "--no-auto-gc", "--quiet", url}, missing...)
	if _, err := s.run(ctx, path, nil, env, args...); err != nil {
		return err
	}
	still, err := s.Missing(ctx, name, missing)
	if err != nil {
		return err
	}
	if len(still) > 0 {
		return fmt.Errorf("%w after fetching: %s", ErrMissingObjects, strings.Join(still[:min(3, len(still))], ", "))
	}
	return nil
}

// Delete moves a repository to the trash (atomically) and removes it in the
// background.
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
	dir := filepath.Join(s.root, ".trash")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return wrapIO("trash", err)
	}
	dst := filepath.Join(dir, fmt.Sprintf("%s-%d-%d", strings.ReplaceAll(name, "/", "_"), id, time.Now().UnixNano()))
	if err := os.Rename(path, dst); err != nil {
		return wrapIO("move to trash", err)
	}
	go os.RemoveAll(dst)
	return nil
}

// FreeBytes is the free space on the store's filesystem.
func (s *Store) FreeBytes() (uint64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(s.root, &st); err != nil {
		return 0, err
	}
	return st.Bavail * uint64(st.Bsize), nil
}
