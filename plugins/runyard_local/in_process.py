"""The in-process step handler: each step runs in the engine's own thread, one at a time.

Timeouts and cancellation interrupt the running step by raising `StepInterrupted` inside
it. On the main thread a signal (SIGALRM) delivers it, which also breaks out of blocking
calls such as ``time.sleep``; on another thread it is raised asynchronously at the next
Python instruction, which cannot interrupt a blocking C call.

A step cannot leave processes behind: those it started (and what they started) that
still run when it ends are killed, and the step's events say so. A daemonized grandchild
escapes this unless the process is a child subreaper, as ``runyard job execute`` is.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from runyard.plugin import (
    Event,
    EventType,
    FailureInfo,
    FailureKind,
    StepHandler,
    StepInterrupted,
    StepRequest,
    StepTimedOut,
    StepUpdate,
    execute_step,
)

_MAIN = threading.main_thread().ident


_PR_GET_CHILD_SUBREAPER = 37


def _is_subreaper() -> bool:
    """Whether this process adopts orphans: `runyard job execute` makes itself one, and
    then runs one run only, so every process started during a step is that step's."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        flag = ctypes.c_int(0)
        return libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0 and flag.value == 1
    except (OSError, AttributeError):
        return False


def _parents() -> dict[int, list[int]]:
    """Every process's children, from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]


def _process_tree(whole_process: bool) -> set[tuple[int, str]] | None:
    """Processes the calling thread started, and their descendants, as (pid, start time):
    a reused pid is another process. Per thread where the kernel lists children per
    thread, so that a step never touches what other threads of this process started
    (another run's steps, a test runner's helpers); else every descendant of this process
    when ``whole_process``; else None (not known)."""
    try:
        mine = Path(f"/proc/self/task/{threading.get_native_id()}/children").read_text().split()
    except OSError:
        if not whole_process:
            return None
        mine = None
    try:
        children = _parents()
    except OSError:
        return None
    stack = [int(c) for c in mine] if mine is not None else list(children.get(os.getpid(), ()))
    found: set[tuple[int, str]] = set()
    while stack:
        pid = stack.pop()
        started = _start_time(pid)
        if started is not None:
            found.add((pid, started))
            stack += children.get(pid, ())
    return found


def _kill_left_over(before: set[tuple[int, str]] | None, whole_process: bool) -> list[int]:
    """Kill the processes started since ``before`` was taken; return their pids."""
    if before is None:
        return []
    after = _process_tree(whole_process)
    left = [pid for pid, _ in (after or set()) - before]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 2
    pending = list(left)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            except ChildProcessError:
                pass  # a grandchild: its own parent (killed too) or init reaps it
            pending.remove(pid)
        if pending:
            time.sleep(0.01)
    return left


class _Handle:
    __slots__ = ("request", "done")

    def __init__(self, request: StepRequest) -> None:
        self.request = request
        self.done = False  # ran, or was stopped before it ran: a later poll reports it finished


class InProcessStepHandler(StepHandler):
    def setup(self) -> None:
        self._lock = threading.Lock()
        self._current: _Handle | None = None
        self._thread: int | None = None
        self._pending: StepInterrupted | None = None
        self._saved_handler: Any = None
        self._whole_process = _is_subreaper()
        if threading.get_ident() == _MAIN:
            self._saved_handler = signal.signal(signal.SIGALRM, self._on_signal)

    def teardown(self) -> None:
        if self._saved_handler is not None:
            signal.signal(signal.SIGALRM, self._saved_handler)

    def launch(self, request: StepRequest) -> _Handle:
        return _Handle(request)  # runs at the first poll, so cancel can find the handle

    def poll(self, handle: _Handle) -> StepUpdate:
        if handle.done:
            return StepUpdate.finished()
        timer = None
        with self._lock:
            self._current = handle
            self._thread = threading.get_ident()
        if handle.request.timeout:
            timer = threading.Timer(handle.request.timeout, self.terminate, (handle, FailureKind.TIMEOUT))
            timer.daemon = True
            timer.start()
        before = _process_tree(self._whole_process)
        try:
            try:
                events = execute_step(handle.request)
            finally:
                with self._lock:
                    self._current = None
                    self._pending = None
                if timer is not None:
                    timer.cancel()
        except StepInterrupted as e:
            # Delivered after the step returned but before we disarmed: the step is over anyway.
            _kill_left_over(before, self._whole_process)
            return StepUpdate.crashed(FailureInfo(kind=e.kind, message=str(e)))
        left = _kill_left_over(before, self._whole_process)
        if left and events:
            req = handle.request
            note = Event(
                type=EventType.STEP_LOG,
                run_id=req.run_id,
                step_key=req.step_key,
                attempt=req.attempt,
                attempt_id=req.attempt_id,
                message=f"killed {len(left)} process(es) the step left running: pid {', '.join(map(str, left))}",
                data={"level": "WARNING", "logger": "runyard"},
            )
            events.insert(len(events) - 1, note)  # before the terminal event, which ends the attempt
        handle.done = True
        return StepUpdate.finished(events)

    def terminate(self, handle: _Handle, kind: FailureKind) -> None:
        with self._lock:
            if not handle.done and self._current is not handle:
                handle.done = True  # not started: never run it
                return
            if self._current is not handle:
                return
            req = handle.request
            if kind is FailureKind.TIMEOUT:
                msg = f"step '{req.step_key}' ran longer than its timeout of {req.timeout:g}s and was stopped"
            else:
                msg = f"step '{req.step_key}' was stopped: the run was canceled"
            exc = StepInterrupted(kind, msg)
            thread = self._thread
            if thread == _MAIN and self._saved_handler is not None:
                self._pending = exc
                signal.pthread_kill(thread, signal.SIGALRM)
            elif thread is not None:
                self._pending = exc
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(thread),
                    ctypes.py_object(StepTimedOut if kind is FailureKind.TIMEOUT else StepInterrupted),
                )

    def _on_signal(self, signum: int, frame: Any) -> None:
        exc = self._pending
        if exc is not None:
            self._pending = None
            raise exc
