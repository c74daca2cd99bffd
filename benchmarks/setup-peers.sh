#!/usr/bin/env bash
# Create (idempotently) the peer venv bench_inprocess.py uses to run Dagster
# and Prefect 3 side by side with runyard.
#
# The peers get their own venv, NOT runyard's project venv, so their large
# dependency trees never leak into runyard's environment or lockfile.
# Re-running is cheap: if the peers already import (including Prefect's server
# app, the part that breaks on a bad FastAPI), nothing is installed.
#
# Usage: benchmarks/setup-peers.sh [--force]     (--force rebuilds from scratch)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-peers"
python="${PYTHON:-python3}"

# Major-version bounds only: the comparison is against current Dagster and
# Prefect 3 as a user would install them; the exact versions that ran are
# recorded in results/inprocess.json.
#
# fastapi<0.155: Prefect 3.8.x declares fastapi<1.0 but its server passes
# Body(min_items=...), which FastAPI 0.155 removed, so the ephemeral API server
# dies on import ("Body() got an unexpected keyword argument 'min_items'").
# (Prefect 3.9 may have fixed this; it needed a newer certifi than this
# machine's mirror has.) Drop the pin once a newer Prefect resolves here.
#
# ruff and mypy: to lint/type-check benchmarks/ without touching runyard's venv.
peers=("dagster>=1.7,<2" "prefect>=3,<4" "fastapi<0.155" "ruff" "mypy")

if [[ "${1:-}" == "--force" ]]; then
    rm -rf "$venv"
fi

# Prefect 3 settings for an offline run with no server to set up. Exported
# here for the import check; bench_inprocess.py sets the same in each Prefect
# child (child_env), with a fresh PREFECT_HOME per run:
#   PREFECT_API_URL unset                     no remote or self-hosted server
#   PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=true  let Prefect start its temporary
#                                             API server (uvicorn + SQLite) as a
#                                             subprocess; 3.8 refuses by default
#   PREFECT_HOME=<temp dir>                   SQLite DB and profiles never
#                                             touch ~/.prefect
#   PREFECT_SERVER_ANALYTICS_ENABLED=false    no telemetry calls
# Logging is left at Prefect's default (INFO); bench_inprocess.py --quiet-peers
# sets PREFECT_LOGGING_LEVEL=WARNING.
unset PREFECT_API_URL PREFECT_PROFILE
PREFECT_HOME="$(mktemp -d)"
trap 'rm -rf "$PREFECT_HOME"' EXIT
export PREFECT_HOME
export PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=true
export PREFECT_SERVER_ANALYTICS_ENABLED=false

check() {
    "$venv/bin/python" - <<'PY'
import dagster
import prefect
import prefect.server.api.server  # noqa: F401  (fails on an incompatible FastAPI)

assert prefect.__version__.startswith("3."), f"need Prefect 3, got {prefect.__version__}"
print(f"dagster {dagster.__version__}, prefect {prefect.__version__}")
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
"$venv/bin/python" -m pip install --quiet "${peers[@]}"
check
echo "peer venv ready at $venv"
