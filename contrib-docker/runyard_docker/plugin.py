"""The ``docker`` executor's and run launcher's hook implementations: their specs and
the ``runyard docker`` commands.

This is the entry-point module: runyard imports it whenever it looks for plugins, so it
imports only `runyard.plugin` and the settings (`runyard_docker.settings`). The docker SDK
is imported by `runyard_docker.executor` and `runyard_docker.launcher`, when a run uses
them, and by the commands when they run.
"""

from __future__ import annotations

from typing import Any

from runyard.plugin import Capabilities, ExecutorSpec, RunLauncherSpec, hookimpl

from .settings import DockerExecutorConfig, DockerLauncherConfig


@hookimpl
def runyard_executors() -> list[ExecutorSpec]:
    return [
        ExecutorSpec(
            name="docker",
            api_version=1,
            handler="runyard_docker.executor:DockerStepHandler",
            config=DockerExecutorConfig,
            capabilities=Capabilities(
                enforces_timeouts=True,  # the container is stopped at the deadline
                can_terminate=True,
                supports_resources=True,  # runyard/resources: memory, cpus
                max_concurrency=None,
                needs_shared_outputs=True,
            ),
            description="Each step in a fresh container on a Docker engine.",
            default_max_concurrent=4,
            extra="docker",
        )
    ]


@hookimpl
def runyard_run_launchers() -> list[RunLauncherSpec]:
    return [
        RunLauncherSpec(
            name="docker",
            api_version=1,
            launcher="runyard_docker.launcher:DockerRunLauncher",
            config=DockerLauncherConfig,
            description="Each run's worker in a container on a Docker engine.",
            extra="docker",
        )
    ]


@hookimpl
def runyard_cli(cli: Any) -> None:
    from .cli import add_commands  # click only; the docker SDK is imported inside the commands

    add_commands(cli)

