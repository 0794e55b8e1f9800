# Sourced by .ci/run: a throwaway PostgreSQL server on 127.0.0.1 for the tests that need one. Installs Debian's
# `postgresql` package where absent, makes a cluster in a temporary folder (owned by the postgres user when
# run as root: initdb refuses root), starts it on a free loopback port and exports its URL:
#   start_test_postgres   ->  ALLDETECT_TEST_POSTGRES=postgresql://postgres@127.0.0.1:PORT/alldetect_test
#   stop_test_postgres    ->  stops the server and removes the folder (safe to call when nothing started)

_pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

_pg_as() {  # run a PostgreSQL program as the cluster's owner
  if [ "$(id -u)" = 0 ]; then runuser -u "$_PG_USER" -- "$@"; else "$@"; fi
}

start_test_postgres() {
  local bin port
  bin=$(_pg_bindir)
  if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
    echo "[postgres] installing Debian's postgresql package"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    bin=$(_pg_bindir)
  fi
  [ -x "$bin/initdb" ] || { echo "[postgres] no initdb after installing postgresql" >&2; return 1; }
  _PG_BIN=$bin
  _PG_USER=postgres
  id -u postgres >/dev/null 2>&1 || _PG_USER=nobody
  _PG_DIR=$(mktemp -d /tmp/alldetect-pg.XXXXXX)
  [ "$(id -u)" = 0 ] && chown "$_PG_USER" "$_PG_DIR"
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  _pg_as "$bin/initdb" -D "$_PG_DIR/data" -U postgres -A trust -E UTF8 --no-sync >"$_PG_DIR/initdb.log" 2>&1 \
    || { cat "$_PG_DIR/initdb.log" >&2; return 1; }
  # Loopback only, the socket in our own folder, no fsync: a test server that holds nothing worth keeping.
  _pg_as "$bin/pg_ctl" -D "$_PG_DIR/data" -l "$_PG_DIR/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $_PG_DIR -c fsync=off" start >/dev/null \
    || { cat "$_PG_DIR/server.log" >&2; return 1; }
  _pg_as "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres alldetect_test
  export ALLDETECT_TEST_POSTGRES="postgresql://postgres@127.0.0.1:$port/alldetect_test"
  echo "[postgres] $("$bin/postgres" --version) on 127.0.0.1:$port (data in $_PG_DIR)"
}

stop_test_postgres() {
  [ -n "${_PG_DIR:-}" ] || return 0
  if [ -f "$_PG_DIR/data/postmaster.pid" ]; then
    _pg_as "$_PG_BIN/pg_ctl" -D "$_PG_DIR/data" -m fast -w stop >/dev/null || true
  fi
  rm -rf "$_PG_DIR"
  _PG_DIR=
  echo "[postgres] stopped"
}
