"""The run queue's order and limits, shared by the daemon (what to launch next) and
`runyard run list` (each queued run's position)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from ..storage import RunRecord
from .settings import QueuedCoordinator, priority


def queue_order(queued: Iterable[RunRecord], coordinator: QueuedCoordinator | None) -> list[RunRecord]:
    """Queued runs in the order they are considered: higher priority tag first, then oldest."""
    tag = coordinator.priority_tag if coordinator is not None else None
    return sorted(queued, key=lambda r: (-priority(r.tags, tag) if tag else 0, r.created_at, r.run_id))


class Slots:
    """What is in flight against the coordinator's limits; `take` admits one more run if
    no limit is reached, counting it."""

    def __init__(self, coordinator: QueuedCoordinator, in_flight: Sequence[RunRecord]) -> None:
        self.coordinator = coordinator
        self.total = len(in_flight)
        self.buckets: Counter[tuple[int, tuple[str, str | None]]] = Counter()
        for run in in_flight:
            self._count(run)

    def _buckets(self, run: RunRecord) -> list[tuple[int, tuple[str, str | None]]]:
        out = []
        for i, limit in enumerate(self.coordinator.tag_concurrency_limits):
            b = limit.bucket(run.tags)
            if b is not None:
                out.append((i, b))
        return out

    def _count(self, run: RunRecord) -> None:
        for b in self._buckets(run):
            self.buckets[b] += 1

    @property
    def full(self) -> bool:
        m = self.coordinator.max_concurrent_runs
        return m >= 0 and self.total >= m

    def blocked_by(self, run: RunRecord) -> str | None:
        """Why ``run`` cannot start now (None: it can)."""
        if self.full:
            return f"max_concurrent_runs {self.coordinator.max_concurrent_runs} reached"
        for i, b in self._buckets(run):
            limit = self.coordinator.tag_concurrency_limits[i]
            if self.buckets[(i, b)] >= limit.limit:
                return f"tag limit {b[0]}{'=' + b[1] if b[1] is not None else ''}: {limit.limit} reached"
        return None

    def take(self, run: RunRecord) -> None:
        self.total += 1
        self._count(run)
