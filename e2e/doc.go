// Package e2e holds gitraft's end-to-end tests. They build the gitraft
// binary, start clusters of separate `gitraft serve` processes on loopback
// with their own CA, and drive them with the real clients: the `gitraft`
// CLI, `git` and `ssh`. Nodes are killed with SIGKILL to test failures.
//
// Run them with the rest: ./e2e/test.sh (or go test ./e2e). The benchmarks
// run only when asked:
//
//	go test ./e2e -run '^$' -bench . -benchtime 1x
package e2e
