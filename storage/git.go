package storage

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"time"
)

// Git runs the configured git binary, with one environment policy for
// every caller: the store's own commands, the SSH front end's upload-pack
// and receive-pack, and the node-to-node upload-pack. Each command gets
// PATH, HOME (a directory of gitraft's own, so no user configuration
// applies), GIT_CONFIG_NOSYSTEM=1, GIT_TERMINAL_PROMPT=0 and LC_ALL=C, plus
// what its caller adds (GIT_PROTOCOL, the push's id); nothing else of the
// process's environment reaches git. Commands run at GitNice.
type Git struct {
	path string
	home string
}

// NewGit is a runner for the git binary (a name looked up on PATH, or a
// path) with HOME set to home ("" leaves HOME out, so git reads no user
// configuration either).
func NewGit(binary, home string) (*Git, error) {
	if binary == "" {
		binary = "git"
	}
	p, err := exec.LookPath(binary)
	if err != nil {
		return nil, fmt.Errorf("git is not installed (%v); gitraft runs the real git, 2.36 or later", err)
	}
	return &Git{path: p, home: home}, nil
}

// DefaultGit runs "git" from PATH without a HOME; for tools and tests that
// have no store.
func DefaultGit() *Git {
	g, err := NewGit("git", "")
	if err != nil {
		return &Git{path: "git"}
	}
	return g
}

// Path is the git binary.
func (g *Git) Path() string { return g.path }

// Env is the environment a git command runs with, extra appended.
func (g *Git) Env(extra ...string) []string {
	env := []string{"PATH=" + os.Getenv("PATH"), "GIT_TERMINAL_PROMPT=0", "GIT_CONFIG_NOSYSTEM=1", "LC_ALL=C"}
	if g.home != "" {
		env = append(env, "HOME="+g.home)
	}
	return append(env, extra...)
}

// Command prepares git with args, run in dir ("" for the current
// directory), with the policy's environment plus extra. Once git has exited
// or ctx ended, Wait does not wait long for a child (say, an ext:: helper)
// that still holds git's stdout or stderr.
func (g *Git) Command(ctx context.Context, dir string, extra []string, args ...string) *exec.Cmd {
	c := exec.CommandContext(ctx, g.path, args...)
	c.Dir = dir
	c.Env = g.Env(extra...)
	c.WaitDelay = 10 * time.Second
	return c
}

// Run runs c at GitNice (RunNice); it is here so that callers need no other
// name to run git.
func (g *Git) Run(c *exec.Cmd) error { return RunNice(c) }
