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

    mode: str | None = None  # checked below; a {env: NAME} when it is read (`selected_mode`)
    in_process: InProcessSettings | None = None
    multiprocess: MultiprocessSettings | None = None

    def __attrs_post_init__(self) -> None:
        if self.in_process is not None and self.multiprocess is not None:
            raise ValueError("give one of in_process: {...} and multiprocess: {...}, not both")
        if isinstance(self.mode, str):  # a {env: NAME} is checked when it is read
            self._check_mode(self.mode)

    def _nested(self) -> str | None:
        if self.in_process is not None:
            return "in_process"
        return "multiprocess" if self.multiprocess is not None else None

    def _check_mode(self, said: str) -> None:
        if said not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {said!r}")
        nested = self._nested()
        if nested and said != nested:
            raise ValueError(f"mode: {said} contradicts {nested}: {{...}}; say which mode once")

    def selected_mode(self) -> str:
        """``multiprocess`` or ``in_process``, reading a ``{env: NAME}`` mode now."""
        said = resolve(self.mode)
        if said is not None:
            self._check_mode(said)
        return self._nested() or said or "multiprocess"

    def delegate_config(self) -> ExecutorConfig:
        """The config of the executor the selected mode delegates to (nested settings win)."""
        if self.selected_mode() == "in_process":
            return InProcessConfig(
                max_concurrent=self.max_concurrent, tag_concurrency_limits=self.tag_concurrency_limits
            )
        chosen = self.multiprocess or self
        return MultiprocessConfig(
            max_concurrent=self.max_concurrent,
            tag_concurrency_limits=self.tag_concurrency_limits,
            start_method=chosen.start_method,
            terminate_grace=chosen.terminate_grace,
        )


_PROCESS_CAPABILITIES = Capabilities(enforces_timeouts=True, can_terminate=True, needs_shared_outputs=True)
# in_process mode: the same, one step at a time. The engine launches at most max_concurrent
# steps and in-process steps run one at a time: any more would wait for each other while
# their timeouts ran. Outputs still go through a shared store, so that a job debugged in
# process fails the same way with an output that cannot be pickled.
_ONE_AT_A_TIME = attrs.evolve(_PROCESS_CAPABILITIES, max_concurrency=1)


def _multi_or_in_process_capabilities(config: MultiOrInProcessConfig) -> Capabilities:
    return _ONE_AT_A_TIME if config.selected_mode() == "in_process" else _PROCESS_CAPABILITIES


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
            # Both modes enforce timeouts, terminate and use shared outputs; in_process
            # mode runs one step at a time, which lowers max_concurrent to 1.
            capabilities=_PROCESS_CAPABILITIES,
            capabilities_for=_multi_or_in_process_capabilities,
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
