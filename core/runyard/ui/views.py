"""What the pages show, computed from storage: plain data, no web framework here."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from ..events import EventType
from ..storage import RunRecord, RunStorage

# Events that change a step's state or a run's status: the timeline is drawn from these.
LIFECYCLE = (
    EventType.STEP_START, EventType.STEP_SUCCESS, EventType.STEP_FAILURE, EventType.STEP_RETRY,
    EventType.STEP_SKIPPED,
    EventType.RUN_QUEUED, EventType.RUN_STARTING, EventType.RUN_LAUNCHED, EventType.RUN_START,
    EventType.RUN_SUCCESS, EventType.RUN_FAILURE, EventType.RUN_CANCELING, EventType.RUN_CANCELED,
    EventType.ENGINE,
)
LOGS = (EventType.STEP_STDOUT, EventType.STEP_STDERR, EventType.STEP_LOG)
# A tag that marks a run created by an action of the UI: its value is the action's key, so a
# repeated submission of the same action finds the run it already created.
ACTION_TAG = "runyard.ui/action"


def duration(run: RunRecord, now: float | None = None) -> float | None:
    begin = run.started_at
    if begin is None:
        return None
    end = run.ended_at if run.ended_at is not None else (now or time.time())
    return max(0.0, end - begin)


def run_row(run: RunRecord) -> dict[str, Any]:
    """One row of the runs page (also what its live refresh sends)."""
    return {
        "run_id": run.run_id,
        "job_name": run.job_name,
        "status": run.status.value,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "ended_at": run.ended_at,
        "duration": duration(run),
        "tags": {k: v for k, v in run.tags.items()},
        "parent_run_id": run.parent_run_id,
    }


def events_json(rows: list[tuple[int, str]]) -> str:
    """``[[id, event], ...]`` as JSON text, each event the stored JSON (`Event.to_dict`) as it
    is: a 5,000-step run has tens of thousands of events, and parsing them here only to
    serialise them again would be most of the page's server time."""
    return "[" + ",".join(f"[{i},{body}]" for i, body in rows) + "]"


def events_after(storage: RunStorage, run_id: str, after: int, *, limit: int) -> tuple[str, int, bool]:
    """The lifecycle events of a run after id ``after``, for the run page (output is fetched
    per step, see `step_logs`). Returns them as JSON text, the id to ask after next time and
    whether more are waiting."""
    rows = storage.get_events_json(run_id, after_id=after, types=LIFECYCLE, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return events_json(rows), (rows[-1][0] if rows else after), more


def step_logs(storage: RunStorage, run_id: str, step: str, after: int, limit: int) -> tuple[str, bool]:
    rows = storage.get_events_json(run_id, after_id=after, step_key=step, types=LOGS, limit=limit + 1)
    return events_json(rows[:limit]), len(rows) > limit


def settings_rows(plugin: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The settings of a resolved executor or launcher, each with where it came from."""
    if not plugin:
        return []
    rows = []
    for s in plugin.get("settings") or []:
        where = "default" if s.get("source") == "default" else f"{s.get('source')}: {s.get('path')}"
        rows.append({"key": s.get("key"), "value": s.get("value"), "where": where})
    return rows


def step_graph(storage: Any, run_id: str) -> dict[str, Any]:
    """``{"steps": [[key, [upstream keys]], ...]}``: the plan recorded with the run when it was
    created (`ExecutionPlan.graph`), or ``{"error": ...}``. Never from the job's code: importing
    it would run user code in the viewer, and fail where the job's dependencies are missing."""
    from ..events import EventType

    for stored in storage.get_events(run_id, types=[EventType.RUN_QUEUED, EventType.RUN_START]):
        plan = stored.event.data.get("plan")
        if plan is not None:
            return {"steps": plan}
    return {"error": "this run has no recorded plan (it was created by an older runyard): no step graph"}


def status_choices() -> Iterable[str]:
    from ..storage import RunStatus

    return [s.value for s in RunStatus]
