"""The ``celery`` executor's task state reading: the handle of one attempt, reading the
tasks' states from the result backend (one MGET on a key-value backend such as Redis),
and turning a FAILURE state into the step's failure."""

from __future__ import annotations

import re
import time
from typing import Any

from celery.backends.base import KeyValueStoreBackend
from runyard.plugin import Event, FailureInfo, FailureKind, StepRequest, error_class_name


class CeleryTask:
    """The handle of one attempt: its Celery task and what the monitor learnt of it."""

    __slots__ = ("request", "task_id", "queue", "sent", "started", "worker", "events", "failure",
                 "over", "reported", "stop_kind", "stop_at", "silent_since", "expiring", "checking", "streamed",
                 "seen", "live", "live_next", "live_seen")

    def __init__(self, request: StepRequest, task_id: str, queue: str) -> None:
        self.request = request
        self.task_id = task_id
        self.queue = queue
        self.sent = time.monotonic()
        self.started = False
        self.worker: str | None = None  # hostname of the worker running it, once STARTED
        self.events: list[Event] = []
        self.failure: FailureInfo | None = None
        self.over = False  # its outcome is known (events or failure)
        self.reported = False
        self.stop_kind: FailureKind | None = None  # set by terminate
        self.stop_at = 0.0
        self.silent_since: float | None = None  # its worker stopped answering pings then
        self.expiring = False  # queue_timeout passed: revoked, the failure is being written
        self.checking = False  # queue_timeout passed: asking the workers whether any consumes its queue
        self.streamed: list[Event] = []  # events a worker streamed while the step runs, not yet polled
        self.seen = 0  # how many of the attempt's events were taken from the streamed ones
        self.live: list[Event] = []  # read from its STARTED meta while it runs, for the next poll
        self.live_next = 0  # index of the next live event to take from that meta
        self.live_seen: set[tuple[Any, ...]] = set()  # `live_mark` of those taken: not reported again

    @property
    def step(self) -> str:
        return self.request.step_key


class StateReader:
    """Reads the states (metas) of many tasks from the app's result backend at once."""

    def __init__(self, app: Any) -> None:
        self.backend = app.backend
        self.kv = isinstance(self.backend, KeyValueStoreBackend)

    def fetch(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        backend = self.backend
        if self.kv:
            values = backend.mget([backend.get_key_for_task(i) for i in ids])
            return {i: backend.decode_result(v) for i, v in zip(ids, values, strict=True) if v is not None}
        return {i: backend.get_task_meta(i) for i in ids}


def task_failure(task: CeleryTask, meta: dict[str, Any], *, step_in_pool: bool = True) -> FailureInfo:
    """The step's failure from a task in state FAILURE. ``step_in_pool``: the step ran in the
    pool process, so that process killed by a signal is the step killed by it; otherwise
    (the step ran in a container the pool process watched) it is a lost worker."""
    exc = meta.get("result")
    if isinstance(exc, dict):  # an exception Celery could not rebuild here
        name, text = str(exc.get("exc_type")), str(exc.get("exc_message"))
        error_class = f"{exc.get('exc_module')}.{name}"
    else:
        name, text, error_class = type(exc).__name__, str(exc), error_class_name(exc)
    where = f" on worker {task.worker}" if task.worker else ""
    if task.stop_kind is not None:
        return FailureInfo(kind=task.stop_kind, message=f"step '{task.step}' was stopped{where}")
    if name == "WorkerLostError":
        sig = re.search(r"signal (\d+)", text)
        code = re.search(r"exitcode (-?\d+)", text)
        return FailureInfo(
            # Killed by a signal is its own kind (as on every executor); exited is worker_lost.
            kind=FailureKind.SIGNAL if sig and step_in_pool else FailureKind.WORKER_LOST,
            message=f"step '{task.step}': the Celery pool process running it died{where}: {text}",
            error_class=error_class,
            signal=int(sig.group(1)) if sig and step_in_pool else None,
            exit_code=int(code.group(1)) if code else None,
        )
    if name == "TimeLimitExceeded":
        return FailureInfo(
            kind=FailureKind.TIMEOUT,
            message=f"step '{task.step}' was killed by Celery's hard time limit{where}: {text}",
            error_class=error_class,
        )
    return FailureInfo(
        kind=FailureKind.ERROR,
        message=f"step '{task.step}': the Celery task failed{where}: {name}: {text}",
        error_class=error_class,
        traceback=meta.get("traceback"),
    )


def live_mark(ev: Event) -> tuple[Any, ...]:
    """What tells a live event apart from the attempt's others: the task's result repeats
    those its STARTED meta carried while it ran, and the handler reports each once."""
    return (ev.type, ev.timestamp, ev.message, ev.data.get("text"))
