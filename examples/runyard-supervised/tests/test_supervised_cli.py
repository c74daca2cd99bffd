"""End to end: the installed ``runyard-supervised`` distribution, selected in runyard.yaml,
through the ``runyard`` command in subprocesses: the limits reach the steps, max_runtime
stops a run, a killed worker's reason is known to every process, bad settings exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from runyard import EventType, Instance, RunStatus

JOBS = '''
import os
import resource
import signal
import time
from pathlib import Path

from runyard import job, step


@step
def limits() -> dict:
    return {"nice": os.nice(0), "memory": resource.getrlimit(resource.RLIMIT_AS)[0], "pid": os.getpid()}


@job
def report():
    limits()


@step
def forever() -> int:
    Path(os.environ["SUP_MARKER"]).write_text("started")
    time.sleep(600)
    return 0


@job
def slow():
    forever()


@step
def suicide() -> int:
    os.kill(os.getpid(), signal.SIGKILL)  # in_process: the step runs in the run worker
    return 0


@job
def killed():
    suicide()
'''


def runyard(home: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    # `python -m runyard`: the commands work without the environment's bin on PATH.
    return subprocess.run([sys.executable, "-m", "runyard", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RUNYARD_HOME": str(home), **env})


@pytest.fixture
def jobs(tmp_path: Path) -> Path:
    path = tmp_path / "sup_jobs.py"
    path.write_text(textwrap.dedent(JOBS))
    return path


def configure(home: Path, settings: dict) -> None:
    (home / "runyard.yaml").write_text(yaml.safe_dump({"run_launcher": {"supervised": settings},
                                                       "executor": {"in_process": {}}}))


def test_plugin_list_shows_the_launcher_from_its_distribution(runyard_home: Path) -> None:
    done = runyard(runyard_home, "plugin", "list", "--json")
    assert done.returncode == 0, done.stderr
    (row,) = [r for r in json.loads(done.stdout) if r["name"] == "supervised"]
    assert (row["kind"], row["distribution"], row["loads"]) == ("run_launcher", "runyard-supervised", True)


def test_steps_run_with_the_configured_nice_and_memory_cap(runyard_home: Path, jobs: Path) -> None:
    configure(runyard_home, {"nice": 7, "memory_mb": 4096})
    done = runyard(runyard_home, "job", "launch", "--wait", "--json", "-f", str(jobs), "-j", "report")
    assert done.returncode == 0, done.stdout + done.stderr
    instance = Instance(runyard_home)
    (run,) = instance.storage.list_runs()
    assert run.status is RunStatus.SUCCESS
    (out,) = [e for s in instance.storage.get_events(run.run_id) if (e := s.event).type is EventType.STEP_OUTPUT]
    value = instance.output_store(shared=True).get(out.data["ref"])
    assert value["nice"] == 7 and value["memory"] == 4096 * 1024 * 1024
    assert value["pid"] != os.getpid()


def test_max_runtime_stops_the_run_and_says_why(runyard_home: Path, jobs: Path, tmp_path: Path) -> None:
    configure(runyard_home, {"max_runtime": 3, "terminate_grace": 2})
    marker = tmp_path / "started"
    began = time.monotonic()
    done = runyard(runyard_home, "job", "launch", "--wait", "--json", "-f", str(jobs), "-j", "slow",
                   SUP_MARKER=str(marker))
    took = time.monotonic() - began
    assert done.returncode == 1, done.stdout + done.stderr
    assert marker.exists() and took < 30
    instance = Instance(runyard_home)
    (run,) = instance.storage.list_runs()
    assert run.status is RunStatus.CANCELED  # the worker got SIGTERM and canceled the run
    launched = instance.storage.get_events(run.run_id, types=[EventType.RUN_LAUNCHED])[0].event.data["worker"]
    state = json.loads(Path(launched["state_file"]).read_text())
    assert state["state"] == "exited" and "longer than max_runtime (3s)" in state["reason"]


def test_a_killed_worker_is_reported_with_its_signal_from_another_process(runyard_home: Path, jobs: Path) -> None:
    configure(runyard_home, {})
    done = runyard(runyard_home, "job", "launch", "--json", "-f", str(jobs), "-j", "killed")
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = json.loads(done.stdout)["run_id"]
    # `run wait` runs in a process that did not start the worker: the supervisor's record tells it.
    waited = runyard(runyard_home, "run", "wait", run_id, "--timeout", "60")
    assert waited.returncode == 1, waited.stdout + waited.stderr
    instance = Instance(runyard_home)
    (failure,) = [s.event for s in instance.storage.get_events(run_id, types=[EventType.RUN_FAILURE])]
    assert "was killed by SIGKILL" in failure.message, failure.message


def test_a_bad_setting_is_a_configuration_error(runyard_home: Path, jobs: Path) -> None:
    configure(runyard_home, {"nice": 40})
    done = runyard(runyard_home, "job", "launch", "-f", str(jobs), "-j", "report")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "run_launcher.supervised: nice: expected 0 (normal) to 19 (lowest priority), got 40" in done.stderr
    assert Instance(runyard_home).storage.list_runs() == []
