"""``runyard config``: which settings a run would use, and where each comes from."""

from __future__ import annotations

import json
from typing import Any

import click

from ._common import code_pointer_options, echo_json, load_run_config


@click.group()
def config() -> None:
    """Explain the configuration a run would use.

    \b
    Example:
      runyard config explain -f examples/hello.py
    """


@config.command("explain")
@code_pointer_options
@click.option("-j", "--job", "job_name", help="Job to explain (needed only when several are defined).")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="Run config YAML file.")
@click.option("--executor", help="Executor a run would be given with --executor.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def explain(pointer, job_name, config_path, executor, as_json) -> None:  # type: ignore[no-untyped-def]
    """Show the executor and launcher settings a run would use.

    Every setting of the executor and run launcher a run of the job would get, with
    the layer and key path it comes from, the steps it runs at once and the executor's
    capabilities: the same resolution `runyard job launch` stores with the run (`--json`
    prints it field for field).
    Sources, highest first: --executor, the run config (-c), the job, its Definitions,
    the instance's runyard.yaml, the built-in default. Settings no layer sets show their
    default. Invalid configuration exits 2 with the same message a run would get.

    \b
    Example:
      runyard config explain -f examples/hello.py -c run.yaml --executor in_process
    """
    from ..execution import validate_run
    from ..instance import CONFIG_FILE, Instance
    from ..loader import load_job

    run_config = load_run_config(config_path)
    instance = Instance.from_env(validate=True)
    job_def, loc = load_job(pointer, job_name)
    # The same call `runyard job launch` makes: what is printed is what a run would store.
    resolution = validate_run(
        job_def, instance=instance, executor=executor, definitions=loc.definitions, run_config=run_config,
        step_selection=None, parent_run_id=None, launcher=True,
    ).resolution
    data = {
        "job": job_def.name,
        "code": pointer.to_dict(),
        **resolution.to_dict(),
        "instance_config_exists": bool(instance.home and (instance.home / CONFIG_FILE).exists()),
    }
    if as_json:
        echo_json(data)
        return
    click.echo(f"job {job_def.name} ({pointer.describe()})")
    absent = "" if data["instance_config_exists"] else " (absent: all defaults)"
    click.echo(f"instance config: {instance.config_source}{absent}")
    ex = data["executor"]
    click.echo(f"\nexecutor: {ex['name']}   (from {ex['source']})")
    _print_settings(ex["settings"])
    click.echo(f"  steps at once: {resolution.max_concurrent}   ({resolution.max_concurrent_from})")
    caps = [k for k, v in data["capabilities"].items() if v is True]
    click.echo(f"  capabilities: {', '.join(caps) or 'none'}")
    for o in ex["overridden"]:
        click.echo(f"  (ignored: {o['source']} names executor '{o['name']}')")
    rl = data["run_launcher"]
    click.echo(f"\nrun launcher: {rl['name']}   (from {rl['source']})")
    _print_settings(rl["settings"])


def _print_settings(rows: list[dict[str, Any]]) -> None:
    if not rows:
        click.echo("  (no settings)")
        return
    values = [json.dumps(r["value"], default=str) for r in rows]
    kw = max(len("SETTING"), *(len(r["key"]) for r in rows))
    vw = max(len("VALUE"), *(len(v) for v in values))
    click.echo(f"  {'SETTING':<{kw}}  {'VALUE':<{vw}}  FROM")
    for r, value in zip(rows, values, strict=True):
        where = r["source"] if r["source"] in ("default", "required, not set") else f"{r['source']}: {r['path']}"
        click.echo(f"  {r['key']:<{kw}}  {value:<{vw}}  {where}")
