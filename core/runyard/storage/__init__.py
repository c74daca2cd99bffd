"""Run storage: run records and their events. SQLite by default."""

from __future__ import annotations

import enum
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from ..events import Event, EventType


class RunStatus(enum.StrEnum):
    QUEUED = "QUEUED"
    STARTING = "STARTING"
    STARTED = "STARTED"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    CANCELING = "CANCELING"
    CANCELED = "CANCELED"

    @property
    def is_finished(self) -> bool:
        return self in (RunStatus.SUCCESS, RunStatus.FAILURE, RunStatus.CANCELED)


def new_run_id() -> str:
    return uuid.uuid4().hex


@attrs.frozen(kw_only=True)
class RunRecord:
    run_id: str = attrs.field(factory=new_run_id)
    job_name: str
    code_pointer: Mapping[str, str] | None = None
    run_config: Mapping[str, Any] = attrs.field(factory=dict)
    executor: str | None = None
    tags: Mapping[str, str] = attrs.field(factory=dict)
    status: RunStatus = RunStatus.QUEUED
    created_at: float = attrs.field(factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    parent_run_id: str | None = None
    step_selection: Sequence[str] | None = None
    # How the run was resolved when it was created (`runyard.resolution.ResolvedRun.to_dict`):
    # the run worker executes this. None for runs recorded before runs kept one.
    resolution: Mapping[str, Any] | None = None


@attrs.frozen(kw_only=True)
class Lease:
    """Who holds a named lease (`RunStorage.claim_lease`): the daemon's single-leader lock.

    Times are seconds since the epoch on the storage's clock (the database server's for
    PostgreSQL), so daemons on machines with skewed clocks still agree on expiry.
    ``epoch`` grows by one each time the lease changes hands.
    """

    name: str
    holder: str
    epoch: int
    acquired_at: float
    renewed_at: float
    expires_at: float
    info: Mapping[str, Any] = attrs.field(factory=dict)
    now: float = 0.0  # the storage's clock when this was read

    @property
    def is_expired(self) -> bool:
        return self.expires_at <= self.now


@attrs.frozen(kw_only=True)
class RunFilter:
    """Which runs a page of runs holds (`RunStorage.page_runs`); None means any."""

    job_name: str | None = None
    statuses: tuple[RunStatus, ...] | None = None
    tag: tuple[str, str] | None = None  # (key, value)
    parent_run_id: str | None = None
    created_after: float | None = None  # created at or after (seconds since the epoch)
    created_before: float | None = None  # created before

    def matches(self, run: RunRecord) -> bool:
        return (
            (self.job_name is None or run.job_name == self.job_name)
            and (self.statuses is None or run.status in self.statuses)
            and (self.tag is None or run.tags.get(self.tag[0]) == self.tag[1])
            and (self.parent_run_id is None or run.parent_run_id == self.parent_run_id)
            and (self.created_after is None or run.created_at >= self.created_after)
            and (self.created_before is None or run.created_at < self.created_before)
        )


@attrs.frozen
class StoredEvent:
    id: int
    event: Event


class RunStorage(ABC):
    """Runs and events. Safe to use from several processes at once."""

    @abstractmethod
    def add_run(self, run: RunRecord) -> None: ...

    @abstractmethod
    def get_run(self, run_id: str) -> RunRecord | None: ...

    @abstractmethod
    def list_runs(self, *, limit: int = 50, statuses: Iterable[RunStatus] | None = None) -> list[RunRecord]: ...

    def page_runs(self, where: RunFilter, *, limit: int = 50, offset: int = 0) -> tuple[list[RunRecord], int]:
        """One page of the runs ``where`` selects, newest first, and how many it selects in all.

        This default reads every run; the SQL storages override it with one indexed query.
        """
        runs = [r for r in self.list_runs(limit=-1) if where.matches(r)]
        return runs[offset:offset + limit], len(runs)

    @abstractmethod
    def set_run_status(
        self, run_id: str, status: RunStatus, *, only_from: Iterable[RunStatus] | None = None
    ) -> bool:
        """Move a run to ``status``; with ``only_from``, only if its status is one of those.

        Returns whether the run changed, so two processes racing to end a run cannot both win.
        """

    @abstractmethod
    def store_events(self, events: Sequence[Event]) -> None: ...

    def transition_run(
        self, run_id: str, status: RunStatus, events: Sequence[Event], *, only_from: Iterable[RunStatus],
        ended_at: float | None = None,
    ) -> bool:
        """Move a run to ``status`` (if it is in ``only_from``) and store ``events`` with it, as
        one change: a reader never sees the new status without its events (a FAILURE with no
        reason), and a crash between the two cannot lose them. The events are stored only if
        the status changed, so the loser of a race adds nothing. ``ended_at``: the time the
        run really ended, recorded instead of now. Returns whether the run changed.

        This default is not atomic (status, then events, as two writes); the SQL storages
        override it with one transaction. Added in API version 1 (optional).
        """
        if not self.set_run_status(run_id, status, only_from=only_from):
            return False
        if ended_at is not None:
            self.record_end_time(run_id, ended_at)
        self.store_events(events)
        return True

    @abstractmethod
    def get_events(
        self,
        run_id: str,
        *,
        after_id: int = 0,
        step_key: str | None = None,
        types: Iterable[EventType] | None = None,
    ) -> list[StoredEvent]: ...

    def get_events_json(
        self,
        run_id: str,
        *,
        after_id: int = 0,
        step_key: str | None = None,
        types: Iterable[EventType] | None = None,
        limit: int | None = None,
    ) -> list[tuple[int, str]]:
        """`get_events` as ``(id, JSON text of Event.to_dict)``, at most ``limit`` of them, for
        readers that pass events on without looking inside (``runyard ui`` sends tens of
        thousands to a browser). The SQL storages return the stored text as it is."""
        found = self.get_events(run_id, after_id=after_id, step_key=step_key, types=types)
        return [(s.id, s.event.to_json()) for s in found[:limit]]

    @abstractmethod
    def delete_run(self, run_id: str) -> None: ...

    # -- optional: what `runyard daemon` needs; the built-in storages implement them --------

    def run_states(self, statuses: Iterable[RunStatus]) -> list[tuple[str, RunStatus]]:
        """``(run_id, status)`` of every run in ``statuses``, oldest first: a cheap poll for
        the daemon (no JSON columns read). Storages may override it with a narrow query."""
        runs = self.list_runs(limit=-1, statuses=statuses)
        return [(r.run_id, r.status) for r in reversed(runs)]

    def record_end_time(self, run_id: str, ended_at: float) -> None:  # noqa: B027 - optional
        """Correct a finished run's ``ended_at`` to when it really ended (a dead worker's
        time of death, known only after the fact). Storages that cannot keep the default."""

    def claim_lease(self, name: str, holder: str, ttl: float, info: Mapping[str, Any]) -> Lease | None:
        """Take or renew the lease ``name`` for ``holder`` for ``ttl`` seconds, atomically:
        it succeeds when nobody holds it, ``holder`` does, or the holder's lease expired.
        Returns the lease when ``holder`` holds it afterwards, else None."""
        raise NotImplementedError(f"{type(self).__name__} keeps no leases; runyard daemon needs sqlite or postgres")

    def get_lease(self, name: str) -> Lease | None:
        """The lease ``name`` as stored (expired or not), or None if never taken."""
        raise NotImplementedError(f"{type(self).__name__} keeps no leases; runyard daemon needs sqlite or postgres")

    def release_lease(self, name: str, holder: str) -> None:
        """Give up the lease if ``holder`` holds it (a clean stop: the next daemon takes over at once)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no leases; runyard daemon needs sqlite or postgres")

    def close(self) -> None:  # noqa: B027 - optional for storages holding nothing
        """Release connections."""


class EventRowReads:
    """`get_events` and `get_events_json` for a storage that reads a run's events with one
    query, ``_event_rows(run_id, after_id, step_key, types, limit) -> [(id, JSON text)]``
    (the SQL storages); listed before `RunStorage` among the bases."""

    def _event_rows(self, run_id: str, after_id: int, step_key: str | None, types: Iterable[EventType] | None,
                    limit: int | None) -> Sequence[tuple[Any, ...]]:
        raise NotImplementedError

    def get_events(
        self,
        run_id: str,
        *,
        after_id: int = 0,
        step_key: str | None = None,
        types: Iterable[EventType] | None = None,
    ) -> list[StoredEvent]:
        rows = self._event_rows(run_id, after_id, step_key, types, None)
        ids, bodies = [int(i) for i, _ in rows], [body for _, body in rows]
        del rows  # the bodies are freed as they are decoded
        return list(map(StoredEvent, ids, Event.many_from_json(bodies)))

    def get_events_json(
        self,
        run_id: str,
        *,
        after_id: int = 0,
        step_key: str | None = None,
        types: Iterable[EventType] | None = None,
        limit: int | None = None,
    ) -> list[tuple[int, str]]:
        return [(int(i), body) for i, body in self._event_rows(run_id, after_id, step_key, types, limit)]
