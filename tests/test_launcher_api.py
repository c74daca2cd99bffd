"""The run-launcher part of the public API: typed worker health, the worker command and
environment, and the in-process run worker entry point."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from runyard import RunyardError
from runyard.plugin import RunLauncher, RunLauncherConfig, RunLauncherSpec, RunRecord, WorkerHealth, WorkerStatus
from runyard.plugin import execute_run as public_execute_run


def test_worker_health_is_typed_and_accepts_the_plain_strings() -> None:
    assert WorkerHealth(status="dead", message="x").status is WorkerStatus.DEAD
    assert WorkerStatus.UNKNOWN == "unknown"  # callers comparing with strings keep working
    with pytest.raises(ValueError, match="'zombie' is not a valid WorkerStatus"):
        WorkerHealth(status="zombie")


@pytest.mark.parametrize(
    ("health", "running", "gone"),
    [
        (WorkerHealth.running(), True, False),
        (WorkerHealth.finished("exited with code 0"), False, True),
        (WorkerHealth.dead("killed by SIGKILL"), False, True),
        (WorkerHealth.unknown("another host"), False, False),
    ],
)
def test_worker_health_tests(health: WorkerHealth, running: bool, gone: bool) -> None:
    assert (health.is_running, health.is_gone, health.is_dead) == (running, gone, gone)


def test_the_base_launcher_says_unknown_and_the_spec_defaults_to_no_settings(tmp_path: Path) -> None:
    launcher = RunLauncher(RunLauncherConfig(), str(tmp_path))
    run = RunRecord(job_name="j")
    assert launcher.check_health(run, {}).status is WorkerStatus.UNKNOWN
    with pytest.raises(NotImplementedError):
        launcher.launch(run)
    spec = RunLauncherSpec(name="x", api_version=1, launcher="pkg.mod:Cls")
    assert spec.config is RunLauncherConfig


def test_worker_command_runs_without_the_venv_on_path(tmp_path: Path) -> None:
    cmd = RunLauncher.worker_command("abc123")
    assert cmd == [sys.executable, "-m", "runyard", "api", "execute-run", "abc123"]
    assert RunLauncher.worker_command(RunRecord(run_id="r9", job_name="j"), python="python3")[:1] == ["python3"]
    # The command itself: an unknown run is an error of the worker, not "command not found".
    done = subprocess.run(cmd, env={"PATH": "/usr/bin:/bin", "RUNYARD_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "no run 'abc123'" in done.stderr, done.stderr


def test_worker_env_points_the_worker_at_the_instance(tmp_path: Path) -> None:
    env = RunLauncher(RunLauncherConfig(), str(tmp_path)).worker_env({"PATH": "/bin", "RUNYARD_HOME": "/elsewhere"})
    assert env == {"PATH": "/bin", "RUNYARD_HOME": str(tmp_path)}


def test_execute_run_says_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(RunyardError, match="no run 'nope'"):
        public_execute_run("nope", tmp_path)
    errors: list[BaseException] = []

    def off_main() -> None:
        try:
            public_execute_run("nope", tmp_path)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=off_main)
    thread.start()
    thread.join(30)
    assert isinstance(errors[0], RuntimeError) and "main thread" in str(errors[0])
