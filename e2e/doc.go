// Package e2e holds gitraft's end-to-end tests. TestMain builds the gitraft
// binary once; each test starts its own cluster of separate `gitraft serve`
// processes on loopback, with a fresh CA and mutual TLS, short Raft timeouts,
// and each node's log in the test's temp dir (its tail is printed when a
// test fails). The tests drive the cluster only from outside, as operators
// and users do: the `gitraft` CLI, the public gRPC API, `git` and `ssh`.
// Failures are real: nodes are killed with SIGKILL and restarted on their
// data dirs.
//
// They check gitraft's promises from outside: the cluster's
// lifecycle and bad input (Test_E2E_ClusterLifecycle), a killed leader and
// its catching up (Test_E2E_LeaderKilledAndRejoins), certificates from
// another CA refused (Test_E2E_ForeignCAClientRefused), no writes without a
// majority (Test_E2E_NoQuorum), membership changes
// (Test_E2E_JoinRemoveTransfer), write locks (Test_E2E_LockCLI), `gitraft
// dev` (Test_E2E_DevCommand), pushes, fetches and clones under faults
// (Test_E2E_Git*), the whole contract under kills, freezes and partitions,
// checked for linearizability with porcupine (Test_E2E_FaultInjection,
// fault_test.go, nemesis_test.go, fault_model_test.go), PostgreSQL switchover, failover and refusals with a real
// primary, streaming standby and pgbouncers (Test_E2E_DB_*, harness in
// cluster/dbtarget/pgctl/pgtest), and mail drain with a real Postfix
// (Test_E2E_MailDrain).
//
// Run them with the rest: ./e2e/test.sh (it installs git, OpenSSH,
// PostgreSQL 15, pgbouncer, Postfix and iptables when missing), or just these:
//
//	go test -count=1 -v ./e2e
//
// The tests run one after another; they need no network but loopback. The
// fault test's partitions need root, iptables and cgroup v2: it starts each
// node in a cgroup of its own and drops only its own nodes' Raft and gRPC
// traffic, with rules it tags and always removes; without them it logs why
// and runs with kills and freezes only.
//
// The benchmarks run only when asked (./e2e/bench.sh runs them all). One at a
// time:
//
//	go test ./e2e -run '^$' -bench Cluster -benchtime 1x  # Raft writes, failover
//	go test ./e2e -run '^$' -bench Git -benchtime 1x      # git over SSH vs sshd
//	go test ./e2e -run '^$' -bench DatabaseSwitchover -benchtime 1x
//
// The long fault run: ./e2e/bench.sh Fault, or
//
//	GITRAFT_FAULT_OPS=3000 go test -count=1 -v -timeout 4h -run Test_E2E_FaultInjection ./e2e
package e2e
