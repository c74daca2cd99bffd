"""The ``dask`` executor's interruption: stopping one step's task wherever it runs (a
distributed worker, a local thread, or a local scheduler's pool process)."""

from __future__ import annotations

from typing import Any

from runyard.plugin import FailureKind

from . import remote
from .submission import DaskHandle


def stop_task(client: Any, handle: DaskHandle, future: Any, kind: FailureKind, stop_file: str | None) -> None:
    """Interrupt the step and drop its task. ``client`` is None with a local scheduler;
    ``stop_file`` is where a processes scheduler's child watches for a stop request."""
    if client is not None:
        if future.done():
            return
        # Interrupt the step wherever it runs (each worker checks its own list), then drop
        # the task: queued, it never starts; running, its result is discarded.
        try:
            client.run(remote.interrupt_on_worker, handle.key, kind.value, wait=False)
        finally:
            client.cancel([future], reason=f"runyard: {kind.value}")
    else:
        future.cancel()
        remote.interrupt(handle.key, kind.value)  # reaches threads, not the processes scheduler's children
        if stop_file is not None:  # ...which watch for this file instead
            with open(stop_file, "w") as f:
                f.write(kind.value)
