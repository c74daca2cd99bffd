"""Hook specifications: the contract between runyard and its plugins.

A plugin is a module registered under the entry-point group ``runyard`` (for example
``dask = "runyard_dask.plugin"``) that implements some of these hooks with
``@runyard.plugin.hookimpl``. Hooks are called with keyword arguments; an implementation
may accept fewer arguments than the spec. Every hook here is documented in
``docs/plugins.md``; a test keeps the two in step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from .plugin import ExecutorSpec, RunLauncherSpec, StorageSpec

hookspec = pluggy.HookspecMarker("runyard")


# --- registration: what a plugin provides -----------------------------------------


@hookspec
def runyard_executors() -> list[ExecutorSpec]:
    """Return the executors this plugin provides.

    :return: a list of `runyard.plugin.ExecutorSpec`; each names the executor, its
        config class and the import string of its step handler. The handler module is
        imported only when a run uses the executor.

    Results of all plugins are collected; two specs claiming one name is an error that
    names both distributions. Added in API version 1.
    """


@hookspec
def runyard_run_launchers() -> list[RunLauncherSpec]:
    """Return the run launchers this plugin provides.

    :return: a list of `runyard.plugin.RunLauncherSpec`; the launcher class is imported
        only when a run is launched with it.

    Results of all plugins are collected, as for ``runyard_executors``. Added in API version 1.
    """


@hookspec
def runyard_storages() -> list[StorageSpec]:
    """Return the run storages this plugin provides (where runs and events are kept).

    :return: a list of `runyard.plugin.StorageSpec`.

    Results of all plugins are collected, as for ``runyard_executors``. Added in API version 1.
    """


# --- command line -------------------------------------------------------------------


@hookspec
def runyard_cli(cli: click.Group) -> None:
    """Add commands to the ``runyard`` command line.

    :param cli: the top-level click group; add a group named after the plugin
        (``runyard celery worker``) rather than top-level commands.

    Called only when the CLI needs plugin commands, so keep imports of the backend inside
    the command functions. Added in API version 1.
    """
