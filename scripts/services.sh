#!/usr/bin/env bash
# Services the test suite needs. Each is checked, started if it is down, and installed
# (apt-get) if it is missing; a service that cannot be brought up is an error (exit 1),
# so CI fails loudly instead of skipping the tests that need it.
#
#   bash scripts/services.sh postgres        # ensure PostgreSQL is up (see services.d/postgres.sh)
#   bash scripts/services.sh stop-postgres   # stop it, only if this script started it
#
# One module per service in scripts/services.d/NAME.sh defines ensure_NAME and stop_NAME.
# What the scripts did (started or installed a service) is recorded in .ci/state/, so that
# "stop" only ever stops what they started. The modules can also be sourced:
#   . scripts/services.sh && _load postgres && ensure_postgres

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE_DIR=$ROOT/.ci/state
SERVICES_D=$ROOT/scripts/services.d

_log() { echo "services: $*" >&2; }
_die() { echo "services: error: $*" >&2; exit 1; }

_as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo -n "$@"
  else
    _die "need root (or passwordless sudo) to run: $*"
  fi
}

# State files hold key=value lines; a key written again replaces the old line.
_state_set() {
  mkdir -p "$STATE_DIR"
  touch "$1"
  grep -v "^$2=" "$1" >"$1.tmp" || true
  echo "$2=$3" >>"$1.tmp"
  mv "$1.tmp" "$1"
}
_state_is() { [ -f "$1" ] && grep -qx "$2=$3" "$1"; }
_state_get() { [ -f "$1" ] && grep "^$2=" "$1" | tail -n 1 | cut -d= -f2-; }

_known() { (cd "$SERVICES_D" && ls -- *.sh) | sed 's/\.sh$//' | tr '\n' ' '; }

_load() {
  [ -f "$SERVICES_D/$1.sh" ] || _die "unknown service '$1' (known: $(_known))"
  # shellcheck disable=SC1090
  . "$SERVICES_D/$1.sh"
}

_main() {
  [ $# -gt 0 ] || set -- postgres
  local service
  for service in "$@"; do
    case "$service" in
      stop-* | stop_*) _load "${service#stop?}"; "stop_${service#stop?}" ;;
      ensure_*) _load "${service#ensure_}"; "$service" ;;
      *) _load "$service"; "ensure_$service" ;;
    esac
  done
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  _main "$@"
fi
