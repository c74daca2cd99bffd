#!/usr/bin/env bash
# Runs runyard's whole test suite from a fresh clone. Needs Python 3.11+ with pip, and
# the services the backends' tests talk to (PostgreSQL, Redis, RabbitMQ, Docker, ministack, Chromium, Kubernetes): scripts/services.sh starts
# a stopped one, or installs it with apt-get when run as root, and fails loudly otherwise.
# It installs uv into .tools/, syncs the workspace into .venv/ from uv.lock, checks lint,
# then runs pytest. Extra arguments go to pytest (e.g. -k engine -x).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "runyard needs Python 3.11 or newer; $PY is $("$PY" --version)" >&2; exit 2; }
if [ ! -x .tools/bin/uv ]; then
  echo "--- installing uv into .tools/"
  "$PY" -m venv .tools
  .tools/bin/pip install --quiet --disable-pip-version-check uv
fi
echo "--- syncing the workspace into .venv/ (uv.lock)"
.tools/bin/uv sync --locked --all-packages --compile-bytecode --python "$PY" --quiet
echo "--- ruff"
.venv/bin/ruff check .
# Kubernetes: built from source on a cache miss (~15 min, once per machine), then started.
echo "--- services (PostgreSQL for the storage tests, Redis and RabbitMQ for Celery, Docker for runyard-docker, ministack for runyard-ecs, Chromium for runyard ui, Kubernetes for runyard-k8s)"
bash scripts/services.sh postgres redis rabbitmq docker ministack chromium k8s
echo "--- pytest"
# The slowest tests go to the end of the log: where a CI run's time went, without a rerun.
exec .venv/bin/python -m pytest --durations=30 "$@"
