"""The docker run launcher passes the run-launcher conformance kit on the real engine:
each run's worker in a container (RUNYARD_HOME bind-mounted at the same path, so the
kit's scratch files are shared), canceled from another process, killed with SIGKILL from
inside, and no container of the run left afterwards."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from runyard.testing.launchers import Launched, RunLauncherConformance


class TestDockerLauncherConformance(RunLauncherConformance):
    launcher = "docker"

    @pytest.fixture
    def instance(self, runyard_make_instance: Callable[..., Any], docker_settings: dict[str, Any]) -> Any:
        return runyard_make_instance({"run_launcher": {"docker": docker_settings}})

    @pytest.fixture(autouse=True)
    def _containers(self, run_containers: Callable[[str], list[Any]]) -> None:
        self.run_containers = run_containers

    def leftovers(self, launched: Launched) -> list[str]:
        # Beyond the kit's heartbeats: every container of the run is removed (the watcher
        # removes an exited run container within moments, hence the short wait).
        deadline = time.monotonic() + 20
        while (left := self.run_containers(launched.run_id)) and time.monotonic() < deadline:
            time.sleep(0.25)
        return [f"container {c.name} ({c.status}, {c.labels.get('runyard.kind')})" for c in left]
