#!/usr/bin/env bash
# Create (idempotently) the peer venv bench_dask.py uses: Dagster with its Dask executor
# (dagster-dask) and Prefect 3 with its Dask task runner (prefect-dask), each installed
# separately so that one that does not resolve does not keep the other out. What did not
# install, and why, is written to .venv-peers-dask/install-report.txt (bench_dask.py
# copies it into its results).
#
# The peers get their own venv, never runyard's project venv or lockfile. The same dask
# and distributed as runyard's venv are pinned first, so that the peers' clients talk to
# the benchmark's cluster with the versions its workers run.
#
# Usage: benchmarks/setup-peers-dask.sh [--force]
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-peers-dask"
python="${PYTHON:-python3}"
runyard_python="$here/../.venv/bin/python"

if [[ "${1:-}" == "--force" ]]; then
    rm -rf "$venv"
fi
if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv" || exit 1
    "$venv/bin/python" -m pip install --quiet --upgrade pip || exit 1
fi

dask_version="$("$runyard_python" -c 'import dask; print(dask.__version__)' 2>/dev/null || echo "")"
dask_pins=("dask[distributed]${dask_version:+==$dask_version}")
report="$venv/install-report.txt"
: > "$report"

install() {  # name, pip requirements...
    local name="$1"; shift
    if "$venv/bin/python" -m pip install --quiet "${dask_pins[@]}" "$@" >"$venv/pip-$name.log" 2>&1; then
        echo "$name: installed ($*)" | tee -a "$report"
    else
        echo "$name: NOT installed ($*): $(grep -E 'ERROR|error:' "$venv/pip-$name.log" | head -3 | tr '\n' ' ')" \
            | tee -a "$report"
    fi
}

# Prefect 3.8's server needs fastapi<0.155 (see setup-peers.sh).
install dagster "dagster>=1.7,<2" "dagster-dask"
install prefect "prefect>=3,<4" "prefect-dask" "fastapi<0.155"

# The benchmark's workers run in this venv so that they can run every system's tasks:
# runyard and runyard-dask are installed here from the workspace too (not from an index).
install runyard "$here/.." "$here/../contrib-dask"

"$venv/bin/python" - <<'PY' | tee -a "$report"
import importlib.metadata as md
for dist in ("dask", "distributed", "dagster", "dagster-dask", "prefect", "prefect-dask", "runyard", "runyard-dask"):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist} missing")
PY
