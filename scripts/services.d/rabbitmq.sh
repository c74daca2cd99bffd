# RabbitMQ at 127.0.0.1:$RUNYARD_RABBITMQ_PORT (default 5672), user guest/guest from
# localhost: the Celery tests' second broker. Sourced by scripts/services.sh; see there
# for the conventions. With another port, RUNYARD_RABBITMQ_NODENAME names the node to
# start (default rabbit-$PORT@localhost), so it does not clash with a running one.

RABBITMQ_HOST=127.0.0.1
RABBITMQ_PORT=${RUNYARD_RABBITMQ_PORT:-5672}
RABBITMQ_STATE=$STATE_DIR/rabbitmq-$RABBITMQ_PORT
if [ "$RABBITMQ_PORT" = 5672 ]; then
  RABBITMQ_NODE=${RUNYARD_RABBITMQ_NODENAME:-}
else
  RABBITMQ_NODE=${RUNYARD_RABBITMQ_NODENAME:-rabbit-$RABBITMQ_PORT@localhost}
fi

# A real protocol check: send the AMQP 0-9-1 protocol header; a broker answers with
# connection.start, a frame that begins with type 1 on channel 0 (bytes 01 00 00).
rabbitmq_ready() {
  local reply
  reply=$(timeout 3 bash -c "exec 3<>/dev/tcp/$RABBITMQ_HOST/$RABBITMQ_PORT && printf 'AMQP\x00\x00\x09\x01' >&3 \
          && head -c 3 <&3 | od -An -tx1" 2>/dev/null) || return 1
  [ "$(echo $reply)" = "01 00 00" ]
}

_rabbitmqctl() {
  if [ -n "$RABBITMQ_NODE" ]; then rabbitmqctl -n "$RABBITMQ_NODE" "$@"; else rabbitmqctl "$@"; fi
}

_install_rabbitmq() {
  command -v apt-get >/dev/null 2>&1 \
    || _die "RabbitMQ is not installed and there is no apt-get to install it: install rabbitmq-server, or" \
            "start a RabbitMQ at $RABBITMQ_HOST:$RABBITMQ_PORT"
  _log "RabbitMQ is not installed; installing rabbitmq-server with apt-get"
  _as_root env DEBIAN_FRONTEND=noninteractive sh -c \
    'apt-get update -qq && apt-get install -y -qq rabbitmq-server >/dev/null' \
    || _die "apt-get install rabbitmq-server failed (see above)"
  _state_set "$RABBITMQ_STATE" installed 1
}

ensure_rabbitmq() {
  if rabbitmq_ready; then
    _state_is "$RABBITMQ_STATE" started 1 || _state_set "$RABBITMQ_STATE" started 0
    _log "RabbitMQ is running at $RABBITMQ_HOST:$RABBITMQ_PORT"
    return 0
  fi
  command -v rabbitmq-server >/dev/null 2>&1 || _install_rabbitmq
  local epmd_before log=$STATE_DIR/rabbitmq-$RABBITMQ_PORT.log
  epmd_before=$(pgrep -x epmd || true)
  mkdir -p "$STATE_DIR"
  _log "starting RabbitMQ at $RABBITMQ_HOST:$RABBITMQ_PORT${RABBITMQ_NODE:+ (node $RABBITMQ_NODE)}"
  if [ -n "$RABBITMQ_NODE" ]; then
    # A second node on this machine: its own name, port, data directory and no plugins.
    local base=$STATE_DIR/rabbitmq-$RABBITMQ_PORT.d
    mkdir -p "$base"
    # Its own config file: the system one may pin a listener to 5672.
    printf 'listeners.tcp.default = %s:%s\nloopback_users.guest = true\n' "$RABBITMQ_HOST" "$RABBITMQ_PORT" \
      >"$base/rabbitmq.conf"
    chown -R rabbitmq: "$base" 2>/dev/null || true
    _as_root env RABBITMQ_NODENAME="$RABBITMQ_NODE" RABBITMQ_NODE_PORT="$RABBITMQ_PORT" \
      RABBITMQ_NODE_IP_ADDRESS="$RABBITMQ_HOST" RABBITMQ_DIST_PORT=$((RABBITMQ_PORT + 20000)) \
      RABBITMQ_MNESIA_BASE="$base/mnesia" RABBITMQ_LOG_BASE="$base/log" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$base/enabled_plugins" RABBITMQ_CONFIG_FILE="$base/rabbitmq.conf" \
      rabbitmq-server -detached >"$log" 2>&1 \
      || _die "rabbitmq-server -detached failed; see $log"
  else
    _as_root rabbitmq-server -detached >"$log" 2>&1 || _die "rabbitmq-server -detached failed; see $log"
  fi
  # Recorded at once, so that stop_rabbitmq can stop it even if it never becomes ready.
  _state_set "$RABBITMQ_STATE" started 1
  _state_set "$RABBITMQ_STATE" node "${RABBITMQ_NODE:-default}"
  # -detached returns before the node registers, and await_startup gives up on a node it
  # cannot see yet: wait for AMQP first (8-15 s here), then for the boot to finish.
  local waited=0
  until rabbitmq_ready; do
    [ "$waited" -lt 120 ] || _die "RabbitMQ did not answer AMQP at $RABBITMQ_HOST:$RABBITMQ_PORT within 120s; see $log" \
                                   "and /var/log/rabbitmq/ (stop it with: bash scripts/services.sh stop-rabbitmq)"
    sleep 1
    waited=$((waited + 1))
  done
  _rabbitmqctl await_startup --timeout 60 >>"$log" 2>&1 \
    || _die "RabbitMQ answers AMQP but did not finish booting; see $log"
  if [ -z "$epmd_before" ]; then
    _state_set "$RABBITMQ_STATE" epmd "$(pgrep -x epmd || true)"
  fi
  _log "RabbitMQ is up at $RABBITMQ_HOST:$RABBITMQ_PORT"
}

stop_rabbitmq() {
  if ! _state_is "$RABBITMQ_STATE" started 1; then
    _log "RabbitMQ at $RABBITMQ_HOST:$RABBITMQ_PORT was not started by this script; leaving it running"
    return 0
  fi
  _log "stopping RabbitMQ at $RABBITMQ_HOST:$RABBITMQ_PORT (started by this script)"
  _rabbitmqctl stop >/dev/null 2>&1 || _log "rabbitmqctl stop failed; is it already stopped?"
  local epmd
  epmd=$(_state_get "$RABBITMQ_STATE" epmd || true)
  if [ -n "$epmd" ] && kill -0 "$epmd" 2>/dev/null; then
    _log "stopping the epmd this script's RabbitMQ started (pid $epmd)"
    kill -TERM "$epmd" 2>/dev/null || true
  fi
  _state_set "$RABBITMQ_STATE" started 0
}
