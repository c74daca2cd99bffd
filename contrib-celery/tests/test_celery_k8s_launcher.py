"""The celery_k8s run launcher passes the run-launcher conformance kit on the real cluster:
each run's worker in a Job (RUNYARD_HOME mounted at the same path, PostgreSQL storage, the
node's network to reach Redis and PostgreSQL), its steps sent through Redis to a real
``runyard celery worker --steps-in k8s``, which runs each as a Job beside it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from celery_support import BROKERS, k8s_executor_config, queue
from runyard.testing.launchers import Launched, RunLauncherConformance


def run_worker_pids(run_id: str) -> list[int]:
    """Host pids of the run's worker (``runyard api execute-run RUN_ID``): the kubelet runs
    pods on this machine's Docker engine, so their processes are this machine's too."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"execute-run" in argv and run_id.encode() in argv and b"-c" not in argv:
            found.append(int(proc.name))
    return found


def _k8s_launcher_kit() -> Any:
    """contrib-k8s/tests/test_launcher_conformance.py, imported by path (not collected here)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "contrib-k8s" / "tests" / "test_launcher_conformance.py"
    spec = importlib.util.spec_from_file_location("runyard_k8s_launcher_kit", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestCeleryK8sLauncherConformance(RunLauncherConformance):
    launcher = "celery_k8s"
    executor = "celery_k8s"  # the launcher refuses any other (its pair check)
    # The kit's steps run in step Jobs, not in the run worker: the kill test kills the
    # worker from outside instead (see kill_worker).
    killed_job = "kit_heartbeat_job"

    @pytest.fixture
    def instance(self, runyard_make_instance: Any, session_k8s_workers: Any, k8s_section: dict[str, Any],
                 k8s_postgres_url: str, k8s_postgres_schema: str) -> Any:
        broker = BROKERS["redis"]
        executor = k8s_executor_config("redis", queue("k8s-redis-main"), k8s_section, terminate_grace=5.0)
        # A run Job that ends by itself goes by its TTL (short, as in contrib-k8s's launcher
        # tests): a kit test that never asks after it again leaves nothing at the session's end.
        run_job = {**k8s_section, "pod_spec": {"hostNetwork": True}, "ttl_seconds_after_finished": 15,
                   # The run worker signs its step requests with the workers' key.
                   "env_vars": ["RUNYARD_SIGNING_KEY"]}
        return runyard_make_instance({
            "storage": {"postgres": {"url": k8s_postgres_url, "schema": k8s_postgres_schema}},
            "run_launcher": {"celery_k8s": {**broker, "k8s": run_job}},
            "executor": {"celery_k8s": executor},
        })

    @pytest.fixture(autouse=True)
    def _cluster(self, k8s_cluster: Any, k8s_namespace: str) -> None:
        self.cluster = k8s_cluster
        self.namespace = k8s_namespace

    def kill_worker(self, launched: Launched) -> None:
        deadline = time.monotonic() + 30
        while not (pids := run_worker_pids(launched.run_id)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pids, f"no process of the run worker of {launched.run_id} on this machine"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    # Beyond the kit's heartbeats: no pod of the run (worker or step) still runs; the k8s
    # launcher kit's own check, reused (self.cluster, self.namespace: set by _cluster).
    leftovers = _k8s_launcher_kit().TestK8sLauncherConformance.leftovers
