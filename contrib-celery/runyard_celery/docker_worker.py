"""The ``celery_docker`` executor's worker side: each step attempt in a container of its own,
through the ``docker`` executor's step handler (`runyard_docker.executor.DockerStepHandler`).

No container code lives here, nor any Celery task logic (`handler_task.HandlerTask` has
that): this module only makes the docker handler for a run from the worker's container
settings (``executor.celery_docker.docker`` in its runyard.yaml), one step at a time, with
the pool process's scope label. So a step container is created, labelled, streamed, waited
for, read (exit status, OOM, the whole stderr) and only then removed exactly as under the
``docker`` executor, with the same settings and step tags; and should the pool process die,
the docker handler's reaper removes the containers carrying its label.
"""

from __future__ import annotations

from typing import Any

from runyard import Instance
from runyard.plugin import HandlerContext, StepHandler

from .docker_settings import INSTALL_HINT
from .handler_task import HandlerTask

try:
    from runyard_docker.executor import DockerStepHandler
    from runyard_docker.settings import DockerExecutorConfig
except ImportError as e:  # runyard-celery without runyard-docker
    raise ImportError(f"{INSTALL_HINT} ({e})") from e


def executor_config(docker: Any) -> DockerExecutorConfig:
    """The ``docker`` executor's config made of the worker's container settings, one step at
    a time (a pool process runs one task at a time)."""
    fields = {f.name: getattr(docker, f.name) for f in type(docker).__attrs_attrs__}
    return DockerExecutorConfig(**fields, max_concurrent=1)


SCOPE_LABEL = "runyard.celery_worker"
"""Label of every step container a pool process starts: ``NODE/PID`` (see `handler_task.MakeHandler`)."""


def make_task(docker: Any, instance: Instance, node: str) -> HandlerTask:
    """The celery_docker task of a worker whose container settings are ``docker``."""
    config = executor_config(docker)

    def make_handler(context: HandlerContext, owner: str) -> StepHandler:
        return DockerStepHandler(config, context, scope={SCOPE_LABEL: owner})

    return HandlerTask(executor="celery_docker", section="docker", settings=docker, make_handler=make_handler,
                       instance=instance, node=node)
