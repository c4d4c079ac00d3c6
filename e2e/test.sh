#!/bin/sh
# Runs every gitraft test: unit, in-process cluster and end-to-end.
# The end-to-end tests drive real git, ssh, sshd, PostgreSQL 15, pgbouncer and
# Postfix on loopback.
#
# It first installs what a fresh Debian machine lacks for the end-to-end tests,
# which drive real parts, when it runs as root and something is missing. Each
# entry is "command:Debian package"; add one when a test starts to need it.
set -eu
cd "$(dirname "$0")/.."

need=""
for pair in git:git ssh:openssh-client ssh-keygen:openssh-client sshd:openssh-server \
	pgbouncer:pgbouncer postfix:postfix /usr/lib/postgresql/15/bin/pg_ctl:postgresql-15 \
	iptables:iptables; do
	cmd=${pair%%:*}
	pkg=${pair#*:}
	if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ] && [ ! -x "$cmd" ]; then
		need="$need $pkg"
	fi
done
if [ -n "$need" ]; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
		echo "installing:$need"
		export DEBIAN_FRONTEND=noninteractive
		apt-get update -qq
		apt-get install -y -qq --no-install-recommends $need >/dev/null
	else
		echo "missing:$need (install them, or run as root with apt-get)" >&2
		exit 1
	fi
fi

go vet ./...
# The e2e tests build the binary with the race detector too (procs_test.go).
export GITRAFT_E2E_RACE=1
exec go test -race -count=1 -timeout 30m "$@" ./...
