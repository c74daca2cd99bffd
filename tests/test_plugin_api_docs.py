"""The plugin API's reference stays complete: every hook has a docstring and a section in
docs/plugins.md, and plugins can add CLI commands through `runyard_cli`."""

from __future__ import annotations

import inspect
from pathlib import Path

import click
from click.testing import CliRunner
from runyard import hookspecs
from runyard.plugin import hookimpl
from runyard.registry import PluginRegistry

ROOT = Path(__file__).resolve().parent.parent
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("runyard_")]


def test_there_are_hooks() -> None:
    assert {"runyard_executors", "runyard_run_launchers", "runyard_storages", "runyard_cli"} <= set(HOOKS)


def test_every_hook_has_a_docstring_with_its_version() -> None:
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert "Added in API version" in doc, f"hook {name} lacks a docstring saying when it was added"


def test_every_hook_has_a_section_in_the_plugin_guide() -> None:
    guide = (ROOT / "docs" / "plugins.md").read_text()
    missing = [name for name in HOOKS if f"`{name}`" not in guide or f"### `{name}`" not in guide]
    assert not missing, f"docs/plugins.md has no '### `hook`' section for: {', '.join(missing)}"


class _CliPlugin:
    @hookimpl
    def runyard_cli(self, cli: click.Group) -> None:
        @cli.group("greeter")
        def greeter() -> None:
            """Commands of a throwaway plugin."""

        @greeter.command("hello")
        def hello() -> None:
            click.echo("hello from a plugin command")


def test_runyard_cli_hook_adds_commands() -> None:
    registry = PluginRegistry(use_entry_points=False)
    registry.register(_CliPlugin(), name="greeter", distribution="greeter-dist")
    group = click.Group("runyard")
    registry.add_cli_commands(group)
    result = CliRunner().invoke(group, ["greeter", "hello"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "hello from a plugin command"
