"""``runyard job``: list jobs and execute one in this process."""

from __future__ import annotations

import sys
import time

import click

from ._common import code_pointer_options, echo_json, load_run_config, parse_tags


@click.group()
def job() -> None:
    """List jobs and execute them."""


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


@job.command("execute")
@code_pointer_options
@click.option("-j", "--job", "job_name", help="Job to run (needed only when several are defined).")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="Run config YAML file.")
@click.option("--executor", help="Executor to use, overriding the job, Definitions and instance.")
@click.option("--tag", "tags", multiple=True, help="Tag the run: KEY=VALUE (repeatable).")
@click.option("--steps", help="Run only these steps (comma-separated keys or globs); needs --parent.")
@click.option("--parent", "parent_run_id", help="Run whose outputs unselected upstream steps read.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def execute(pointer, job_name, config_path, executor, tags, steps, parent_run_id, as_json) -> None:  # type: ignore[no-untyped-def]
    """Execute a job in this process: the engine runs here, steps wherever its executor puts them.

    Exit status: 0 if the run succeeded, 1 if it failed or was canceled, 2 for usage or
    configuration errors.

    \b
    Examples:
      runyard job execute -f examples/hello.py
      runyard job execute -m my_pkg.jobs -j nightly --executor in_process --tag team=data
    """
    from ..engine import Cancellation
    from ..execution import execute_job
    from ..instance import Instance
    from ..loader import load_job

    run_config = load_run_config(config_path)
    tag_map = parse_tags(tags)
    instance = Instance.from_env()
    job_def, loc = load_job(pointer, job_name)
    cancellation = Cancellation()
    started = time.monotonic()
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
        )
    except KeyboardInterrupt:
        cancellation.cancel()
        click.echo("interrupted", err=True)
        sys.exit(1)
    elapsed = time.monotonic() - started
    if as_json:
        echo_json({"run_id": result.run_id, "status": result.status.value, "steps": dict(result.step_states)})
    else:
        from ..events import EventType

        for ev in result.events:
            if ev.type is EventType.STEP_FAILURE:
                f = ev.failure
                click.echo(
                    f"step {ev.step_key} failed (attempt {ev.attempt}, {f.kind.value if f else '?'}): {ev.message}"
                )
                if f and f.traceback:
                    click.echo(f.traceback.rstrip())
        counts: dict[str, int] = {}
        for s in result.step_states.values():
            counts[s] = counts.get(s, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        click.echo(f"run {result.run_id} {result.status.value} in {elapsed:.2f}s ({summary})")
    sys.exit(0 if result.success else 1)
