package storage

import (
	"os/exec"
	"syscall"
)

// GitNice is the niceness git runs at. git's work (packing, indexing,
// walking history) can saturate a node's cores; Raft's heartbeats, in the
// gitraft process at normal priority, must not starve behind it, or
// leaders step down under a heavy push load.
const GitNice = 10

// RunNice runs c as Run does, at GitNice.
func RunNice(c *exec.Cmd) error {
	if err := StartNice(c); err != nil {
		return err
	}
	return c.Wait()
}

// StartNice starts c and lowers its CPU priority to GitNice. The children
// git starts from then on (index-pack, pack-objects) inherit it. Failing to
// lower it is not an error: the work runs either way.
func StartNice(c *exec.Cmd) error {
	if err := c.Start(); err != nil {
		return err
	}
	_ = syscall.Setpriority(syscall.PRIO_PROCESS, c.Process.Pid, GitNice)
	return nil
}
