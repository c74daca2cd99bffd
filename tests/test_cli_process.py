"""`runyard job execute` as its run's worker, with real processes: killed with SIGKILL, ended
by its own step (os._exit, a segfault), canceled from another shell, interrupted once and
twice; and in-process steps that start processes of their own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from runyard.events import EventType
from runyard.instance import Instance
from runyard.storage import RunStatus

RUNYARD = Path(sys.executable).parent / "runyard"

JOBS = """
import ctypes
import os
import subprocess
import time
from pathlib import Path
from runyard import job, step

MARK = Path(os.environ["RY_MARK"])

def started() -> None:
    MARK.write_text(str(os.getpid()))

@step
def nap() -> int:
    started()
    time.sleep(60)
    return 1

@step
def later(x: int) -> int:
    return x

@job
def sleepy():
    later(nap())

@step
def exits() -> int:
    started()
    time.sleep(0.2)
    os._exit(3)

@job
def exiting():
    later(exits())

@step
def exits_leaving_a_child() -> int:
    child = subprocess.Popen(["sleep", "300"])
    Path(os.environ["RY_PIDS"]).write_text(str(child.pid))
    started()
    time.sleep(0.2)
    os._exit(3)

@job
def exiting_leaving():
    later(exits_leaving_a_child())

@step
def crashes() -> int:
    started()
    time.sleep(0.2)
    ctypes.string_at(0)  # reads address 0: SIGSEGV
    return 1

@job
def crashing():
    later(crashes())

@step
def spawns() -> int:
    child = subprocess.Popen(["sleep", "300"])
    # A daemonized grandchild: its parent (sh) exits at once, leaving it an orphan.
    subprocess.run(["sh", "-c", "sleep 301 & echo $! > " + os.environ["RY_PIDS"] + ".orphan"], check=True)
    Path(os.environ["RY_PIDS"]).write_text(str(child.pid))
    return 1

@job
def spawning():
    later(spawns())

@step
def stubborn() -> int:
    child = subprocess.Popen(["sleep", "300"])
    Path(os.environ["RY_PIDS"]).write_text(str(child.pid))
    started()
    while True:  # will not stop when asked
        try:
            time.sleep(60)
        except BaseException:
            pass

@job
def stubborn_job():
    later(stubborn())
"""


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def env(home: Path, tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "RUNYARD_HOME": str(home), "RY_MARK": str(tmp_path / "mark"),
            "RY_PIDS": str(tmp_path / "pids")}


@pytest.fixture
def jobs(tmp_path: Path) -> Path:
    f = tmp_path / "jobs.py"
    f.write_text(textwrap.dedent(JOBS))
    return f


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """CLI processes a test starts; none outlives it."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    return path.read_text()


def execute(procs: list[subprocess.Popen[str]], env: dict[str, str], jobs: Path, job: str,
            *args: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([str(RUNYARD), "job", "execute", "-f", str(jobs), "-j", job, *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(p)
    return p


def ry(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RUNYARD), *args], env=env, capture_output=True, text=True, timeout=60)


def only_run(home: Path):  # type: ignore[no-untyped-def]
    (run,) = Instance(home).storage.list_runs()
    return run


def test_job_execute_records_itself_as_the_runs_worker(
    home: Path, env: dict[str, str], jobs: Path, procs: list[subprocess.Popen[str]]
) -> None:
    p = execute(procs, env, jobs, "sleepy", "--executor", "in_process")
    wait_for(Path(env["RY_MARK"]), p)
    shown = json.loads(ry(env, "run", "show", only_run(home).run_id, "--json").stdout)
    assert shown["status"] == "STARTED"
    assert shown["launcher"] == "job_execute" and shown["worker"]["pid"] == p.pid


@pytest.mark.parametrize("executor", ["in_process", "multiprocess"])
def test_a_killed_job_execute_is_a_failed_run_when_observed(
    home: Path, env: dict[str, str], jobs: Path, procs: list[subprocess.Popen[str]], executor: str
) -> None:
    p = execute(procs, env, jobs, "sleepy", "--executor", executor)
    wait_for(Path(env["RY_MARK"]), p)
    p.kill()  # kill -9: nothing of the CLI gets to record anything
    p.wait()
    run = only_run(home)
    assert run.status is RunStatus.STARTED
    shown = ry(env, "run", "show", run.run_id[:12], "--json")
    assert shown.returncode == 0, shown.stderr
    out = json.loads(shown.stdout)
    assert out["status"] == "FAILURE"
    assert out["failure"]["kind"] == "worker_lost"
    assert f"`runyard job execute` process (pid {p.pid}) is gone" in out["failure"]["message"]


@pytest.mark.parametrize(("job", "code"), [("exiting", 3), ("crashing", -signal.SIGSEGV)])
def test_a_step_ending_the_cli_process_fails_the_run_with_a_reason(
    home: Path, env: dict[str, str], jobs: Path, procs: list[subprocess.Popen[str]], job: str, code: int
) -> None:
    p = execute(procs, env, jobs, job, "--executor", "in_process")
    p.communicate(timeout=60)
    assert p.returncode == code
    listed = ry(env, "run", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (run,) = json.loads(listed.stdout)
    assert run["status"] == "FAILURE"
    (failure,) = Instance(home).storage.get_events(run["run_id"], types=[EventType.RUN_FAILURE])
    assert "run worker died before the run finished" in failure.event.message
    assert "os._exit, a crash" in failure.event.message


def test_an_in_process_step_cannot_leave_processes_behind(
    home: Path, env: dict[str, str], jobs: Path, procs: list[subprocess.Popen[str]]
) -> None:
    p = execute(procs, env, jobs, "spawning", "--executor", "in_process")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, out + err
    child = int(Path(env["RY_PIDS"]).read_text())
    orphan = int(Path(env["RY_PIDS"] + ".orphan").read_text())
    try:
        assert gone(child), "the step's child still runs"
        assert gone(orphan), "the step's daemonized grandchild still runs"
    finally:
        for pid in (child, orphan):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    logs = ry(env, "run", "logs", only_run(home).run_id)
    assert "killed 2 process(es) the step left running" in logs.stdout


def test_run_cancel_stops_a_run_of_job_execute(
    home: Path, env: dict[str, str], jobs: Path, procs: list[subprocess.Popen[str]]
) -> None:
    p = execute(procs, env, jobs, "sleepy")  # the default executor: the step in a process of its own
    wait_for(Path(env["RY_MARK"]), p)
    run = only_run(home)
    began = time.monotonic()
    canceled = ry(env, "run", "cancel", run.run_id)
    assert canceled.returncode == 0, canceled.stderr
    assert canceled.stdout.strip() == f"run {run.run_id} CANCELED"
    out, err = p.communicate(timeout=30)
    assert time.monotonic() - began < 15
    assert p.returncode == 1, out + err
    assert "step later skipped" in out and "CANCELED" in out
    types = [s.event.type for s in Instance(home).storage.get_events(run.run_id)]
    assert EventType.STEP_SUCCESS not in types  # it did not go on to finish
    assert only_run(home).status is RunStatus.CANCELED


def test_a_second_ctrl_c_abandons_at_once_after_killing_the_steps_processes(
    home: Path, env: dict[str, str], jobs: Path, procs: list[subprocess.Popen[str]]
) -> None:
    p = execute(procs, env, jobs, "stubborn_job", "--executor", "in_process")
    wait_for(Path(env["RY_MARK"]), p)
    child = int(Path(env["RY_PIDS"]).read_text())
    p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 10
    while only_run(home).status is not RunStatus.CANCELING:  # recorded at the first Ctrl-C
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert p.poll() is None and not gone(child)  # the step does not let itself be stopped
    began = time.monotonic()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert time.monotonic() - began < 5
    assert p.returncode == 1, out + err
    assert "canceling the run" in err and "abandoned run" in err
    assert gone(child)
    run = only_run(home)
    assert run.status is RunStatus.CANCELED
    (ended,) = Instance(home).storage.get_events(run.run_id, types=[EventType.RUN_CANCELED])
    assert "run abandoned" in ended.event.message


def test_an_in_process_step_of_a_launched_run_cannot_leave_processes_behind(
    home: Path, env: dict[str, str], jobs: Path
) -> None:
    proc = ry(env, "job", "launch", "-f", str(jobs), "-j", "spawning", "--executor", "in_process", "--wait")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    child = int(Path(env["RY_PIDS"]).read_text())
    orphan = int(Path(env["RY_PIDS"] + ".orphan").read_text())
    try:
        assert gone(child) and gone(orphan)
    finally:
        for pid in (child, orphan):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert "killed 2 process(es) the step left running" in ry(env, "run", "logs", only_run(home).run_id).stdout


@pytest.mark.parametrize("executor", ["in_process", "multiprocess"])
def test_ctrl_c_on_a_terminal_cancels_the_run(
    home: Path, env: dict[str, str], jobs: Path, executor: str
) -> None:
    # A terminal's Ctrl-C reaches the whole foreground process group: the CLI and the
    # steps' processes alike. The run still ends CANCELED, not failed by a KeyboardInterrupt.
    p = subprocess.Popen([str(RUNYARD), "job", "execute", "-f", str(jobs), "-j", "sleepy", "--executor", executor],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(Path(env["RY_MARK"]), p)
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 1, out + err
    assert "step nap failed (attempt 1, canceled)" in out and "KeyboardInterrupt" not in out + err
    run = only_run(home)
    assert run.status is RunStatus.CANCELED
    assert Instance(home).storage.get_events(run.run_id, types=[EventType.RUN_FAILURE]) == []


def test_what_a_step_that_ended_the_cli_left_running_is_killed_when_observed(
    home: Path, env: dict[str, str], jobs: Path, procs: list[subprocess.Popen[str]]
) -> None:
    p = execute(procs, env, jobs, "exiting_leaving", "--executor", "in_process")
    assert p.wait(timeout=60) == 3  # not communicate(): the orphan holds the output pipes open
    child = int(Path(env["RY_PIDS"]).read_text())
    try:
        assert not gone(child)  # orphaned when the CLI died: nothing of the CLI could stop it
        shown = ry(env, "run", "show", only_run(home).run_id, "--json")
        assert shown.returncode == 0, shown.stderr
        failure = json.loads(shown.stdout)["failure"]["message"]
        assert "1 process(es) its steps left running were killed" in failure
        deadline = time.monotonic() + 5
        while not gone(child):
            assert time.monotonic() < deadline, "the orphan still runs"
            time.sleep(0.02)
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
