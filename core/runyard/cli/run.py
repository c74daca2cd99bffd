"""``runyard run``: look at launched runs, follow them, cancel, re-execute, delete.

Every command that looks at an unfinished run first checks its worker (`runs.check_run`),
so a run whose worker died is marked FAILURE, with the reason, as soon as anyone looks.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from ._common import echo_json

if TYPE_CHECKING:
    from ..instance import Instance
    from ..storage import RunRecord

_STATUSES = ("QUEUED", "STARTING", "STARTED", "SUCCESS", "FAILURE", "CANCELING", "CANCELED")


@click.group()
def run() -> None:
    """Inspect, follow, cancel, re-execute and delete launched runs.

    RUN_ID may be a unique prefix of a run id (`run list` shows 12 characters).

    \b
    Examples:
      runyard run list --status failure
      runyard run reexecute 3f2c9a1b04de --from-failure --wait
    """


def _instance() -> Instance:
    from ..instance import Instance

    return Instance.from_env(validate=True)


def _observe(instance: Instance, run: RunRecord) -> RunRecord:
    """``run`` after noticing a dead worker; if the storage cannot record that (a full
    disk), the run as stored, with a warning: looking at runs must keep working."""
    from ..errors import StorageError
    from ..runs import check_run

    try:
        return check_run(instance, run)
    except StorageError as e:
        click.echo(f"warning: run {run.run_id} could not be checked: {e}", err=True)
        return run


def _checked(instance: Instance, run_id: str) -> RunRecord:
    """The run (by id or unique prefix), after noticing a dead worker."""
    from ..runs import get_run

    return _observe(instance, get_run(instance, run_id))


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _took(run: RunRecord) -> str:
    from ._runs import duration

    d = duration(run)
    if d is None:
        if run.started_at is None:
            return "-"
        return f"{time.time() - run.started_at:.1f}s…"
    return f"{d:.2f}s"


def _parse_when(value: str | None, option: str) -> float | None:
    """A time given as ``2026-12-01``, ``2026-12-01T14:30`` (local time) or an age
    (``90s``, ``30m``, ``2h``, ``7d``): seconds since the epoch."""
    if value is None:
        return None
    text = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:].lower() in units and text[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(text[:-1]) * units[text[-1].lower()]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise click.BadParameter(
            f"expected a date/time like 2026-12-01 or 2026-12-01T14:30, or an age like 30m, 2h, 7d; got {value!r}",
            param_hint=option,
        ) from None


def _parse_tag(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise click.BadParameter(f"expected KEY=VALUE, got {value!r}", param_hint="--tag")
    return key, val


def _describe(where: Any) -> str:
    """``where`` (a RunFilter) in words, for "no runs …"."""
    parts = []
    if where.job_name is not None:
        parts.append(f"of job {where.job_name}")
    if where.statuses:
        parts.append(f"with status {', '.join(s.value for s in where.statuses)}")
    if where.tag is not None:
        parts.append(f"tagged {where.tag[0]}={where.tag[1]}")
    if where.created_after is not None:
        parts.append(f"created since {_when(where.created_after)}")
    if where.created_before is not None:
        parts.append(f"created before {_when(where.created_before)}")
    return " ".join(parts)


@run.command("list")
@click.option(
    "--status", "statuses", multiple=True, type=click.Choice(_STATUSES, case_sensitive=False),
    help="Only runs with this status (repeatable).",
)
@click.option("--job", "job_name", help="Only runs of this job.")
@click.option("--tag", metavar="KEY=VALUE", help="Only runs with this tag.")
@click.option("--since", help="Only runs created at or after this time (2026-12-01, 2026-12-01T14:30, "
              "or an age: 2h, 7d).")
@click.option("--until", help="Only runs created before this time (same forms as --since).")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1), help="At most this many runs.")
@click.option("--offset", default=0, show_default=True, type=click.IntRange(min=0),
              help="Skip this many matching runs first (the next page: --offset of the previous + --limit).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def list_runs(statuses: tuple[str, ...], job_name: str | None, tag: str | None, since: str | None,
              until: str | None, limit: int, offset: int, as_json: bool) -> None:
    """List runs, newest first, a page at a time.

    Unfinished runs are checked first: one whose worker died shows as FAILURE.

    \b
    Examples:
      runyard run list
      runyard run list --status failure --limit 5 --json
      runyard run list --job etl --tag team=data --since 2d --offset 20
    """
    from ..runs import ACTIVE
    from ..storage import RunFilter, RunStatus
    from ._runs import run_dict

    where = RunFilter(
        job_name=job_name,
        statuses=tuple(RunStatus(s.upper()) for s in statuses) or None,
        tag=_parse_tag(tag),
        created_after=_parse_when(since, "--since"),
        created_before=_parse_when(until, "--until"),
    )
    instance = _instance()
    storage = instance.storage
    for r in storage.list_runs(limit=10_000, statuses=ACTIVE):
        _observe(instance, r)
    runs, total = storage.page_runs(where, limit=limit, offset=offset)
    from ..runs import queue_positions

    positions = queue_positions(instance) if any(r.status is RunStatus.QUEUED for r in runs) else {}
    if as_json:
        echo_json([{**run_dict(r), "queue_position": positions.get(r.run_id)} for r in runs])
        return
    if not runs:
        what = _describe(where)
        click.echo(f"no runs{' ' + what if what else ''}" + (f" past the first {offset}" if offset and total else ""))
        return
    width = max(len("JOB"), *(len(r.job_name) for r in runs))
    click.echo(f"{'RUN_ID':<12}  {'JOB':<{width}}  {'STATUS':<9}  {'CREATED':<19}  {'DURATION':<9}  TAGS")
    for r in runs:
        tag_text = " ".join(f"{k}={v}" for k, v in r.tags.items())
        # A queued run shows its place in the daemon's queue: QUEUED#1 starts next.
        status = f"{r.status.value}#{positions[r.run_id]}" if r.run_id in positions else r.status.value
        click.echo(
            f"{r.run_id[:12]:<12}  {r.job_name:<{width}}  {status:<9}  {_when(r.created_at):<19}  "
            f"{_took(r):<9}  {tag_text}".rstrip()
        )
    if offset + len(runs) < total:
        click.echo(f"(runs {offset + 1}-{offset + len(runs)} of {total}; next page: --offset {offset + len(runs)})",
                   err=True)


def _step_details(instance: Instance, run: RunRecord) -> dict[str, dict[str, Any]]:
    """Each step's state, attempts, timings (per attempt and in all) and last failure."""
    from ..events import EventType
    from ..runs import step_states

    states = step_states(instance, run.run_id)
    steps: dict[str, dict[str, Any]] = {
        k: {"state": s, "attempts": 0, "failure": None, "started_at": None, "ended_at": None, "duration": None,
            "timings": []}
        for k, s in states.items()
    }
    by_attempt: dict[tuple[str, int], dict[str, Any]] = {}
    for stored in instance.storage.get_events(
        run.run_id, types=[EventType.STEP_START, EventType.STEP_FAILURE, EventType.STEP_SUCCESS]
    ):
        ev = stored.event
        info = steps.get(ev.step_key or "")
        if info is None:
            continue
        if ev.attempt is not None:
            info["attempts"] = max(info["attempts"], ev.attempt)
            timing = by_attempt.get((ev.step_key or "", ev.attempt))
            if timing is None:
                timing = {"attempt": ev.attempt, "started_at": None, "ended_at": None, "duration": None,
                          "outcome": "running"}
                by_attempt[(ev.step_key or "", ev.attempt)] = timing
                info["timings"].append(timing)
            if ev.type is EventType.STEP_START:
                timing["started_at"] = ev.timestamp
            elif timing["ended_at"] is None:  # the first ending of an attempt is its outcome
                timing["ended_at"] = ev.timestamp
                timing["outcome"] = "success" if ev.type is EventType.STEP_SUCCESS else "failure"
            if timing["started_at"] is not None and timing["ended_at"] is not None:
                timing["duration"] = max(0.0, timing["ended_at"] - timing["started_at"])
        if ev.type is EventType.STEP_FAILURE:
            f = ev.failure
            info["failure"] = f.to_dict() if f else {"message": ev.message}
        elif ev.type is EventType.STEP_SUCCESS:
            info["failure"] = None  # an earlier attempt failed, a retry succeeded
    for info in steps.values():
        starts = [t["started_at"] for t in info["timings"] if t["started_at"] is not None]
        ends = [t["ended_at"] for t in info["timings"] if t["ended_at"] is not None]
        info["started_at"] = min(starts) if starts else None
        if ends and all(t["ended_at"] is not None for t in info["timings"]):
            info["ended_at"] = max(ends)
        if info["started_at"] is not None and info["ended_at"] is not None:
            info["duration"] = max(0.0, info["ended_at"] - info["started_at"])
    return steps


def _step_took(info: dict[str, Any]) -> str:
    if info["duration"] is not None:
        return f"{info['duration']:.2f}s"
    if info["started_at"] is not None and info["state"] == "running":
        return f"{time.time() - info['started_at']:.1f}s…"
    return "-"


@run.command("show")
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def show(run_id: str, as_json: bool) -> None:
    """Show a run, the state of each step and why it failed.

    RUN_ID may be a unique prefix, as `runyard run list` shows.

    \b
    Example:
      runyard run show 3f2c9a1b04de --json
    """
    from ..runs import child_runs, worker_info
    from ._runs import end_reason, run_dict

    instance = _instance()
    r = _checked(instance, run_id)
    children = child_runs(instance, r.run_id)
    steps = _step_details(instance, r)
    reason = end_reason(instance, r)
    launcher, worker = worker_info(instance, r.run_id)
    if as_json:
        echo_json({**run_dict(r), "steps": steps, "failure": reason, "launcher": launcher, "worker": worker,
                   "children": [{"run_id": c.run_id, "status": c.status.value, "tags": dict(c.tags)}
                                for c in children],
                   "resolution": r.resolution})  # what it executes with (as `config explain --json` prints)
        return
    pointer = r.code_pointer or {}
    rows = [
        ("run", r.run_id),
        ("job", r.job_name),
        ("status", r.status.value),
    ]
    if reason is not None:
        rows.append(("reason", reason["message"]))
    rows += [
        ("code", f"-f {pointer['file']}" if "file" in pointer else f"-m {pointer.get('module', '?')}"),
        ("executor", r.executor or "-"),
        ("tags", " ".join(f"{k}={v}" for k, v in r.tags.items()) or "-"),
        ("parent", r.parent_run_id or "-"),
        ("children", " ".join(f"{c.run_id} ({c.status.value})" for c in children) or "-"),
        ("steps", ", ".join(r.step_selection) if r.step_selection is not None else "all"),
        ("created", _when(r.created_at)),
        ("started", _when(r.started_at)),
        ("ended", _when(r.ended_at)),
        ("duration", _took(r)),
    ]
    if worker is not None:
        where = f"pid {worker['pid']}" if "pid" in worker else ", ".join(f"{k}={v}" for k, v in worker.items())
        if worker.get("host"):
            where += f" on {worker['host']}"
        rows.append(("worker", f"{launcher}: {where}"))
    for k, v in rows:
        lines = str(v).splitlines() or [""]
        click.echo(f"{k:<9} {lines[0]}")
        for more in lines[1:]:
            click.echo(f"{'':<9} {more}")
    if not steps:
        click.echo("\nno step has run")
        return
    width = max(len("STEP"), *(len(k) for k in steps))
    click.echo(f"\n{'STEP':<{width}}  {'STATE':<8}  {'ATTEMPTS':<8}  DURATION")
    for key, info in steps.items():
        line = f"{key:<{width}}  {info['state']:<8}  {info['attempts']:<8}  {_step_took(info)}"
        if info["failure"]:
            line += f"  {info['failure'].get('message', '')}".splitlines()[0]
        click.echo(line)
    for key, info in steps.items():
        failure = info["failure"]
        if not failure or info["state"] != "failed":
            continue
        kind = f" ({failure['kind']})" if failure.get("kind") else ""
        click.echo(f"\nstep '{key}' failed{kind}: {failure.get('message', '')}")
        tb = failure.get("traceback")
        if tb:
            click.echo(str(tb).rstrip())


def _print_log_event(ev: Any, prefix: bool) -> None:
    from ..events import EventType

    head = f"[{ev.step_key}] " if prefix else ""
    if ev.type is EventType.STEP_LOG:
        text = f"{ev.data.get('level', 'INFO')} {ev.data.get('logger', '')}: {ev.message}"
    else:
        text = str(ev.data.get("text", ""))
    for line in text.splitlines():
        click.echo(f"{head}{line}")


@run.command("logs")
@click.argument("run_id")
@click.option("--step", "step_key", help="Only this step's output.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the run finishes.")
def logs(run_id: str, step_key: str | None, follow: bool) -> None:
    """Print what a run's steps wrote (stdout, stderr, logs).

    Lines are prefixed with their step's key unless --step picks one step.

    \b
    Examples:
      runyard run logs 3f2c9a1b04de
      runyard run logs 3f2c9a1b04de --step load --follow
    """
    from ..errors import RunyardError
    from ..events import EventType
    from ..runs import step_states, wait_for_run

    instance = _instance()
    r = _checked(instance, run_id)
    if step_key is not None and r.status.is_finished:
        known = step_states(instance, r.run_id)
        if step_key not in known:
            steps = ", ".join(known) or "none ran"
            raise RunyardError(f"run {r.run_id} has no step '{step_key}' (its steps: {steps})")
    kinds = {EventType.STEP_STDOUT, EventType.STEP_STDERR, EventType.STEP_LOG}
    printed = [0]

    def emit(events: Any) -> None:
        for ev in events:
            if ev.type in kinds and (step_key is None or ev.step_key == step_key):
                _print_log_event(ev, prefix=step_key is None)
                printed[0] += 1

    if follow and not r.status.is_finished:
        try:
            r = wait_for_run(instance, r.run_id, on_events=emit, every=0.1).run
        except KeyboardInterrupt:
            sys.exit(1)
    else:
        emit(s.event for s in instance.storage.get_events(r.run_id, step_key=step_key, types=list(kinds)))
    if not printed[0]:
        # On stderr: a script reading stdout gets nothing, a person learns why.
        whose = f"step '{step_key}' of run {r.run_id}" if step_key else f"run {r.run_id}"
        click.echo(f"{whose} ({r.status.value}) has no output: no step printed or logged anything", err=True)


@run.command("wait")
@click.argument("run_id")
@click.option("--timeout", type=click.FloatRange(min=0), help="Give up after this many seconds (exit 1).")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON instead of progress.")
def wait(run_id: str, timeout: float | None, as_json: bool) -> None:
    """Wait for a run to finish, showing its progress.

    Exit 0 if it succeeded, 1 if it failed or was canceled.
    A run whose worker died is marked FAILURE (with the reason) within about a second.
    A timeout exits 1 and leaves the run going.

    \b
    Example:
      runyard run wait 3f2c9a1b04de --timeout 600
    """
    from ._runs import wait_and_report

    instance = _instance()
    r = _checked(instance, run_id)
    sys.exit(wait_and_report(instance, r, timeout=timeout, as_json=as_json))


@run.command("cancel")
@click.argument("run_id")
@click.option("--grace", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds the run gets to stop its steps before everything of it is killed.")
def cancel(run_id: str, grace: float) -> None:
    """Cancel a run: stop its steps, skip the rest.

    The run ends CANCELED.

    The worker is asked to stop; after --grace seconds it and every process it started
    are killed. Exit 0 once the run has ended (whatever its status).

    \b
    Example:
      runyard run cancel 3f2c9a1b04de --grace 30
    """
    from ..errors import RunyardError
    from ..runs import cancel_run
    from ._runs import fail

    instance = _instance()
    r = _checked(instance, run_id)
    if r.status.is_finished:
        click.echo(f"run {r.run_id} already ended {r.status.value}; nothing to cancel")
        return
    try:
        done = cancel_run(instance, r.run_id, grace=grace)
    except RunyardError:
        raise
    except Exception as e:
        fail(f"could not cancel run {r.run_id}: {type(e).__name__}: {e}", 2)
    click.echo(f"run {done.run_id} {done.status.value}")


@run.command("reexecute")
@click.argument("run_id")
@click.option("--from-failure", is_flag=True, help="Run only the steps that did not succeed.")
@click.option("--steps", help="Run these steps (comma-separated keys or globs).")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the new run to finish; exit 0/1 by its outcome.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def reexecute(run_id: str, from_failure: bool, steps: str | None, wait_: bool, as_json: bool) -> None:
    """Launch a child run that reuses its parent's outputs.

    The new run of the same job has parent_run_id set and reads the outputs the
    parent's successful steps stored; without --from-failure or --steps it runs the
    parent's steps again. The job is loaded from the parent's code pointer.

    \b
    Examples:
      runyard run reexecute 3f2c9a1b04de --from-failure --wait
      runyard run reexecute 3f2c9a1b04de --steps 'report,load_*'
    """
    from ..definitions import CodePointer
    from ..errors import RunyardError
    from ..loader import load_job
    from ..runs import create_run, reexecution_selection
    from ._runs import report_started, start

    if from_failure and steps:
        raise click.UsageError("give --from-failure or --steps, not both")
    instance = _instance()
    parent = _checked(instance, run_id)
    if not parent.code_pointer:
        raise RunyardError(f"run {parent.run_id} has no code pointer: its job cannot be loaded again")
    pointer = CodePointer.from_dict(parent.code_pointer)
    job_def, loc = load_job(pointer, parent.job_name)
    selected = [s.strip() for s in steps.split(",") if s.strip()] if steps else None
    selection = reexecution_selection(instance, parent, job_def, from_failure=from_failure, steps=selected)
    child = create_run(
        instance, job_def, pointer=pointer, definitions=loc.definitions, run_config=parent.run_config,
        executor=parent.executor, tags=parent.tags, step_selection=selection, parent_run_id=parent.run_id,
    )
    if not instance.queues_runs:  # with a run queue, the daemon launches it
        child = start(instance, child)
    report_started(instance, child, wait=wait_, as_json=as_json,
                   summary={"run_id": child.run_id, "parent_run_id": parent.run_id, "status": child.status.value,
                            "step_selection": selection})


@run.command("delete")
@click.argument("run_ids", metavar="RUN_ID...", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Delete unfinished runs too (they are canceled first).")
@click.option("--yes", is_flag=True, help="Do not ask before deleting more than one run.")
def delete(run_ids: tuple[str, ...], force: bool, yes: bool) -> None:
    """Delete finished runs and their events. Their step outputs are kept.

    Each RUN_ID is a run id or a unique prefix; an empty or ambiguous one is refused.
    Deleting more than one run asks first on a terminal; elsewhere it needs --yes.
    An unfinished run is refused unless --force, which cancels it first.

    \b
    Examples:
      runyard run delete 3f2c9a1b04de
      runyard run delete 3f2c9a1b04de 77e0c1d2a3b4 --yes
    """
    from ..errors import RunyardError
    from ..runs import cancel_run
    from ._runs import fail

    instance = _instance()
    # Resolve every id before deleting anything: one bad id deletes nothing.
    runs: dict[str, RunRecord] = {}
    for run_id in run_ids:
        r = _checked(instance, run_id)
        runs.setdefault(r.run_id, r)
    unfinished = [r for r in runs.values() if not r.status.is_finished]
    if unfinished and not force:
        r = unfinished[0]
        raise RunyardError(
            f"run {r.run_id} is {r.status.value}: cancel it first (runyard run cancel {r.run_id}) or pass --force"
        )
    if len(runs) > 1 and not yes:
        listing = "\n".join(f"  {r.run_id}  {r.job_name}  {r.status.value}" for r in runs.values())
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            fail(f"refusing to delete {len(runs)} runs without confirmation; pass --yes to delete:\n{listing}", 2)
        click.echo(f"about to delete {len(runs)} runs:\n{listing}")
        if not click.confirm("delete them?", default=False):
            fail("nothing deleted", 2)
    for r in runs.values():
        if not r.status.is_finished:
            cancel_run(instance, r.run_id, grace=2.0)
        instance.storage.delete_run(r.run_id)
        click.echo(f"deleted run {r.run_id}")
