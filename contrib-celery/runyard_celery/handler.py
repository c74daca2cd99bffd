"""The ``celery`` executor's step handler: each step attempt is one Celery task.

The engine's thread sends tasks (`launch`) and reads what the monitor learnt (`poll`). The
handler composes the concerns, each in its own module:

- `connection`: the app, the broker and backend reachability check, and the refusals of
  steps no worker could run;
- `states`: the attempt's handle, reading task states from the result backend, and the
  failure a FAILURE state means;
- `monitor`: the threads that turn states and worker pings into outcomes;
- `control`: revoking and stopping tasks, pinging workers, asking for their queues.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from runyard.plugin import (
    FailureInfo,
    FailureKind,
    StepHandler,
    StepRequest,
    StepUpdate,
    missing_key_error,
    sign_request,
    signing_key_at,
)

from .app import broker_priority
from .connection import CeleryBrokerError, open_app, refusal
from .control import WorkerControl
from .monitor import TaskMonitor
from .settings import PRIORITY_TAG, QUEUE_TAG, TASK_NAME, CeleryConfig
from .states import CeleryTask, StateReader, live_mark

__all__ = ["CeleryBrokerError", "CeleryStepHandler", "CeleryTask"]


class CeleryStepHandler(StepHandler):
    """Runs each step attempt as a ``runyard.execute_step`` task on Celery workers."""

    config: CeleryConfig

    task_name = TASK_NAME
    """The task each attempt is sent as (the celery_docker executor sends its own)."""
    step_in_pool = True
    worker_command = "runyard celery worker"
    """How to start a worker that takes these tasks (named when nobody consumes a queue)."""
    """The step runs in the worker's pool process (see `states.task_failure`); when false, the
    step's own STEP_START event (streamed by the worker), not the task's STARTED state, tells
    the engine that it started, so its timeout does not count the container's start-up."""

    # -- life cycle ---------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.config
        # Workers run signed requests only: without a key no step could run, so say so now.
        key = signing_key_at(self.context.instance_home)
        if key is None:
            raise missing_key_error("executor celery")
        self._key = key
        self.app, self.broker, self.default_queue = open_app(cfg)
        self._control = WorkerControl(self.app, cfg)
        self._monitor = TaskMonitor(cfg, self._control, StateReader(self.app),
                                    step_in_pool=self.step_in_pool, worker_command=self.worker_command)
        self._monitor.start()

    def teardown(self) -> None:
        if not hasattr(self, "_monitor"):  # setup failed, and released what it had
            return
        self._monitor.close()
        with contextlib.suppress(Exception):
            self.app.close()

    # -- engine calls -------------------------------------------------------------------

    def launch(self, request: StepRequest) -> CeleryTask:
        tags = request.tags
        queue = tags.get(QUEUE_TAG) or self.default_queue
        task = CeleryTask(request, f"{request.run_id}.{request.attempt_id}", queue)
        problem = refusal(request)
        if problem is not None:
            task.failure = FailureInfo(kind=FailureKind.NOT_STARTED, message=problem)
            task.over = True
            return task
        options: dict[str, Any] = {"queue": queue, "task_id": task.task_id}
        if PRIORITY_TAG in tags:
            options["priority"] = broker_priority(int(tags[PRIORITY_TAG]), self.broker)
        if request.timeout:
            # A backstop: the engine stops the step at its timeout through terminate; this
            # kills it on the worker even if the run worker died before it could.
            options["time_limit"] = request.timeout + self.config.time_limit_margin
        monitor = self._monitor
        with monitor.lock:
            monitor.tasks[task.task_id] = task
        try:
            self.app.send_task(self.task_name, args=self.task_args(request), **options)
        except BaseException:
            with monitor.lock:
                monitor.tasks.pop(task.task_id, None)
            raise
        monitor.kick.set()
        return task

    def task_args(self, request: StepRequest) -> list[Any]:
        """The task's arguments (JSON): the signed request."""
        return [sign_request(request, self._key)]

    def poll(self, handle: CeleryTask) -> StepUpdate:
        monitor = self._monitor
        with monitor.lock:
            live, handle.live = handle.live, []
            if not handle.over:
                streamed, handle.streamed = handle.streamed, []
                return StepUpdate.running([*live, *streamed], started=handle.started and self.step_in_pool)
            if handle.reported:
                return StepUpdate.finished()
            handle.reported = True
            monitor.tasks.pop(handle.task_id, None)
        # The result carries every event: those reported live are not reported again.
        events = [*live, *handle.streamed, *(ev for ev in handle.events if live_mark(ev) not in handle.live_seen)]
        handle.streamed = []
        if handle.failure is not None:
            return StepUpdate.crashed(handle.failure, events)
        return StepUpdate.finished(events)

    def wait(self, timeout: float) -> None:
        # The engine polls every attempt after this returns, so clearing after the wait
        # loses nothing: a change after the clear is seen by that poll.
        self._monitor.changed.wait(timeout)
        self._monitor.changed.clear()

    def terminate(self, handle: CeleryTask, kind: FailureKind) -> None:
        monitor = self._monitor
        with monitor.lock:
            if handle.over or handle.stop_kind is not None:
                return
            handle.stop_kind = kind
            handle.stop_at = time.monotonic()
            queued, worker = not handle.started, handle.worker
        problem = self._control.stop(handle.task_id, worker)
        if queued:
            # Finished whether or not the broker took the revoke: nothing else would end it.
            message = f"step '{handle.step}' was stopped before a worker started it"
            if problem:
                message += f" (revoking its Celery task failed: {problem}; a worker may still run it later)"
            monitor.finish(handle, failure=FailureInfo(kind=kind, message=message))
        monitor.kick.set()
