#!/usr/bin/env bash
# Create (idempotently) the peer venv used by bench_inprocess.py to run
# Dagster and Prefect 3 side by side with runyard.
#
# The peers live in their own venv, NOT in runyard's project venv, so that
# their large dependency trees can never leak into runyard's environment or
# lockfile. Re-running is cheap: an existing venv whose peers import is left alone.
#
# Usage: benchmarks/setup-peers.sh [--force]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-peers"
python="${PYTHON:-python3}"

# Pin major versions only: the benchmark compares against "current" Dagster and
# Prefect 3 as a user would install them today; the exact versions installed
# are recorded in results/inprocess.json by the runner.
peers=("dagster>=1.7,<2" "prefect>=3,<4" "ruff")

if [[ "${1:-}" == "--force" ]]; then
    rm -rf "$venv"
fi

if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
fi

# Prefect 3 settings for an offline, in-process run. Recorded here because the
# runner (bench_inprocess.py) sets the same values in each Prefect child:
#   PREFECT_API_URL unset                      -> no remote/self-hosted server
#   PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=true   -> flows run against a temporary
#                                                 in-process server + SQLite DB
#   PREFECT_HOME=<temp dir>                    -> that SQLite DB and profiles
#                                                 never touch ~/.prefect
#   PREFECT_LOGGING_LEVEL=WARNING              -> per-task INFO logs would
#                                                 otherwise dominate stdout
#   PREFECT_TELEMETRY / analytics off          -> no network calls
export PREFECT_HOME="${PREFECT_HOME:-$(mktemp -d)}"
unset PREFECT_API_URL
export PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=true
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_LOGGING_LEVEL=WARNING
export DAGSTER_HOME="${DAGSTER_HOME:-$(mktemp -d)}"

check() {
    "$venv/bin/python" - <<'PY'
import dagster
import prefect

assert prefect.__version__.startswith("3."), prefect.__version__
print(f"dagster {dagster.__version__}, prefect {prefect.__version__}")
PY
}

if check 2>/dev/null; then
    echo "peer venv already set up at $venv"
    exit 0
fi

"$venv/bin/python" -m pip install --quiet "${peers[@]}"
check
echo "peer venv ready at $venv"
