"""The ``celery_docker`` executor's step handler (engine side): each step attempt is one
Celery task, ``runyard.execute_step_in_container``, that a worker started with ``runyard
celery worker --steps-in docker`` runs in a container of its own (`docker_worker`).

The container settings are the workers' own (executor.celery_docker.docker in each
worker's runyard.yaml): a signed request may choose a job inside a worker's allowance, not
mounts or privileges on its machine. Each task carries digests of the run's settings, and a
worker whose settings differ refuses the step, naming the keys.

Everything else on this side is the ``celery`` executor's: sending signed JSON tasks to queues
with priorities, late acknowledgement, ``queue_timeout``, pinging the workers running
steps (``worker_lost_timeout``), revoking and stopping tasks. Two things differ: the task
name, so a worker running steps in its pool processes never takes one of these; and what
a pool process's death means: it watched a container rather than ran the step, so it is
WORKER_LOST, never the step's own signal.

This side imports nothing of Docker: the run worker needs neither the docker SDK nor a
Docker engine; the Celery workers need both.
"""

from __future__ import annotations

from typing import Any

from runyard.plugin import StepRequest

from .docker_settings import DOCKER_TASK_NAME, CeleryDockerConfig, fingerprint
from .handler import CeleryStepHandler


class CeleryDockerStepHandler(CeleryStepHandler):
    """Runs each step attempt as a Celery task whose worker runs it in a container."""

    config: CeleryDockerConfig  # type: ignore[assignment]

    task_name = DOCKER_TASK_NAME
    step_in_pool = False
    worker_command = "runyard celery worker --steps-in docker"

    def task_args(self, request: StepRequest) -> list[Any]:
        # The run's container settings travel as digests: the worker applies its own, and
        # refuses the step when they differ (a run config asking for another image, say).
        return [*super().task_args(request), {"docker": fingerprint(self.config.docker)}]


__all__ = ["CeleryDockerStepHandler"]
