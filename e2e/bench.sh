#!/bin/sh
# Runs gitraft's benchmarks and prints their tables:
#   BenchmarkCluster: committed Raft writes (locks, ref updates) and failover
#   BenchmarkGit: git over SSH, plain git + OpenSSH sshd vs a gitraft cluster,
#   then 16 clients pushing at once, then the push path under failures
#   (GITRAFT_BENCH_GIT=push: only the small pushes' cost, in a minute or two;
#   GITRAFT_BENCH_GIT=concurrent: only the 16 clients; GITRAFT_BENCH_GIT=failover:
#   only the failures, no OpenSSH baseline needed)
#   BenchmarkDatabaseSwitchover: PostgreSQL switchover write pause, failover (PostgreSQL 15 + pgbouncer, as e2e/test.sh installs)
# and, only when asked for by name:
#   PushFailoverTimeouts: leader SIGKILL -> next acknowledged push under Raft
#   timings (GITRAFT_BENCH_RAFT, e.g. "1s/1s/500ms default"), what the
#   defaults were chosen from.
#   Scale: BenchmarkScale, a cluster filled to 10,000 repositories and a million
#   refs (GITRAFT_SCALE_REPOS, GITRAFT_SCALE_BIG_REPOS, GITRAFT_SCALE_REFS make
#   it smaller): creates, fill time, big pushes and ls-remote against plain git,
#   restarts, memory, a fourth node. About 20 minutes.
#   Housekeep: BenchmarkHousekeep, clone time after 1,000 small pushes without
#   housekeeping and after `gitraft repo housekeep`, next to the same history
#   pushed at once (GITRAFT_BENCH_HOUSEKEEP_PUSHES makes it smaller). Needs only
#   the ssh client.
#   Fault: the long run of Test_E2E_FaultInjection, thousands of compare-and-swap
#   pushes and reads under kills, freezes and partitions, checked with porcupine
#   (GITRAFT_FAULT_OPS operations, 3000 by default, or GITRAFT_FAULT_DURATION;
#   GITRAFT_FAULT_OUT keeps porcupine's visualization). Partitions need root and
#   iptables.
#   Backup: BenchmarkBackup, gitraft backup create full and incremental for the Go
#   source tree as one repository and for 1,000 small repositories, next to GNU tar
#   (full and --listed-incremental) of a node's data dir (GITRAFT_BACKUP_TREE,
#   "none" to skip the big repository; GITRAFT_BACKUP_SMALL_REPOS). A few minutes.
# The git baseline needs OpenSSH's sshd (Debian: openssh-server) and root (it
# creates a "gitbench" account with git-shell as its login shell).
set -eu
cd "$(dirname "$0")/.."
if [ "${1:-}" = Fault ]; then
	if ! command -v iptables >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		export DEBIAN_FRONTEND=noninteractive
		apt-get update -qq
		apt-get install -y -qq --no-install-recommends iptables openssh-client >/dev/null
	fi
	if [ -z "${GITRAFT_FAULT_DURATION:-}" ]; then
		export GITRAFT_FAULT_OPS="${GITRAFT_FAULT_OPS:-3000}"
	fi
	exec go test -count=1 -run '^Test_E2E_FaultInjection$' -v -timeout 4h ./e2e
fi
if [ "${1:-}" = Housekeep ]; then
	exec go test -count=1 -run '^$' -bench '^BenchmarkHousekeep$' -benchtime 1x -timeout 3h ./e2e
fi
if [ "${1:-}" = Backup ]; then
	exec go test -count=1 -run '^$' -bench '^BenchmarkBackup$' -benchtime 1x -timeout 90m ./e2e
fi
if [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null 2>&1 || [ ! -x /usr/sbin/pgbouncer ] ||
	[ ! -x /usr/lib/postgresql/15/bin/pg_ctl ]; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		export DEBIAN_FRONTEND=noninteractive
		apt-get update -qq
		apt-get install -y -qq --no-install-recommends openssh-server openssh-client pgbouncer postgresql-15 >/dev/null
	else
		echo "missing: openssh-server, pgbouncer or postgresql-15 (install them, or run as root with apt-get)" >&2
		exit 1
	fi
fi
case "${1:-}" in
"") bench='^Benchmark(Cluster|Git|DatabaseSwitchover)$' ;;
*) bench="$1" ;;
esac
exec go test -count=1 -run '^$' -bench "$bench" -benchtime 1x -timeout 90m ./e2e
