"""The public API for plugin authors. Plugins import from here and from `runyard` only.

An executor plugin supplies a *step handler*: how to start one step somewhere, how to
ask whether it is done, and how to stop it. The engine (ready queue, concurrency
limits, retries, timeouts, skips, cancellation) is the same for every executor.

Versioned: `API_VERSION` changes only when a contract breaks; additions keep it.
"""

from __future__ import annotations

import contextvars
import enum
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import pluggy

from .config import EnvVar, resolve
from .config import structure as structure_config
from .definitions import CodePointer
from .envvars import check_env_item, check_env_items, environment_from
from .errors import ConfigError, PluginError
from .events import STEP_LIVE, STEP_TERMINAL, Event, EventType, FailureInfo, FailureKind
from .failures import error_class_name, failure_from_exception
from .private import make_private_dirs, open_private
from .procs import (
    GroupStop,
    describe_exit,
    interrupt_thread,
    kill_processes,
    reap_group_leader,
    signal_name,
    signal_process_group,
    split_wait_status,
    stop_process_group,
)
from .resources import RESOURCES_TAG, parse_resources_tag
from .storage import RunFilter, RunRecord, RunStatus, RunStorage, StoredEvent
from .validators import above, at_least, one_of

if TYPE_CHECKING:
    from .definitions import JobDefinition
    from .storage.postgres import PostgresRunStorage
    from .storage.sqlite import SqliteRunStorage
    from .storage_location import StorageLocation, locate_storage  # noqa: F401
    from .trust import (  # noqa: F401
        SIGNING_KEY_ENV,
        STEP_WORKER_ENV,
        RequestRefused,
        WorkerPolicy,
        admit_or_refuse,
        configured_signing_key,
        execute_trusted_step,
        grant_for_run,
        load_worker_policy,
        missing_key_error,
        new_signing_key,
        policy_from_grant,
        refusal_event,
        sign_request,
        signing_key_at,
        verify_request,
    )
    from .worker import StepContext, StepInterrupted, StepTimedOut  # noqa: F401

API_VERSION = 1
"""Major version of the plugin API. A spec declaring another version is not loaded."""

hookimpl = pluggy.HookimplMarker("runyard")
"""Decorator for a plugin module's hook implementations."""


@attrs.frozen(kw_only=True)
class TagConcurrencyLimit:
    """At most ``limit`` steps whose tag ``key`` (equal to ``value``, when given) run at once."""

    key: str
    limit: int = attrs.field(validator=attrs.validators.ge(1))
    value: str | None = None

    def matches(self, tags: Mapping[str, str]) -> bool:
        return self.key in tags and (self.value is None or tags[self.key] == self.value)


def _positive_or_none(_: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"'{attribute.name}' must be at least 1, got {value}")


@attrs.frozen(kw_only=True)
class ExecutorConfig:
    """Settings every executor has; a plugin's config class subclasses this.

    ``max_concurrent``: steps running at once (default: the executor's own default).
    ``tag_concurrency_limits``: per-tag limits, enforced by the engine on every backend.
    """

    max_concurrent: int | None = attrs.field(default=None, validator=_positive_or_none)
    tag_concurrency_limits: list[TagConcurrencyLimit] = attrs.field(factory=list)


@attrs.frozen(kw_only=True)
class Capabilities:
    """What a step handler can honour. Configuration asking for more is rejected before a run.

    ``enforces_timeouts``: a step past its timeout is stopped, not just reported.
    ``can_terminate``: a running step can be stopped (cancellation).
    ``supports_resources``: steps may request resources through the ``runyard/resources`` tag.
    ``max_concurrency``: the most steps it can run at once (None: no limit of its own).
    ``needs_shared_outputs``: steps run outside this process, so outputs need a file or
    fsspec store rather than the in-memory one.
    ``reports_start``: attempts may wait in a queue before they run (a broker, a cluster's
    scheduler), and `StepHandler.poll` says when one starts (`StepUpdate.started`, or a
    STEP_START event). The engine then counts a step's timeout from its start, not from
    its launch; bounding the time queued is the executor's job (say how in its docs).
    """

    enforces_timeouts: bool = False
    can_terminate: bool = False
    supports_resources: bool = False
    max_concurrency: int | None = None
    needs_shared_outputs: bool = True
    reports_start: bool = False


_NoConfig = attrs.make_class("NoConfig", {}, frozen=True, kw_only=True)


@attrs.frozen(kw_only=True)
class PluginSpec:
    """Fields every spec has. ``api_version`` is the plugin API the plugin was written
    against (write ``api_version=API_VERSION``, imported at the time you write it);
    ``extra`` is the pip extra of ``runyard`` that installs the plugin, used in hints."""

    name: str
    api_version: int  # required: the check is meaningless if it defaults to ours
    description: str = ""
    extra: str | None = None


@attrs.frozen(kw_only=True)
class ExecutorSpec(PluginSpec):
    """Registers an executor: returned from the ``runyard_executors`` hook.

    ``handler`` is the import string (``"package.module:Class"``) of a `StepHandler`
    subclass, imported only when a run uses this executor, so registering and
    validating config never import the backend's dependencies.

    ``capabilities`` are what the handler can honour. When they depend on settings (a mode
    that runs one step at a time), give ``capabilities_for``: a function of the structured
    config returning them (it runs when a run is resolved, in the launching process, so
    it must not import the backend). A ``max_concurrency`` it returns that is lower than
    the spec's own lowers the run's ``max_concurrent`` rather than rejecting it: another
    setting decided it. Reject a contradiction in your config class's validation instead,
    if you prefer an error.
    """

    handler: str
    config: type[ExecutorConfig] = ExecutorConfig
    capabilities: Capabilities = Capabilities()
    capabilities_for: Callable[[Any], Capabilities] | None = None
    default_max_concurrent: int | None = None  # None: the number of CPUs

    def capabilities_of(self, config: ExecutorConfig) -> Capabilities:
        """The capabilities of a run with ``config``."""
        return self.capabilities_for(config) if self.capabilities_for is not None else self.capabilities


@attrs.frozen(kw_only=True)
class RunLauncherConfig:
    """Base of a run launcher's config class (``run_launcher: {NAME: {...}}``); it has no keys.

    Subclass it with ``@attrs.frozen(kw_only=True)`` and give each setting a default where
    one makes sense. runyard builds it from the YAML before anything starts: an unknown
    key, a wrong type or a failing validator is an error naming the file and the key path
    (``run_launcher.NAME.KEY``). A value written ``{env: NAME}`` arrives as an `EnvVar`:
    read it with `resolve` when the launcher uses it, so it is read where the run starts.
    Any attrs class works as a launcher's config; this base only says there are no keys.
    """


@attrs.frozen(kw_only=True)
class RunLauncherSpec(PluginSpec):
    """Registers a run launcher: returned from the ``runyard_run_launchers`` hook.

    ``launcher`` is the import string (``"package.module:Class"``) of a `RunLauncher`
    subclass, imported only when a run is launched, terminated or checked with it, so
    listing plugins and validating config never import the launcher's dependencies.
    ``config`` is its config class (see `RunLauncherConfig`).
    """

    launcher: str
    config: type = RunLauncherConfig


@attrs.frozen(kw_only=True)
class StorageSpec(PluginSpec):
    """Registers a run storage: returned from the ``runyard_storages`` hook.

    ``storage`` imports to a callable ``(config, instance_home: Path) -> RunStorage``.
    ``location`` (optional) imports to a callable ``(config, instance_home: Path) ->
    StorageLocation`` saying where the data lives without opening the storage, for run
    launchers that must check a worker elsewhere can reach it (see `locate_storage`).
    """

    storage: str
    config: type = _NoConfig
    location: str | None = None


class WorkerStatus(enum.StrEnum):
    """What a run launcher knows of a run worker (`WorkerHealth.status`).

    Members equal their lower-case names (``WorkerStatus.DEAD == "dead"``).
    """

    RUNNING = "running"
    """The worker exists and runs (or is still starting: a container being created)."""
    FINISHED = "finished"
    """The worker exited by itself (the launcher saw a normal exit, or the run had ended
    when it looked): it ended the run, or it ends in FAILURE if it did not."""
    DEAD = "dead"
    """The worker is gone otherwise: killed (a signal, the OOM killer), crashed, vanished
    with its machine or container. The message says how, as precisely as it is known."""
    UNKNOWN = "unknown"
    """The launcher cannot tell (another machine, an engine that does not answer). runyard
    leaves the run alone and asks again later."""


@attrs.frozen(kw_only=True)
class WorkerHealth:
    """The answer of `RunLauncher.check_health`: a `WorkerStatus` and a message.

    ``message`` says why a worker is DEAD (exit code, signal, OOM, the last lines of its
    output), what a FINISHED one exited with, or why the status is UNKNOWN. When the run
    is unfinished and its worker is DEAD or FINISHED, runyard ends the run FAILURE with the
    message as the reason: make it say what happened. ``status`` also accepts the plain
    strings (``WorkerHealth(status="dead", message=...)``).
    """

    status: WorkerStatus = attrs.field(converter=WorkerStatus)
    message: str = ""
    died_at: float | None = None
    """When a DEAD or FINISHED worker ended (seconds since the epoch), if the launcher knows
    (a container's ``State.FinishedAt``). runyard records it as the run's end; without it,
    the monitor estimates the time of death from when it last saw the worker running."""

    @classmethod
    def running(cls, message: str = "") -> WorkerHealth:
        return cls(status=WorkerStatus.RUNNING, message=message)

    @classmethod
    def finished(cls, message: str = "") -> WorkerHealth:
        return cls(status=WorkerStatus.FINISHED, message=message)

    @classmethod
    def dead(cls, message: str) -> WorkerHealth:
        return cls(status=WorkerStatus.DEAD, message=message)

    @classmethod
    def unknown(cls, message: str = "") -> WorkerHealth:
        return cls(status=WorkerStatus.UNKNOWN, message=message)

    @property
    def is_running(self) -> bool:
        return self.status is WorkerStatus.RUNNING

    @property
    def is_gone(self) -> bool:
        """The worker no longer runs (DEAD or FINISHED): it will write nothing more to the run."""
        return self.status in (WorkerStatus.DEAD, WorkerStatus.FINISHED)

    @property
    def is_dead(self) -> bool:
        """Same as `is_gone`: DEAD and FINISHED alike leave nobody to end the run, and that
        is what runyard acts on (an unfinished run fails, a cancel stops waiting)."""
        return self.is_gone


LAUNCH_ID_ENV = "RUNYARD_LAUNCH_ID"
"""Set by `RunLauncher.worker_env` while `runyard daemon` launches a run (``RUN_ID:LAUNCH_ID``):
the worker then executes the run only once that launch is recorded and is still the run's
latest, so a worker orphaned by a daemon that died mid-launch never runs it a second time."""

current_launch: contextvars.ContextVar[str | None] = contextvars.ContextVar("runyard_launch", default=None)

worker_fork: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "runyard_worker_fork", default=None
)
"""Set by ``runyard job launch`` around its launch: this process is a short-lived command
that has just loaded the run's job and holds no lease or thread, so `RunLauncher.fork_worker`
may start the run worker as a fork of it rather than a new interpreter (which would import
runyard, every plugin and the job again). The value is called before forking: it closes this
process's storage connections, which a child must not share."""


class ForkedWorker:
    """A process this one forked (a run worker started by `RunLauncher.fork_worker`, a step
    process): watched and reaped like a `subprocess.Popen` (``pid``, ``returncode``,
    ``poll()``, ``wait()``, ``kill()``)."""

    def __init__(self, pid: int, *, what: str = "run worker") -> None:
        self.pid = pid
        self.what = what
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -9  # reaped elsewhere: how it ended cannot be known
                return self.returncode
            if pid:
                code, sig = split_wait_status(status)
                self.returncode = -sig if sig is not None else code
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import subprocess
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"{self.what} {self.pid}", timeout or 0.0)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass


def single_threaded() -> bool:
    """True when this process has no other thread, Python's or native (Linux: /proc): when
    ``os.fork()`` is safe (a forked child gets no copy of a lock another thread held)."""
    import threading

    if threading.active_count() != 1:
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False  # cannot tell: do not fork


class RunLauncher:
    """Allocates compute for a whole run and starts its run worker there. Subclass it.

    **Constructor**: ``Launcher(config, instance_home)``. ``config`` is an instance of the
    spec's config class built from ``run_launcher: {NAME: {...}}`` of the instance's
    ``runyard.yaml`` (its defaults when the run was launched with this launcher but the
    file now names another). ``instance_home`` is the instance's ``RUNYARD_HOME`` as an
    absolute path string (None only for an in-memory instance, which cannot launch runs).
    runyard builds a new launcher for each call, often in another process than the one
    that launched the run: keep the constructor cheap and free of side effects.

    **Stateless between calls**: whatever `launch` returns is stored with the run (its
    RUN_LAUNCHED event) and handed back as ``worker`` to `terminate` and `check_health`,
    which may run in another process (``runyard run cancel`` an hour later) or on another
    machine. Everything needed to find the worker again goes in that JSON data.

    **The run worker** is `worker_command` (``python -m runyard api execute-run RUN_ID``),
    or `execute_run` called in a process of your own. It must see the same instance: the
    same ``RUNYARD_HOME`` (see `worker_env`) or at least its ``runyard.yaml`` and a
    storage it can reach. It loads the job from the run's code pointer, runs the engine,
    writes every event, ends the run SUCCESS, FAILURE or CANCELED and exits 0 if the run
    succeeded, 1 otherwise. SIGTERM (or SIGINT) makes it cancel the run cleanly: running
    steps are stopped, the rest skipped, the run ends CANCELED.

    `runyard.testing.launchers.RunLauncherConformance` checks all of this; see
    docs/launchers.md.
    """

    def __init__(self, config: Any, instance_home: str | None) -> None:
        self.config = config
        self.instance_home = instance_home

    def launch(self, run: RunRecord) -> dict[str, Any]:
        """Start the run worker for ``run`` and return JSON data identifying it (a pid and
        its start time, a container id, a job name). Return as soon as the worker is
        started, never when the run ends. Raise if it cannot be started: the run then ends
        FAILURE with your exception's message as the reason."""
        raise NotImplementedError

    def terminate(self, run: RunRecord, worker: Mapping[str, Any], *, force: bool = False) -> None:
        """Stop the run's worker.

        Without ``force``: ask it to stop (SIGTERM, or your platform's equivalent) and return
        at once; the worker cancels its steps and ends the run CANCELED. With ``force``: kill
        the worker and everything it started (its step processes, their children, step
        containers), so that nothing of the run is left running.

        Idempotent, and safe on a worker that has already exited or was never seen: calling
        it twice, or after the run finished, does nothing and does not raise. Raise only
        when the worker cannot be reached to be stopped (say where it runs).
        """
        raise NotImplementedError

    def check_health(self, run: RunRecord, worker: Mapping[str, Any]) -> WorkerHealth:
        """Say whether the worker still runs: a `WorkerHealth` (RUNNING, FINISHED, DEAD with
        the reason, or UNKNOWN). Called often (``run wait`` polls it every second): keep it
        cheap. Never raise for a worker that is gone; return UNKNOWN when you cannot tell.
        Reporting DEAD is also the moment to remove what is left of the run (orphaned step
        processes or containers), since nobody will stop them otherwise."""
        return WorkerHealth.unknown("this run launcher does not check its workers")

    def remember_end(self, run: RunRecord, health: WorkerHealth, *, tag: str) -> None:
        """Keep ``health`` (a worker found DEAD or FINISHED) in the instance's ``logs/``
        (``TAG-run-RUN_ID.exit.json``, owner-only), for `remembered_end` to answer later
        checks once what showed it is removed (a container, a Job): checks from several
        processes then agree, whoever asked first. Best effort: a read-only home keeps nothing."""
        path = self._end_path(run, tag)
        if path is None:
            return
        try:
            make_private_dirs(path.parent)  # owner-only: the message carries the run's output
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            with open(open_private(tmp, os.O_WRONLY | os.O_TRUNC), "w") as f:
                f.write(json.dumps({"status": health.status.value, "message": health.message,
                                    "died_at": getattr(health, "died_at", None)}))
            tmp.replace(path)
        except OSError:
            pass

    def record_forced_end(self, run: RunRecord, how: str) -> bool:
        """End a STARTED ``run`` FAILURE now, from `terminate` with ``force``, before you stop
        its worker; True if this ended it. For platforms that cannot kill a worker without
        warning (ECS StopTask and a pod's deletion send SIGTERM first): the warned worker
        would cancel its steps and end the run CANCELED, while a forced terminate means
        the worker got no chance. The engine ends a run only from an unfinished status, so
        the worker's own end, written later, is fenced out; its steps' endings are still
        stored. ``how`` says what you do to the worker (it goes into the reason).

        A run being canceled (CANCELING: a cancel escalating to force still ends CANCELED),
        one not yet started (whoever forces it records why, e.g. a start timeout) and a
        finished one are left alone. Added in API version 1.
        """
        if self.instance_home is None:
            return False
        from .instance import Instance

        storage = Instance(self.instance_home).storage
        if not storage.set_run_status(run.run_id, RunStatus.FAILURE, only_from=[RunStatus.STARTED]):
            return False
        reason = f"run worker terminated by force: {how}"
        info = FailureInfo(kind=FailureKind.WORKER_LOST, message=reason)
        storage.store_events([Event(type=EventType.RUN_FAILURE, run_id=run.run_id, message=reason,
                                    data={"failure": info.to_dict(), "forced": True})])
        return True

    def remembered_end(self, run: RunRecord, *, tag: str) -> WorkerHealth | None:
        """What `remember_end` kept for ``run`` (None: nothing)."""
        path = self._end_path(run, tag)
        try:
            data = json.loads(path.read_text()) if path is not None else None
        except (OSError, ValueError):
            return None
        if not data:
            return None
        return WorkerHealth(status=data["status"], message=data["message"], died_at=data.get("died_at"))

    def _end_path(self, run: RunRecord, tag: str) -> Any:
        if self.instance_home is None:
            return None
        from pathlib import Path

        return Path(self.instance_home) / "logs" / f"{tag}-run-{run.run_id}.exit.json"

    def fork_worker(self, run: RunRecord, *, output: int) -> ForkedWorker | None:
        """Start ``run``'s worker on this machine as a fork of this process, in a new session
        (its own process group), with ``output`` (a file descriptor) as its stdout and stderr,
        stdin from /dev/null and `worker_env` as its environment; None when this process
        does not allow it (`worker_fork` unset, or more than one thread): then start
        `worker_command` instead.

        A fork skips the new interpreter's start-up and imports (runyard, every plugin, the
        job), most of a short run's launch time. The worker does what ``runyard api
        execute-run`` does and then leaves with ``os._exit``: nothing of this process's
        state (atexit handlers, buffered output) runs twice.
        """
        prepare = worker_fork.get()
        if prepare is None or not hasattr(os, "fork") or not single_threaded():
            return None
        env = self.worker_env()
        prepare()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        pid = os.fork()
        if pid:
            return ForkedWorker(pid)
        code = 70  # EX_SOFTWARE: the worker's own set-up failed (said on its stderr)
        try:
            os.setsid()
            stdin = os.open(os.devnull, os.O_RDONLY)
            os.dup2(stdin, 0)
            os.dup2(output, 1)
            os.dup2(output, 2)
            os.close(stdin)
            os.environ.clear()
            os.environ.update(env)
            worker_fork.set(None)
            from .cli_worker import run_worker

            code = run_worker(run.run_id)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:  # noqa: S110 - leaving whatever happens
                    pass
            os._exit(code)

    @staticmethod
    def worker_command(run: RunRecord | str, *, python: str | None = None) -> list[str]:
        """The command that runs a run worker for ``run`` (a record or a run id).

        ``[python, "-m", "runyard", "api", "execute-run", RUN_ID]`` with ``python`` this
        process's interpreter by default, so the command works whether or not the
        environment's ``bin`` directory is on PATH. Pass ``python`` (``"python3"``, a path)
        for a worker in another environment: a container image, a remote host.
        """
        run_id = run if isinstance(run, str) else run.run_id
        return [python or sys.executable, "-m", "runyard", "api", "execute-run", run_id]

    def worker_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a worker on this machine: ``base`` (default: this process's
        environment) with ``RUNYARD_HOME`` set to the instance's home."""
        env = dict(os.environ if base is None else base)
        env.pop(LAUNCH_ID_ENV, None)  # inherited from a run worker above: not this launch's
        if self.instance_home is not None:
            env["RUNYARD_HOME"] = self.instance_home
        launch = current_launch.get()
        if launch is not None:
            env[LAUNCH_ID_ENV] = launch
        return env


def execute_run(run_id: str, instance_home: str | os.PathLike[str] | None = None) -> RunRecord:
    """Run the run worker of ``run_id`` in this process and return the finished run record.

    The same as ``python -m runyard api execute-run RUN_ID``, for a launcher whose worker is
    a Python process of its own (a wrapper that also reports or cleans up, a task on a
    worker pool): the instance is ``instance_home`` (default: ``$RUNYARD_HOME``), the run
    must be QUEUED or STARTING (what `RunLauncher.launch` is given), and the run's job is
    loaded from its code pointer. Returns once the run has ended; a failing run is not an
    exception (read ``record.status``; exit 0 for SUCCESS and 1 otherwise to behave like the
    command). Raises `RunyardError` when the run cannot be executed here (unknown, already
    started) and what loading the job raised after recording the run's failure.

    Call it from the main thread: it handles SIGTERM and SIGINT, which cancel the run, for
    as long as it runs (the previous handlers are restored afterwards).
    """
    import threading

    from .instance import Instance
    from .runs import execute_run as _execute_run

    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("runyard.plugin.execute_run must be called from the main thread (it handles SIGTERM)")
    instance = Instance(instance_home) if instance_home is not None else Instance.from_env()
    try:
        return _execute_run(instance, run_id)
    finally:
        instance.storage.close()


@attrs.frozen(kw_only=True)
class StepRequest:
    """Everything a step worker needs to run one attempt of one step: plain JSON data.

    The same payload travels to a thread, a process, a container, a pod, a Celery task
    or a Dask task; nothing in it is pickled.
    """

    run_id: str
    step_key: str
    attempt: int
    attempt_id: str
    job_name: str
    code_pointer: CodePointer
    output_store: str
    inputs: Mapping[str, str | Sequence[str]]  # input name -> output ref(s) in the store
    run_config: Mapping[str, Any] = attrs.field(factory=dict)
    timeout: float | None = None
    tags: Mapping[str, str] = attrs.field(factory=dict)
    step_selection: Sequence[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self, recurse=False)
        d["code_pointer"] = self.code_pointer.to_dict()
        d["inputs"] = {k: v if isinstance(v, str) else list(v) for k, v in self.inputs.items()}
        d["run_config"] = dict(self.run_config)
        d["tags"] = dict(self.tags)
        d["step_selection"] = list(self.step_selection) if self.step_selection is not None else None
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepRequest:
        d = dict(d)
        d["code_pointer"] = CodePointer.from_dict(d["code_pointer"])
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> StepRequest:
        return cls.from_dict(json.loads(s))


@attrs.frozen
class StepUpdate:
    """What `StepHandler.poll` reports: new events, and whether the attempt is over.

    A step worker ends its events with STEP_SUCCESS or STEP_FAILURE. When the attempt
    ended without one (the process was killed, the container vanished), the handler says
    why with ``failure``; the engine turns it into the STEP_FAILURE event.

    ``started``: the attempt has left its queue and runs (for handlers whose capabilities
    say ``reports_start``; reporting it more than once is harmless).
    """

    events: Sequence[Event] = ()
    done: bool = False
    failure: FailureInfo | None = None
    started: bool = False

    @classmethod
    def running(cls, events: Sequence[Event] = (), *, started: bool = False) -> StepUpdate:
        return cls(events, False, None, started)

    @classmethod
    def finished(cls, events: Sequence[Event] = ()) -> StepUpdate:
        return cls(events, True, None)

    @classmethod
    def crashed(cls, failure: FailureInfo, events: Sequence[Event] = ()) -> StepUpdate:
        return cls(events, True, failure)


class StreamedAttempt:
    """What a handler has read of one attempt whose step worker runs elsewhere (a
    container, a pod, a remote task) and streams its events back, and what `poll` reports
    of it, in the order the engine needs. Subclass it for your attempt's state.

    Reader threads, holding ``lock``, call `take` with each of the worker's events and
    `add_stderr` with text its process wrote outside events (its own stderr: start-up
    errors, warnings). The attempt's own thread, holding ``lock``, sets ``done`` once it is
    over and, when the worker reported no ending, ``failure``. `poll` returns `update()`.

    `update` guarantees this order, whatever order the streams were read in:

    1. the worker's events as they came, its STEP_START first of all;
    2. stderr, as one STEP_STDERR event per poll, held until the STEP_START has been
       taken (or the attempt is over): stderr comes on another stream than the events
       and may be read first, yet a step's events must begin with its start;
    3. at the end, the worker's own ending (STEP_SUCCESS or STEP_FAILURE, held back by
       `take` until the attempt is over, so nothing follows it), or else ``failure``.

    Added in API version 1.
    """

    def __init__(self, request: StepRequest) -> None:
        import threading

        self.request = request
        self.lock = threading.Lock()
        self.pending: list[Event] = []
        self.stderr: list[str] = []
        self.ending: Event | None = None
        self.started_step = False  # the worker's STEP_START has been taken
        self.done = False
        self.failure: FailureInfo | None = None
        self.reported = False  # `update` has said the attempt is over

    def take(self, event: Event) -> None:
        """One of the worker's events (under ``lock``); the first ending is kept for the end."""
        if event.type in STEP_TERMINAL:
            if self.ending is None:
                self.ending = event
            return
        if event.type is EventType.STEP_START:
            self.started_step = True
        self.pending.append(event)

    def add_stderr(self, text: str) -> None:
        """Text the worker's process wrote outside its events (under ``lock``)."""
        if text:
            self.stderr.append(text)

    def event(self, type_: EventType, data: dict[str, Any], message: str = "") -> Event:
        """An event of this attempt (for what the handler itself has to say)."""
        r = self.request
        return Event(type=type_, run_id=r.run_id, step_key=r.step_key, attempt=r.attempt, attempt_id=r.attempt_id,
                     data=data, message=message)

    def update(self, *, started: bool = False, lost: Callable[[], FailureInfo] | None = None) -> StepUpdate:
        """What `StepHandler.poll` returns now (takes ``lock``). ``started``: passed on to
        `StepUpdate.running`. ``lost()``: the failure when the attempt is over with neither
        an ending nor ``failure`` (called under ``lock``; default: WORKER_LOST)."""
        with self.lock:
            if self.reported:
                return StepUpdate.finished()
            events, self.pending = self.pending, []
            if self.stderr and (self.started_step or self.done):
                text, self.stderr = "".join(self.stderr), []
                events.append(self.event(EventType.STEP_STDERR, {"text": text}))
            if not self.done:
                return StepUpdate.running(events, started=started)
            self.reported = True
            if self.ending is not None:
                return StepUpdate.finished([*events, self.ending])
            failure = self.failure or (lost() if lost is not None else FailureInfo(
                kind=FailureKind.WORKER_LOST, message=f"step '{self.request.step_key}' ended without an outcome"))
            return StepUpdate.crashed(failure, events)


@attrs.frozen(kw_only=True)
class HandlerContext:
    """What a step handler is told about the run it serves.

    ``max_concurrent`` is the run's resolved limit, the same number as the handler's
    ``config.max_concurrent`` (the engine never has more steps running than that).
    ``config_source`` and ``config_path`` say where the executor's settings were written
    (a file or another layer, and the key path of the section there: ``executor.dask``
    in runyard.yaml, ``execution.dask`` in a run config); ``setting_sources`` maps each
    setting a layer gave to ``source: key.path``. Use `where` in error messages.
    """

    run_id: str
    instance_home: str | None
    output_store: str
    max_concurrent: int
    config_source: str = ""
    config_path: str = ""
    setting_sources: Mapping[str, str] = attrs.field(factory=dict)

    def where(self, key: str | None = None) -> str:
        """``source: key.path`` of the executor's section, or of its setting ``key``
        (``/srv/runyard/runyard.yaml: executor.dask.queue_timeout``)."""
        if key is not None and key in self.setting_sources:
            return self.setting_sources[key]
        path = self.config_path if key is None else f"{self.config_path}.{key}" if self.config_path else key
        return f"{self.config_source}: {path}" if self.config_source else path


class StepHandler:
    """Starts, polls and stops the steps of one run on some compute. Subclass it.

    The engine calls `setup` once, then `launch`/`poll`/`terminate` for every attempt,
    and `teardown` once at the end, even after a failure. All calls come from the
    engine's thread except `terminate`, which a cancellation may call from another thread.
    """

    # Not used: a run's capabilities are resolved once, at launch, from the spec
    # (`ExecutorSpec.capabilities` / `capabilities_for`). A handler class that sets this to
    # anything else is reported when a run uses it.
    capabilities: ClassVar[Capabilities | None] = None

    def __init__(self, config: ExecutorConfig, context: HandlerContext) -> None:
        self.config = config
        self.context = context

    def setup(self) -> None:
        """Acquire what the run needs (a pool, a client, a cluster)."""

    def report(self, events: Sequence[Event]) -> None:
        """Pass events of a running attempt to the engine now, from any thread.

        For STEP_START, STEP_LOG, STEP_STDOUT and STEP_STDERR only (`STEP_LIVE`; others
        raise ValueError): the engine writes them to storage with its next batch, within about
        `runyard.engine.FLUSH_EVERY` seconds, while the step still runs, so that
        ``runyard run logs --follow`` shows them and a worker that dies mid-step leaves a
        record that the step started. Report each event once: an event reported here is
        not returned from `poll` as well (a STEP_START returned again is ignored; other
        events would be recorded twice). STEP_OUTPUT and the ending still come from
        `poll`. Events of an attempt that has ended are dropped, except its logs and
        output after a stop (a cancel, a timeout): what it wrote up to then is kept.

        Call it from a thread that reads the step's event stream (a pipe, a container's
        output, a message subscription), or from `poll` when that blocks for the whole
        step. Added in API 1 (issue 14); handlers that never call it still work, their
        events reaching storage when `poll` returns them.
        """
        reporter = self.__dict__.get("_runyard_reporter")
        if reporter is None:
            raise RuntimeError(
                f"{type(self).__name__}.report was called before an engine connected it (connect_reporter)"
            )
        reporter(events)

    def connect_reporter(self, reporter: Callable[[Sequence[Event]], None]) -> None:
        """Where `report` sends events: the engine calls this once, before `setup`. A test
        driving a handler without an engine passes its own collector."""
        self.__dict__["_runyard_reporter"] = reporter

    @property
    def reports_connected(self) -> bool:
        """Whether `report` has somewhere to send events (an engine or a test connected one)."""
        return "_runyard_reporter" in self.__dict__

    def launch(self, request: StepRequest) -> Any:
        """Start one attempt of a step and return a handle for it. Must not block on the step."""
        raise NotImplementedError

    def poll(self, handle: Any) -> StepUpdate:
        """Return events reported since the last poll and whether the attempt is over."""
        raise NotImplementedError

    def terminate(self, handle: Any, kind: FailureKind) -> None:
        """Stop the attempt (``kind`` says why: TIMEOUT or CANCELED). Must be idempotent."""
        raise NotImplementedError(f"{type(self).__name__} cannot terminate steps")

    def wait(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds or until a running step may have changed.

        The default sleeps; handlers with a completion signal (a queue, a future) should
        wake early so that short steps do not wait out a poll interval.
        """
        import time

        time.sleep(timeout)

    def teardown(self) -> None:
        """Release what `setup` acquired."""


def execute_step(
    request: StepRequest, *, capture_output: bool = True, on_event: Callable[[Event], None] | None = None
) -> list[Event]:
    """Run one step attempt in this process and return its events (the step-worker protocol).

    Loads the job from the request's code pointer (once per process: see `preload_job`),
    reads inputs from the output store, calls the step, writes the output, and reports
    STEP_START, captured output, STEP_OUTPUT and STEP_SUCCESS or STEP_FAILURE. Never
    raises for a failing step.

    ``capture_output=False`` leaves ``sys.stdout``/``sys.stderr`` alone and reports no
    output events: for executors that capture the step process's file descriptors
    themselves (a process or container per step), where Python-level capture would miss
    what C extensions and subprocesses write.

    ``on_event``, when given, is called with each event as soon as it is emitted (from the
    thread running the step), so a worker can stream events while the step runs.
    """
    from .worker import execute_step as _execute

    return _execute(request, capture_output=capture_output, on_event=on_event)


def preload_job(code_pointer: CodePointer, job_name: str, *, reload: bool = False) -> JobDefinition:
    """Import a job now, so that `execute_step` in this process (or in processes forked
    from it later) finds it loaded, and return it. Raises what loading the job raises.

    Long-lived step workers (a fork server, a Dask or Celery worker) call it to pay a job's
    import once rather than on the first step of every run. ``reload=True`` loads it from
    its code pointer even if this process has it already: a process forked from the one
    that defined the job learns now whether other processes can load it.
    """
    from .worker import load_job_cached

    return load_job_cached(code_pointer, job_name, reload=reload)


def preload_step_worker() -> None:
    """Import now everything `execute_step` needs (the step worker, the job loader, the
    output stores), so that processes forked from this one later (a fork server's step
    processes) start with it loaded rather than importing it in every step."""
    from . import loader, outputs, worker  # noqa: F401


# Run storages shipped with runyard, for plugins that wrap or register them. Loaded on
# first use: the PostgreSQL one imports psycopg (``pip install "runyard[postgres]"``).
_LAZY_STORAGES = {"SqliteRunStorage": ".storage.sqlite", "PostgresRunStorage": ".storage.postgres"}


# The rest of the API that only running steps and checking step requests use, imported
# on first use too: every plugin module imports this one, so `runyard --help` and `runyard
# plugin list` would otherwise pay for the step worker (logging, sockets, output stores)
# and request signing (hashlib, hmac, secrets).
_LAZY = {
    **{name: ".trust" for name in (
        "SIGNING_KEY_ENV", "STEP_WORKER_ENV", "RequestRefused", "WorkerPolicy", "admit_or_refuse",
        "configured_signing_key", "execute_trusted_step", "grant_for_run", "load_worker_policy",
        "missing_key_error", "new_signing_key", "policy_from_grant", "refusal_event", "sign_request",
        "signing_key_at", "verify_request",
    )},
    **{name: ".worker" for name in ("StepContext", "StepInterrupted", "StepTimedOut")},
    **{name: ".storage_location" for name in ("StorageLocation", "locate_storage")},
}


def __getattr__(name: str) -> Any:
    import importlib

    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __package__), name)
        globals()[name] = value  # found directly from now on
        return value
    module = _LAZY_STORAGES.get(name)
    if module is None:
        raise AttributeError(f"module 'runyard.plugin' has no attribute '{name}'")
    # Not cached here: sys.modules caches the module, and a driver that cannot load keeps
    # raising ImportError rather than handing out a class imported before.
    return getattr(importlib.import_module(module, __package__), name)


__all__ = [
    "API_VERSION",
    "Capabilities",
    "CodePointer",
    "ConfigError",
    "EnvVar",
    "Event",
    "EventType",
    "ExecutorConfig",
    "ExecutorSpec",
    "FailureInfo",
    "FailureKind",
    "ForkedWorker",
    "GroupStop",
    "HandlerContext",
    "PluginError",
    "PluginSpec",
    "PostgresRunStorage",
    "RESOURCES_TAG",
    "RunLauncher",
    "RunLauncherConfig",
    "RunLauncherSpec",
    "RunRecord",
    "RunFilter",
    "RunStatus",
    "RunStorage",
    "STEP_LIVE",
    "STEP_TERMINAL",
    "SqliteRunStorage",
    "StepContext",
    "StepHandler",
    "StepInterrupted",
    "StepRequest",
    "StepTimedOut",
    "StepUpdate",
    "StreamedAttempt",
    "StorageLocation",
    "StorageSpec",
    "StoredEvent",
    "TagConcurrencyLimit",
    "WorkerHealth",
    "above",
    "check_env_item",
    "check_env_items",
    "environment_from",
    "structure_config",
    "at_least",
    "describe_exit",
    "error_class_name",
    "WorkerStatus",
    "execute_run",
    "execute_step",
    "failure_from_exception",
    "hookimpl",
    "interrupt_thread",
    "kill_processes",
    "locate_storage",
    "make_private_dirs",
    "one_of",
    "open_private",
    "parse_resources_tag",
    "preload_job",
    "preload_step_worker",
    "reap_group_leader",
    "resolve",
    "signal_name",
    "signal_process_group",
    "single_threaded",
    "split_wait_status",
    "stop_process_group",
    # Trust: signed step requests and workers' own allowances (runyard.trust, docs/security.md).
    "RequestRefused",
    "SIGNING_KEY_ENV",
    "STEP_WORKER_ENV",
    "WorkerPolicy",
    "admit_or_refuse",
    "configured_signing_key",
    "execute_trusted_step",
    "grant_for_run",
    "load_worker_policy",
    "missing_key_error",
    "new_signing_key",
    "policy_from_grant",
    "refusal_event",
    "sign_request",
    "signing_key_at",
    "verify_request",
    "worker_fork",
]
