"""Deliberately broken run launchers: each must fail the run-launcher conformance kit.

Each is the default launcher with one defect a launcher author could plausibly ship. The
kit's own tests (tests/test_launcher_kit_mutants.py) install this module as a plugin
distribution (a ``.dist-info`` with a ``runyard`` entry point on PYTHONPATH, so run
workers and ``runyard run cancel`` in other processes find it too) and run the kit
against each, expecting a failure that names the defect.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from typing import Any

from runyard.plugin import API_VERSION, RunLauncher, RunLauncherSpec, RunRecord, WorkerHealth, hookimpl
from runyard_local.launcher import DefaultRunLauncher, _children


class Control(DefaultRunLauncher):
    """Not broken: the harness itself must not make the kit fail."""


class NoopTerminate(DefaultRunLauncher):
    """terminate() does nothing."""

    def terminate(self, run: RunRecord, worker: Mapping[str, Any], *, force: bool = False) -> None:
        pass


class ForceOnly(DefaultRunLauncher):
    """terminate() without force does nothing: the worker is never asked to cancel cleanly."""

    def terminate(self, run: RunRecord, worker: Mapping[str, Any], *, force: bool = False) -> None:
        if force:
            super().terminate(run, worker, force=True)


class PidOnly(DefaultRunLauncher):
    """Signals the worker's pid, not its process group, and leaves a dead worker's children alone."""

    def terminate(self, run: RunRecord, worker: Mapping[str, Any], *, force: bool = False) -> None:
        try:
            os.kill(int(worker["pid"]), signal.SIGKILL if force else signal.SIGTERM)
        except ProcessLookupError:
            pass

    def _kill_leftovers(self, worker: Mapping[str, Any]) -> None:
        pass


class RaisesWhenGone(DefaultRunLauncher):
    """terminate() raises ProcessLookupError once the worker has exited: not idempotent."""

    def terminate(self, run: RunRecord, worker: Mapping[str, Any], *, force: bool = False) -> None:
        os.killpg(int(worker["pgid"]), signal.SIGKILL if force else signal.SIGTERM)


class MemoryOnly(DefaultRunLauncher):
    """Finds workers only in this process's memory: stateful between calls."""

    def terminate(self, run: RunRecord, worker: Mapping[str, Any], *, force: bool = False) -> None:
        if int(worker["pid"]) in _children:
            super().terminate(run, worker, force=force)

    def check_health(self, run: RunRecord, worker: Mapping[str, Any]) -> WorkerHealth:
        if int(worker["pid"]) not in _children:
            return WorkerHealth.unknown("this worker was not started by this process")
        return super().check_health(run, worker)


class AlwaysRunning(DefaultRunLauncher):
    """check_health() always says RUNNING."""

    def check_health(self, run: RunRecord, worker: Mapping[str, Any]) -> WorkerHealth:
        return WorkerHealth.running()


class NoHealth(DefaultRunLauncher):
    """check_health() is not implemented: the base class's UNKNOWN."""

    check_health = RunLauncher.check_health


class DeadWithoutReason(DefaultRunLauncher):
    """Reports a dead worker without saying how it died."""

    def check_health(self, run: RunRecord, worker: Mapping[str, Any]) -> WorkerHealth:
        health = super().check_health(run, worker)
        return WorkerHealth.dead("the run worker is dead") if health.status == "dead" else health


class FinishedWhenKilled(DefaultRunLauncher):
    """Reports every worker that is gone as FINISHED, a killed one included."""

    def check_health(self, run: RunRecord, worker: Mapping[str, Any]) -> WorkerHealth:
        health = super().check_health(run, worker)
        return WorkerHealth.finished(health.message) if health.is_gone else health


class BlockingLaunch(DefaultRunLauncher):
    """launch() returns only when the worker has exited."""

    def launch(self, run: RunRecord) -> dict[str, Any]:
        worker = super().launch(run)
        _children[worker["pid"]].wait()
        return worker


class BareCommand(DefaultRunLauncher):
    """Starts the worker as a bare ``runyard`` command: fails when the venv is not on PATH."""

    @staticmethod
    def worker_command(run: RunRecord | str, *, python: str | None = None) -> list[str]:
        run_id = run if isinstance(run, str) else run.run_id
        return ["runyard", "api", "execute-run", run_id]


MUTANTS = {
    "kit_control": Control,
    "kit_noop_terminate": NoopTerminate,
    "kit_force_only": ForceOnly,
    "kit_pid_only": PidOnly,
    "kit_raises_when_gone": RaisesWhenGone,
    "kit_memory_only": MemoryOnly,
    "kit_always_running": AlwaysRunning,
    "kit_no_health": NoHealth,
    "kit_dead_without_reason": DeadWithoutReason,
    "kit_finished_when_killed": FinishedWhenKilled,
    "kit_blocking_launch": BlockingLaunch,
    "kit_bare_command": BareCommand,
}


@hookimpl
def runyard_run_launchers() -> list[RunLauncherSpec]:
    return [
        RunLauncherSpec(name=name, api_version=API_VERSION, launcher=f"{__name__}:{cls.__name__}",
                        description=(cls.__doc__ or "").strip())
        for name, cls in MUTANTS.items()
    ]
