# Docker engine (dockerd on /var/run/docker.sock): the runyard-docker tests' engine.
# Sourced by scripts/services.sh; see there for the conventions.
#
# Detects a running engine with `docker info`; if there is none, installs docker.io with
# apt-get when dockerd is missing, starts dockerd in the background (no systemd here) and
# records its pid in .ci/state/docker, so that stop_docker stops only a daemon it started.

DOCKER_STATE=$STATE_DIR/docker
DOCKERD_LOG=${RUNYARD_DOCKERD_LOG:-$STATE_DIR/dockerd.log}
_docker_record() { _state_set "$DOCKER_STATE" "$1" "$2"; }

docker_ready() { docker info >/dev/null 2>&1; }

_install_docker() {
  command -v apt-get >/dev/null 2>&1 \
    || _die "dockerd is not installed and there is no apt-get to install it: install Docker Engine and start it"
  _log "dockerd is not installed; installing docker.io with apt-get"
  _as_root env DEBIAN_FRONTEND=noninteractive sh -c \
    'apt-get update -qq && apt-get install -y -qq docker.io >/dev/null' \
    || _die "apt-get install docker.io failed (see above)"
  _docker_record installed 1
}

ensure_docker() {
  if docker_ready; then
    # Ours only if we recorded starting it and that daemon still runs.
    if ! { _state_is "$DOCKER_STATE" started 1 && kill -0 "$(_state_get "$DOCKER_STATE" pid)" 2>/dev/null; }; then
      _docker_record started 0
    fi
    _log "Docker engine is running ($(docker version --format '{{.Server.Version}}' 2>/dev/null))"
    return 0
  fi
  command -v dockerd >/dev/null 2>&1 || _install_docker
  command -v dockerd >/dev/null 2>&1 || _die "apt-get installed docker.io but there is no dockerd on PATH"
  command -v docker >/dev/null 2>&1 || _die "there is no docker command line on PATH"
  _docker_clear_stale_pidfiles
  _start_dockerd && return 0
  # One retry: the usual cause is a containerd left half-alive by a daemon that was killed
  # (dockerd then waits on it forever instead of starting its own).
  _log "dockerd did not come up; stopping it, clearing containerd's state and trying once more"
  _docker_kill_ours
  _as_root rm -f /var/run/docker/containerd/containerd.pid /var/run/docker/containerd/containerd.sock /var/run/docker.pid
  _start_dockerd && return 0
  tail -n 50 "$DOCKERD_LOG" >&2 2>/dev/null || true
  _die "dockerd did not answer 'docker info' within 60s, twice (log above: $DOCKERD_LOG)"
}

# Is pid $1 alive and running the program named $2? A pid alone proves nothing: a machine
# restored from a snapshot keeps /var/run, and the old pid may now belong to any process.
_pid_is() {
  [ -n "$1" ] && [ -r "/proc/$1/comm" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}

# dockerd trusts its pid files by liveness only: a stale docker.pid makes it refuse to
# start, and a stale containerd.pid whose number was reused makes it wait for a containerd
# that is not there ("containerd is still running" then "timeout waiting for containerd").
_docker_clear_stale_pidfiles() {
  local pid
  if [ -f /var/run/docker.pid ]; then
    pid=$(cat /var/run/docker.pid 2>/dev/null)
    _pid_is "$pid" dockerd || { _log "removing a stale /var/run/docker.pid (pid ${pid:-?} is not dockerd)"; _as_root rm -f /var/run/docker.pid; }
  fi
  if [ -f /var/run/docker/containerd/containerd.pid ]; then
    pid=$(cat /var/run/docker/containerd/containerd.pid 2>/dev/null)
    if ! _pid_is "$pid" containerd; then
      _log "removing a stale containerd pid file (pid ${pid:-?} is not containerd)"
      _as_root rm -f /var/run/docker/containerd/containerd.pid /var/run/docker/containerd/containerd.sock
    elif [ ! -f /var/run/docker.pid ]; then
      # A containerd whose dockerd is gone: an orphan that dockerd may not be able to reuse.
      _log "stopping an orphaned containerd (pid $pid) left by a dockerd that is gone"
      _as_root kill -TERM "$pid" 2>/dev/null || true
      local i
      for i in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -0 "$pid" 2>/dev/null && _as_root kill -KILL "$pid" 2>/dev/null
      _as_root rm -f /var/run/docker/containerd/containerd.pid /var/run/docker/containerd/containerd.sock
    fi
  fi
}

_docker_kill_ours() {
  local pid i
  pid=$(_state_get "$DOCKER_STATE" pid)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    _as_root kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && _as_root kill -KILL "$pid" 2>/dev/null
  fi
  pid=$(cat /var/run/docker/containerd/containerd.pid 2>/dev/null)
  _pid_is "$pid" containerd && _as_root kill -KILL "$pid" 2>/dev/null
  return 0
}

# Start dockerd unless one is recorded running, then wait up to 60 s for `docker info`.
_start_dockerd() {
  if [ ! -f /var/run/docker.pid ]; then
    mkdir -p "$STATE_DIR"
    _log "starting dockerd (log: $DOCKERD_LOG)"
    if [ "$(id -u)" = 0 ]; then
      nohup dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
    else
      nohup sudo -n dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
    fi
    _docker_record pid $!
    _docker_record started 1
  fi
  local i
  for i in $(seq 1 120); do
    docker_ready && { _log "Docker engine is up"; return 0; }
    sleep 0.5
  done
  return 1
}

stop_docker() {
  if ! _state_is "$DOCKER_STATE" started 1; then
    _log "the Docker engine was not started by this script; leaving it running"
    return 0
  fi
  local pid i
  pid=$(_state_get "$DOCKER_STATE" pid)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    _log "stopping dockerd (pid $pid, started by this script)"
    _as_root kill -TERM "$pid"
    for i in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && _as_root kill -KILL "$pid"
  fi
  _docker_record started 0
}
