#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests: 127.0.0.1, a free port, data under /tmp.
#
#   eval "$(scripts/postgres.sh)"   # prints: export AUTOHYBRID_TEST_PG=postgresql://...
#   scripts/postgres.sh stop        # stop it (the data stays until /tmp is cleaned)
#
# Installs PostgreSQL with apt-get when no initdb is found (Debian/Ubuntu). Idempotent: a
# second call reuses the running server, or restarts the stopped one. As root the server
# runs as the `postgres` user (PostgreSQL refuses to run as root). Only the export line goes
# to stdout; progress goes to stderr.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

ROOT="${AUTOHYBRID_PG_DIR:-/tmp/autohybrid-pg}"
DATA="$ROOT/data"
DB=autohybrid
USER_NAME=autohybrid

log() { echo "postgres.sh: $*" >&2; }

find_bin() {  # directory holding initdb / pg_ctl
    local d
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return
    fi
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
            echo "$d"
            return
        fi
    done
}

BIN="$(find_bin)"
if [ -z "$BIN" ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        log "PostgreSQL is not installed and cannot be installed here (needs root + apt-get)"
        exit 1
    fi
    log "installing PostgreSQL with apt-get ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends postgresql postgresql-client >&2
    BIN="$(find_bin)"
    [ -n "$BIN" ] || { log "no initdb after installing postgresql"; exit 1; }
fi
command -v psql >/dev/null 2>&1 || [ -x "$BIN/psql" ] || {
    log "psql (postgresql-client) is missing"; exit 1; }
PSQL="$(command -v psql || echo "$BIN/psql")"

if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir "$ROOT" --shell /bin/sh postgres
    OWNER=postgres
    if command -v runuser >/dev/null 2>&1; then
        as_owner() { runuser -u postgres -- "$@"; }
    else
        as_owner() { su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; }
    fi
else
    OWNER="$(id -un)"
    as_owner() { "$@"; }
fi

pg_ctl() { as_owner "$BIN/pg_ctl" -D "$DATA" "$@"; }
running() { [ -f "$DATA/postmaster.pid" ] && pg_ctl status >/dev/null 2>&1; }

if [ "${1:-}" = stop ]; then
    if running; then pg_ctl stop -m fast -w >&2; else log "not running"; fi
    exit 0
fi

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

mkdir -p "$ROOT"
chmod 755 "$ROOT"
if [ ! -s "$DATA/PG_VERSION" ]; then
    log "initdb in $DATA"
    rm -rf "$DATA"
    mkdir -p "$DATA"
    chown "$OWNER" "$ROOT" "$DATA"
    chmod 700 "$DATA"
    as_owner "$BIN/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        -E UTF8 --locale=C >/dev/null
    head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$ROOT/password"
    chmod 600 "$ROOT/password"
    rm -f "$ROOT/ready"
fi

if ! running; then
    PORT="$(cat "$ROOT/port" 2>/dev/null || true)"
    if [ -z "$PORT" ] || (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        PORT="$(free_port)"  # first start, or the old port is taken by something else
    fi
    echo "$PORT" >"$ROOT/port"
    log "starting on 127.0.0.1:$PORT"
    pg_ctl start -w -t 60 -l "$ROOT/server.log" \
        -o "-p $PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$ROOT" >&2 || {
        log "the server did not start; its log:"; tail -n 20 "$ROOT/server.log" >&2; exit 1; }
fi
PORT="$(cat "$ROOT/port")"
PASS="$(cat "$ROOT/password")"

if [ ! -f "$ROOT/ready" ]; then
    sql() { as_owner "$PSQL" -h "$ROOT" -p "$PORT" -U postgres -d postgres -qtAX -c "$1"; }
    if [ -z "$(sql "SELECT 1 FROM pg_roles WHERE rolname = '$USER_NAME'")" ]; then
        sql "CREATE ROLE $USER_NAME LOGIN PASSWORD '$PASS'" >/dev/null
    fi
    if [ -z "$(sql "SELECT 1 FROM pg_database WHERE datname = '$DB'")" ]; then
        sql "CREATE DATABASE $DB OWNER $USER_NAME" >/dev/null
    fi
    touch "$ROOT/ready"
fi

echo "export AUTOHYBRID_TEST_PG=postgresql://$USER_NAME:$PASS@127.0.0.1:$PORT/$DB"
