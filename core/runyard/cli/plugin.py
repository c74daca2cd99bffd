"""``runyard plugin``: what is installed."""

from __future__ import annotations

import click

from ._common import echo_json


@click.group()
def plugin() -> None:
    """Inspect installed plugins.

    \b
    Example:
      runyard plugin list
    """


@plugin.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def list_plugins(as_json: bool) -> None:
    """List executors, run launchers and storages, with the distribution providing each.

    Plugins that fail to load (an import error, a hook runyard does not have, a hook
    without @hookimpl) are listed with the reason, and so are plugins disabled with
    RUNYARD_DISABLE_PLUGINS=name,...; the others keep working. Deprecation warnings of
    loaded plugins are printed to stderr.

    \b
    Example:
      runyard plugin list --json
    """
    from ..registry import default_registry

    reg = default_registry()
    rows = [
        {"name": r.spec.name, "kind": r.kind, "distribution": r.distribution, "version": r.version,
         "loads": True, "description": r.spec.description}
        for r in reg.all()
    ]
    rows += [
        {"name": f.plugin, "kind": "?", "distribution": f.distribution, "version": f.version,
         "loads": False, "description": f.error}
        for f in reg.failures
    ]
    rows += [
        {"name": d.plugin, "kind": "?", "distribution": d.distribution, "version": d.version,
         "loads": False, "description": d.reason}
        for d in reg.disabled
    ]
    for w in reg.warnings:
        click.echo(f"warning: plugin '{w.plugin}' ({w.distribution} {w.version}): {w.message}", err=True)
    if as_json:
        echo_json(rows)
        return
    click.echo(f"{'NAME':<16} {'KIND':<13} {'DISTRIBUTION':<22} {'VERSION':<9} LOADS")
    for r in rows:
        loads = "yes" if r["loads"] else f"no: {r['description']}"
        click.echo(f"{r['name']:<16} {r['kind']:<13} {r['distribution']:<22} {r['version']:<9} {loads}")
