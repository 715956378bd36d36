#!/usr/bin/env bash
# Start a throw-away PostgreSQL server on 127.0.0.1:${GLOM_PG_PORT:-55432} (trust auth, data in
# /tmp) unless one already answers there; prints the SQLAlchemy URL the tests use.
set -euo pipefail
port=${GLOM_PG_PORT:-55432}
data=${GLOM_PGDATA:-/tmp/glomlab-pg-$port}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -n "$bin" ] || { echo "PostgreSQL is not installed (apt-get install postgresql)" >&2; exit 1; }
url="postgresql+psycopg://postgres@127.0.0.1:$port/postgres"
if ! "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"; then
  as=()
  if [ "$(id -u)" = 0 ]; then as=(runuser -u postgres --); fi
  rm -rf "$data"; mkdir -p "$data"
  [ "$(id -u)" = 0 ] && chown postgres "$data"
  "${as[@]}" "$bin/initdb" -D "$data" -A trust -U postgres >/dev/null
  "${as[@]}" "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -o "-p $port -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
fi
echo "$url"
