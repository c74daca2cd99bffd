"""What runs inside a Dask worker (or dask's local scheduler): one step attempt.

Imports no dask: the task function gets plain JSON data and returns plain JSON data, so
nothing of runyard is pickled between the engine and the workers except a reference to
`run_step` itself.

The step runs in a step thread (reused from step to step) while the Dask task's thread
waits for it. A timeout
or cancel (`interrupt`) raises `StepInterrupted` in the step's thread; if the step is
blocked in a C call (``time.sleep``, a socket read) the exception only lands when the
call returns, so the task stops waiting after ``grace`` seconds and gives its worker
thread back to Dask, leaving the step's thread to end in the background.

A request runs only if it is signed and inside the allowance of this process (see
docs/security.md): for workers of a cluster the run started itself, the allowance the engine
installed (`install_grant`, through a worker plugin); for any other worker, its own
configuration (`runyard.plugin.load_worker_policy`: RUNYARD_SIGNING_KEY, runyard.yaml's
``step_worker`` section or RUNYARD_STEP_WORKER).
"""

from __future__ import annotations

import contextvars
import json
import os
import queue
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from runyard.plugin import (
    STEP_TERMINAL,
    Event,
    EventType,
    StepInterrupted,
    StepTimedOut,
    WorkerPolicy,
    admit_or_refuse,
    execute_step,
    interrupt_thread,
    load_worker_policy,
    policy_from_grant,
    preload_job,
    refusal_event,
)

# Steps running in this process, by Dask key.
_lock = threading.Lock()
_load_lock = threading.Lock()
_running: dict[str, _Running] = {}
# Keys interrupted before their task started (a timeout racing the task's start).
_early: dict[str, str] = {}


def _take_pending_interrupt() -> None:
    """Let an interrupt sent just as the step ended land here, not in the thread's next step.

    A pending asynchronous exception is raised at the thread's next check of the eval loop,
    which a loop's backward jump makes. (Clearing it with ``PyThreadState_SetAsyncExc(id,
    NULL)`` instead would leave the interpreter-wide "async exception pending" flag set and
    slow every thread of the process down.)
    """
    try:
        for _ in range(8):
            pass
    except StepInterrupted:
        pass


class _StepThread:
    """A thread that runs steps one after another, so that a step costs a hand-over rather
    than a thread start. A thread whose step was interrupted but did not end is retired:
    it finishes that step in the background and then exits."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="runyard-step", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                job = self.jobs.get()
                if job is None:
                    return
                job()
            except StepInterrupted:
                pass  # arrived after its step ended: the handler already reported the stop


_idle: list[_StepThread] = []


class _Running:
    __slots__ = ("worker", "interrupted", "ended", "done", "wake", "events")

    def __init__(self, worker: _StepThread) -> None:
        self.worker = worker
        self.interrupted: str | None = None  # the kind, once interrupted
        self.ended = False  # the step is over: no interrupt may be sent to its thread any more
        self.done = threading.Event()  # set by the step's thread when the step is over
        self.wake = threading.Event()  # set when the step is over or interrupted
        self.events: list[Event] | None = None


def _stop_requested(stop_file: str | None) -> str | None:
    if stop_file is None or not os.path.exists(stop_file):
        return None
    try:
        with open(stop_file) as f:
            return f.read().strip() or "canceled"
    except OSError:
        return "canceled"


# Allowances installed by the engine that started this worker, by run id; this process's own.
_grants: dict[str, WorkerPolicy] = {}
_own: list[WorkerPolicy | str] = []


def install_grant(run_id: str, key: str, grant: Mapping[str, Any]) -> None:
    """Accept the requests of run ``run_id`` signed with ``key`` within ``grant`` (its code
    location and output store): called by the engine on the workers it started itself."""
    with _lock:
        _grants[run_id] = policy_from_grant(key.encode(), grant, source=f"the engine of run {run_id}")


def drop_grant(run_id: str) -> None:
    with _lock:
        _grants.pop(run_id, None)


def _policy_for(request: Any) -> WorkerPolicy | str:
    """The policy for a request, or why there is none (reported as its refusal)."""
    run_id = request.get("run_id") if isinstance(request, Mapping) else None
    with _lock:
        granted = _grants.get(run_id) if isinstance(run_id, str) else None
        if granted is not None:
            return granted
        if not _own:
            try:
                _own.append(load_worker_policy())
            except Exception as e:
                _own.append(f"this Dask worker has no valid runyard step-worker settings: {e}")
        return _own[0]


def run_local_step(grant: tuple[str, str, dict[str, Any]], request: dict[str, Any], key: str,
                   grace: float = 1.0, stop_file: str | None = None, live_file: str | None = None) -> dict[str, Any]:
    """`run_step` under dask's local schedulers: the engine's own processes, which get the
    run's allowance along with the task (``grant``: run id, key, allowance). Refused inside a
    distributed worker, where only the engine's worker plugin may install one."""
    dist_worker = sys.modules.get("distributed.worker")
    if dist_worker is not None:
        try:
            dist_worker.get_worker()
        except ValueError:
            pass
        else:
            event = refusal_event(request, "run_local_step is for dask's local schedulers only")
            return {"events": [event.to_dict()], "abandoned": False, "interrupted": None}
    install_grant(*grant)
    return run_step(request, key, grace, stop_file=stop_file, live_file=live_file)


_LIVE = (EventType.STEP_START, EventType.STEP_LOG, EventType.STEP_STDOUT, EventType.STEP_STDERR)
# A step's live events wait this long before the first is sent: most steps of a wide job end
# sooner, and their result carries the events anyway. Sending each start through the
# scheduler to the client cost a message per step there and a report per step in the engine
# (a 500-step no-op run: the scheduler's busiest extra work, on a 2-CPU machine shared with
# the workers). A step still running then sends what it held and streams from there on.
LIVE_HOLD = 0.1


class _LiveSender:
    """Sends a running step's start, log records and output to its handler as they come:
    as distributed events on the run's topic (message: key and event), or, under dask's
    local schedulers, as JSON lines appended to a file the handler reads. The task's
    result still carries every event; the handler drops those it had already."""

    def __init__(self, key: str, topic: str | None, path: str | None) -> None:
        self.key = key
        self.topic = topic
        self.worker: Any = None
        self.file: Any = None
        self.lock = threading.Lock()  # one sender at a time, in the order the events came
        self.held: list[Event] | None = []  # None once released (see LIVE_HOLD)
        if topic is not None:
            dist_worker = sys.modules.get("distributed.worker")
            if dist_worker is not None:
                try:
                    self.worker = dist_worker.get_worker()
                except ValueError:
                    pass
        elif path is not None:
            try:
                self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
            except OSError:
                pass  # the events still come with the result

    @property
    def active(self) -> bool:
        return self.worker is not None or self.file is not None

    def __call__(self, ev: Event) -> None:
        if ev.type not in _LIVE:
            return
        with self.lock:
            if self.held is not None:
                self.held.append(ev)
            else:
                self._send(ev)

    def release(self) -> None:
        """The step is still running after LIVE_HOLD: send what it held, and stream from now on."""
        with self.lock:
            held, self.held = self.held or [], None
            for ev in held:
                self._send(ev)

    def _send(self, ev: Event) -> None:
        try:
            if self.worker is not None:
                # Fire and forget, like the start report: the worker's batched stream carries it.
                self.worker.log_event(self.topic, {"key": self.key, "event": ev.to_dict()})
            elif self.file is not None:
                self.file.write(ev.to_json() + "\n")
                self.file.flush()
        except Exception:  # noqa: S110 - a live copy lost is not the step's failure
            pass

    def close(self) -> None:
        if self.file is not None:
            with self.lock:
                self.file.close()
                self.file = None


def run_step(
    request: dict[str, Any], key: str, grace: float = 1.0, start_topic: str | None = None,
    stop_file: str | None = None, live_topic: str | None = None, live_file: str | None = None,
) -> dict[str, Any]:
    """The Dask task: run one attempt and return ``{"events": [...], "abandoned": bool,
    "interrupted": kind or None}`` (events as dicts).

    The request runs only if this process's policy admits it (signature, code location,
    output store); otherwise the events are one STEP_FAILURE saying why.

    With ``start_topic``, the task first tells the run's client that it started, as a
    distributed event on that topic (message: ``key``), so the step's timeout counts from
    here rather than from its submission.

    With ``live_topic`` (a distributed worker) or ``live_file`` (dask's local schedulers),
    the step's start, log records and output also go to the handler while it runs
    (`_LiveSender`).

    With ``stop_file``, the handler asks for a stop by creating that file (holding the
    kind): the way to reach a step in a process of dask's local ``processes`` scheduler,
    where the handler's `interrupt` call cannot."""
    policy = _policy_for(request)
    if isinstance(policy, str):
        return {"events": [refusal_event(request, policy).to_dict()], "abandoned": False, "interrupted": None}
    admitted = admit_or_refuse(policy, request)
    if isinstance(admitted, Event):
        return {"events": [admitted.to_dict()], "abandoned": False, "interrupted": None}
    req = admitted
    early_stop = _stop_requested(stop_file)
    if early_stop is not None:
        return {"events": [], "abandoned": False, "interrupted": early_stop}
    with _lock:
        if key in _early:
            kind = _early.pop(key)
            return {"events": [], "abandoned": False, "interrupted": kind}
        worker = _idle.pop() if _idle else None
    if start_topic is not None:
        _report_start(start_topic, key)
    if worker is None:
        worker = _StepThread()
    state = _Running(worker)
    with _lock:
        _running[key] = state

    # distributed keeps the running task's worker in a context variable and its key in a
    # thread-local; the step's thread gets copies of both so that get_worker(),
    # get_client() and distributed.worker.thread_state.key work in steps.
    dist_worker = sys.modules.get("distributed.worker")
    task_state = dict(vars(dist_worker.thread_state)) if dist_worker is not None else {}
    context = contextvars.copy_context()
    live = _LiveSender(key, live_topic, live_file) if live_topic or live_file else None

    def body() -> None:
        try:
            if task_state:
                vars(dist_worker.thread_state).update(task_state)
            try:
                # Jobs load once per process; two worker threads must not import one file at once.
                with _load_lock:
                    preload_job(req.code_pointer, req.job_name)
            except Exception:
                pass  # execute_step reports the load failure as the attempt's NOT_STARTED failure
            on_event = live if live is not None and live.active else None
            state.events = context.run(execute_step, req, on_event=on_event)
        except StepInterrupted:
            pass  # delivered after execute_step returned: the handler already reported the stop
        finally:
            with _lock:
                state.ended = True  # from here on, interrupt() sends this thread nothing
            if state.interrupted is not None:
                _take_pending_interrupt()
            state.done.set()
            state.wake.set()

    worker.jobs.put(body)
    if live is not None and live.active and not state.wake.wait(LIVE_HOLD):
        live.release()  # still running: its start and output so far go out now
    try:
        # An interrupt landing in the step thread's last instructions could skip the wake-up;
        # a thread that is gone needs no waiting for.
        while not state.wake.wait(0.05 if stop_file else 0.5) and worker.thread.is_alive():
            kind = _stop_requested(stop_file)
            if kind is not None:
                interrupt(key, kind)
        # Interrupted: give the step `grace` seconds to take the exception and end.
        if state.interrupted is not None:
            state.done.wait(grace)
    finally:
        with _lock:
            _running.pop(key, None)
            if state.done.is_set() and worker.thread.is_alive():
                _idle.append(worker)
            else:
                worker.jobs.put(None)  # retire it once its step ends
    if live is not None:
        live.close()
    if not state.done.is_set():
        return {"events": [], "abandoned": True, "interrupted": state.interrupted}
    events = state.events or []
    return {"events": [e.to_dict() for e in events], "abandoned": False, "interrupted": state.interrupted}


def run_step_json(
    request: dict[str, Any], key: str, grace: float = 1.0, start_topic: str | None = None,
    stop_file: str | None = None, live_topic: str | None = None,
) -> str:
    """`run_step` as the distributed task: its result as one JSON string. Dask measures
    (``sizeof``) and serializes every task result; for a nested dict of events that cost the
    worker more CPU than the no-op step itself, for a string next to nothing. See
    `decode_result`."""
    return json.dumps(run_step(request, key, grace, start_topic, stop_file, live_topic), separators=(",", ":"))


def decode_result(result: Any) -> dict[str, Any]:
    """A task's result as `run_step` returned it: `run_step_json`'s string decoded; a dict
    (from dask's local schedulers) as it is. Anything else is an empty result, which the
    handler reports as a task that ended without the step's events."""
    if isinstance(result, str | bytes):
        try:
            result = json.loads(result)
        except ValueError:
            return {}
    return result if isinstance(result, dict) else {}


def _report_start(topic: str, key: str) -> None:
    # Fire and forget: the worker's batched stream carries it to the scheduler, which
    # forwards it to the subscribed client; nothing here waits on the network.
    dist_worker = sys.modules.get("distributed.worker")
    if dist_worker is None:
        return
    try:
        worker = dist_worker.get_worker()
    except ValueError:
        return  # not in a distributed worker (dask's local schedulers)
    worker.log_event(topic, key)


def interrupt(key: str, kind: str) -> bool:
    """Stop the step running under ``key`` in this process (run on every worker by the
    handler). ``kind`` is ``timeout`` or ``canceled``. Returns whether it was running here."""
    with _lock:
        state = _running.get(key)
        if state is None:
            _early[key] = kind
            if len(_early) > 10_000:  # keys of tasks that never came here: forget the oldest
                for old in list(_early)[:5_000]:
                    _early.pop(old, None)
            return False
        if state.interrupted is not None:
            return True
        state.interrupted = kind
        if not state.ended:
            # Under the lock: the step cannot end (and its thread take another step) meanwhile.
            exc = StepTimedOut if kind == "timeout" else StepInterrupted
            ident = state.worker.thread.ident
            if ident is not None:
                interrupt_thread(ident, exc)
    state.wake.set()
    return True


def events_from(result: dict[str, Any]) -> list[Event]:
    return [Event.from_dict(d) for d in result.get("events", ())]


def is_terminal(events: list[Event]) -> bool:
    return bool(events) and events[-1].type in STEP_TERMINAL


async def interrupt_on_worker(key: str, kind: str) -> bool:
    """`interrupt`, as a coroutine: ``Client.run(..., wait=False)`` (fire and forget, so a
    slow or lost worker never blocks the engine) only accepts coroutine functions."""
    return interrupt(key, kind)
