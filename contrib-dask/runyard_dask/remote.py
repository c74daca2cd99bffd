"""What runs inside a Dask worker (or dask's local scheduler): one step attempt.

Imports no dask: the task function gets plain JSON data and returns plain JSON data, so
nothing of runyard is pickled between the engine and the workers except a reference to
`run_step` itself.

The step runs in a thread of its own while the Dask task's thread waits for it. A timeout
or cancel (`interrupt`) raises `StepInterrupted` in the step's thread; if the step is
blocked in a C call (``time.sleep``, a socket read) the exception only lands when the
call returns, so the task stops waiting after ``grace`` seconds and gives its worker
thread back to Dask, leaving the step's thread to end in the background.
"""

from __future__ import annotations

import contextvars
import ctypes
import sys
import threading
from typing import Any

from runyard.plugin import (
    Event,
    EventType,
    StepInterrupted,
    StepRequest,
    StepTimedOut,
    execute_step,
    preload_job,
)

# Steps running in this process, by Dask key.
_lock = threading.Lock()
_load_lock = threading.Lock()
_running: dict[str, _Running] = {}
# Keys interrupted before their task started (a timeout racing the task's start).
_early: dict[str, str] = {}


class _Running:
    __slots__ = ("thread", "interrupted", "wake", "events")

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.interrupted: str | None = None  # the kind, once interrupted
        self.wake = threading.Event()
        self.events: list[Event] | None = None


def run_step(request: dict[str, Any], key: str, grace: float = 1.0) -> dict[str, Any]:
    """The Dask task: run one attempt and return ``{"events": [event dicts], "abandoned": bool}``."""
    req = StepRequest.from_dict(request)
    state = _Running()
    with _lock:
        if key in _early:
            kind = _early.pop(key)
            return {"events": [], "abandoned": False, "interrupted": kind}
        _running[key] = state

    # distributed keeps the running task's worker in a context variable and its key in a
    # thread-local; the step's thread gets copies of both so that get_worker(),
    # get_client() and get_current_task() work in steps.
    dist_worker = sys.modules.get("distributed.worker")
    task_state = dict(vars(dist_worker.thread_state)) if dist_worker is not None else {}
    context = contextvars.copy_context()

    def body() -> None:
        if task_state:
            vars(dist_worker.thread_state).update(task_state)
        try:
            # Jobs load once per process; two worker threads must not import one file at once.
            with _load_lock:
                preload_job(req.code_pointer, req.job_name)
        except Exception:
            pass  # execute_step reports the load failure as the attempt's NOT_STARTED failure
        try:
            state.events = execute_step(req)
        except StepInterrupted:
            pass  # delivered after execute_step returned: the handler already reported the stop
        finally:
            state.wake.set()

    thread = threading.Thread(target=context.run, args=(body,), name=f"runyard-step-{req.step_key}", daemon=True)
    state.thread = thread
    try:
        thread.start()
        # An interrupt landing in the step thread's last instructions could skip the wake-up;
        # a thread that is gone needs no waiting for.
        while not state.wake.wait(0.5) and thread.is_alive():
            pass
        # Interrupted: give the step `grace` seconds to take the exception and end.
        if state.interrupted is not None and state.events is None:
            thread.join(grace)
    finally:
        with _lock:
            _running.pop(key, None)
    events = state.events
    if events is None:
        return {"events": [], "abandoned": thread.is_alive(), "interrupted": state.interrupted}
    return {"events": [e.to_dict() for e in events], "abandoned": False, "interrupted": state.interrupted}


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
        thread = state.thread
    if thread is not None and thread.ident is not None and thread.is_alive():
        exc = StepTimedOut if kind == "timeout" else StepInterrupted
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc))
    state.wake.set()
    return True


def events_from(result: dict[str, Any]) -> list[Event]:
    return [Event.from_dict(d) for d in result.get("events", ())]


def is_terminal(events: list[Event]) -> bool:
    return bool(events) and events[-1].type in (EventType.STEP_SUCCESS, EventType.STEP_FAILURE)


async def interrupt_on_worker(key: str, kind: str) -> bool:
    """`interrupt`, as a coroutine: ``Client.run(..., wait=False)`` (fire and forget, so a
    slow or lost worker never blocks the engine) only accepts coroutine functions."""
    return interrupt(key, kind)
