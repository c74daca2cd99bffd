"""Specs of the built-in local plugins. Imports nothing but the public plugin API."""

from __future__ import annotations

import attrs
from runyard.plugin import (
    API_VERSION,
    Capabilities,
    ExecutorConfig,
    ExecutorSpec,
    RunLauncherSpec,
    StorageSpec,
    hookimpl,
)


@attrs.frozen(kw_only=True)
class InProcessConfig(ExecutorConfig):
    """The in-process executor runs one step at a time; it has no settings of its own."""


@attrs.frozen(kw_only=True)
class SqliteConfig:
    """``path``: the database file (default ``$RUNYARD_HOME/runyard.db``)."""

    path: str | None = None


@hookimpl
def runyard_executors() -> list[ExecutorSpec]:
    return [
        ExecutorSpec(
            name="in_process",
            api_version=API_VERSION,
            handler="runyard_local.in_process:InProcessStepHandler",
            config=InProcessConfig,
            capabilities=Capabilities(
                enforces_timeouts=True,
                can_terminate=True,
                max_concurrency=1,
                needs_shared_outputs=False,
            ),
            description="Every step in the run worker's own process, one at a time.",
            default_max_concurrent=1,
        )
    ]


@hookimpl
def runyard_storages() -> list[StorageSpec]:
    return [
        StorageSpec(
            name="sqlite",
            api_version=API_VERSION,
            storage="runyard_local.storages:create_sqlite_storage",
            config=SqliteConfig,
            description="SQLite database under $RUNYARD_HOME (WAL; safe for several processes).",
        )
    ]


@attrs.frozen(kw_only=True)
class DefaultLauncherConfig:
    """The default launcher has no settings: each run gets one process on this machine."""


@hookimpl
def runyard_run_launchers() -> list[RunLauncherSpec]:
    return [
        RunLauncherSpec(
            name="default",
            api_version=API_VERSION,
            launcher="runyard_local.launcher:DefaultRunLauncher",
            config=DefaultLauncherConfig,
            description="One OS process per run on this machine (its own process group).",
        )
    ]
