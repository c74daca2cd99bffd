"""``runyard job``: list jobs and execute one in this process."""

from __future__ import annotations

import signal
import sys
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

    The engine runs here, steps wherever its executor puts them; Ctrl-C cancels the
    run. On a terminal it shows live progress; otherwise it prints a line per step that
    finished, failed, was retried or skipped, then a summary. Exit status: 0 if the run
    succeeded, 1 if it failed or was canceled, 2 for usage or configuration errors.

    \b
    Examples:
      runyard job execute -f examples/hello.py
      runyard job execute -m my_pkg.jobs -j nightly --executor in_process --tag team=data
    """
    from ..engine import Cancellation
    from ..execution import execute_job
    from ..instance import Instance
    from ..loader import load_job
    from ._progress import Progress, summary_line, use_live

    run_config = load_run_config(config_path)
    tag_map = parse_tags(tags)
    instance = Instance.from_env()
    job_def, loc = load_job(pointer, job_name)
    cancellation = Cancellation()

    def on_interrupt(signum: int, frame: Any) -> None:
        # The first Ctrl-C cancels the run cleanly (steps stopped, the rest skipped); a
        # second one stops waiting for that.
        if cancellation.requested:
            raise KeyboardInterrupt
        # To the real stderr: during an in-process step sys.stderr captures the step's output.
        click.echo("canceling the run (Ctrl-C again to abandon it)", file=sys.__stderr__)
        cancellation.cancel()

    started = time.monotonic()
    progress = None if as_json else Progress(live=use_live(), label=job_def.name, started=started)
    previous = signal.signal(signal.SIGINT, on_interrupt)
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
            on_events=progress.feed if progress is not None else None,
        )
    except KeyboardInterrupt:
        if progress is not None:
            progress.close()
        click.echo("interrupted", err=True)
        sys.exit(1)
    finally:
        signal.signal(signal.SIGINT, previous)
        if progress is not None:
            progress.close()
    elapsed = time.monotonic() - started
    if as_json:
        echo_json({"run_id": result.run_id, "status": result.status.value, "steps": dict(result.step_states)})
    else:
        click.echo(summary_line(result.run_id, result.status.value, elapsed, result.step_states))
    sys.exit(0 if result.success else 1)


@job.command("launch")
@_run_options
@click.option("--wait", "wait_", is_flag=True, help="Wait for the run to finish; exit 0/1 by its outcome.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def launch(pointer, job_name, config_path, executor, tags, wait_, as_json) -> None:  # type: ignore[no-untyped-def]
    """Launch a run of a job in the background; print its run id.

    The run is validated and recorded first (configuration errors exit 2 before anything
    starts), then handed to the instance's run launcher (by default: a process group of
    its own on this machine). With --wait, follow it like `runyard run wait`.

    \b
    Examples:
      runyard job launch -f examples/hello.py
      RUN=$(runyard job launch -m my_pkg.jobs -j nightly --tag team=data)
      runyard job launch -f examples/hello.py --wait
    """
    from ..instance import Instance
    from ..loader import load_job
    from ..runs import create_run
    from ._runs import start, wait_and_report

    run_config = load_run_config(config_path)
    tag_map = parse_tags(tags)
    instance = Instance.from_env()
    job_def, loc = load_job(pointer, job_name)
    run = create_run(
        instance, job_def, pointer=pointer, definitions=loc.definitions, run_config=run_config,
        executor=executor, tags=tag_map,
    )
    run = start(instance, run)
    if not wait_:
        if as_json:
            echo_json({"run_id": run.run_id, "job_name": run.job_name, "status": run.status.value})
        else:
            click.echo(run.run_id)
        return
    if not as_json:
        click.echo(run.run_id)
    sys.exit(wait_and_report(instance, run, timeout=None, as_json=as_json))
