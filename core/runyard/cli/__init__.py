"""The ``runyard`` command line. Subcommands load lazily so ``runyard --help`` stays fast."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from ..errors import RunyardError

_COMMANDS = {
    "job": ("runyard.cli.job", "job", "Run jobs: list them, execute one here, launch runs."),
    "run": ("runyard.cli.run", "run", "Launched runs: list, show, logs, wait, cancel, reexecute, delete."),
    "config": ("runyard.cli.config", "config", "Explain the executor and launcher settings a run would use."),
    "plugin": ("runyard.cli.plugin", "plugin", "List the executors, run launchers and storages installed."),
    "instance": ("runyard.cli.instance", "instance", "Show and check the instance ($RUNYARD_HOME, runyard.yaml)."),
    "daemon": ("runyard.cli.daemon", "daemon", "Run the daemon: run monitoring, the run queue, retries, timeouts."),
    "ui": ("runyard.cli.ui", "ui", "Serve a run viewer in the browser (needs runyard[ui])."),
    "api": ("runyard.cli.api", "api", "Machine interface used by executors and launchers (step worker)."),
}


class _LazyGroup(click.Group):
    """Imports a subcommand's module only when that subcommand runs."""

    _plugins_added = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._add_plugin_commands()
        return sorted({*_COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in _COMMANDS:
            module, attr, _ = _COMMANDS[name]
            return getattr(importlib.import_module(module), attr)
        cmd = super().get_command(ctx, name)
        if cmd is None and not self._plugins_added:
            self._add_plugin_commands()
            cmd = super().get_command(ctx, name)
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Built-in summaries come from the table above, so `--help` imports no command module.
        self._add_plugin_commands()
        rows = [(name, help_) for name, (_, _, help_) in _COMMANDS.items()]
        rows += [(n, c.get_short_help_str(60)) for n, c in self.commands.items() if n not in _COMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))

    def _add_plugin_commands(self) -> None:
        if self._plugins_added:
            return
        self._plugins_added = True
        from ..registry import default_registry

        try:
            default_registry().add_cli_commands(self)
        except Exception as e:  # one broken plugin must not break the CLI
            click.echo(f"warning: a plugin failed to add commands: {e}", err=True)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="runyard")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """runyard runs jobs (DAGs of Python steps) on whatever compute you have.

    \b
    Example:
      runyard job execute -f examples/hello.py
    The instance lives in $RUNYARD_HOME (default ~/.runyard); configure it in runyard.yaml.
    """
    ctx.obj = {"debug": debug}


def main(argv: list[str] | None = None) -> Any:
    """Entry point: usage and configuration errors exit 2, a failed run exits 1."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        return cli.main(args=argv, prog_name="runyard", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except RunyardError as e:
        if debug:
            import traceback

            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
