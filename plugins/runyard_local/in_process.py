"""The in-process step handler: each step runs in the engine's own thread, one at a time.

Timeouts and cancellation interrupt the running step by raising `StepInterrupted` inside
it. On the main thread a signal (SIGALRM) delivers it, which also breaks out of blocking
calls such as ``time.sleep``; on another thread it is raised asynchronously at the next
Python instruction, which cannot interrupt a blocking C call.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from runyard.plugin import (
    FailureInfo,
    FailureKind,
    StepHandler,
    StepInterrupted,
    StepRequest,
    StepTimedOut,
    StepUpdate,
    execute_step,
    interrupt_thread,
)

_MAIN = threading.main_thread().ident


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
            return StepUpdate.crashed(FailureInfo(kind=e.kind, message=str(e)))
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
                interrupt_thread(thread, StepTimedOut if kind is FailureKind.TIMEOUT else StepInterrupted)

    def _on_signal(self, signum: int, frame: Any) -> None:
        exc = self._pending
        if exc is not None:
            self._pending = None
            raise exc
