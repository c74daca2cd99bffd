#!/usr/bin/env bash
# Create (idempotently) the peer venv bench_celery.py uses to run Dagster's celery executor
# (dagster + dagster-celery, with celery[redis]) side by side with runyard's.
#
# The peers get their own venv, never runyard's project venv or lockfile. If dagster-celery
# does not install or import here, the script says why and exits 1; bench_celery.py then
# records the peer as unavailable, with that reason, and still compares against raw Celery.
#
# Usage: benchmarks/setup-peers-celery.sh [--force]     (--force rebuilds from scratch)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-peers-celery"
python="${PYTHON:-python3}"

# Major-version bounds only; the versions that ran are recorded in results/celery.json.
peers=("dagster>=1.7,<2" "dagster-celery" "celery[redis]>=5.3,<6")

if [[ "${1:-}" == "--force" ]]; then
    rm -rf "$venv"
fi

check() {
    "$venv/bin/python" - <<'PY'
import celery
import dagster
import dagster_celery

print(f"dagster {dagster.__version__}, dagster-celery {dagster_celery.__version__}, celery {celery.__version__}")
PY
}

if [[ -x "$venv/bin/python" ]] && check 2>/dev/null; then
    echo "peer venv already set up at $venv"
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
if ! "$venv/bin/python" -m pip install --quiet "${peers[@]}"; then
    echo "error: pip could not install ${peers[*]} (see above)" >&2
    exit 1
fi
check
echo "peer venv ready at $venv"
