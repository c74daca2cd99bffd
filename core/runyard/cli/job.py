"""``runyard job``: list jobs and execute one in this process."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import click

from ._common import code_pointer_options, echo_json, load_run_config, parse_tags


@click.group()
def job() -> None:
    """List jobs, execute one here, or launch a run of one.

    \b
    Example:
      runyard job launch -f examples/hello.py --wait
    """


@job.command("list")
@code_pointer_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def list_jobs(pointer, as_json: bool) -> None:  # type: ignore[no-untyped-def]
    """List the jobs a file or module defines.

    \b
    Example:
      runyard job list -f examples/hello.py
    """
    from ..loader import load_code_location

    loc = load_code_location(pointer)
    rows = [
        {
            "name": j.name,
            "steps": len(j.nodes),
            "executor": j.executor,
            "description": (j.description or "").split("\n")[0],
        }
        for j in sorted(loc.jobs.values(), key=lambda j: j.name)
    ]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no jobs defined")
    for r in rows:
        click.echo(f"{r['name']:<24} {r['steps']:>4} steps  {r['description']}")


def _run_options(fn):  # type: ignore[no-untyped-def]
    fn = click.option("--tag", "tags", multiple=True, help="Tag the run: KEY=VALUE (repeatable).")(fn)
    fn = click.option("--executor", help="Executor to use, overriding the job, Definitions and instance.")(fn)
    fn = click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
                      help="Run config YAML file.")(fn)
    fn = click.option("-j", "--job", "job_name", help="Job to run (needed only when several are defined).")(fn)
    return code_pointer_options(fn)


@job.command("execute")
@_run_options
@click.option("--steps", help="Run only these steps (comma-separated keys or globs); add --parent when they "
              "read outputs of steps left out.")
@click.option("--parent", "parent_run_id", help="Run whose outputs unselected upstream steps read.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def execute(pointer, job_name, config_path, executor, tags, steps, parent_run_id, as_json) -> None:  # type: ignore[no-untyped-def]
    """Execute a job in this process and wait for it.

    The engine runs here, steps wherever its executor puts them. This process is the
    run's worker: `runyard run cancel` stops it, and if it dies the run is marked FAILURE
    when next looked at. Ctrl-C cancels the run; a second Ctrl-C abandons it at once,
    killing the steps' processes. On a terminal it shows live progress; otherwise it
    prints a line per step that finished, failed, was retried or skipped, then a summary.
    Exit status: 0 if the run succeeded, 1 if it failed or was canceled, 2 for usage or
    configuration errors.

    \b
    Examples:
      runyard job execute -f examples/hello.py
      runyard job execute -m my_pkg.jobs -j nightly --executor in_process --tag team=data
    """
    from .. import cli_worker
    from ..engine import Cancellation
    from ..events import Event, EventType
    from ..execution import execute_job
    from ..instance import Instance
    from ..loader import load_job
    from ..runs import UNFINISHED
    from ..storage import RunStatus
    from ._progress import Progress, summary_line, use_live

    run_config = load_run_config(config_path)
    tag_map = parse_tags(tags)
    instance = Instance.from_env(validate=True)
    job_def, loc = load_job(pointer, job_name)
    storage = instance.storage  # opened now: a damaged database fails before anything runs
    cancellation = Cancellation()
    signaled: list[str] = []  # the signal that asked for the cancel
    run_ids: list[str] = []  # the run's id, once it is recorded
    # Orphans of the steps' processes (a daemonized grandchild) are adopted by this process,
    # so that none outlives the run.
    cli_worker.become_subreaper()

    def record(status: RunStatus, only_from: Any, event: EventType, message: str) -> None:
        if run_ids and storage.set_run_status(run_ids[0], status, only_from=only_from):
            storage.store_events([Event(type=event, run_id=run_ids[0], message=message)])

    def in_background(fn: Any, *args: Any, wait: float | None = None) -> None:
        # A signal handler interrupts the main thread anywhere, maybe inside the storage's
        # own lock: it must not write to storage itself.
        t = threading.Thread(target=_quietly, args=(fn, *args), daemon=True)
        t.start()
        if wait is not None:
            t.join(wait)

    def abandon() -> None:
        killed = cli_worker.kill_descendants()
        in_background(
            record, RunStatus.CANCELED, UNFINISHED, EventType.RUN_CANCELED,
            f"run abandoned (interrupted twice): {len(killed)} step process(es) killed", wait=2.0,
        )
        where = f"run {run_ids[0]}" if run_ids else "the run"
        click.echo(f"\nabandoned {where}; {len(killed)} step process(es) killed", file=sys.__stderr__)
        sys.__stdout__.flush()
        os._exit(1)  # at once: no waiting for steps to wind down

    def on_signal(signum: int, frame: Any) -> None:
        # The first Ctrl-C (or the SIGTERM of `runyard run cancel`) cancels the run cleanly:
        # steps stopped, the rest skipped, CANCELED. A second one abandons it at once.
        if cancellation.requested:
            abandon()
        # To the real stderr: during an in-process step sys.stderr captures the step's output.
        why = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        signaled.append(why)
        click.echo(f"canceling the run ({why}; Ctrl-C again to abandon it)", file=sys.__stderr__)
        # No lock taken here: the engine's threads cancel (see Cancellation.cancel_from_signal).
        cancellation.cancel_from_signal()

    def record_canceling() -> None:
        why = f"cancel requested ({signaled[0]})" if signaled else "cancel requested"
        in_background(record, RunStatus.CANCELING, [RunStatus.STARTING, RunStatus.STARTED],
                      EventType.RUN_CANCELING, why)

    def on_events(events: Any) -> None:
        if not run_ids:
            for ev in events:
                if ev.type is EventType.RUN_START:
                    # This process is the run's worker: whoever looks at the run notices if
                    # it dies, and `runyard run cancel` reaches it (SIGTERM).
                    run_ids.append(ev.run_id)
                    os.environ[cli_worker.RUN_MARKER] = ev.run_id  # inherited by every step process
                    storage.store_events([Event(
                        type=EventType.RUN_LAUNCHED, run_id=ev.run_id,
                        message="executing in a `runyard job execute` process",
                        data={"launcher": cli_worker.LAUNCHER, "worker": cli_worker.this_process()},
                    )])
                    break
        if progress is not None:
            progress.feed(events)

    started = time.monotonic()
    progress = None if as_json else Progress(live=use_live(), label=job_def.name, started=started)
    cancellation.subscribe(record_canceling)  # before the engine's: CANCELING, then the steps stop
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = execute_job(
            job_def,
            instance=instance,
            executor=executor,
            definitions=loc.definitions,
            run_config=run_config,
            step_selection=[s.strip() for s in steps.split(",")] if steps else None,
            parent_run_id=parent_run_id,
            tags=tag_map,
            cancellation=cancellation,
            on_events=on_events,
        )
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if progress is not None:
            progress.close()
        left = cli_worker.kill_descendants()
        if left:
            click.echo(f"warning: killed {len(left)} process(es) the run's steps left running", err=True)
    elapsed = time.monotonic() - started
    if as_json:
        echo_json({"run_id": result.run_id, "status": result.status.value, "steps": dict(result.step_states)})
    else:
        click.echo(summary_line(result.run_id, result.status.value, elapsed, result.step_states))
    sys.exit(0 if result.success else 1)


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as e:  # reported, not raised: the thread's caller has moved on
        click.echo(f"warning: could not record the run's state: {e}", file=sys.__stderr__)


@job.command("launch")
@_run_options
@click.option("--wait", "wait_", is_flag=True, help="Wait for the run to finish; exit 0/1 by its outcome.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def launch(pointer, job_name, config_path, executor, tags, wait_, as_json) -> None:  # type: ignore[no-untyped-def]
    """Launch a run of a job in the background; print its run id.

    The run is validated and recorded first (configuration errors exit 2 before anything
    starts), then handed to the instance's run launcher (by default: a process group of
    its own on this machine). With a run_coordinator section in runyard.yaml the run is
    left QUEUED instead, and `runyard daemon` launches it when the queue's limits allow.
    With --wait, follow it like `runyard run wait`.

    \b
    Examples:
      runyard job launch -f examples/hello.py
      RUN=$(runyard job launch -m my_pkg.jobs -j nightly --tag team=data)
      runyard job launch -f examples/hello.py --wait
    """
    from ..instance import Instance
    from ..loader import load_job
    from ..runs import create_run
    from ._runs import report_started, start

    run_config = load_run_config(config_path)
    tag_map = parse_tags(tags)
    instance = Instance.from_env(validate=True)
    job_def, loc = load_job(pointer, job_name)
    run = create_run(
        instance, job_def, pointer=pointer, definitions=loc.definitions, run_config=run_config,
        executor=executor, tags=tag_map,
    )
    if not instance.queues_runs:
        from ..console import standalone
        from ..plugin import worker_fork

        # A command of its own (not a CliRunner inside another program): the launcher may
        # fork the worker from here, where runyard and the job are imported already.
        token = worker_fork.set(instance.storage.close if standalone() else None)
        try:
            run = start(instance, run)
        finally:
            worker_fork.reset(token)
    # else: recorded QUEUED; `runyard daemon` launches it when the queue's limits allow.
    report_started(instance, run, wait=wait_, as_json=as_json,
                   summary={"run_id": run.run_id, "job_name": run.job_name, "status": run.status.value})
