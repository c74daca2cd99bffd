"""The ``dask`` executor's hook implementation (its spec; settings are in
`runyard_dask.settings`). Imports only the public plugin API: runyard imports this module
whenever it lists plugins, so dask must not be imported here."""

from __future__ import annotations

from runyard.plugin import ExecutorSpec, hookimpl

from .settings import CAPABILITIES, DaskConfig, capabilities_for


@hookimpl
def runyard_executors() -> list[ExecutorSpec]:
    return [
        ExecutorSpec(
            name="dask",
            api_version=1,
            handler="runyard_dask.handler:DaskStepHandler",
            config=DaskConfig,
            capabilities=CAPABILITIES,
            capabilities_for=capabilities_for,
            description="Each step as a task on a Dask cluster (or dask's local schedulers).",
            extra="dask",
            # Steps in flight at once; Dask queues them on its workers' threads.
            default_max_concurrent=32,
        )
    ]

