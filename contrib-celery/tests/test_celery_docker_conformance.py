"""The celery_docker executor passes the conformance kit on both brokers, with real
``runyard celery worker --steps-in docker`` processes starting real containers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery_support import docker_executor_config, queue
from runyard.testing.conformance import ExecutorConformance

# As for the celery kit: the kit's cancel step ignores SIGTERM, so a stop takes the whole
# grace before SIGKILL, and must be over within the kit's stop_within.
GRACE = 2.0


class _CeleryDockerKit(ExecutorConformance):
    executor = "celery_docker"
    broker = ""

    @pytest.fixture(autouse=True)
    def _workers(self, session_docker_workers: Any, docker_image: str,
                 tmp_path_factory: pytest.TempPathFactory) -> None:
        """The session's docker worker of this broker consumes the queue. The run's container
        settings must be the workers' (each task carries their digests), and the workers'
        name pytest's temporary folder, known only now: so the config is set per test."""
        shared: Path = tmp_path_factory.getbasetemp()
        self.executor_config = docker_executor_config(  # type: ignore[misc]
            self.broker, queue(f"docker-{self.broker}-main"), docker_image, shared,
            max_concurrent=4, terminate_grace=GRACE)


class TestCeleryDockerRedisConformance(_CeleryDockerKit):
    broker = "redis"


class TestCeleryDockerRabbitMQConformance(_CeleryDockerKit):
    broker = "rabbitmq"
