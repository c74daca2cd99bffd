"""Specs of the built-in local plugins. Imports nothing but the public plugin API."""

from __future__ import annotations

from typing import Any

import attrs
from runyard.plugin import (
    API_VERSION,
    Capabilities,
    ExecutorConfig,
    ExecutorSpec,
    RunLauncherSpec,
    StorageSpec,
    hookimpl,
    one_of,
    resolve,
)


@attrs.frozen(kw_only=True)
class InProcessConfig(ExecutorConfig):
    """The in-process executor runs one step at a time; it has no settings of its own."""


START_METHODS = ("forkserver", "fork", "spawn")
MODES = ("multiprocess", "in_process")


def _start_method() -> Any:
    # A {env: NAME} reference is checked when the handler resolves it.
    return attrs.field(default="forkserver", validator=one_of(*START_METHODS))


def _terminate_grace() -> Any:
    return attrs.field(default=5.0, validator=attrs.validators.ge(0))


@attrs.frozen(kw_only=True)
class MultiprocessConfig(ExecutorConfig):
    """Settings of the ``multiprocess`` executor, besides ``max_concurrent`` (default: the
    number of CPUs) and ``tag_concurrency_limits``.

    ``start_method``: how a step's process starts. ``forkserver`` (default): forked from a
    per-run fork server that imported the job once, in milliseconds. ``fork``: forked from
    the run worker itself (fastest; unsafe if the run worker has threads holding locks).
    ``spawn``: a fresh interpreter per step (for code that is not fork-safe; pays an
    interpreter start and the job's imports per step).
    ``terminate_grace``: seconds between SIGTERM and SIGKILL when a step is stopped
    (timeout, cancel); 0 kills at once.
    """

    start_method: str = _start_method()
    terminate_grace: float = _terminate_grace()


@attrs.frozen(kw_only=True)
class MultiprocessSettings:
    """``multiprocess: {...}`` under ``multi_or_in_process``: the multiprocess executor's
    own settings (see `MultiprocessConfig`)."""

    start_method: str = _start_method()
    terminate_grace: float = _terminate_grace()


@attrs.frozen(kw_only=True)
class InProcessSettings:
    """``in_process: {}`` under ``multi_or_in_process``: it has no settings of its own."""


@attrs.frozen(kw_only=True)
class MultiOrInProcessConfig(MultiprocessConfig):
    """Settings of ``multi_or_in_process``: the multiprocess ones, plus which mode to use.

    ``mode``: ``multiprocess`` (default) or ``in_process``. The nested forms say the same:
    ``in_process: {}`` is ``mode: in_process``; ``multiprocess: {start_method: spawn}`` is
    ``mode: multiprocess`` with those settings (they win over top-level ones). In
    in_process mode steps run one at a time, whatever ``max_concurrent`` says.
    """

    mode: str | None = None  # checked below, once a {env: NAME} is read
    in_process: InProcessSettings | None = None
    multiprocess: MultiprocessSettings | None = None

    def __attrs_post_init__(self) -> None:
        if self.in_process is not None and self.multiprocess is not None:
            raise ValueError("give one of in_process: {...} and multiprocess: {...}, not both")
        nested = (
            "in_process" if self.in_process is not None else "multiprocess" if self.multiprocess is not None else None
        )
        said = resolve(self.mode)  # read a {env: NAME} now: the mode decides max_concurrent
        if said is not None and said not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {said!r}")
        if nested and said and said != nested:
            raise ValueError(f"mode: {said} contradicts {nested}: {{...}}; say which mode once")
        mode = nested or said or "multiprocess"
        # Frozen: normalise through object.__setattr__, once, while constructing.
        object.__setattr__(self, "mode", mode)
        if self.multiprocess is not None:
            for a in attrs.fields(MultiprocessSettings):
                object.__setattr__(self, a.name, getattr(self.multiprocess, a.name))
        if mode == "in_process":
            # The engine launches at most max_concurrent steps and in-process steps run one
            # at a time: any more would wait for each other while their timeouts ran.
            object.__setattr__(self, "max_concurrent", 1)


_PROCESS_CAPABILITIES = Capabilities(enforces_timeouts=True, can_terminate=True, needs_shared_outputs=True)


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
        ),
        ExecutorSpec(
            name="multiprocess",
            api_version=API_VERSION,
            handler="runyard_local.multiprocess:MultiprocessStepHandler",
            config=MultiprocessConfig,
            capabilities=_PROCESS_CAPABILITIES,
            description="Each step in an OS process of its own on this machine, forked in milliseconds.",
            default_max_concurrent=None,  # the number of CPUs
        ),
        ExecutorSpec(
            name="multi_or_in_process",
            api_version=API_VERSION,
            handler="runyard_local.multiprocess:MultiOrInProcessStepHandler",
            config=MultiOrInProcessConfig,
            # True of both modes: in_process also enforces timeouts, terminates, and works
            # with shared outputs; its one-at-a-time limit is set through max_concurrent.
            capabilities=_PROCESS_CAPABILITIES,
            description="multiprocess, or in_process when the config says mode: in_process.",
            default_max_concurrent=None,
        ),
    ]


@hookimpl
def runyard_storages() -> list[StorageSpec]:
    return [
        StorageSpec(
            name="sqlite",
            api_version=API_VERSION,
            storage="runyard_local.storages:create_sqlite_storage",
            location="runyard_local.storages:locate_sqlite_storage",
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
