"""The built-in multiprocess executors pass the conformance kit, with every start method
and, for multi_or_in_process, in both modes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from runyard.instance import Instance
from runyard.plugin import Capabilities
from runyard.testing.conformance import ExecutorConformance


class TestMultiprocessConformance(ExecutorConformance):
    executor = "multiprocess"  # default start method: the fork server


class TestMultiprocessExecdForkServerConformance(ExecutorConformance):
    """The fork server started as a fresh interpreter, as whenever the run worker has threads."""

    executor = "multiprocess"

    @pytest.fixture(autouse=True)
    def _another_thread(self) -> Iterator[None]:
        # A run worker with a second thread gets an exec'd fork server, never a forked one.
        stop = threading.Event()
        other = threading.Thread(target=stop.wait, daemon=True)
        other.start()
        yield
        stop.set()
        other.join()


class TestMultiprocessSpawnConformance(ExecutorConformance):
    executor = "multiprocess"
    executor_config: ClassVar[dict[str, Any]] = {"start_method": "spawn"}


class TestMultiprocessForkConformance(ExecutorConformance):
    executor = "multiprocess"
    executor_config: ClassVar[dict[str, Any]] = {"start_method": "fork"}


class TestMultiOrInProcessConformance(ExecutorConformance):
    executor = "multi_or_in_process"  # multiprocess mode by default


class TestMultiOrInProcessInProcessModeConformance(ExecutorConformance):
    executor = "multi_or_in_process"
    executor_config: ClassVar[dict[str, Any]] = {"mode": "in_process"}

    def capabilities(self, instance: Instance) -> Capabilities:
        # In this mode steps run one at a time (the config pins max_concurrent to 1).
        return Capabilities(enforces_timeouts=True, can_terminate=True, max_concurrency=1)
