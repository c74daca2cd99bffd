"""The ``ecs`` executor's and run launcher's hook implementations: their specs.

This is the entry-point module: runyard imports it whenever it looks for plugins, so it
imports only `runyard.plugin` and the settings (`runyard_ecs.settings`). boto3 is
imported by `runyard_ecs._aws`, which `runyard_ecs.executor` and `runyard_ecs.launcher`
import when a run uses them.
"""

from __future__ import annotations

from runyard.plugin import Capabilities, ExecutorSpec, RunLauncherSpec, hookimpl

from .settings import EcsExecutorConfig, EcsLauncherConfig


@hookimpl
def runyard_executors() -> list[ExecutorSpec]:
    return [
        ExecutorSpec(
            name="ecs",
            api_version=1,
            handler="runyard_ecs.executor:EcsStepHandler",
            config=EcsExecutorConfig,
            capabilities=Capabilities(
                enforces_timeouts=True,  # StopTask at the deadline
                can_terminate=True,
                supports_resources=False,  # cpu/memory come from the runyard/ecs step tag
                max_concurrency=None,
                needs_shared_outputs=True,
                reports_start=True,  # a task may wait in PROVISIONING/PENDING; STEP_START comes from its log
            ),
            description="Each step attempt in an Amazon ECS task of its own.",
            default_max_concurrent=4,
            extra="ecs",
        )
    ]


@hookimpl
def runyard_run_launchers() -> list[RunLauncherSpec]:
    return [
        RunLauncherSpec(
            name="ecs",
            api_version=1,
            launcher="runyard_ecs.launcher:EcsRunLauncher",
            config=EcsLauncherConfig,
            description="Each run's worker in an Amazon ECS task.",
            extra="ecs",
        )
    ]
