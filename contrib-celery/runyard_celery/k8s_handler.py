"""The ``celery_k8s`` executor's step handler (engine side): each step attempt is one Celery
task, ``runyard.execute_step_in_job``, that a worker started with ``runyard celery worker
--steps-in k8s`` runs as a Kubernetes Job of its own (`k8s_worker`).

As for ``celery_docker`` (`docker_handler`): the Job settings are the workers' own
(executor.celery_k8s.k8s in each worker's runyard.yaml); each task carries digests of the
run's settings, and a worker whose settings differ refuses the step, naming the keys.
Everything else is the ``celery`` executor's: signed JSON tasks, queues and priorities,
late acknowledgement, ``queue_timeout``, ``worker_lost_timeout``, revoking and stopping.

This side imports nothing of Kubernetes: the run worker needs neither the client nor
access to the cluster; the Celery workers need both.
"""

from __future__ import annotations

from typing import Any

from runyard.plugin import StepRequest

from .handler import CeleryStepHandler
from .k8s_settings import K8S_TASK_NAME, CeleryK8sConfig
from .settings import fingerprint


class CeleryK8sStepHandler(CeleryStepHandler):
    """Runs each step attempt as a Celery task whose worker runs it as a Kubernetes Job."""

    config: CeleryK8sConfig  # type: ignore[assignment]

    task_name = K8S_TASK_NAME
    step_in_pool = False
    worker_command = "runyard celery worker --steps-in k8s"

    def task_args(self, request: StepRequest) -> list[Any]:
        return [*super().task_args(request), {"k8s": fingerprint(self.config.k8s)}]


__all__ = ["CeleryK8sStepHandler"]
