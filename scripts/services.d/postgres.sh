# PostgreSQL at 127.0.0.1:$RUNYARD_PG_PORT (default 5432), trust auth, user postgres: the
# storage tests' server. Sourced by scripts/services.sh; see there for the conventions.
# RUNYARD_PG_PORT picks another port (the cluster listening there is the one started).

PG_HOST=127.0.0.1
PG_PORT=${RUNYARD_PG_PORT:-5432}
PG_STATE=$STATE_DIR/postgres${RUNYARD_PG_PORT:+-$RUNYARD_PG_PORT}
_pg_record() { _state_set "$PG_STATE" "$1" "$2"; }
_pg_recorded() { _state_is "$PG_STATE" "$1" "$2"; }

postgres_ready() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 3
  else
    (exec 3<>"/dev/tcp/$PG_HOST/$PG_PORT") 2>/dev/null  # no client tools: a TCP connect at least
  fi
}

# The tests connect as postgres, without a password.
postgres_usable() {
  command -v psql >/dev/null 2>&1 || return 0  # nothing to check with; the tests will tell
  psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -w -tAc 'SELECT 1' >/dev/null 2>&1
}

# "VERSION CLUSTER" of the cluster configured for $PG_PORT, if any.
_postgres_cluster() {
  command -v pg_lsclusters >/dev/null 2>&1 || return 0
  pg_lsclusters -h 2>/dev/null | awk -v port="$PG_PORT" '$3 == port && !found { print $1, $2; found = 1 }'
}

_install_postgres() {
  command -v apt-get >/dev/null 2>&1 \
    || _die "PostgreSQL is not installed and there is no apt-get to install it: install PostgreSQL and" \
            "make it listen on $PG_HOST:$PG_PORT with trust auth for user postgres"
  _log "PostgreSQL is not installed; installing it with apt-get"
  _as_root env DEBIAN_FRONTEND=noninteractive sh -c \
    'apt-get update -qq && apt-get install -y -qq postgresql >/dev/null' \
    || _die "apt-get install postgresql failed (see above)"
  _pg_record installed 1
  local cluster
  cluster=$(_postgres_cluster)
  [ -n "$cluster" ] || _die "apt-get installed PostgreSQL but created no cluster on port $PG_PORT (pg_lsclusters)"
  # A machine where this script installed PostgreSQL is a test machine: let local TCP
  # connections in without a password, as the tests expect.
  local hba
  hba=/etc/postgresql/${cluster% *}/${cluster#* }/pg_hba.conf
  _as_root sed -i -e '1i host all all 127.0.0.1/32 trust' -e '1i host all all ::1/128 trust' "$hba" \
    || _die "could not edit $hba"
  _log "allowed passwordless (trust) connections from 127.0.0.1 in $hba"
  if postgres_ready; then  # apt-get started it (no policy-rc.d in the way): re-read pg_hba.conf
    # shellcheck disable=SC2086
    _as_root pg_ctlcluster --skip-systemctl-redirect $cluster reload
    _pg_record started 1
    _pg_record cluster "$cluster"
  fi
}

_start_postgres() {
  local cluster
  cluster=$(_postgres_cluster)
  if [ -z "$cluster" ]; then
    # The command the issue names, for machines without pg_lsclusters' view of it.
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    [ -n "$version" ] || _die "PostgreSQL is installed but has no cluster under /etc/postgresql"
    cluster="$version main"
  fi
  _log "starting PostgreSQL cluster $cluster"
  # shellcheck disable=SC2086 # "VERSION NAME" are two arguments
  _as_root pg_ctlcluster --skip-systemctl-redirect $cluster start \
    || _die "pg_ctlcluster $cluster start failed; see /var/log/postgresql/postgresql-${cluster// /-}.log"
  _pg_record started 1
  _pg_record cluster "$cluster"
}

ensure_postgres() {
  if postgres_ready; then
    _pg_recorded started 1 || _pg_record started 0
    _log "PostgreSQL is running at $PG_HOST:$PG_PORT"
  else
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
      _install_postgres
    fi
    postgres_ready || _start_postgres
    local waited=0
    until postgres_ready; do
      [ "$waited" -lt 30 ] || _die "PostgreSQL did not come up at $PG_HOST:$PG_PORT within 30s (pg_lsclusters; the log" \
                                   "is under /var/log/postgresql/)"
      sleep 1
      waited=$((waited + 1))
    done
    _log "PostgreSQL is up at $PG_HOST:$PG_PORT"
  fi
  postgres_usable \
    || _die "PostgreSQL at $PG_HOST:$PG_PORT refuses user postgres without a password; the tests need" \
            "'host all all 127.0.0.1/32 trust' in its pg_hba.conf (then: pg_ctlcluster ... reload)," \
            "or set RUNYARD_TEST_POSTGRES_URL to a URL that works"
}

stop_postgres() {
  if ! _pg_recorded started 1; then
    _log "PostgreSQL at $PG_HOST:$PG_PORT was not started by this script; leaving it running"
    return 0
  fi
  local cluster
  cluster=$(_state_get "$PG_STATE" cluster | cut -d= -f2-)
  [ -n "$cluster" ] || cluster=$(_postgres_cluster)
  _log "stopping PostgreSQL cluster $cluster (started by this script)"
  # shellcheck disable=SC2086
  _as_root pg_ctlcluster --skip-systemctl-redirect $cluster stop
  _pg_record started 0
}
