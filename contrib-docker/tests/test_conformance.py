"""The docker executor passes the conformance kit against the real engine."""

from __future__ import annotations

from typing import Any

import pytest
from runyard.testing.conformance import ExecutorConformance


class TestDockerConformance(ExecutorConformance):
    executor = "docker"

    @pytest.fixture
    def instance(self, docker_instance: Any) -> Any:
        return docker_instance
