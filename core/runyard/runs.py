"""Runs as first-class records: create, launch, execute in a run worker, monitor, cancel,
re-execute. The CLI's ``job launch`` and ``run …`` commands are thin wrappers over this."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from .config import Selection, structure
from .definitions import CodePointer, Definitions, JobDefinition
from .errors import ConfigError, RunyardError
from .events import Event, EventType, FailureInfo, FailureKind
from .instance import Instance, plugin_spec
from .plugin import RunLauncher, WorkerHealth
from .registry import load_object
from .resolution import DEFAULT_LAUNCHER, ResolvedPlugin, ResolvedRun, resolve_launcher  # noqa: F401 (re-exported)
from .storage import RunRecord, RunStatus

UNFINISHED = (RunStatus.QUEUED, RunStatus.STARTING, RunStatus.STARTED, RunStatus.CANCELING)
ACTIVE = (RunStatus.STARTING, RunStatus.STARTED, RunStatus.CANCELING)
STARTING_GRACE = 30.0  # seconds a launched worker may take to mark its run STARTED


LAUNCH_RECORD_TIMEOUT = 120.0  # seconds a fenced worker waits for its launch to be recorded


class RunNotFound(RunyardError):
    pass


class SupersededLaunch(RunyardError):
    """A worker of a fenced launch that is not (or no longer) the run's recorded launch."""


def _own_launch_id(run_id: str) -> str | None:
    """The launch id `runyard daemon` gave this worker (``RUNYARD_LAUNCH_ID``), if it is for
    ``run_id``; removed from the environment so that nothing this worker starts inherits it."""
    import os

    from .plugin import LAUNCH_ID_ENV

    value = os.environ.pop(LAUNCH_ID_ENV, None)
    if not value:
        return None
    rid, _, lid = value.partition(":")
    return lid if rid == run_id and lid else None


class AmbiguousRunId(RunyardError):
    """A run-id prefix that names no single run: empty, or shared by several runs."""


def get_run(instance: Instance, run_id: str) -> RunRecord:
    """The run whose id is ``run_id`` or, failing that, the one run whose id starts with it.

    An empty prefix or one that several runs share is refused (never "the first match"):
    a command acting on the wrong run (``run delete``) cannot be undone.
    """
    prefix = run_id.strip()
    if not prefix:
        raise AmbiguousRunId("the run id is empty; give a run id or a unique prefix (`runyard run list` shows them)")
    run = instance.storage.get_run(prefix)
    if run is not None:
        return run
    # Accept a unique prefix, as `run list` shows shortened ids.
    matches = [r for r in instance.storage.list_runs(limit=-1) if r.run_id.startswith(prefix)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        shown = "\n".join(f"  {r.run_id}  {r.job_name}  {r.status.value}" for r in matches[:20])
        more = f"\n  … and {len(matches) - 20} more" if len(matches) > 20 else ""
        raise AmbiguousRunId(
            f"run id prefix '{prefix}' matches {len(matches)} runs; give more characters of the one you mean:\n"
            f"{shown}{more}"
        )
    raise RunNotFound(f"no run '{prefix}' in {instance.home}; `runyard run list` shows the runs")


def _event(run: RunRecord | str, type: EventType, message: str = "", **data: Any) -> Event:
    run_id = run if isinstance(run, str) else run.run_id
    return Event(type=type, run_id=run_id, message=message, data=data)


# -- creating and launching ------------------------------------------------------------


def create_run(
    instance: Instance,
    job: JobDefinition,
    *,
    pointer: CodePointer,
    definitions: Definitions | None = None,
    run_config: Mapping[str, Any] | None = None,
    executor: str | None = None,
    tags: Mapping[str, str] | None = None,
    step_selection: Iterable[str] | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
) -> RunRecord:
    """Validate everything a run needs and record it QUEUED. Nothing is started.

    ``run_id``: a chosen id (the daemon gives a retry an id derived from its parent's, so
    that a retry is created once whatever happens to the daemon).

    The run is resolved now (executor, settings, concurrency, capabilities, run launcher)
    and the resolution stored with it: the worker executes what was validated here,
    whatever its own environment's runyard.yaml says.
    """
    from .execution import new_run_record, validate_run

    v = validate_run(
        job, instance=instance, executor=executor, definitions=definitions, run_config=run_config,
        step_selection=step_selection, parent_run_id=parent_run_id, launcher=True,
    )
    run = new_run_record(job, pointer, v.run_config, v.resolution, tags, parent_run_id, v.step_selection)
    if run_id is not None:
        run = attrs.evolve(run, run_id=run_id)
    from .daemon.settings import check_tags

    check_tags(run.tags, f"job '{job.name}'")
    instance.storage.add_run(run)
    # The plan's graph goes with the run: readers (runyard ui) draw it without the job's code.
    instance.storage.store_events(
        [_event(run, EventType.RUN_QUEUED, f"run of job '{job.name}' queued", plan=v.plan.graph())]
    )
    return run


def stored_resolution(run: RunRecord) -> ResolvedRun | None:
    """The resolution stored with ``run`` (None for a run recorded before runs kept one)."""
    if not run.resolution:
        return None
    try:
        return ResolvedRun.from_dict(run.resolution)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"run {run.run_id}: its stored resolution cannot be read: {type(e).__name__}: {e}") from None


def launcher_selection(instance: Instance) -> tuple[Selection, Any]:
    """The instance's run launcher section and its structured settings."""
    resolved = resolve_launcher(instance)
    return resolved.selection(), _launcher_config(instance, resolved)


def _launcher_config(instance: Instance, resolved: ResolvedPlugin) -> Any:
    sel = resolved.selection()
    spec = plugin_spec(instance.registry, "run_launcher", sel)
    return structure(sel.config, spec.config, source=sel.source, path=sel.path)


def get_launcher(
    instance: Instance, name: str | None = None, *, run: RunRecord | None = None
) -> tuple[str, RunLauncher]:
    """The run launcher of ``run`` as it was resolved when the run was created (else the
    instance's), constructed. ``name``: the launcher that started it (from RUN_LAUNCHED)."""
    from . import cli_worker

    if name == cli_worker.LAUNCHER:
        # The run executes in a `runyard job execute` process, which recorded itself as
        # its worker: no launcher started it, but it is checked and stopped like one.
        return name, cli_worker.ExecutingProcess(None, str(instance.home) if instance.home else None)
    stored = stored_resolution(run) if run is not None else None
    resolved = stored.run_launcher if stored is not None else None
    if resolved is None or (name is not None and name != resolved.name):
        resolved = resolve_launcher(instance)
        if name is not None and name != resolved.name:
            # Launched with another launcher than the instance now names: its defaults.
            resolved = ResolvedPlugin(name=name, source="run record", config_source="run record",
                                      path=f"run_launcher.{name}", config={})
    config = _launcher_config(instance, resolved)
    spec = plugin_spec(instance.registry, "run_launcher", resolved.selection())
    cls = load_object(spec.launcher, what=f"run launcher '{resolved.name}'")
    return resolved.name, cls(config, str(instance.home) if instance.home else None)


def launch_run(
    instance: Instance, run: RunRecord, *, launch_id: str | None = None, by: str | None = None,
    relaunch: bool = False,
) -> RunRecord:
    """Hand a QUEUED run to the instance's run launcher.

    ``launch_id`` (given by `runyard daemon`, with ``by`` naming the daemon) fences the
    launch: the worker gets it in its environment and executes the run only once this
    launch is recorded (RUN_LAUNCHED) and is still the run's latest, so a launch can be
    redone safely (``relaunch``: the run is STARTING, left so by a daemon that died between
    recording RUN_STARTING and RUN_LAUNCHED) without the run ever executing twice.
    """
    from .plugin import current_launch

    if instance.is_ephemeral:
        raise RunyardError("an ephemeral instance cannot launch runs: its storage lives in this process only")
    storage = instance.storage
    name, launcher = get_launcher(instance, run=run)
    if relaunch:
        if launch_id is None:
            raise RunyardError("a relaunch needs a launch id: only a fenced launch can be redone safely")
        current = storage.get_run(run.run_id)
        if current is None or current.status is not RunStatus.STARTING:
            raise RunyardError(f"run {run.run_id} is not STARTING; it cannot be relaunched")
    elif not storage.set_run_status(run.run_id, RunStatus.STARTING, only_from=[RunStatus.QUEUED]):
        raise RunyardError(f"run {run.run_id} is not QUEUED; it cannot be launched again")
    fence = {"launch_id": launch_id, "daemon": by} if launch_id else {}
    what = "relaunching" if relaunch else "launching"
    storage.store_events([_event(run, EventType.RUN_STARTING, f"{what} with run launcher '{name}'", **fence)])
    token = current_launch.set(f"{run.run_id}:{launch_id}" if launch_id else None)
    try:
        worker = launcher.launch(run)
    except Exception as e:
        fail_run(
            instance,
            run.run_id,
            f"run launcher '{name}' could not start the run worker: {e}",
            kind=FailureKind.NOT_STARTED,
        )
        raise
    finally:
        current_launch.reset(token)
    storage.store_events(
        [_event(run, EventType.RUN_LAUNCHED, f"run worker started by '{name}'", launcher=name, worker=worker,
                **fence)]
    )
    return storage.get_run(run.run_id) or run


def launch_state(instance: Instance, run_id: str) -> tuple[dict[str, Any] | None, bool]:
    """The data of the run's latest RUN_STARTING event (None if it has none) and whether
    a RUN_LAUNCHED event records that launch (for a fenced launch: its launch id)."""
    events = instance.storage.get_events(run_id, types=[EventType.RUN_STARTING, EventType.RUN_LAUNCHED])
    starting = [e.event for e in events if e.event.type is EventType.RUN_STARTING]
    if not starting:
        return None, any(e.event.type is EventType.RUN_LAUNCHED for e in events)
    latest = dict(starting[-1].data)
    lid = latest.get("launch_id")
    after = False
    for e in events:
        ev = e.event
        if ev.type is EventType.RUN_STARTING:
            after = ev is starting[-1]
        elif after and (lid is None or ev.data.get("launch_id") == lid):
            return latest, True
    return latest, False


def _wait_for_own_launch(instance: Instance, run: RunRecord, launch_id: str, timeout: float) -> str | None:
    """In a worker started by a fenced launch: wait until the launch is recorded; return why
    this worker must not execute the run (None: go ahead)."""
    deadline = time.monotonic() + timeout
    while True:
        current = instance.storage.get_run(run.run_id)
        if current is None or current.status is not RunStatus.STARTING:
            return f"the run is {current.status.value if current else 'gone'}"
        latest, launched = launch_state(instance, run.run_id)
        if latest is None or latest.get("launch_id") != launch_id:
            return "a later launch of the run superseded this worker's launch"
        if launched:
            return None
        if time.monotonic() > deadline:
            return f"the launch that started this worker was not recorded within {timeout:g}s (its daemon died?)"
        time.sleep(0.02)


def fail_run(
    instance: Instance, run_id: str, reason: str, *, kind: FailureKind = FailureKind.WORKER_LOST,
    died_at: float | None = None, **data: Any,
) -> bool:
    """End an unfinished run FAILURE with ``reason``; False if it had already ended.

    ``died_at``: when the run really ended (a dead worker's time of death), recorded as its
    ``ended_at`` instead of the time this was noticed. ``data`` goes into the event.
    """
    info = FailureInfo(kind=kind, message=reason)
    if died_at is not None:
        data["died_at"] = died_at
    # The status and its RUN_FAILURE event in one change: no reader sees FAILURE without
    # the reason, and a crash cannot lose it.
    event = _event(run_id, EventType.RUN_FAILURE, reason, failure=info.to_dict(), **data)
    return instance.storage.transition_run(run_id, RunStatus.FAILURE, [event], only_from=UNFINISHED, ended_at=died_at)


def close_lost_steps(instance: Instance, run_id: str, reason: str) -> list[str]:
    """End every step attempt the storage still shows running, for a run whose worker is
    gone: nobody else will ever report how they ended. Returns their step keys."""
    running: dict[str, Event] = {}
    for stored in instance.storage.get_events(
        run_id, types=[EventType.STEP_START, EventType.STEP_SUCCESS, EventType.STEP_FAILURE]
    ):
        ev = stored.event
        if ev.step_key is None:
            continue
        if ev.type is EventType.STEP_START:
            running[ev.step_key] = ev
        else:
            running.pop(ev.step_key, None)
    info = FailureInfo(kind=FailureKind.WORKER_LOST, message=reason)
    events = [
        Event(type=EventType.STEP_FAILURE, run_id=run_id, step_key=key, attempt=ev.attempt,
              attempt_id=ev.attempt_id, message=reason, data={"failure": info.to_dict()})
        for key, ev in running.items()
    ]
    instance.storage.store_events(events)
    return list(running)


# -- the run worker ------------------------------------------------------------------


def execute_run(instance: Instance, run_id: str) -> RunRecord:
    """Body of the run worker (``runyard api execute-run``): run the stored run here.

    SIGTERM or SIGINT cancel the run: running steps are stopped, the rest skipped, and the
    run ends CANCELED.
    """
    from .engine import Cancellation
    from .execution import execute_job
    from .loader import load_job

    storage = instance.storage
    run = get_run(instance, run_id)
    if run.status not in (RunStatus.QUEUED, RunStatus.STARTING):
        raise RunyardError(f"run {run.run_id} is {run.status.value}; only a queued or starting run can be executed")
    launch_id = _own_launch_id(run.run_id)
    if launch_id is not None:
        why = _wait_for_own_launch(instance, run, launch_id, LAUNCH_RECORD_TIMEOUT)
        if why is not None:
            # Leave the run alone: whoever launched it later (or the daemon) owns it now.
            raise SupersededLaunch(f"run {run.run_id}: this worker does not execute it: {why}")
    cancellation = Cancellation()

    def on_signal(signum: int, frame: Any) -> None:
        # No lock taken here (see Cancellation.cancel_from_signal): the engine's threads cancel.
        cancellation.cancel_from_signal()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            pointer = CodePointer.from_dict(run.code_pointer or {})
            job, loc = load_job(pointer, run.job_name)
        except Exception as e:
            fail_run(instance, run.run_id, f"could not load job '{run.job_name}': {e}", kind=FailureKind.NOT_STARTED)
            raise
        try:
            resolution = stored_resolution(run)
            execute_job(
                job,
                instance=instance,
                # Only for a run recorded before runs kept their resolution: resolve it here.
                executor=run.executor if resolution is None else None,
                definitions=loc.definitions,
                run_config=run.run_config,
                step_selection=run.step_selection,
                parent_run_id=run.parent_run_id,
                cancellation=cancellation,
                run=run,
                resolution=resolution,
            )
        except Exception as e:
            # Whatever stopped the run before or while it ran ends it now, with the reason,
            # rather than leaving it to look like a lost worker (a no-op once it has ended).
            fail_run(instance, run.run_id, f"run worker: {e}", kind=FailureKind.NOT_STARTED)
            raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return storage.get_run(run.run_id) or run


# -- monitoring, cancel, re-execution ------------------------------------------------------


def worker_info(instance: Instance, run_id: str) -> tuple[str | None, dict[str, Any] | None]:
    launched = instance.storage.get_events(run_id, types=[EventType.RUN_LAUNCHED])
    if not launched:
        return None, None
    data = launched[-1].event.data
    return data.get("launcher"), data.get("worker")


def check_run(instance: Instance, run: RunRecord) -> RunRecord:
    """Notice a run whose worker died: mark it FAILURE with the reason. Cheap for finished runs."""
    if run.status not in ACTIVE:
        return run
    name, worker = worker_info(instance, run.run_id)
    if worker is None:
        if run.status is RunStatus.STARTING and time.time() - run.created_at > STARTING_GRACE:
            fail_run(
                instance,
                run.run_id,
                "the run was never handed to a run worker (launch did not complete)",
                kind=FailureKind.NOT_STARTED,
            )
        return instance.storage.get_run(run.run_id) or run
    _, launcher = get_launcher(instance, name, run=run)
    health: WorkerHealth = launcher.check_health(run, worker)
    if health.is_dead:
        latest = instance.storage.get_run(run.run_id)
        if latest is not None and latest.status in ACTIVE:  # it may have just finished
            if latest.status is RunStatus.CANCELING:
                instance.storage.transition_run(run.run_id, RunStatus.CANCELED,
                                                [_event(run, EventType.RUN_CANCELED, "run canceled (worker stopped)")],
                                                only_from=[RunStatus.CANCELING])
            else:
                fail_run(instance, run.run_id, f"run worker died before the run finished: {health.message}")
    return instance.storage.get_run(run.run_id) or run


def cancel_run(instance: Instance, run_id: str, *, grace: float = 10.0) -> RunRecord:
    """Cancel a run: stop its running steps, skip the rest, end it CANCELED.

    The worker is asked to stop (it cancels its steps cleanly); after ``grace`` seconds it
    and everything it started are killed. No process of the run survives.
    """
    storage = instance.storage
    run = get_run(instance, run_id)
    if run.status is RunStatus.QUEUED:
        storage.transition_run(run.run_id, RunStatus.CANCELED,
                               [_event(run, EventType.RUN_CANCELED, "run canceled before it started")],
                               only_from=[RunStatus.QUEUED])
        return storage.get_run(run.run_id) or run
    if run.status.is_finished:
        return run
    storage.transition_run(run.run_id, RunStatus.CANCELING, [_event(run, EventType.RUN_CANCELING, "cancel requested")],
                           only_from=[RunStatus.STARTING, RunStatus.STARTED])
    name, worker = worker_info(instance, run.run_id)
    if worker is None:
        storage.transition_run(run.run_id, RunStatus.CANCELED,
                               [_event(run, EventType.RUN_CANCELED, "run canceled before its worker started")],
                               only_from=[RunStatus.CANCELING])
        return storage.get_run(run.run_id) or run
    _, launcher = get_launcher(instance, name, run=run)
    launcher.terminate(run, worker)
    deadline = time.monotonic() + grace
    stopped = False
    while time.monotonic() < deadline:
        # A dead worker writes nothing more, whether or not it ended the run (SIGTERM may
        # reach it before it handles signals): stop waiting as soon as it is gone.
        health = launcher.check_health(run, worker)
        if health.is_dead:
            stopped = True
            break
        current = storage.get_run(run.run_id)
        if current is not None and current.status.is_finished and health.status == "unknown":
            break
        time.sleep(0.05)
    # Whatever is left of the run (a worker ignoring SIGTERM, a step's orphaned child) goes now.
    launcher.terminate(run, worker, force=True)
    why = "run canceled (its worker stopped)" if stopped else f"run worker killed after {grace:g}s grace"
    storage.transition_run(run.run_id, RunStatus.CANCELED, [_event(run, EventType.RUN_CANCELED, why)],
                           only_from=[RunStatus.CANCELING])
    return storage.get_run(run.run_id) or run


def step_states(instance: Instance, run_id: str) -> dict[str, str]:
    """The last known state of each step of a run, from its events."""
    states: dict[str, str] = {}
    names = {
        EventType.STEP_START: "running",
        EventType.STEP_SUCCESS: "success",
        EventType.STEP_FAILURE: "failed",
        EventType.STEP_RETRY: "retrying",
        EventType.STEP_SKIPPED: "skipped",
    }
    for stored in instance.storage.get_events(run_id, types=list(names)):
        ev = stored.event
        if ev.step_key is not None:
            states[ev.step_key] = names[ev.type]
    return states


def reexecution_selection(
    instance: Instance, parent: RunRecord, job: JobDefinition, *, from_failure: bool, steps: Iterable[str] | None
) -> list[str] | None:
    """The steps a re-execution of ``parent`` runs: those that did not succeed
    (``from_failure``), ``steps``, or else the parent's own selection."""
    if not parent.status.is_finished:
        raise RunyardError(
            f"run {parent.run_id} is {parent.status.value}: wait for it to finish (or cancel it) before re-executing it"
        )
    if from_failure:
        if parent.status is RunStatus.SUCCESS:
            raise RunyardError(f"run {parent.run_id} succeeded: nothing to re-execute from failure")
        from .plan import resolve_selection

        done = {k for k, s in step_states(instance, parent.run_id).items() if s == "success"}
        base = resolve_selection(job, parent.step_selection) if parent.step_selection is not None else set(job.nodes)
        left = [k for k in job.nodes if k in base and k not in done]
        if not left:
            raise RunyardError(f"run {parent.run_id}: every selected step succeeded; nothing to re-execute")
        return left
    if steps is not None:
        return list(steps)
    return parent.step_selection


def child_runs(instance: Instance, run_id: str) -> list[RunRecord]:
    """Runs whose parent is ``run_id`` (re-executions and the daemon's retries), oldest first."""
    from .storage import RunFilter

    # Indexed on parent_run_id in the SQL storages.
    children, _ = instance.storage.page_runs(RunFilter(parent_run_id=run_id), limit=10_000)
    return list(reversed(children))


def queue_positions(instance: Instance) -> dict[str, int]:
    """Each QUEUED run's place in the daemon's queue (1 = considered next)."""
    from .daemon.queue import queue_order
    from .daemon.settings import settings

    queued = instance.storage.list_runs(limit=-1, statuses=[RunStatus.QUEUED])
    ordered = queue_order(queued, settings(instance).coordinator)
    return {r.run_id: i for i, r in enumerate(ordered, 1)}


@attrs.frozen
class WaitResult:
    run: RunRecord
    timed_out: bool


def wait_for_run(
    instance: Instance, run_id: str, *, timeout: float | None = None, on_events: Any = None, health_every: float = 1.0,
    every: float = 0.2,
) -> WaitResult:
    """Poll until the run finishes, checking its worker's health; ``on_events`` gets new
    events. Storage is read at most ``every`` seconds apart (sooner while events come)."""
    storage = instance.storage
    run = get_run(instance, run_id)
    last_id = 0
    started = time.monotonic()
    last_health = 0.0
    delay = 0.02
    exit_fd: int | None = None  # the worker's pidfd, when it runs here: its exit wakes the wait
    watched = False
    try:
        while True:
            if not watched and run.status is not RunStatus.QUEUED:
                watched = True
                exit_fd = _worker_exit_fd(instance, run.run_id)
            new = storage.get_events(run.run_id, after_id=last_id)
            if new:
                last_id = new[-1].id
                if on_events is not None:
                    on_events([s.event for s in new])
                delay = 0.02
            run = storage.get_run(run.run_id) or run
            if run.status.is_finished:
                tail = storage.get_events(run.run_id, after_id=last_id)
                if tail and on_events is not None:
                    on_events([s.event for s in tail])
                return WaitResult(run, False)
            now = time.monotonic()
            if now - last_health >= health_every:
                last_health = now
                run = check_run(instance, run)
                if run.status.is_finished:
                    continue
            if timeout is not None and now - started > timeout:
                return WaitResult(run, True)
            if exit_fd is not None and _wait_readable(exit_fd, delay):
                # The worker has exited: what it wrote last is in storage now. Look once
                # more at once, then check its health (it may have died before ending the run).
                os.close(exit_fd)
                exit_fd = None
                last_health = 0.0
            elif exit_fd is None:
                time.sleep(delay)
            delay = min(delay * 1.5, every)
    finally:
        if exit_fd is not None:
            os.close(exit_fd)


def _worker_exit_fd(instance: Instance, run_id: str) -> int | None:
    """A pidfd of the run's worker when it is a process on this machine (its launch record
    names a pid and this host); None otherwise. Should the pid be another process's by now,
    its exit only wakes the wait early."""
    _, worker = worker_info(instance, run_id)
    if not worker or not hasattr(os, "pidfd_open") or worker.get("host") != os.uname().nodename:
        return None
    try:
        return os.pidfd_open(int(worker["pid"]))
    except (KeyError, TypeError, ValueError, OSError):
        return None


def _wait_readable(fd: int, timeout: float) -> bool:
    import select

    return bool(select.select([fd], [], [], timeout)[0])

