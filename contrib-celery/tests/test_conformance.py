"""The celery executor passes the conformance kit on both brokers, with real workers."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from celery_support import executor_config, queue
from runyard.testing.conformance import ExecutorConformance

# The kit's cancel step ignores SIGTERM, so a stop takes the whole grace before SIGKILL, and
# must be over within the kit's stop_within (8 s) with the broker round trips on a busy machine.
GRACE = 2.0


class _CeleryKit(ExecutorConformance):
    executor = "celery"
    # A task's events come back in one piece, as its result: a pool process that dies
    # mid-step leaves none to pass along (the failure still says how it died).
    events_survive_a_crash = False


class TestCeleryRedisConformance(_CeleryKit):
    executor_config: ClassVar[dict[str, Any]] = executor_config(
        "redis", queue("redis-main"), max_concurrent=4, terminate_grace=GRACE
    )

    @pytest.fixture(autouse=True)
    def _workers(self, session_workers: Any) -> None:
        """The session's Redis worker consumes this queue."""


class TestCeleryRabbitMQConformance(_CeleryKit):
    executor_config: ClassVar[dict[str, Any]] = executor_config(
        "rabbitmq", queue("rabbitmq-main"), max_concurrent=4, terminate_grace=GRACE
    )

    @pytest.fixture(autouse=True)
    def _workers(self, session_workers: Any) -> None:
        """The session's RabbitMQ worker consumes this queue."""
