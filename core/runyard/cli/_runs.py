"""Helpers the run commands share: launching, waiting with progress, describing runs."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn

import click

if TYPE_CHECKING:
    from ..instance import Instance
    from ..storage import RunRecord


def debug_enabled() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    return bool(root is not None and isinstance(root.obj, dict) and root.obj.get("debug"))


def fail(message: str, code: int) -> NoReturn:
    """Print ``error: message`` on stderr (with the traceback under --debug) and exit ``code``."""
    if debug_enabled() and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def start(instance: Instance, run: RunRecord) -> RunRecord:
    """Hand a created run to the run launcher; a launcher that cannot start it fails the run (exit 1)."""
    from ..errors import RunyardError
    from ..runs import launch_run

    try:
        return launch_run(instance, run)
    except RunyardError:
        raise
    except Exception as e:
        fail(f"run {run.run_id} could not be started: {type(e).__name__}: {e}", 1)


def duration(run: RunRecord) -> float | None:
    begin = run.started_at or run.created_at
    if run.ended_at is None:
        return None
    return max(0.0, run.ended_at - begin)


def run_dict(run: RunRecord) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "job_name": run.job_name,
        "status": run.status.value,
        "executor": run.executor,
        "tags": dict(run.tags),
        "parent_run_id": run.parent_run_id,
        "step_selection": list(run.step_selection) if run.step_selection is not None else None,
        "code_pointer": dict(run.code_pointer) if run.code_pointer else None,
        "run_config": dict(run.run_config),
        "created_at": run.created_at,
        "started_at": run.started_at,
        "ended_at": run.ended_at,
        "duration": duration(run),
    }


def end_reason(instance: Instance, run: RunRecord) -> dict[str, Any] | None:
    """Why a finished run failed or was canceled: the message of its last RUN_FAILURE or
    RUN_CANCELED event, with the failure details when it has them."""
    from ..events import EventType
    from ..storage import RunStatus

    if run.status not in (RunStatus.FAILURE, RunStatus.CANCELED):
        return None
    wanted = EventType.RUN_FAILURE if run.status is RunStatus.FAILURE else EventType.RUN_CANCELED
    events = instance.storage.get_events(run.run_id, types=[wanted])
    if not events:
        return {"message": f"run {run.status.value.lower()}"}
    ev = events[-1].event
    out: dict[str, Any] = {"message": ev.message}
    if ev.failure is not None:
        out.update(ev.failure.to_dict())
        out["message"] = ev.message or ev.failure.message
    if run.status is RunStatus.CANCELED:
        # Who asked for the cancel and why (the daemon's max_runtime) is on RUN_CANCELING.
        asked = instance.storage.get_events(run.run_id, types=[EventType.RUN_CANCELING])
        if asked and asked[-1].event.data.get("reason"):
            out["reason"] = asked[-1].event.data["reason"]
            out["message"] = f"{asked[-1].event.message} ({ev.message})"
    return out


def report_started(instance: Instance, run: RunRecord, *, wait: bool, as_json: bool, summary: dict[str, Any]) -> None:
    """End a command that started ``run``: print its id (or ``summary`` as JSON) and return;
    with ``wait``, print the id and follow the run, exiting by its outcome."""
    from ._common import echo_json

    if not wait:
        if as_json:
            echo_json(summary)
        else:
            click.echo(run.run_id)
        return
    if not as_json:
        click.echo(run.run_id)
    sys.exit(wait_and_report(instance, run, timeout=None, as_json=as_json))


def wait_and_report(instance: Instance, run: RunRecord, *, timeout: float | None, as_json: bool) -> int:
    """Wait for ``run`` to finish showing progress (or, with ``as_json``, print its outcome
    as JSON at the end); return the exit status: 0 SUCCESS, 1 otherwise or on timeout."""
    from ..runs import step_states, wait_for_run
    from ..storage import RunStatus
    from ._progress import Progress, summary_line, use_live

    begin = run.started_at or run.created_at
    started = time.monotonic() - max(0.0, time.time() - begin)
    progress = None
    if not as_json:
        progress = Progress(live=use_live(), label=f"{run.job_name} {run.run_id[:12]}", started=started)
    try:
        result = wait_for_run(instance, run.run_id, timeout=timeout, on_events=progress.feed if progress else None)
    except KeyboardInterrupt:
        if progress is not None:
            progress.close()
        click.echo(
            f"stopped waiting; run {run.run_id} goes on (`runyard run cancel {run.run_id}` stops it)", err=True
        )
        return 1
    finally:
        if progress is not None:
            progress.close()
    final = result.run
    states = progress.states if progress is not None else step_states(instance, final.run_id)
    reason = end_reason(instance, final)
    if as_json:
        from ._common import echo_json

        echo_json({**run_dict(final), "steps": states, "failure": reason, "timed_out": result.timed_out})
    else:
        if reason is not None and "kind" in reason:  # not a step's failure: those are shown already
            click.echo(f"run {final.status.value.lower()}: {reason['message']}")
        if result.timed_out:
            click.echo(
                f"timed out after {timeout:g}s: run {final.run_id} is still {final.status.value}", err=True
            )
        else:
            elapsed = duration(final)
            click.echo(summary_line(final.run_id, final.status.value, elapsed or 0.0, states))
    return 0 if final.status is RunStatus.SUCCESS and not result.timed_out else 1
