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
    interrupt_thread,
    kill_processes,
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
        stat = _read_stat(entry)
        if stat is not None and stat[0] != b"Z":
            children.setdefault(int(stat[1]), []).append(int(entry))
    return children


def _read_stat(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        try:
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        return None
    return raw[raw.rindex(b")") + 2 :].split()


def _start_time(pid: int) -> bytes | None:
    stat = _read_stat(pid)
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


def _process_tree(whole_process: bool) -> set[tuple[int, bytes]] | None:
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
        forks = _forks()
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
            self._clean_up(forks)
            return StepUpdate.crashed(FailureInfo(kind=e.kind, message=str(e)))
        left = self._clean_up(forks)
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
