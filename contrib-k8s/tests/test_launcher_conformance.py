"""The k8s run launcher passes the run-launcher conformance kit on the real cluster: each
run's worker in a Job (RUNYARD_HOME mounted at the same path, PostgreSQL storage), canceled
from another process, killed with SIGKILL from inside, and nothing of the run left running."""

from __future__ import annotations

import time
from typing import Any

import pytest
from runyard.testing.launchers import Launched, RunLauncherConformance


class TestK8sLauncherConformance(RunLauncherConformance):
    launcher = "k8s"

    @pytest.fixture
    def instance(self, k8s_launcher_instance: Any) -> Any:
        return k8s_launcher_instance

    @pytest.fixture(autouse=True)
    def _cluster(self, k8s_cluster: Any, k8s_namespace: str) -> None:
        self.cluster = k8s_cluster
        self.namespace = k8s_namespace

    def leftovers(self, launched: Launched) -> list[str]:
        # Beyond the kit's heartbeats: no pod of the run still runs.
        from runyard_k8s.manifest import run_selector

        def running() -> list[str]:
            pods, _ = self.cluster.list_pods(self.namespace, run_selector(launched.run_id))
            return [f"pod {p['metadata']['name']} ({(p.get('status') or {}).get('phase')})" for p in pods
                    if (p.get("status") or {}).get("phase") in ("Pending", "Running")]

        deadline = time.monotonic() + 30
        while (left := running()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left
