# Single-node Kubernetes 1.20 (etcd, kube-apiserver, controller-manager, scheduler, kubelet
# on the Docker engine): the runyard-k8s tests' cluster. Sourced by scripts/services.sh.
#
# No registry reachable here ships Kubernetes server binaries, so build_k8s compiles them
# offline from Debian bookworm's `kubernetes` source package (~15 min on 2 cores), once per
# machine: the binaries are cached outside the repo under /var/cache/runyard-k8s/<key>/,
# where <key> hashes everything that went into the build (source version, patches, Go,
# targets). A build runs in a temporary directory under flock and is renamed into place,
# so an interrupted build never leaves a half cache behind.
#
#   (. scripts/services.sh && _load k8s && build_k8s)   # build (or reuse) the binaries only
#   bash scripts/services.sh k8s         # build if needed, then start the cluster
#   bash scripts/services.sh stop-k8s    # stop what k8s started, by pid

K8S_SRC_VERSION=1.20.5+really1.20.2
K8S_GO=golang-1.19-go
K8S_GOBIN=/usr/lib/go-1.19/bin
K8S_TARGETS="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet"
K8S_BINARIES="kube-apiserver kube-controller-manager kube-scheduler kubelet"
K8S_CACHE_ROOT=${RUNYARD_K8S_CACHE:-/var/cache/runyard-k8s}

# Test-only patches: kubelet 1.20 would otherwise fail every sandbox on this VM (OOM adj
# -998 is refused), re-score and move the host's dockerd, and rewrite host sysctls.
_k8s_patch_tree() {
  sed -i 's/defaultSandboxOOMAdj int = -998/defaultSandboxOOMAdj int = 0/' pkg/kubelet/dockershim/docker_sandbox.go
  sed -i 's/guaranteedOOMScoreAdj int = -997/guaranteedOOMScoreAdj int = 0/' pkg/kubelet/qos/policy.go
  sed -i 's#^func (m \*containerManager) doWork() {$#&\n\tif true {\n\t\treturn\n\t}#' pkg/kubelet/dockershim/cm/container_manager_linux.go
  sed -i 's#^func setupKernelTunables(option KernelTunableBehavior) error {$#&\n\tif true {\n\t\treturn nil\n\t}#' pkg/kubelet/cm/container_manager_linux.go
  grep -q 'defaultSandboxOOMAdj int = 0' pkg/kubelet/dockershim/docker_sandbox.go \
    && grep -q 'guaranteedOOMScoreAdj int = 0' pkg/kubelet/qos/policy.go \
    || _die "the kubelet patches did not apply to kubernetes $K8S_SRC_VERSION"
}

k8s_cache_key() {
  { echo "$K8S_SRC_VERSION"; echo "$K8S_GO"; echo "$K8S_TARGETS"; declare -f _k8s_patch_tree; } \
    | sha256sum | cut -c1-16
}

k8s_bin_dir() { echo "$K8S_CACHE_ROOT/$(k8s_cache_key)/bin"; }

_k8s_cache_ok() {
  local dir=$1
  [ -f "$dir/SHA256SUMS" ] || return 1
  (cd "$dir" && sha256sum --quiet -c SHA256SUMS) >/dev/null 2>&1 || return 1
  "$dir/kube-apiserver" --version 2>/dev/null | grep -q v1.20
}

_k8s_apt_prereqs() {
  local need=""
  command -v etcd >/dev/null 2>&1 || need="$need etcd-server etcd-client"
  [ -x "$K8S_GOBIN/go" ] || need="$need $K8S_GO"
  command -v rsync >/dev/null 2>&1 || need="$need rsync"
  command -v jq >/dev/null 2>&1 || need="$need jq"
  command -v openssl >/dev/null 2>&1 || need="$need openssl"
  command -v dpkg-source >/dev/null 2>&1 || need="$need dpkg-dev"
  if [ -n "$need" ]; then
    _log "installing with apt-get:$need"
    _as_root env DEBIAN_FRONTEND=noninteractive sh -c "apt-get update -qq && apt-get install -y -qq $need >/dev/null" \
      || _die "apt-get install$need failed (see above)"
  fi
}

_k8s_deb_src() {
  # apt-get source needs a deb-src entry; bookworm's sources file lists only binaries.
  local f=/etc/apt/sources.list.d/runyard-deb-src.sources
  [ -f "$f" ] && return 0
  _log "adding a deb-src entry for bookworm ($f) to fetch the kubernetes source package"
  _as_root sh -c "cat > $f" <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  _as_root apt-get update -qq || _die "apt-get update failed after adding $f"
}

build_k8s() {
  local key dir t0 tmp
  key=$(k8s_cache_key)
  dir=$K8S_CACHE_ROOT/$key
  if _k8s_cache_ok "$dir/bin"; then
    _log "Kubernetes binaries cached in $dir/bin (key $key)"
    return 0
  fi
  _as_root mkdir -p "$K8S_CACHE_ROOT"
  exec 8>"$K8S_CACHE_ROOT/build.lock"
  _log "waiting for the build lock $K8S_CACHE_ROOT/build.lock"
  flock 8
  if _k8s_cache_ok "$dir/bin"; then
    _log "Kubernetes binaries were built meanwhile in $dir/bin"
    exec 8>&-; return 0
  fi
  t0=$(date +%s)
  _k8s_apt_prereqs
  _k8s_deb_src
  tmp=$(mktemp -d "$K8S_CACHE_ROOT/build.XXXXXX")
  _log "building Kubernetes $K8S_SRC_VERSION from Debian's source package in $tmp (~15 min on 2 cores)"
  (
    set -euo pipefail
    cd "$tmp"
    apt-get source --download-only "kubernetes=$K8S_SRC_VERSION" >/dev/null 2>&1 \
      || apt-get source --download-only kubernetes >/dev/null
    dpkg-source --skip-patches -x kubernetes_*.dsc src >/dev/null 2>&1 || dpkg-source -x kubernetes_*.dsc src >/dev/null
    cd src
    _k8s_patch_tree
    SRC=$PWD
    mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
    cd .go/src/k8s.io/kubernetes
    env GOPATH="$SRC/.go" PATH="$K8S_GOBIN:$PATH" CGO_ENABLED=0 GOPROXY=off GOFLAGS=-mod=vendor \
      HOME="$tmp/home" GOCACHE="$tmp/gocache" make WHAT="$K8S_TARGETS" >"$tmp/make.log" 2>&1 \
      || { tail -n 40 "$tmp/make.log" >&2; exit 1; }
    mkdir -p "$tmp/out/bin"
    for b in $K8S_BINARIES; do cp "_output/bin/$b" "$tmp/out/bin/$b"; done
    (cd "$tmp/out/bin" && sha256sum $K8S_BINARIES > SHA256SUMS)
  ) || { rm -rf "$tmp"; exec 8>&-; _die "building Kubernetes failed (make log tail above)"; }
  rm -rf "$dir"
  mkdir -p "$dir"
  mv "$tmp/out/bin" "$dir/bin"
  rm -rf "$tmp"
  exec 8>&-
  _log "built Kubernetes binaries in $(( $(date +%s) - t0 )) s -> $dir/bin"
}


# -- the running cluster ----------------------------------------------------------------
#
# Every daemon listens on loopback except the kubelet, which needs a non-loopback node IP
# for pod logs. Its data (etcd, keys, the kubelet's root dir, logs, pid files) lives in
# $K8S_DIR; what ensure_k8s did is recorded in $K8S_STATE, so stop_k8s stops only daemons
# it started, by pid. A cluster already answering on the apiserver port (started from
# another checkout on this machine) is reused, not started twice, and left running by stop.
#
# The tests find the cluster through the kubeconfig written to $K8S_KUBECONFIG (or
# $RUNYARD_K8S_KUBECONFIG when set): server https://127.0.0.1:$K8S_API_PORT, a static
# admin token (the token file is the cluster's only authentication: test use only).

K8S_STATE=$STATE_DIR/k8s
K8S_DIR=${RUNYARD_K8S_DIR:-$STATE_DIR/k8s.d}
K8S_KUBECONFIG=${RUNYARD_K8S_KUBECONFIG:-$STATE_DIR/k8s.kubeconfig}
K8S_API_PORT=16443
K8S_ETCD_PORT=12379
K8S_ETCD_PEER_PORT=12380
K8S_TOKEN=ryt-admin-token
K8S_NODE=ryt-node
K8S_BASE_IMAGE=${RUNYARD_TEST_BASE_IMAGE:-runyard-test/py311-base:bookworm}
K8S_PAUSE_IMAGE=runyard-test/pause:1
# Host state the kubelet 1.20 would change unpatched (see test-infra.md §4): checked after start.
K8S_SYSCTLS="vm.overcommit_memory kernel.panic kernel.panic_on_oops net.bridge.bridge-nf-call-iptables"
# Directories the kubelet creates outside its root dir: removed by stop_k8s if it created them.
K8S_HOST_DIRS="/var/lib/kubelet /var/lib/dockershim /var/log/pods /var/log/containers"
# Daemons in start order; stopped in reverse.
K8S_DAEMONS="etcd kube-apiserver kube-controller-manager kube-scheduler kubelet"

_k8s_record() { _state_set "$K8S_STATE" "$1" "$2"; }

k8s_host_ip() { hostname -I 2>/dev/null | awk '{print $1}'; }

_k8s_api_ok() {
  curl -fsk --max-time 3 -H "Authorization: Bearer $K8S_TOKEN" "https://127.0.0.1:$K8S_API_PORT/readyz" >/dev/null 2>&1
}

_k8s_kubectl() { kubectl --kubeconfig "$K8S_KUBECONFIG" --request-timeout=20s "$@" 2>&1 | grep -v 'version difference\|^WARNING: version'; }

_k8s_write_kubeconfig() {
  mkdir -p "$(dirname "$K8S_KUBECONFIG")"
  (umask 077 && cat >"$K8S_KUBECONFIG" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: runyard-test
  cluster:
    server: https://127.0.0.1:$K8S_API_PORT
    insecure-skip-tls-verify: true
users:
- name: runyard-test-admin
  user:
    token: $K8S_TOKEN
contexts:
- name: runyard-test
  context: {cluster: runyard-test, user: runyard-test-admin}
current-context: runyard-test
KCFG
)
}

_k8s_sysctls() { local s; for s in $K8S_SYSCTLS; do echo "$s=$(sysctl -n "$s" 2>/dev/null)"; done; }

# Start one daemon in the background, its output in $K8S_DIR/log/NAME.log, its pid recorded.
_k8s_start() {
  local name=$1; shift
  mkdir -p "$K8S_DIR/log" "$K8S_DIR/pid"
  nohup "$@" >"$K8S_DIR/log/$name.log" 2>&1 </dev/null &
  echo $! >"$K8S_DIR/pid/$name"
}

_k8s_wait() {  # _k8s_wait WHAT SECONDS DAEMON COMMAND...: poll COMMAND until it succeeds
  local what=$1 secs=$2 daemon=$3 i; shift 3
  for i in $(seq 1 $((secs * 4))); do
    "$@" && return 0
    if [ -n "$daemon" ] && ! kill -0 "$(cat "$K8S_DIR/pid/$daemon" 2>/dev/null)" 2>/dev/null; then
      tail -n 30 "$K8S_DIR/log/$daemon.log" >&2
      stop_k8s
      _die "$daemon exited while waiting for $what (log above: $K8S_DIR/log/$daemon.log)"
    fi
    sleep 0.25
  done
  [ -n "$daemon" ] && tail -n 30 "$K8S_DIR/log/$daemon.log" >&2
  stop_k8s
  _die "$what not within ${secs}s (log above${daemon:+: $K8S_DIR/log/$daemon.log})"
}

_k8s_node_ready() {
  _k8s_kubectl get node "$K8S_NODE" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' | grep -qx True
}

_k8s_pause_image() {
  docker image inspect "$K8S_PAUSE_IMAGE" >/dev/null 2>&1 && return 0
  if ! docker image inspect "$K8S_BASE_IMAGE" >/dev/null 2>&1; then
    bash "$ROOT/scripts/build-test-image.sh" --base-only >/dev/null || _die "building the base image failed (see above)"
  fi
  _log "building the pod sandbox image $K8S_PAUSE_IMAGE from $K8S_BASE_IMAGE (no registry)"
  # The kubelet's "pause" container only holds the pod's namespaces: sleep, and die at once on stop.
  printf 'FROM %s\nSTOPSIGNAL SIGKILL\nLABEL runyard.test=1\nCMD ["sleep", "infinity"]\n' "$K8S_BASE_IMAGE" \
    | DOCKER_BUILDKIT=0 docker build -q -t "$K8S_PAUSE_IMAGE" - >/dev/null 2>&1 \
    || _die "docker build of $K8S_PAUSE_IMAGE failed"
}

ensure_k8s() {
  local t0 bin hostip kcfg s d
  command -v curl >/dev/null 2>&1 || _die "curl is needed to check the apiserver (apt-get install curl)"
  command -v kubectl >/dev/null 2>&1 || _die "kubectl is needed (apt-get install kubernetes-client)"
  if _k8s_api_ok; then
    _k8s_write_kubeconfig
    if _k8s_node_ready; then
      if ! { _state_is "$K8S_STATE" started 1 && kill -0 "$(cat "$K8S_DIR/pid/kube-apiserver" 2>/dev/null)" 2>/dev/null; }; then
        _k8s_record started 0
      fi
      _log "Kubernetes is running (apiserver 127.0.0.1:$K8S_API_PORT, node $K8S_NODE Ready); kubeconfig: $K8S_KUBECONFIG"
      return 0
    fi
    _die "an apiserver answers on 127.0.0.1:$K8S_API_PORT but node $K8S_NODE is not Ready; stop it (bash scripts/services.sh stop-k8s from the checkout that started it)"
  fi
  t0=$(date +%s)
  build_k8s
  bin=$(k8s_bin_dir)
  _log "Kubernetes binaries ready in $(( $(date +%s) - t0 )) s ($bin)"
  . "$SERVICES_D/docker.sh"
  ensure_docker
  _k8s_pause_image
  hostip=$(k8s_host_ip)
  [ -n "$hostip" ] && [ "$hostip" != 127.0.0.1 ] || _die "no non-loopback IP address (hostname -I) for the kubelet's node IP"
  t0=$(date +%s)
  mkdir -p "$K8S_DIR"
  chmod 700 "$K8S_DIR"
  rm -rf "$K8S_DIR/etcd" "$K8S_DIR/pid"   # a fresh cluster every start: no state from an earlier run
  : >"$K8S_STATE.tmp" && mv "$K8S_STATE.tmp" "$K8S_STATE"
  _k8s_record started 1
  _k8s_record sysctls "$(_k8s_sysctls | tr '\n' ' ')"
  for d in $K8S_HOST_DIRS; do [ -e "$d" ] || _k8s_record "created:$d" 1; done
  kcfg=$K8S_KUBECONFIG
  _k8s_write_kubeconfig
  if [ ! -f "$K8S_DIR/sa.key" ]; then
    openssl genrsa -out "$K8S_DIR/sa.key" 2048 >/dev/null 2>&1 && openssl rsa -in "$K8S_DIR/sa.key" -pubout -out "$K8S_DIR/sa.pub" >/dev/null 2>&1 \
      || _die "openssl could not make the service-account key pair"
  fi
  (umask 077 && echo "$K8S_TOKEN,admin,admin,\"system:masters\"" >"$K8S_DIR/tokens.csv")
  _log "starting Kubernetes (etcd, apiserver, controller-manager, scheduler, kubelet on Docker; node IP $hostip; logs: $K8S_DIR/log)"
  _k8s_start etcd etcd --name ryt --data-dir "$K8S_DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$K8S_ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$K8S_ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$K8S_ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$K8S_ETCD_PEER_PORT" \
    --initial-cluster "ryt=http://127.0.0.1:$K8S_ETCD_PEER_PORT"
  _k8s_wait "etcd healthy" 30 etcd curl -fso /dev/null --max-time 2 "http://127.0.0.1:$K8S_ETCD_PORT/health"
  # TTLAfterFinished (alpha in 1.20): without the gate on both the apiserver and the
  # controller-manager, ttlSecondsAfterFinished is silently dropped.
  _k8s_start kube-apiserver "$bin/kube-apiserver" --etcd-servers="http://127.0.0.1:$K8S_ETCD_PORT" \
    --bind-address=127.0.0.1 --secure-port="$K8S_API_PORT" --advertise-address="$hostip" \
    --cert-dir="$K8S_DIR/serving" --service-cluster-ip-range=10.96.0.0/16 \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$K8S_DIR/sa.pub" \
    --service-account-signing-key-file="$K8S_DIR/sa.key" --token-auth-file="$K8S_DIR/tokens.csv" \
    --authorization-mode=RBAC --allow-privileged=true --kubelet-preferred-address-types=InternalIP \
    --feature-gates=TTLAfterFinished=true
  _k8s_wait "the apiserver's /readyz" 90 kube-apiserver _k8s_api_ok
  _k8s_start kube-controller-manager "$bin/kube-controller-manager" --kubeconfig="$kcfg" \
    --authentication-kubeconfig="$kcfg" --authorization-kubeconfig="$kcfg" --leader-elect=false \
    --bind-address=127.0.0.1 --port=0 --service-account-private-key-file="$K8S_DIR/sa.key" \
    --root-ca-file="$K8S_DIR/serving/apiserver.crt" --use-service-account-credentials=false \
    --controllers='*,-nodeipam,-csrsigning,-csrapproving,-bootstrapsigner,-tokencleaner' \
    --feature-gates=TTLAfterFinished=true
  _k8s_start kube-scheduler "$bin/kube-scheduler" --kubeconfig="$kcfg" --authentication-kubeconfig="$kcfg" \
    --authorization-kubeconfig="$kcfg" --leader-elect=false --bind-address=127.0.0.1 --port=0
  # Flags and patches that keep the host as it was: no iptables chains, no sysctls, no
  # move of dockerd, no negative OOM scores (refused on this VM), no image GC of others' images.
  _k8s_start kubelet "$bin/kubelet" --kubeconfig="$kcfg" --container-runtime=docker \
    --docker-endpoint=unix:///var/run/docker.sock --pod-infra-container-image="$K8S_PAUSE_IMAGE" \
    --cgroup-driver=cgroupfs --fail-swap-on=false --oom-score-adj=0 --make-iptables-util-chains=false \
    --root-dir="$K8S_DIR/kubelet" --cert-dir="$K8S_DIR/kubelet-pki" --address="$hostip" --node-ip="$hostip" \
    --read-only-port=0 --healthz-port=0 --anonymous-auth=true --authorization-mode=AlwaysAllow \
    --cgroups-per-qos=false --enforce-node-allocatable= --eviction-hard= --image-gc-high-threshold=100 \
    --image-gc-low-threshold=99 --resolv-conf=/etc/resolv.conf --hostname-override="$K8S_NODE"
  _k8s_wait "node $K8S_NODE Ready" 120 kubelet _k8s_node_ready
  _k8s_wait "the default service account" 60 kube-controller-manager \
    sh -c "kubectl --kubeconfig '$kcfg' get serviceaccount default -n default >/dev/null 2>&1"
  for s in $(_state_get "$K8S_STATE" sysctls); do
    if [ "$s" != "${s%%=*}=$(sysctl -n "${s%%=*}" 2>/dev/null)" ]; then
      stop_k8s
      _die "starting Kubernetes changed the host's ${s%%=*} (was ${s#*=}); the kubelet patches did not hold"
    fi
  done
  _log "Kubernetes started in $(( $(date +%s) - t0 )) s (apiserver https://127.0.0.1:$K8S_API_PORT, node $K8S_NODE Ready); kubeconfig: $K8S_KUBECONFIG"
}

_k8s_kill() {  # TERM, up to 10 s, then KILL: only the pid recorded for this daemon
  local name=$1 pid i
  pid=$(cat "$K8S_DIR/pid/$name" 2>/dev/null) || return 0
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for i in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$K8S_DIR/pid/$name"
}

stop_k8s() {
  if ! _state_is "$K8S_STATE" started 1; then
    _log "Kubernetes was not started by this checkout's script; leaving it running"
    return 0
  fi
  local name d m ids
  if _k8s_api_ok; then
    # Test namespaces first, while the kubelet still runs to stop their pods.
    _k8s_kubectl delete namespace -l runyard.test=1 --wait=false >/dev/null || true
  fi
  for name in kubelet kube-scheduler kube-controller-manager kube-apiserver etcd; do _k8s_kill "$name"; done
  # What the kubelet left in Docker: every container it made carries the pod's namespace label.
  ids=$(docker ps -aq --filter label=io.kubernetes.pod.namespace 2>/dev/null || true)
  [ -z "$ids" ] || docker rm -f $ids >/dev/null 2>&1 || true
  # The kubelet bind-mounts its root dir and mounts pods' volumes below it: deepest first.
  for m in $(awk -v root="$K8S_DIR/kubelet" 'index($2, root) == 1 {print $2}' /proc/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || _log "could not unmount $m"
  done
  for d in $K8S_HOST_DIRS; do
    if _state_is "$K8S_STATE" "created:$d" 1; then rm -rf "$d"; fi
  done
  rm -rf "$K8S_DIR/kubelet" "$K8S_DIR/etcd"
  _k8s_record started 0
  _log "stopped Kubernetes (the daemons this script started, by pid)"
}
