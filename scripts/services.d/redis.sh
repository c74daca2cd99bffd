# Redis at 127.0.0.1:$RUNYARD_REDIS_PORT (default 6379): the Celery tests' broker and result
# backend. Sourced by scripts/services.sh; see there for the conventions. A Redis this
# script starts runs in the background (no systemd here), without persistence, with its
# pid, log and working directory under .ci/state/; stop_redis stops only that one.

REDIS_HOST=127.0.0.1
REDIS_PORT=${RUNYARD_REDIS_PORT:-6379}
REDIS_STATE=$STATE_DIR/redis-$REDIS_PORT

# A real protocol check: PING must answer PONG (an open port alone could be anything).
redis_ready() {
  if command -v redis-cli >/dev/null 2>&1; then
    [ "$(timeout 3 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]
  else
    local reply
    reply=$(timeout 3 bash -c "exec 3<>/dev/tcp/$REDIS_HOST/$REDIS_PORT && printf 'PING\r\n' >&3 && head -c 5 <&3" \
            2>/dev/null) || return 1
    [ "$reply" = "+PONG" ]
  fi
}

_install_redis() {
  command -v apt-get >/dev/null 2>&1 \
    || _die "Redis is not installed and there is no apt-get to install it: install redis-server, or start a" \
            "Redis at $REDIS_HOST:$REDIS_PORT"
  _log "Redis is not installed; installing redis-server with apt-get"
  _as_root env DEBIAN_FRONTEND=noninteractive sh -c \
    'apt-get update -qq && apt-get install -y -qq redis-server >/dev/null' \
    || _die "apt-get install redis-server failed (see above)"
  _state_set "$REDIS_STATE" installed 1
}

ensure_redis() {
  if redis_ready; then
    _state_is "$REDIS_STATE" started 1 || _state_set "$REDIS_STATE" started 0
    _log "Redis is running at $REDIS_HOST:$REDIS_PORT"
    return 0
  fi
  command -v redis-server >/dev/null 2>&1 || _install_redis
  local dir=$STATE_DIR/redis-$REDIS_PORT.d
  mkdir -p "$dir"
  _log "starting Redis at $REDIS_HOST:$REDIS_PORT (log: $dir/redis.log)"
  # --daemonize yes with a pidfile: the server outlives this script, and its pid is known.
  redis-server --port "$REDIS_PORT" --bind "$REDIS_HOST" --save '' --appendonly no \
    --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
    || _die "redis-server failed to start; see $dir/redis.log"
  local waited=0
  until redis_ready; do
    [ "$waited" -lt 100 ] || _die "Redis did not answer PING at $REDIS_HOST:$REDIS_PORT within 10s; see $dir/redis.log"
    sleep 0.1
    waited=$((waited + 1))
  done
  _state_set "$REDIS_STATE" started 1
  _state_set "$REDIS_STATE" pidfile "$dir/redis.pid"
  _log "Redis is up at $REDIS_HOST:$REDIS_PORT (pid $(cat "$dir/redis.pid"))"
}

stop_redis() {
  if ! _state_is "$REDIS_STATE" started 1; then
    _log "Redis at $REDIS_HOST:$REDIS_PORT was not started by this script; leaving it running"
    return 0
  fi
  local pidfile pid
  pidfile=$(_state_get "$REDIS_STATE" pidfile || true)
  pid=$(cat "$pidfile" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    _log "stopping Redis (pid $pid, started by this script)"
    kill -TERM "$pid"
    local waited=0
    while kill -0 "$pid" 2>/dev/null; do
      [ "$waited" -lt 100 ] || { kill -KILL "$pid" 2>/dev/null || true; break; }
      sleep 0.1
      waited=$((waited + 1))
    done
  fi
  _state_set "$REDIS_STATE" started 0
}
