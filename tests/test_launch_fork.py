"""`runyard job launch` forks the run worker from its own process (`RunLauncher.fork_worker`):
the worker then behaves as one started by `python -m runyard api execute-run` would, run
through the real console script and checked in storage and /proc."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from runyard.events import EventType
from runyard.instance import Instance
from runyard.storage import RunStatus

RUNYARD = Path(sys.executable).parent / "runyard"

JOBS = """
import os, sys, time
from runyard import job, step

@step
def hello() -> int:
    print("hello from", os.getpid())
    print("to stderr", file=sys.stderr)
    return 1

@job
def quick():
    hello()

@step
def nap() -> int:
    time.sleep(60)
    return 1

@job
def slow():
    nap()

@step
def boom() -> int:
    raise ValueError("kaput")

@job
def failing():
    boom()
"""


@pytest.fixture
def jobs(tmp_path: Path) -> Path:
    f = tmp_path / "jobs.py"
    f.write_text(textwrap.dedent(JOBS))
    return f


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def ry(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RUNYARD_HOME": str(home)}
    return subprocess.run([str(RUNYARD), *args], env=env, capture_output=True, text=True, timeout=timeout)


def worker_of(home: Path, run_id: str) -> dict:
    launched = Instance(home).storage.get_events(run_id, types=[EventType.RUN_LAUNCHED])
    assert launched, "no RUN_LAUNCHED event"
    return dict(launched[-1].event.data["worker"])


def test_launch_forks_the_worker_and_the_run_succeeds_with_its_output_in_the_log(home: Path, jobs: Path) -> None:
    proc = ry(home, "job", "launch", "-f", str(jobs), "-j", "quick", "--wait", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "SUCCESS" and out["steps"] == {"hello": "success"}
    worker = worker_of(home, out["run_id"])
    assert worker["forked"] is True
    # The worker's stdout and stderr are its log, not the command's pipes: the command
    # printed its JSON only, and the worker's log holds nothing of the command's.
    assert Path(worker["log"]).exists() and '"run_id"' not in Path(worker["log"]).read_text()
    assert "hello from" not in proc.stdout + proc.stderr
    logs = ry(home, "run", "logs", out["run_id"])
    assert logs.returncode == 0 and "hello from" in logs.stdout, logs.stderr


def test_the_command_returns_while_its_forked_worker_runs_in_a_session_of_its_own(home: Path, jobs: Path) -> None:
    t0 = time.monotonic()
    # capture_output: the command's pipes must not be held open by the worker, or this
    # call would wait the step's 60 s.
    proc = ry(home, "job", "launch", "-f", str(jobs), "-j", "slow", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 30
    run_id = proc.stdout.strip()
    worker = worker_of(home, run_id)
    pid = worker["pid"]
    assert worker["forked"] is True and worker["pgid"] == pid
    assert os.getpgid(pid) == pid and os.getsid(pid) == pid  # its own session and group
    deadline = time.monotonic() + 30
    while Instance(home).storage.get_run(run_id).status is not RunStatus.STARTED:
        assert time.monotonic() < deadline, "the forked worker never started the run"
        time.sleep(0.05)
    cancel = ry(home, "run", "cancel", run_id)
    assert cancel.returncode == 0, cancel.stderr
    run = Instance(home).storage.get_run(run_id)
    assert run is not None and run.status is RunStatus.CANCELED
    deadline = time.monotonic() + 15
    while _alive(pid):
        assert time.monotonic() < deadline, "the forked worker outlived its canceled run"
        time.sleep(0.05)


def test_a_killed_forked_worker_fails_its_run_with_the_reason(home: Path, jobs: Path) -> None:
    proc = ry(home, "job", "launch", "-f", str(jobs), "-j", "slow", timeout=30)
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.strip()
    pid = worker_of(home, run_id)["pid"]
    deadline = time.monotonic() + 30
    while Instance(home).storage.get_run(run_id).status is not RunStatus.STARTED:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(pid, signal.SIGKILL)
    waited = ry(home, "run", "wait", run_id, "--json", timeout=30)
    assert waited.returncode == 1, waited.stderr
    result = json.loads(waited.stdout)
    assert result["status"] == "FAILURE"
    assert "run worker" in result["failure"]["message"]


def test_a_failing_run_of_a_forked_worker_exits_1_and_says_why(home: Path, jobs: Path) -> None:
    proc = ry(home, "job", "launch", "-f", str(jobs), "-j", "failing", "--wait", "--json")
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "FAILURE" and out["steps"] == {"boom": "failed"} and "boom" in out["failure"]["message"]
    assert worker_of(home, out["run_id"])["forked"] is True


def test_launching_from_a_program_never_forks_it(home: Path, jobs: Path) -> None:
    """The launch API (and click's CliRunner) in another program starts `worker_command`."""
    from runyard import CodePointer
    from runyard.loader import load_job
    from runyard.runs import create_run, launch_run, wait_for_run

    instance = Instance(home)
    pointer = CodePointer(file=str(jobs))
    job_def, loc = load_job(pointer, "quick")
    run = create_run(instance, job_def, pointer=pointer, definitions=loc.definitions)
    launch_run(instance, run)
    assert wait_for_run(instance, run.run_id, timeout=60).run.status is RunStatus.SUCCESS
    worker = worker_of(home, run.run_id)
    assert worker["forked"] is False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
