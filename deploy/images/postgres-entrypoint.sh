#!/bin/sh
# Test PostgreSQL: on first start make a cluster whose superuser is POSTGRES_USER with
# POSTGRES_PASSWORD (SCRAM) and a database POSTGRES_DB, then run the server in the
# foreground, reachable from the container network.
set -eu
BIN=/usr/lib/postgresql/15/bin
: "${POSTGRES_USER:=csml}" "${POSTGRES_DB:=csml}"
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    "$BIN/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    printf 'host all all 0.0.0.0/0 scram-sha-256\n' >>"$PGDATA/pg_hba.conf"
    "$BIN/pg_ctl" -D "$PGDATA" -w start \
        -o "-c listen_addresses=127.0.0.1 -c unix_socket_directories=/tmp" >/dev/null
    PGPASSWORD="$POSTGRES_PASSWORD" "$BIN/createdb" -h 127.0.0.1 -U "$POSTGRES_USER" "$POSTGRES_DB"
    "$BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec "$BIN/postgres" -D "$PGDATA" -c listen_addresses='*' -c fsync=off \
    -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 \
    -c unix_socket_directories=/tmp
