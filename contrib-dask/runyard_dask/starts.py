"""The ``dask`` executor's start watch: which submitted steps have started (their tasks
report it on `submission.START_TOPIC`), and which cannot start: queued past
``queue_timeout``, or past ``no_worker_timeout`` with no worker that has their resources."""

from __future__ import annotations

import time
from typing import Any

from runyard.plugin import FailureInfo, FailureKind

from .settings import DaskConfig
from .submission import DaskHandle

_NO_WORKER_CHECK_EVERY = 1.0  # seconds between scheduler queries while a step waits for a worker


class StartWatch:
    """The handles whose task reports its start, and the scheduler's workers as last seen."""

    def __init__(self, config: DaskConfig) -> None:
        self.config = config
        self._awaiting: dict[str, DaskHandle] = {}  # by key, handles whose task reports its start
        self._last_worker_check = 0.0
        self._worker_resources: list[dict[str, float]] | None = None

    def track(self, handle: DaskHandle) -> None:
        handle.track_start = True
        self._awaiting[handle.key] = handle

    def forget(self, handle: DaskHandle) -> None:
        self._awaiting.pop(handle.key, None)

    def on_start(self, event: tuple[float, Any]) -> None:
        # On the client's event loop thread; every run on the cluster shares the topic.
        h = self._awaiting.pop(event[1], None) if isinstance(event[1], str) else None
        if h is not None:
            h.started = True

    def check_queued(self, handle: DaskHandle) -> FailureInfo | None:
        limit = self.config.queue_timeout
        if limit is None or handle.started or not handle.track_start:
            return None
        waited = time.monotonic() - handle.launched
        if waited < limit:
            return None
        return FailureInfo(
            kind=FailureKind.NOT_STARTED,
            message=f"step '{handle.request.step_key}' waited {waited:.0f}s in Dask's queue without starting "
            f"(executor.dask.queue_timeout={limit:g}s); add workers, lower max_concurrent or raise queue_timeout",
        )

    def check_no_worker(self, handle: DaskHandle, client: Any) -> FailureInfo | None:
        now = time.monotonic()
        timeout = self.config.no_worker_timeout
        if now - handle.launched < timeout:
            return None
        if self._worker_resources is None or now - self._last_worker_check >= _NO_WORKER_CHECK_EVERY:
            self._last_worker_check = now
            try:
                info = client.scheduler_info()
            except Exception:
                return None  # the scheduler is unreachable: the client reports that on its futures
            self._worker_resources = [dict(w.get("resources") or {}) for w in info.get("workers", {}).values()]
        workers = self._worker_resources
        if any(all(w.get(r, 0) >= amount for r, amount in handle.resources.items()) for w in workers):
            return None
        step = handle.request.step_key
        if not workers:
            why = "the cluster has no workers"
        else:
            why = f"no worker has the resources {handle.resources} it asks for (dask/resources tag)"
        return FailureInfo(
            kind=FailureKind.NOT_STARTED,
            message=f"step '{step}' waited {now - handle.launched:.0f}s without starting: {why}; "
            "add workers (dask worker --resources 'GPU=1') or raise executor.dask.no_worker_timeout",
        )
