# ministack: an AWS API emulator whose ECS runs tasks as real containers on the local Docker
# engine, and whose CloudWatch Logs receives their awslogs output. The runyard-ecs tests'
# ECS. Sourced by scripts/services.sh; see there for the conventions.
#
# It is installed from PyPI into a venv of its own under .ci/state/ (git-ignored; it pins
# its own botocore, which must not meet the workspace's), started on loopback only with
# its IoT (MQTT over TLS) and SFTP listeners off, on a free port, with its pid, port and
# log recorded in .ci/state/ministack; stop_ministack stops only that process (SIGTERM:
# ministack then removes the containers of its tasks). The tests read the endpoint from
# the state file (key `endpoint`).
#
#   RUNYARD_MINISTACK_VERSION   the version installed (default below; the one measured)
#   RUNYARD_MINISTACK_PORT      a fixed port instead of a free one

MINISTACK_VERSION=${RUNYARD_MINISTACK_VERSION:-1.5.33}
MINISTACK_STATE=$STATE_DIR/ministack
MINISTACK_DIR=$STATE_DIR/ministack.d
MINISTACK_VENV=$MINISTACK_DIR/venv-$MINISTACK_VERSION

_ministack_health() {
  # A real answer from ministack itself, not just an open port.
  python3 - "$1" <<'EOF' 2>/dev/null
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1] + "/_ministack/health", timeout=3) as r:
    json.load(r)
EOF
}

ministack_ready() {
  local pid endpoint
  pid=$(_state_get "$MINISTACK_STATE" pid || true)
  endpoint=$(_state_get "$MINISTACK_STATE" endpoint || true)
  [ -n "$pid" ] && [ -n "$endpoint" ] && kill -0 "$pid" 2>/dev/null && _ministack_health "$endpoint"
}

_install_ministack() {
  if [ -x "$MINISTACK_VENV/bin/python" ] && "$MINISTACK_VENV/bin/python" -c 'import ministack, docker' 2>/dev/null; then
    return 0
  fi
  _log "installing ministack $MINISTACK_VERSION (and the docker SDK it drives containers with) into $MINISTACK_VENV"
  rm -rf "$MINISTACK_VENV"
  mkdir -p "$MINISTACK_DIR"
  python3 -m venv "$MINISTACK_VENV" || _die "python3 -m venv $MINISTACK_VENV failed"
  "$MINISTACK_VENV/bin/pip" install --quiet --disable-pip-version-check "ministack==$MINISTACK_VERSION" 'docker>=7.0' \
    || _die "pip install ministack==$MINISTACK_VERSION failed (see above); PyPI must be reachable"
}

_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

ensure_ministack() {
  if ministack_ready; then
    _log "ministack is running at $(_state_get "$MINISTACK_STATE" endpoint) (pid $(_state_get "$MINISTACK_STATE" pid))"
    return 0
  fi
  # Its ECS runs tasks on the Docker engine: without one every task would fail to start.
  _load docker
  ensure_docker
  _install_ministack
  local port=${RUNYARD_MINISTACK_PORT:-$(_free_port)}
  local log=$MINISTACK_DIR/ministack-$port.log
  local endpoint=http://127.0.0.1:$port
  mkdir -p "$MINISTACK_DIR"
  _log "starting ministack on $endpoint (log: $log)"
  # BIND_HOST: loopback only (its default is 0.0.0.0). IOT_MTLS_ENABLED=0 and SFTP_ENABLED=0:
  # otherwise it also listens on 0.0.0.0:8883 (MQTT) and for SFTP. TMPDIR: its pid file.
  (cd "$MINISTACK_DIR" && exec env BIND_HOST=127.0.0.1 GATEWAY_PORT="$port" IOT_MTLS_ENABLED=0 SFTP_ENABLED=0 \
      TMPDIR="$MINISTACK_DIR" LOG_LEVEL=WARNING "$MINISTACK_VENV/bin/python" -m ministack \
      >"$log" 2>&1 </dev/null) &
  local pid=$!
  _state_set "$MINISTACK_STATE" pid "$pid"
  _state_set "$MINISTACK_STATE" endpoint "$endpoint"
  _state_set "$MINISTACK_STATE" log "$log"
  local waited=0
  until _ministack_health "$endpoint"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$log" >&2 || true
      _die "ministack exited during start-up (log above: $log)"
    fi
    [ "$waited" -lt 300 ] || { kill -TERM "$pid" 2>/dev/null; _die "ministack did not answer on $endpoint within 30s; see $log"; }
    sleep 0.1
    waited=$((waited + 1))
  done
  _state_set "$MINISTACK_STATE" started 1
  _log "ministack is up at $endpoint (pid $pid)"
}

stop_ministack() {
  if ! _state_is "$MINISTACK_STATE" started 1; then
    _log "ministack was not started by this script; nothing to stop"
    return 0
  fi
  local pid
  pid=$(_state_get "$MINISTACK_STATE" pid || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    _log "stopping ministack (pid $pid, started by this script)"
    kill -TERM "$pid"
    local waited=0
    while kill -0 "$pid" 2>/dev/null; do
      [ "$waited" -lt 150 ] || { kill -KILL "$pid" 2>/dev/null || true; break; }
      sleep 0.1
      waited=$((waited + 1))
    done
  fi
  _state_set "$MINISTACK_STATE" started 0
}
