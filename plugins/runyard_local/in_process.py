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
from collections.abc import Callable, Sequence
from typing import Any

from runyard.plugin import (
    STEP_LIVE,
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
    interrupt_thread,
    kill_processes,
)

from .mp_os import read_proc_stat

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
        stat = read_proc_stat(entry)
        if stat is not None and stat[0] != b"Z":
            children.setdefault(int(stat[1]), []).append(int(entry))
    return children


def _start_time(pid: int) -> bytes | None:
    stat = read_proc_stat(pid)
    return stat[19] if stat is not None else None


def _forks() -> int | None:
    """Processes created on this machine since boot: when it has not moved while a step
    ran, the step started no process and there is nothing to look for."""
    try:
        with open("/proc/stat", "rb") as f:
            data = f.read()
        at = data.index(b"\nprocesses ") + len(b"\nprocesses ")
        return int(data[at : data.index(b"\n", at)])
    except (OSError, ValueError):
        return None


def _roots(whole_process: bool) -> list[int] | None:
    """The children `_process_tree` starts from: the calling thread's where the kernel lists
    them, else (when ``whole_process``) the process's; None when not known."""
    try:
        # os.open/os.read rather than pathlib: this runs after every step.
        fd = os.open(f"/proc/self/task/{threading.get_native_id()}/children", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = b""
            while chunk := os.read(fd, 65536):
                data += chunk
        finally:
            os.close(fd)
        return [int(c) for c in data.split()]
    except OSError:
        if not whole_process:
            return None
    try:
        return _parents().get(os.getpid(), [])
    except OSError:
        return None


def _process_tree(whole_process: bool) -> set[tuple[int, bytes]] | None:
    """Processes the calling thread started, and their descendants, as (pid, start time):
    a reused pid is another process. Per thread where the kernel lists children per
    thread, so that a step never touches what other threads of this process started
    (another run's steps, a test runner's helpers); else every descendant of this process
    when ``whole_process``; else None (not known)."""
    roots = _roots(whole_process)
    if roots is None:
        return None
    if not roots:
        return set()  # no child, so no descendant: no need to scan all of /proc
    try:
        children = _parents()
    except OSError:
        return None
    stack = list(roots)
    found: set[tuple[int, bytes]] = set()
    while stack:
        pid = stack.pop()
        started = _start_time(pid)
        if started is not None:
            found.add((pid, started))
            stack += children.get(pid, ())
    return found


def _kill_left_over(before: set[tuple[int, bytes]], whole_process: bool) -> list[int]:
    """Kill the processes started since ``before`` was taken; return their pids."""
    left = [pid for pid, _ in (_process_tree(whole_process) or set()) - before]
    kill_processes(left)
    return left


class _Handle:
    __slots__ = ("request", "done")

    def __init__(self, request: StepRequest) -> None:
        self.request = request
        self.done = False  # ran, or was stopped before it ran: a later poll reports it finished


class InProcessStepHandler(StepHandler):
    _reporter: Callable[[Sequence[Event]], None] | None = None

    def connect_reporter(self, reporter: Callable[[Sequence[Event]], None]) -> None:
        super().connect_reporter(reporter)
        # Kept to call directly from each step: `report` and `reports_connected` are a
        # Python call apiece, which a run of thousands of short steps pays for every step.
        self._reporter = reporter

    def setup(self) -> None:
        self._lock = threading.Lock()
        self._current: _Handle | None = None
        self._thread: int | None = None
        self._pending: StepInterrupted | None = None
        self._saved_handler: Any = None
        self._whole_process = _is_subreaper()
        # The processes there before any step: whatever is new after a step is the step's.
        self._known = _process_tree(self._whole_process)
        if threading.get_ident() == _MAIN:
            self._saved_handler = signal.signal(signal.SIGALRM, self._on_signal)

    def teardown(self) -> None:
        # Also called when setup raised before it saved anything: then there is nothing to restore.
        saved = getattr(self, "_saved_handler", None)
        if saved is not None:
            signal.signal(signal.SIGALRM, saved)

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
        # With no process before the step, the step's thread having no child afterwards says
        # it left nothing (checked in _clean_up); reading /proc/stat costs more than that.
        forks = _forks() if self._known else None
        live = None
        kept: list[Event] = []
        report = self._reporter
        if report is not None:
            # The step runs on the engine's thread, inside this call: its start, logs and
            # output go to the engine as they happen, the rest (kept here, so no second pass
            # sorts them out) is returned at the end.
            keep = kept.append

            def live(ev: Event) -> None:
                if ev.type in STEP_LIVE:
                    report((ev,))
                else:
                    keep(ev)

        try:
            try:
                events = execute_step(handle.request, on_event=live)
            finally:
                with self._lock:
                    self._current = None
                    self._pending = None
                if timer is not None:
                    timer.cancel()
        except StepInterrupted as e:
            # Delivered after the step returned but before we disarmed: the step is over anyway.
            self._clean_up(forks)
            return StepUpdate.crashed(FailureInfo(kind=e.kind, message=str(e)))
        left = self._clean_up(forks)
        if live is not None:
            events = kept
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

    def _clean_up(self, forks_before: int | None) -> list[int]:
        """Kill what the step that just ended left running."""
        if self._known is None or (forks_before is not None and _forks() == forks_before):
            return []
        if not self._known and _roots(self._whole_process) == []:
            return []  # nothing before, no child now: nothing left running
        left = _kill_left_over(self._known, self._whole_process)
        self._known = _process_tree(self._whole_process) or set()
        return left

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
                interrupt_thread(thread, StepTimedOut if kind is FailureKind.TIMEOUT else StepInterrupted)

    def _on_signal(self, signum: int, frame: Any) -> None:
        exc = self._pending
        if exc is not None:
            self._pending = None
            raise exc
