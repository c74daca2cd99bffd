"""The thread-pool step handler: each step attempt is a task on a ThreadPoolExecutor.

Imported by runyard only when a run uses the ``threadpool`` executor.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

from runyard.plugin import (
    STEP_LIVE,
    Event,
    FailureInfo,
    FailureKind,
    StepHandler,
    StepRequest,
    StepUpdate,
    execute_step,
    failure_from_exception,
    resolve,
)

from .plugin import ThreadPoolConfig


class _Handle:
    """What `launch` returns: the engine passes it back to `poll` and `terminate`."""

    __slots__ = ("request", "future", "live")

    def __init__(self, request: StepRequest, future: Future[list[Event]], live: bool) -> None:
        self.request = request
        self.future = future
        self.live = live  # its start, logs and output went to the engine as they came


class ThreadPoolStepHandler(StepHandler):
    """Runs each step attempt with `runyard.plugin.execute_step` on a pool of
    ``context.max_concurrent`` threads in the engine's process. Threads cannot be stopped,
    so running steps are neither timed out nor canceled (see the spec's capabilities)."""

    config: ThreadPoolConfig

    def setup(self) -> None:
        # The engine never launches more than context.max_concurrent attempts at once, so a
        # pool of that size starts every launched step at once.
        self._pool = ThreadPoolExecutor(
            max_workers=self.context.max_concurrent,
            thread_name_prefix=resolve(self.config.thread_name_prefix) or "runyard-step",
        )
        self._changed = threading.Event()

    def launch(self, request: StepRequest) -> _Handle:
        live = self.reports_connected  # False only when a test drives the handler without an engine
        future = self._pool.submit(execute_step, request, on_event=self._report_live if live else None)
        future.add_done_callback(self._on_done)  # runs in the worker thread
        return _Handle(request, future, live)

    def _report_live(self, event: Event) -> None:
        # In the step's thread while it runs: its start, log records and output reach the
        # engine (and storage, and `run logs --follow`) now; poll returns the rest at the end.
        if event.type in STEP_LIVE:
            self.report([event])

    def _on_done(self, _: Future[list[Event]]) -> None:
        self._changed.set()

    def poll(self, handle: _Handle) -> StepUpdate:
        future = handle.future
        if not future.done():
            return StepUpdate.running()
        if future.cancelled():
            return StepUpdate.crashed(
                FailureInfo(kind=FailureKind.NOT_STARTED, message=f"step '{handle.request.step_key}' never started")
            )
        error = future.exception()
        if error is None:
            # The worker's events end with STEP_SUCCESS or STEP_FAILURE; those reported live
            # are not returned again.
            events = future.result()
            return StepUpdate.finished([e for e in events if e.type not in STEP_LIVE] if handle.live else events)
        # execute_step reports a failing step as events and never raises for an Exception;
        # a BaseException (SystemExit, KeyboardInterrupt raised by the step) escapes it and
        # takes the attempt's events with it.
        return StepUpdate.crashed(
            failure_from_exception(
                error,
                message=f"step '{handle.request.step_key}' raised {type(error).__name__} "
                f"out of the step worker: {error}",
            )
        )

    def wait(self, timeout: float) -> None:
        # Wake as soon as any step finishes rather than sleeping out the poll interval. The
        # engine polls every running attempt after this returns, so clearing after the wait
        # loses nothing: a step finishing after the clear is seen by that poll.
        self._changed.wait(timeout)
        self._changed.clear()

    def terminate(self, handle: _Handle, kind: FailureKind) -> None:
        # The spec declares can_terminate=False, so the engine calls this only when a run
        # ends with attempts still running (a cancel, an interrupt, an engine error). A
        # step still queued in the pool is dropped; a running thread cannot be stopped.
        if handle.future.cancel() or handle.future.done():
            return
        raise NotImplementedError(
            f"step '{handle.request.step_key}' is running in a thread, which cannot be stopped; "
            "it runs to completion and what it reports is discarded"
        )

    def teardown(self) -> None:
        # The engine calls teardown even when setup raised (an unset {env: NAME}), before
        # the pool existed: release only what was acquired, so the run reports setup's error.
        pool = getattr(self, "_pool", None)
        if pool is None:
            return
        # Normally every future is done by now. After a cancel, do not block the run's end
        # on threads that cannot be stopped; they finish in the background (and the
        # interpreter waits for them before it exits).
        pool.shutdown(wait=False, cancel_futures=True)
