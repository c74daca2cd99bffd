"""Settings of the ``celery_docker`` executor: the ``celery`` executor's settings plus a
``docker:`` section with the ``docker`` executor's container settings.

Imports neither Celery nor the docker SDK (the plugin module imports this one whenever
runyard discovers plugins). The container settings class comes from
`runyard_docker.settings`, which imports only attrs and `runyard.plugin`; when runyard-docker
is not installed, a ``docker:`` section is an error naming the extra to install.
"""

from typing import Any

import attrs

from .settings import CeleryConfig, differing_keys, fingerprint

try:
    from runyard_docker.settings import DockerSettings
except ImportError:  # runyard-celery without runyard-docker: the executor says what to install
    DockerSettings = None  # type: ignore[assignment,misc]

INSTALL_HINT = (
    "the celery_docker executor needs runyard-docker as well as runyard-celery: "
    'pip install "runyard[celery-docker]" (the same as "runyard[celery,docker]")'
)

DOCKER_TASK_NAME = "runyard.execute_step_in_container"
"""The task of the ``celery_docker`` executor: its only argument is a signed step request;
a worker started with ``runyard celery worker --steps-in docker`` runs it in a container.
A name of its own, so that a worker that runs steps in its pool processes never takes a
step meant for a container (it rejects the message as an unregistered task)."""

if DockerSettings is not None:

    @attrs.frozen(kw_only=True, slots=False)
    class ContainerSettings(DockerSettings):
        """``executor.celery_docker.docker``: the ``docker`` executor's container settings
        (image, pull_policy, network(s), env_vars, volumes, labels, memory, cpus,
        container_kwargs, cleanup, mount_outputs, mount_code, terminate_grace,
        heartbeat_timeout), applied by the Celery workers that start the containers.

        ``heartbeat_timeout``: a step container stops itself when the Celery pool process
        that started it has not refreshed its heartbeat for this many seconds; 0 turns it off.
        """

        heartbeat_timeout: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))

    DockerSection: Any = ContainerSettings
else:
    ContainerSettings = None  # type: ignore[assignment,misc]
    DockerSection = dict[str, Any]


def _docker_installed(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if DockerSettings is None:
        raise ValueError(f"{attribute.name}: {INSTALL_HINT}")


@attrs.frozen(kw_only=True)
class CeleryDockerConfig(CeleryConfig):
    """``executor: {celery_docker: {...}}``: each step attempt a Celery task whose worker runs
    the step in a container of its own (docs/backends/celery-containers.md).

    Every key of the ``celery`` executor (broker, backend, queues, ``queue_timeout``,
    ``worker_lost_timeout``, ``terminate_grace``...), with ``default_queue`` defaulting to
    ``runyard-docker``, plus ``docker``: the container settings. Workers started with
    ``runyard celery worker --steps-in docker`` read this same section of their
    runyard.yaml, and the container settings they apply are their own (see the docs: a
    step request cannot choose mounts or privileges on a worker's machine).
    """

    docker: DockerSection = attrs.field(validator=_docker_installed, metadata={"required": (
        "add the container settings the Celery workers apply, at least the image: "
        "`docker: {image: my-jobs:1}` (the keys of the docker executor)"
    )})
    default_queue: str = "runyard-docker"


__all__ = ["DOCKER_TASK_NAME", "INSTALL_HINT", "CeleryDockerConfig", "ContainerSettings", "differing_keys",
           "fingerprint"]
