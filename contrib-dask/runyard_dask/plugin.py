"""The ``dask`` executor's hook implementation (its spec; settings are in
`runyard_dask.settings`). Imports only the public plugin API: runyard imports this module
whenever it lists plugins, so dask must not be imported here."""

from __future__ import annotations

from runyard.plugin import Capabilities, ExecutorSpec, hookimpl

from .settings import DaskConfig


@hookimpl
def runyard_executors() -> list[ExecutorSpec]:
    return [
        ExecutorSpec(
            name="dask",
            api_version=1,
            handler="runyard_dask.handler:DaskStepHandler",
            config=DaskConfig,
            capabilities=Capabilities(
                # The engine records the timeout or cancel at once and the Dask future is
                # canceled; the step itself is interrupted where Python allows (see the docs).
                enforces_timeouts=True,
                can_terminate=True,
                # dask/resources (and runyard/resources) become Dask worker resources.
                supports_resources=True,
                max_concurrency=None,
                needs_shared_outputs=True,
                # A step's task tells the run when it starts on a worker (a distributed event),
                # so its timeout does not count the time it waited in Dask's queue.
                reports_start=True,
            ),
            description="Each step as a task on a Dask cluster (or dask's local schedulers).",
            extra="dask",
            # Steps in flight at once; Dask queues them on its workers' threads.
            default_max_concurrent=32,
        )
    ]

