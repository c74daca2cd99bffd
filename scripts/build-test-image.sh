#!/usr/bin/env bash
# Builds the images the runyard-docker tests and benchmark use, with no registry:
#
#   1. the base image (Debian bookworm + python3 + pip + venv), made with mmdebstrap and
#      `docker import` (about 20 s; skipped when the image exists);
#   2. the project image: runyard, runyard-docker and runyard-celery from this checkout, installed
#      from a local wheelhouse by `runyard docker build-image`, with psycopg for PostgreSQL storage
#      (skipped when an image built from the same sources exists).
#
#   bash scripts/build-test-image.sh            # prints the project image's name
#   bash scripts/build-test-image.sh --base-only   # only step 1 (the Kubernetes pause image's base)
#   RUNYARD_TEST_BASE_IMAGE=...  RUNYARD_TEST_IMAGE=...   choose the names
#
# Needs a running Docker engine (scripts/services.sh docker) and root for mmdebstrap.
# Everything it creates carries the label runyard.test=1. It fails loudly (exit 1).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE=${RUNYARD_TEST_BASE_IMAGE:-runyard-test/py311-base:bookworm}
IMAGE=${RUNYARD_TEST_IMAGE:-runyard-test/runyard:latest}
PY=${RUNYARD_PYTHON:-$ROOT/.venv/bin/python}

die() { echo "build-test-image: error: $*" >&2; exit 1; }
log() { echo "build-test-image: $*" >&2; }

docker info >/dev/null 2>&1 || die "the Docker engine is not reachable; start it with: bash scripts/services.sh docker"

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  if ! command -v mmdebstrap >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "mmdebstrap is missing and installing it needs root: apt-get install mmdebstrap"
    log "installing mmdebstrap with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null; } \
      || die "apt-get install mmdebstrap failed"
  fi
  [ "$(id -u)" = 0 ] || die "building the base image with mmdebstrap needs root"
  log "building base image $BASE with mmdebstrap (Debian bookworm, python3)"
  # --variant=extract unpacks without configuring: 3x faster than the 'apt' variant; the
  # hooks add what configuring would (passwd, group, nsswitch, ldconfig) and drop docs.
  set -o pipefail
  mmdebstrap --quiet --variant=extract \
    --include='?essential' --include=python3,python3-pip,python3-venv \
    --setup-hook='for d in bin sbin lib lib64; do ln -s usr/$d "$1/$d"; mkdir -p "$1/usr/$d"; done' \
    --extract-hook='R="$1";
       cp "$R/usr/share/base-passwd/passwd.master" "$R/etc/passwd";
       cp "$R/usr/share/base-passwd/group.master"  "$R/etc/group";
       cp "$R/usr/share/libc-bin/nsswitch.conf"     "$R/etc/nsswitch.conf";
       ln -sf which.debianutils "$R/usr/bin/which";
       chroot "$R" /sbin/ldconfig;
       rm -rf "$R"/usr/share/doc/* "$R"/usr/share/man/* "$R"/usr/share/locale/* "$R"/usr/share/info/*' \
    bookworm - \
  | docker import -c 'ENV LANG=C.UTF-8' -c 'LABEL runyard.test=1' -c 'CMD ["/bin/bash"]' - "$BASE" >/dev/null \
  || die "building the base image failed (mmdebstrap | docker import, see above)"
  docker run --rm --label runyard.test=1 "$BASE" python3 -c 'import venv, sqlite3, ssl' \
    || die "the base image $BASE has no working python3"
fi

if [ "${1:-}" = --base-only ]; then echo "$BASE"; exit 0; fi

[ -x "$PY" ] || die "no Python at $PY: run .tools/bin/uv sync --all-packages first (or set RUNYARD_PYTHON)"
# What goes in beside runyard and runyard-docker: scripts/test-image.with (read by a test too).
WITH=()
while IFS= read -r line || [ -n "$line" ]; do
  case $line in ''|'#'*) continue ;; ./*) line=$ROOT/${line#./} ;; esac
  WITH+=(--with "$line")
done <"$ROOT/scripts/test-image.with"
"$PY" -m runyard docker build-image --base "$BASE" --tag "$IMAGE" --label runyard.test=1 --if-changed "${WITH[@]}" >&2 \
  || die "runyard docker build-image failed (see above)"
echo "$IMAGE"
