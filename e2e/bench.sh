#!/bin/sh
# Runs gitraft's benchmarks and prints their tables:
#   BenchmarkCluster: committed Raft writes (locks, ref updates) and failover
#   BenchmarkGit: git over SSH, plain git + OpenSSH sshd vs a gitraft cluster
#   (GITRAFT_BENCH_GIT=push: only the small pushes' cost, in a minute or two)
#   BenchmarkDatabaseSwitchover: PostgreSQL switchover write pause, failover (PostgreSQL 15 + pgbouncer, as e2e/test.sh installs)
# and, only when asked for by name:
#   Scale: BenchmarkScale, a cluster filled to 10,000 repositories and a million
#   refs (GITRAFT_SCALE_REPOS, GITRAFT_SCALE_BIG_REPOS, GITRAFT_SCALE_REFS make
#   it smaller): creates, fill time, big pushes and ls-remote against plain git,
#   restarts, memory, a fourth node. About 20 minutes.
#   Fault: the long run of Test_E2E_FaultInjection, thousands of compare-and-swap
#   pushes and reads under kills, freezes and partitions, checked with porcupine
#   (GITRAFT_FAULT_OPS operations, 3000 by default, or GITRAFT_FAULT_DURATION;
#   GITRAFT_FAULT_OUT keeps porcupine's visualization). Partitions need root and
#   iptables.
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
