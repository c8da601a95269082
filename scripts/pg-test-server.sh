#!/bin/sh
# A throwaway PostgreSQL on 127.0.0.1 for tests (trust auth, no fsync: test data only).
#   scripts/pg-test-server.sh start DIR PORT   -> postgresql://postgres@127.0.0.1:PORT/postgres
#   scripts/pg-test-server.sh stop DIR
# Postgres refuses to run as root, so as root it runs as the `postgres` user.
# Fails loudly (exit 1, the reason on stderr) when there are no server binaries or the server
# does not start; the tests hand that reason to require_service (a failure under CI=true).
set -eu
usage() {
    echo "usage: $0 start DIR PORT | stop DIR" >&2
    exit 2
}
[ $# -ge 2 ] || usage
cmd=$1
dir=$2
die() {
    echo "pg-test-server.sh: $*" >&2
    exit 1
}
# pg_ctl on PATH, else /usr/local/bin, else Debian's newest /usr/lib/postgresql/N/bin
BIN=""
if command -v pg_ctl >/dev/null 2>&1; then
    BIN=$(dirname "$(command -v pg_ctl)")
elif [ -x /usr/local/bin/pg_ctl ]; then
    BIN=/usr/local/bin
else
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V); do
        [ -x "$d/pg_ctl" ] && BIN=$d
    done
fi
[ -n "$BIN" ] && [ -x "$BIN/initdb" ] ||
    die "no PostgreSQL server binaries (pg_ctl, initdb) on PATH, in /usr/local/bin or /usr/lib/postgresql/*/bin"
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
case $cmd in
start)
    [ $# -eq 3 ] || usage
    port=$3
    if [ "$(id -u)" -eq 0 ]; then
        id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user to run the server as"
    fi
    mkdir -p "$dir"
    if [ "$(id -u)" -eq 0 ]; then chown postgres "$dir"; fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_pg "$BIN/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 ||
            die "initdb failed: $(tail -n 5 "$dir/initdb.log")"
    fi
    as_pg "$BIN/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
        -o "-h 127.0.0.1 -p $port -k $dir -F -c max_connections=100" start >/dev/null ||
        die "the server did not start on 127.0.0.1:$port: $(tail -n 5 "$dir/postgres.log" 2>/dev/null)"
    ;;
stop)
    as_pg "$BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    ;;
*)
    usage
    ;;
esac
