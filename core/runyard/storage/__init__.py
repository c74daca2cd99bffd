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

    @abstractmethod
    def set_run_status(
        self, run_id: str, status: RunStatus, *, only_from: Iterable[RunStatus] | None = None
    ) -> bool:
        """Move a run to ``status``; with ``only_from``, only if its status is one of those.

        Returns whether the run changed, so two processes racing to end a run cannot both win.
        """

    @abstractmethod
    def store_events(self, events: Sequence[Event]) -> None: ...

    @abstractmethod
    def get_events(
        self,
        run_id: str,
        *,
        after_id: int = 0,
        step_key: str | None = None,
        types: Iterable[EventType] | None = None,
    ) -> list[StoredEvent]: ...

    @abstractmethod
    def delete_run(self, run_id: str) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional for storages holding nothing
        """Release connections."""
