"""``runyard config``: which settings a run would use, and where each comes from."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import attrs
import click

from ._common import code_pointer_options, echo_json, load_run_config

if TYPE_CHECKING:
    from ..config import Selection


@click.group()
def config() -> None:
    """Explain the configuration a run would use.

    \b
    Example:
      runyard config explain -f examples/hello.py
    """


def _default_of(field: attrs.Attribute) -> tuple[bool, Any]:
    """(has a default, the default) of a config field."""
    default = field.default
    if default is attrs.NOTHING:
        return False, None
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        if default.takes_self:
            return True, None
        return True, default.factory()
    return True, default


def _plain(value: Any) -> Any:
    from ..config import unstructure

    return unstructure(value)


def _settings(cls: type, layers: tuple[Selection, ...]) -> list[dict[str, Any]]:
    """Each setting of ``cls`` with its value and the highest layer that set it, or its default."""
    rows: list[dict[str, Any]] = []
    fields = attrs.fields(cls) if attrs.has(cls) else ()
    known = {f.name for f in fields}
    for f in fields:
        for sel in layers:
            if f.name in sel.config:
                rows.append({"key": f.name, "value": _plain(sel.config[f.name]), "source": sel.source})
                break
        else:
            has_default, value = _default_of(f)
            rows.append({"key": f.name, "value": _plain(value) if has_default else None,
                         "source": "default" if has_default else "required, not set"})
    for sel in layers:  # keys the class does not know are rejected by validation; list them anyway
        for key in sel.config:
            if key not in known and not any(r["key"] == key for r in rows):
                rows.append({"key": key, "value": _plain(sel.config[key]), "source": sel.source})
    return rows


@config.command("explain")
@code_pointer_options
@click.option("-j", "--job", "job_name", help="Job to explain (needed only when several are defined).")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="Run config YAML file.")
@click.option("--executor", help="Executor a run would be given with --executor.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def explain(pointer, job_name, config_path, executor, as_json) -> None:  # type: ignore[no-untyped-def]
    """Show the executor and launcher settings a run would use.

    Every setting of the executor and run launcher a run of the job would get, with
    the layer it comes from.
    Sources, highest first: --executor, the run config (-c), the job, its Definitions,
    the instance's runyard.yaml, the built-in default. Settings no layer sets show their
    default. Invalid configuration exits 2 with the same message a run would get.

    \b
    Example:
      runyard config explain -f examples/hello.py -c run.yaml --executor in_process
    """
    from ..execution import resolve_executor, structure_executor_config
    from ..instance import CONFIG_FILE, Instance
    from ..loader import load_job
    from ..runs import launcher_selection

    run_config = load_run_config(config_path)
    instance = Instance.from_env()
    job_def, loc = load_job(pointer, job_name)
    resolved = resolve_executor(
        job_def, definitions=loc.definitions, run_config=run_config, instance=instance, override=executor
    )
    spec = instance.registry.executor(resolved.name)
    structured = structure_executor_config(resolved, spec)
    import os

    effective = structured.max_concurrent or spec.default_max_concurrent or os.cpu_count() or 1
    if spec.capabilities.max_concurrency is not None and structured.max_concurrent is None:
        effective = min(effective, spec.capabilities.max_concurrency)
    lsel, _ = launcher_selection(instance)  # validates the launcher's settings
    lspec = instance.registry.run_launcher(lsel.name)
    data = {
        "job": job_def.name,
        "code": pointer.to_dict(),
        "executor": {
            "name": resolved.name,
            "source": resolved.layers[0].source,
            "settings": _settings(spec.config, resolved.layers),
            "max_concurrent_effective": effective,
            "layers": [{"source": s.source, "config": _plain(s.config)} for s in resolved.layers],
            "overridden": [{"name": s.name, "source": s.source} for s in resolved.overridden],
        },
        "run_launcher": {
            "name": lsel.name,
            "source": lsel.source,
            "settings": _settings(lspec.config, (lsel,)),
        },
        "instance_config": instance.config_source,
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
    click.echo(f"  steps at once: {effective}")
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
        click.echo(f"  {r['key']:<{kw}}  {value:<{vw}}  {r['source']}")
