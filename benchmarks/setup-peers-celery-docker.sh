#!/usr/bin/env bash
# Create (idempotently) what bench_celery_docker.py needs to run Dagster's
# celery_docker_executor side by side with runyard's celery_docker:
#
#   1. the peer venv benchmarks/.venv-peers-celery-docker (dagster, dagster-celery,
#      dagster-celery-docker, dagster-docker, dagster-postgres, celery[redis]): the engine and
#      the `dagster-celery worker` run from it;
#   2. the step image runyard-test/dagster-celery-docker:latest, built FROM the test base image
#      (scripts/build-test-image.sh --base-only) with no registry and no network in the build:
#      the peer venv's exact versions are fetched here (`pip wheel`, this machine's Python 3.11,
#      into a wheelhouse under /tmp) and installed in the image with --no-index. The image's venv
#      sits at the peer venv's path, first on PATH (Dagster starts each step as
#      `dagster api execute_step ...`, its job origin also naming the engine's sys.executable),
#      and the job module (workloads/dagster_celery_docker_job.py) at its path in this checkout,
#      since the step is handed a pointer to the module and its working directory.
#
# The image is rebuilt only when the peer versions, the job module, the paths or the base image
# change (a key in its label runyard.bench.key). Everything made carries runyard.test=1. If a
# step fails, the script says why and exits 1; bench_celery_docker.py then records Dagster's row
# as unavailable, with the reason.
#
# Usage: benchmarks/setup-peers-celery-docker.sh [--force]     (--force rebuilds venv and image)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="$here/.venv-peers-celery-docker"
python="${PYTHON:-python3}"
base="${RUNYARD_TEST_BASE_IMAGE:-runyard-test/py311-base:bookworm}"
image="${RUNYARD_BENCH_DAGSTER_IMAGE:-runyard-test/dagster-celery-docker:latest}"
jobdir="$here/workloads"
jobfile="$jobdir/dagster_celery_docker_job.py"
build="${RUNYARD_BENCH_DAGSTER_BUILD:-/tmp/runyard-bench-dagster-celery-docker}"

# Major-version bounds only; the versions that ran are recorded in results/celery-docker.json.
peers=("dagster>=1.7,<2" "dagster-celery" "dagster-celery-docker" "dagster-docker" "dagster-postgres"
       "celery[redis]>=5.3,<6")

die() { echo "setup-peers-celery-docker: error: $*" >&2; exit 1; }
log() { echo "setup-peers-celery-docker: $*" >&2; }

if [[ "${1:-}" == "--force" ]]; then
    rm -rf "$venv"
    docker image rm "$image" >/dev/null 2>&1 || true
fi

check() {
    "$venv/bin/python" - <<'PY'
import celery
import dagster
import dagster_celery
import dagster_celery_docker
import dagster_docker
import dagster_postgres

print(f"dagster {dagster.__version__}, dagster-celery {dagster_celery.__version__}, "
      f"dagster-celery-docker {dagster_celery_docker.__version__}, dagster-docker {dagster_docker.__version__}, "
      f"dagster-postgres {dagster_postgres.__version__}, celery {celery.__version__}")
PY
}

# 1. The peer venv.
if [[ -x "$venv/bin/python" ]] && check >/dev/null 2>&1; then
    log "peer venv already set up at $venv"
else
    if [[ ! -x "$venv/bin/python" ]]; then
        "$python" -m venv "$venv" || die "$python -m venv $venv failed"
        "$venv/bin/python" -m pip install --quiet --upgrade pip || die "pip could not upgrade itself in $venv"
    fi
    "$venv/bin/python" -m pip install --quiet "${peers[@]}" || die "pip could not install ${peers[*]} (see above)"
    check >&2 || die "the peers do not import in $venv (see above)"
fi
pyver=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[[ "$pyver" == 3.11 ]] || die "the peer venv's Python is $pyver; the image's (Debian bookworm) is 3.11, and the wheelhouse is resolved here"

# 2. The step image.
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable; start it with: bash scripts/services.sh docker"
docker image inspect "$base" >/dev/null 2>&1 || bash "$root/scripts/build-test-image.sh" --base-only >/dev/null \
    || die "the base image $base is missing and scripts/build-test-image.sh --base-only failed"
freeze=$("$venv/bin/python" -m pip freeze --exclude-editable --all 2>/dev/null | grep -vE '^(pip|setuptools|wheel)==' || true)
[[ -n "$freeze" ]] || die "pip freeze of $venv printed nothing"
key=$( { echo "$freeze"; cat "$jobfile"; echo "$venv $jobdir"; docker image inspect -f '{{.Id}}' "$base"; } \
       | sha256sum | cut -c1-16)
if [[ "$(docker image inspect -f '{{index .Config.Labels "runyard.bench.key"}}' "$image" 2>/dev/null || true)" == "$key" ]]; then
    log "image $image is up to date (key $key)"
else
    log "building image $image FROM $base (key $key)"
    mkdir -p "$build/wheels"
    ctx=$(mktemp -d "$build/context.XXXXXX")
    trap 'rm -rf "$ctx"' EXIT
    echo "$freeze" >"$ctx/requirements.txt"
    # What the image's Python needs beyond the peer venv's: redis wants async-timeout on Python
    # < 3.11.3 (bookworm's is 3.11.2; this machine's may be newer), kombu reads zoneinfo's UTC
    # and the base image has no system time zone data (as scripts/test-image.with says).
    printf '%s\n' "async-timeout>=4.0.3" tzdata >>"$ctx/requirements.txt"
    # The wheelhouse is kept between builds (pip skips the wheels it already has).
    "$venv/bin/python" -m pip wheel --quiet --no-deps -r "$ctx/requirements.txt" -w "$build/wheels" \
        || die "pip wheel could not fetch the peers' wheels into $build/wheels (see above)"
    mkdir "$ctx/wheels"
    cp "$build/wheels"/*.whl "$ctx/wheels/"
    cp "$jobfile" "$ctx/"
    cat >"$ctx/Dockerfile" <<EOF
FROM $base
LABEL runyard.test=1 runyard.bench.key=$key
COPY wheels /tmp/wheels
COPY requirements.txt /tmp/requirements.txt
RUN python3 -m venv $venv \\
 && $venv/bin/python -m pip install --quiet --no-index --find-links /tmp/wheels -r /tmp/requirements.txt \\
 && rm -rf /tmp/wheels /tmp/requirements.txt
ENV PATH=$venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
COPY $(basename "$jobfile") $jobfile
WORKDIR $jobdir
EOF
    docker build --quiet --label runyard.test=1 --force-rm -t "$image" "$ctx" >/dev/null \
        || die "docker build of $image failed (see above)"
fi
docker run --rm --label runyard.test=1 --network none "$image" dagster --version >/dev/null \
    || die "the image $image has no dagster command on PATH"
docker run --rm --label runyard.test=1 --network none "$image" python -c \
    'import dagster_celery_docker, dagster_postgres, dagster_celery_docker_job as j; assert j.wide.executor_def' \
    || die "the image $image cannot import dagster_celery_docker, dagster_postgres or the job module"
check
echo "$image"
