"""The ecs run launcher passes the run-launcher conformance kit on the emulator: each run's
worker an ECS task (the project image on the real Docker engine, RUNYARD_HOME mounted at
the same path, so the kit's scratch files and SQLite storage are shared), canceled from
another process by StopTask, killed with SIGKILL from inside, and no task of the run left
running afterwards."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from runyard.testing.launchers import Launched, RunLauncherConformance


class TestEcsLauncherConformance(RunLauncherConformance):
    launcher = "ecs"

    @pytest.fixture
    def instance(self, runyard_make_instance: Callable[..., Any], ecs_settings: dict[str, Any]) -> Any:
        return runyard_make_instance({"run_launcher": {"ecs": ecs_settings}})

    @pytest.fixture(autouse=True)
    def _ecs(self, boto: Callable[[str], Any], ecs_settings: dict[str, Any]) -> None:
        self.ecs = boto("ecs")
        self.cluster = ecs_settings["cluster"]

    def leftovers(self, launched: Launched) -> list[str]:
        # Beyond the kit's heartbeats: no task of the run is still live in ECS.
        deadline = time.monotonic() + 20
        while True:
            arns = self.ecs.list_tasks(cluster=self.cluster, startedBy=f"runyard:{launched.run_id}",
                                       desiredStatus="RUNNING")["taskArns"]
            if not arns or time.monotonic() > deadline:
                return [f"ECS task {a}" for a in arns]
            time.sleep(0.25)
