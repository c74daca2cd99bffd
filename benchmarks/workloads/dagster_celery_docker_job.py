"""Dagster's side of bench_celery_docker.py: a job of independent no-op ops, each run by
``dagster_celery_docker.celery_docker_executor`` in a container of its own.

Runs under the peer venv (``benchmarks/.venv-peers-celery-docker``, made with
setup-peers-celery-docker.sh). The step containers import this module too: the setup script
copies it into the image at this same path (and the image's venv, first on PATH, at the peer
venv's path), because Dagster starts each step as ``dagster api execute_step`` with a pointer
to the job: module name, working directory and the engine's ``sys.executable``.
RUNYARD_BENCH_STEPS (default 20) is the number of ops; the benchmark forwards it to the step
containers, so both sides build the same job.
"""

from __future__ import annotations

import os

from dagster import job, op
from dagster_celery_docker import celery_docker_executor

STEPS = int(os.environ.get("RUNYARD_BENCH_STEPS", "20"))


@op
def noop() -> int:
    return 1


@job(executor_def=celery_docker_executor)
def wide():
    for i in range(STEPS):
        noop.alias(f"noop_{i}")()
