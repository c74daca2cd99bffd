"""The celery executor passes the conformance kit on both brokers, with real workers."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from celery_support import executor_config, queue
from runyard.testing.conformance import ExecutorConformance


class TestCeleryRedisConformance(ExecutorConformance):
    executor = "celery"
    executor_config: ClassVar[dict[str, Any]] = executor_config("redis", queue("redis-main"), max_concurrent=4)

    @pytest.fixture(autouse=True)
    def _workers(self, session_workers: Any) -> None:
        """The session's Redis worker consumes this queue."""


class TestCeleryRabbitMQConformance(ExecutorConformance):
    executor = "celery"
    executor_config: ClassVar[dict[str, Any]] = executor_config("rabbitmq", queue("rabbitmq-main"), max_concurrent=4)

    @pytest.fixture(autouse=True)
    def _workers(self, session_workers: Any) -> None:
        """The session's RabbitMQ worker consumes this queue."""
