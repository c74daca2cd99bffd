"""Typed event records and their stable JSON form.

Every event of a run, whether written by the engine or reported by a step worker
running in another process or machine, is an `Event`. Its JSON form (`to_dict`)
is a stable, versioned contract: plugins and storages depend on it.
"""

from __future__ import annotations

import enum
import json
import time
from typing import Any

import attrs

EVENT_SCHEMA_VERSION = 1


class EventType(enum.StrEnum):
    RUN_QUEUED = "RUN_QUEUED"
    RUN_STARTING = "RUN_STARTING"
    RUN_LAUNCHED = "RUN_LAUNCHED"
    RUN_START = "RUN_START"
    RUN_SUCCESS = "RUN_SUCCESS"
    RUN_FAILURE = "RUN_FAILURE"
    RUN_CANCELING = "RUN_CANCELING"
    RUN_CANCELED = "RUN_CANCELED"
    STEP_START = "STEP_START"
    STEP_OUTPUT = "STEP_OUTPUT"
    STEP_SUCCESS = "STEP_SUCCESS"
    STEP_FAILURE = "STEP_FAILURE"
    STEP_RETRY = "STEP_RETRY"
    STEP_SKIPPED = "STEP_SKIPPED"
    STEP_STDOUT = "STEP_STDOUT"
    STEP_STDERR = "STEP_STDERR"
    STEP_LOG = "STEP_LOG"
    ENGINE = "ENGINE"


STEP_TERMINAL = frozenset({EventType.STEP_SUCCESS, EventType.STEP_FAILURE})
STEP_LIVE = frozenset({EventType.STEP_START, EventType.STEP_LOG, EventType.STEP_STDOUT, EventType.STEP_STDERR})
"""The events of a running attempt a handler passes on while it runs (`StepHandler.report`)."""


class FailureKind(enum.StrEnum):
    """Why a step attempt failed; the same taxonomy for every backend."""

    ERROR = "error"  # the step function raised
    TIMEOUT = "timeout"  # it ran past its timeout and was stopped
    SIGNAL = "signal"  # its process was killed by a signal
    OOM = "oom"  # it ran out of memory
    NOT_STARTED = "not_started"  # the backend never started it
    WORKER_LOST = "worker_lost"  # the process, container or worker running it vanished
    CANCELED = "canceled"  # the run was canceled while it ran


@attrs.frozen(kw_only=True)
class FailureInfo:
    """What is known about a failure: carried in the `data` of STEP_FAILURE events."""

    kind: FailureKind
    message: str
    error_class: str | None = None
    traceback: str | None = None
    exit_code: int | None = None
    signal: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["kind"] = self.kind.value
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FailureInfo:
        return cls(
            kind=FailureKind(d["kind"]),
            message=d.get("message", ""),
            error_class=d.get("error_class"),
            traceback=d.get("traceback"),
            exit_code=d.get("exit_code"),
            signal=d.get("signal"),
        )


@attrs.frozen(kw_only=True)
class Event:
    """One thing that happened in a run.

    ``data`` holds the payload of the event type:
    STEP_FAILURE/RUN_FAILURE: ``{"failure": FailureInfo.to_dict()}``;
    STEP_OUTPUT: ``{"ref": str, "type": str}``; STEP_STDOUT/STEP_STDERR: ``{"text": str}``;
    STEP_RETRY: ``{"delay": float, "next_attempt": int}``; STEP_START: ``{"pid": int, "host": str}``.
    """

    type: EventType
    run_id: str
    timestamp: float = attrs.field(factory=time.time)
    step_key: str | None = None
    attempt: int | None = None
    attempt_id: str | None = None
    message: str = ""
    data: dict[str, Any] = attrs.field(factory=dict)

    @property
    def failure(self) -> FailureInfo | None:
        raw = self.data.get("failure")
        return FailureInfo.from_dict(raw) if raw else None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "v": EVENT_SCHEMA_VERSION,
            "type": self.type.value,
            "run_id": self.run_id,
            "timestamp": self.timestamp,
        }
        if self.step_key is not None:
            d["step_key"] = self.step_key
        if self.attempt is not None:
            d["attempt"] = self.attempt
        if self.attempt_id is not None:
            d["attempt_id"] = self.attempt_id
        if self.message:
            d["message"] = self.message
        if self.data:
            d["data"] = self.data
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), default=str)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        return cls(
            type=EventType(d["type"]),
            run_id=d["run_id"],
            timestamp=d["timestamp"],
            step_key=d.get("step_key"),
            attempt=d.get("attempt"),
            attempt_id=d.get("attempt_id"),
            message=d.get("message", ""),
            data=d.get("data") or {},
        )

    @classmethod
    def from_json(cls, s: str) -> Event:
        return cls.from_dict(json.loads(s))

    @classmethod
    def many_from_json(cls, bodies: list[str], chunk: int = 2000) -> list[Event]:
        """``[from_json(b) for b in bodies]`` in less memory, emptying ``bodies`` as it goes.

        A run's events repeat the same run id, step keys, attempt ids, messages and payload
        keys, and each copy decoded on its own was a string of its own (~1 KB per step of a
        large run, issue 18). One `json.loads` per chunk shares equal keys; equal short
        strings are shared here; each chunk's JSON is dropped once decoded.
        """
        shared: dict[Any, Any] = {}
        same = shared.setdefault
        events = []
        for start in range(0, len(bodies), chunk):
            text = "[" + ",".join(bodies[start:start + chunk]) + "]"
            bodies[start:start + chunk] = [""] * len(bodies[start:start + chunk])
            for d in json.loads(text):
                data = d.get("data") or {}
                for k, v in data.items():
                    if type(v) is str and len(v) <= 200:
                        data[k] = same(v, v)  # the same key: the dict does not change size
                step_key, attempt_id, message = d.get("step_key"), d.get("attempt_id"), d.get("message", "")
                events.append(cls(
                    type=EventType(d["type"]),
                    run_id=same(d["run_id"], d["run_id"]),
                    timestamp=d["timestamp"],
                    step_key=None if step_key is None else same(step_key, step_key),
                    attempt=d.get("attempt"),
                    attempt_id=None if attempt_id is None else same(attempt_id, attempt_id),
                    message=same(message, message),
                    data=data,
                ))
        return events
