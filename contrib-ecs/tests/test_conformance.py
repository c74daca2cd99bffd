"""The ecs executor passes the executor conformance kit on the emulator: every step
attempt an ECS task running the project image on the real Docker engine."""

from __future__ import annotations

from typing import Any

import pytest
from runyard.testing.conformance import ExecutorConformance


class TestEcsConformance(ExecutorConformance):
    executor = "ecs"

    @pytest.fixture
    def instance(self, ecs_instance: Any) -> Any:
        return ecs_instance
