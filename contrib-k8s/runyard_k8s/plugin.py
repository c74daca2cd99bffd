"""The ``k8s`` executor's and run launcher's hook implementations: their specs and the
``runyard k8s`` commands.

This is the entry-point module: runyard imports it whenever it looks for plugins, so it
imports only `runyard.plugin` and the settings (`runyard_k8s.settings`). The ``kubernetes``
client is imported by `runyard_k8s._k8s`, when a run uses the executor or the launcher.
"""

from __future__ import annotations

from typing import Any

from runyard.plugin import API_VERSION, Capabilities, ExecutorSpec, RunLauncherSpec, hookimpl

from .settings import K8sExecutorConfig, K8sLauncherConfig


@hookimpl
def runyard_executors() -> list[ExecutorSpec]:
    return [
        ExecutorSpec(
            name="k8s",
            api_version=API_VERSION,
            handler="runyard_k8s.executor:K8sStepHandler",
            config=K8sExecutorConfig,
            capabilities=Capabilities(
                enforces_timeouts=True,  # the Job is deleted at the deadline (activeDeadlineSeconds as backstop)
                can_terminate=True,
                supports_resources=True,  # runyard/resources: memory, cpus -> limits and requests
                max_concurrency=None,
                needs_shared_outputs=True,
                reports_start=True,  # pods may wait for the scheduler: timeouts count from the pod's start
            ),
            description="Each step attempt in a Kubernetes Job of its own.",
            default_max_concurrent=8,
            extra="k8s",
        )
    ]


@hookimpl
def runyard_run_launchers() -> list[RunLauncherSpec]:
    return [
        RunLauncherSpec(
            name="k8s",
            api_version=API_VERSION,
            launcher="runyard_k8s.launcher:K8sRunLauncher",
            config=K8sLauncherConfig,
            description="Each run's worker in a Kubernetes Job of its own.",
            extra="k8s",
        )
    ]


@hookimpl
def runyard_cli(cli: Any) -> None:
    from .cli import add_commands  # click only; nothing here talks to a cluster

    add_commands(cli)
