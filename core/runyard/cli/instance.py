"""``runyard instance``: where runyard keeps its state, and whether its config is valid."""

from __future__ import annotations

import sys

import click

from ._common import echo_json


@click.group()
def instance() -> None:
    """Show and validate the instance ($RUNYARD_HOME).

    \b
    Example:
      runyard instance validate
    """


@instance.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def info(as_json: bool) -> None:
    """Show the instance directory, its config file and the plugins each section selects.

    \b
    Example:
      RUNYARD_HOME=/srv/runyard runyard instance info
    """
    from ..instance import CONFIG_FILE, Instance

    inst = Instance.from_env(validate=True)
    assert inst.home is not None
    data = {
        "home": str(inst.home),
        "config_file": str(inst.home / CONFIG_FILE),
        "config_file_exists": (inst.home / CONFIG_FILE).exists(),
        **{k: (s.name if s else None) for k, s in inst.sections.items()},
        "outputs": inst.outputs_url,
    }
    if as_json:
        echo_json(data)
        return
    for k, v in data.items():
        click.echo(f"{k:<20} {v if v is not None else '(default)'}")


@instance.command("validate")
def validate() -> None:
    """Check runyard.yaml against the installed plugins; exit 2 listing every problem.

    \b
    Example:
      runyard instance validate
    """
    from ..instance import Instance

    inst = Instance.from_env()
    problems = inst.validate()
    if problems:
        for p in problems:
            click.echo(f"error: {p}", err=True)
        sys.exit(2)
    click.echo(f"{inst.config_source}: ok")
