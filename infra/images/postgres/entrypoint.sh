#!/bin/sh
# The official postgres image's start-up, reduced to what docker-compose.yml uses: on an empty PGDATA,
# initdb with POSTGRES_USER as the superuser (password POSTGRES_PASSWORD, never a default) and POSTGRES_DB
# created; then the server, listening on the container's network with password (SCRAM) logins only.
# Nothing listens during the initialisation (single-user mode), so pg_isready says ready only when it is.
set -eu
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required (warmserve compose-secrets writes it)}"
PGDATA="${PGDATA:-/var/lib/postgresql/data}"
user="${POSTGRES_USER:-postgres}"
db="${POSTGRES_DB:-$user}"

if [ "$(id -u)" = 0 ]; then  # a fresh volume may be root's: hand it to postgres, then drop root
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb --pgdata="$PGDATA" --username="$user" --pwfile="$pwfile" --encoding=UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "$db" != postgres ]; then
        printf 'CREATE DATABASE "%s" OWNER "%s";\n' "$db" "$user" \
            | postgres --single -D "$PGDATA" -j postgres >/dev/null
    fi
    echo "postgres-entrypoint: initialised $PGDATA (superuser $user, database $db)"
fi

exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/var/run/postgresql "$@"
