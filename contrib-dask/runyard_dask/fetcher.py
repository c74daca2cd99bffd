"""The ``dask`` executor's result fetcher: a thread that reads the results (or errors) of
finished tasks off the engine's thread, in batches, and wakes the engine."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .submission import DaskHandle

RESULT_TIMEOUT = 30.0  # seconds to fetch a finished task's result or error
# A gather is a round trip from the client through the scheduler to every worker holding a
# result; on a wide run of short steps, one per handful of tasks cost more CPU (client,
# scheduler and workers) than the steps did. So the fetcher waits for a quarter of the tasks
# in flight to end, or at most this long after the first, and reads them in one gather.
# A lone step (or the last few) is read as soon as it ends.
COALESCE = 0.02


class ResultFetcher:
    """Reads what finished tasks left: one round trip for every task that finished while
    the previous batch was read."""

    def __init__(self, client: Any, changed: threading.Event, in_flight: Callable[[], int] = lambda: 1) -> None:
        self._client = client
        self._changed = changed
        self._in_flight = in_flight  # attempts submitted and not yet reported over
        self._done_queue: queue.SimpleQueue[DaskHandle | None] = queue.SimpleQueue()  # tasks over, not yet read
        self._thread = threading.Thread(target=self._loop, name="runyard-dask-results", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def put(self, handle: DaskHandle) -> None:
        """A task is over: read it, then wake the engine."""
        self._done_queue.put(handle)

    def close(self) -> None:
        """Stop after the tasks already over are read (waiting for that at most RESULT_TIMEOUT)."""
        if self._closed:
            return
        self._closed = True
        self._done_queue.put(None)
        self._thread.join(RESULT_TIMEOUT)

    def _loop(self) -> None:
        while True:
            first = self._done_queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + COALESCE
            while True:
                want = max(1, self._in_flight() // 4)
                wait = deadline - time.monotonic() if len(batch) < want else 0.0
                try:
                    h = self._done_queue.get(timeout=wait) if wait > 0 else self._done_queue.get_nowait()
                except queue.Empty:
                    break
                if h is None:
                    self._done_queue.put(None)  # stop after this batch
                    break
                batch.append(h)
            try:
                self._fetch(batch)
            finally:
                for h in batch:
                    h.fetched = True
                self._changed.set()

    def _fetch(self, batch: list[DaskHandle]) -> None:
        finished = [h for h in batch if h.future.status == "finished"]
        if finished:
            try:
                results = self._client.gather([h.future for h in finished], errors="raise")
            except Exception:
                results = None
            if results is not None:
                for h, r in zip(finished, results, strict=True):
                    h.result = r
            else:
                for h in finished:  # one of them went away between the check and the gather
                    try:
                        h.result = h.future.result(timeout=RESULT_TIMEOUT)
                    except Exception as e:
                        h.fetch_error = f"{type(e).__name__}: {e}"
        for h in batch:
            if h.future.status == "error" and h.stopped is None:
                try:
                    h.error = h.future.exception(timeout=RESULT_TIMEOUT)
                except Exception as e:
                    h.error = e
