"""Runs end to end: launched through the CLI (the console script, as subprocesses), run by
the default run launcher in their own process groups, checked from storage.

Covers success, a failing step, cancel of a long step (no process of the run survives), a
run worker killed with SIGKILL (noticed within seconds), re-execution from failure, and
twenty runs launched at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from runyard.events import EventType
from runyard.instance import Instance
from runyard.storage import RunStatus

RUNYARD = Path(sys.executable).parent / "runyard"

THREE_STEPS = """
from runyard import job, step

@step
def fetch() -> list[int]:
    return [1, 2, 3]

@step
def square(xs: list[int]) -> list[int]:
    return [x * x for x in xs]

@step
def total(xs: list[int]) -> int:
    print(f"total is {sum(xs)}")
    return sum(xs)

@job
def three():
    total(square(fetch()))
"""

FAILING = """
from runyard import job, step

class KaputError(Exception):
    pass

@step
def emit() -> int:
    return 1

@step
def boom(x: int) -> int:
    raise KaputError(f"kaput {x}")

@job
def failing():
    boom(emit())
"""

# The step's own pid is the run worker's (in_process runs steps in the worker); the child
# it starts stands for any process a step spawns.
SLEEPY = """
import os
import subprocess
import time
from pathlib import Path
from runyard import job, step

@step
def nap() -> int:
    child = subprocess.Popen(["sleep", "60"])
    target = Path(os.environ["RY_PIDFILE"])
    tmp = target.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()} {child.pid}")
    tmp.rename(target)
    time.sleep(60)
    return 1

@job
def sleepy():
    nap()
"""

FLAKY = """
import os
from pathlib import Path
from runyard import job, step

@step
def a() -> int:
    with open(os.environ["RY_COUNT"], "a") as f:
        f.write("a ran\\n")
    return 20

@step
def b(x: int) -> int:
    if not Path(os.environ["RY_MARKER"]).exists():
        raise RuntimeError("marker file is missing")
    return x + 1

@step
def c(x: int) -> int:
    return x * 2

@job
def flaky():
    c(b(a()))
"""


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


@pytest.fixture
def env(home: Path, tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "RUNYARD_HOME": str(home), "RY_PIDFILE": str(tmp_path / "pids")}


@pytest.fixture
def reap(home: Path) -> Iterator[None]:
    """Whatever a test leaves behind, no run worker of it outlives the test."""
    yield
    storage = Instance(home).storage
    for run in storage.list_runs(limit=1000):
        for stored in storage.get_events(run.run_id, types=[EventType.RUN_LAUNCHED]):
            try:
                os.killpg(stored.event.data["worker"]["pgid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def ry(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RUNYARD), *args], env=env, capture_output=True, text=True, timeout=timeout)


def gone(pid: int) -> bool:
    """The process no longer runs: it does not exist, or it is a zombie nobody reaped yet."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def live_in_group(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are still running (not zombies)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def wait_for_file(path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text()


def worker_of(home: Path, run_id: str) -> dict:
    (launched,) = Instance(home).storage.get_events(run_id, types=[EventType.RUN_LAUNCHED])
    return launched.event.data["worker"]


def types_of(home: Path, run_id: str) -> list[str]:
    return [s.event.type.value for s in Instance(home).storage.get_events(run_id)]


# -- success and failure ---------------------------------------------------------------------------


def test_launch_runs_the_job_in_its_own_worker(home: Path, tmp_path: Path, env: dict[str, str], reap: None) -> None:
    f = write(tmp_path / "three.py", THREE_STEPS)
    proc = ry(env, "job", "launch", "-f", str(f))
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.strip()
    waited = ry(env, "run", "wait", run_id)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    run = Instance(home).storage.get_run(run_id)
    assert run is not None and run.status is RunStatus.SUCCESS and run.executor == "multi_or_in_process"
    types = types_of(home, run_id)
    assert types[:5] == ["RUN_QUEUED", "RUN_STARTING", "RUN_LAUNCHED", "RUN_START", "STEP_START"]
    assert types[-1] == "RUN_SUCCESS"
    assert Counter(types)["STEP_SUCCESS"] == 3
    worker = worker_of(home, run_id)
    assert worker["pid"] != os.getpid() and worker["pgid"] == worker["pid"]
    starts = Instance(home).storage.get_events(run_id, types=[EventType.STEP_START])
    step_pids = {s.event.data["pid"] for s in starts}
    # The default executor: each step in a process of its own, none of them the worker.
    assert len(step_pids) == 3 and worker["pid"] not in step_pids
    # The run is SUCCESS once its last event is stored; the worker then shuts the fork server down.
    deadline = time.monotonic() + 10
    while not (gone(worker["pid"]) and all(gone(pid) for pid in step_pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(worker["pid"]) and all(gone(pid) for pid in step_pids)
    logs = ry(env, "run", "logs", run_id, "--step", "total")
    assert logs.stdout == "total is 14\n"


def test_failing_step_is_stored_with_its_error(home: Path, tmp_path: Path, env: dict[str, str], reap: None) -> None:
    f = write(tmp_path / "failing.py", FAILING)
    proc = ry(env, "job", "launch", "-f", str(f), "--wait")
    assert proc.returncode == 1, proc.stderr
    run_id = proc.stdout.splitlines()[0]
    storage = Instance(home).storage
    run = storage.get_run(run_id)
    assert run is not None and run.status is RunStatus.FAILURE
    (failure,) = storage.get_events(run_id, types=[EventType.STEP_FAILURE])
    info = failure.event.failure
    assert failure.event.step_key == "boom" and info is not None
    assert info.message == "KaputError: kaput 1"
    assert info.error_class is not None and info.error_class.endswith(".KaputError")
    assert info.kind.value == "error" and "raise KaputError" in (info.traceback or "")
    (run_failure,) = storage.get_events(run_id, types=[EventType.RUN_FAILURE])
    assert run_failure.event.message == "step(s) failed: boom"


SLOW_PRINTER = """
import time
from runyard import job, step

@step
def talk() -> int:
    print("hello from the worker")
    time.sleep(1.0)
    return 1

@step
def answer(x: int) -> int:
    print(f"answer {x}")
    return x

@job
def chatty():
    answer(talk())
"""


def test_logs_follow_prints_until_the_run_finishes(
    home: Path, tmp_path: Path, env: dict[str, str], reap: None
) -> None:
    f = write(tmp_path / "chatty.py", SLOW_PRINTER)
    run_id = ry(env, "job", "launch", "-f", str(f)).stdout.strip()
    proc = ry(env, "run", "logs", run_id, "--follow")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[talk] hello from the worker", "[answer] answer 1"]
    run = Instance(home).storage.get_run(run_id)
    assert run is not None and run.status is RunStatus.SUCCESS


# -- cancel and a killed worker ---------------------------------------------------------------------


def test_cancel_stops_the_long_step_and_every_process_of_the_run(
    home: Path, tmp_path: Path, env: dict[str, str], reap: None
) -> None:
    f = write(tmp_path / "sleepy.py", SLEEPY)
    run_id = ry(env, "job", "launch", "-f", str(f)).stdout.strip()
    step_pid, child_pid = map(int, wait_for_file(tmp_path / "pids").split())
    worker = worker_of(home, run_id)
    assert step_pid != worker["pid"]  # the default executor: the step has a process of its own
    assert not gone(child_pid)

    timed_out = ry(env, "run", "wait", run_id, "--timeout", "0.3")
    assert timed_out.returncode == 1
    assert f"timed out after 0.3s: run {run_id} is still STARTED" in timed_out.stderr
    refused = ry(env, "run", "delete", run_id)
    assert refused.returncode == 2 and "is STARTED: cancel it first" in refused.stderr

    started = time.monotonic()
    proc = ry(env, "run", "cancel", run_id)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"run {run_id} CANCELED"
    assert took < 8, f"cancel took {took:.1f}s"
    storage = Instance(home).storage
    run = storage.get_run(run_id)
    assert run is not None and run.status is RunStatus.CANCELED
    (failure,) = storage.get_events(run_id, types=[EventType.STEP_FAILURE])
    assert failure.event.failure is not None and failure.event.failure.kind.value == "canceled"
    assert gone(step_pid) and gone(worker["pid"]) and gone(child_pid)
    assert live_in_group(worker["pgid"]) == []
    assert ry(env, "run", "wait", run_id).returncode == 1


def test_cancel_right_after_launch_does_not_wait_out_the_grace(
    home: Path, tmp_path: Path, env: dict[str, str], reap: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM may reach the worker before it handles signals: it dies without ending the
    run, and cancel must notice that at once rather than after --grace."""
    from runyard import CodePointer
    from runyard.loader import load_job
    from runyard.runs import cancel_run, create_run, launch_run

    monkeypatch.setenv("RUNYARD_HOME", str(home))
    monkeypatch.setenv("RY_PIDFILE", env["RY_PIDFILE"])
    f = write(tmp_path / "sleepy.py", SLEEPY)
    instance = Instance(home)
    pointer = CodePointer(file=str(f.resolve()))
    run = launch_run(instance, create_run(instance, load_job(pointer)[0], pointer=pointer))
    started = time.monotonic()
    done = cancel_run(instance, run.run_id, grace=20)
    assert time.monotonic() - started < 5
    assert done.status is RunStatus.CANCELED
    worker = worker_of(home, run.run_id)
    assert gone(worker["pid"]) and live_in_group(worker["pgid"]) == []


@pytest.mark.parametrize("executor", ["multiprocess", "in_process"])
def test_a_burst_of_sigterms_cancels_the_run_once_and_never_hangs_the_worker(
    home: Path, tmp_path: Path, env: dict[str, str], reap: None, executor: str
) -> None:
    """A signal landing while the worker's first cancel held its lock hung the worker for
    good (the run-launcher kit's terminate-twice test, 1 run in 5: STARTED for ever, the
    stack in Cancellation.cancel twice). The worker ends the run CANCELED by itself here:
    nobody forces it."""
    f = write(tmp_path / "sleepy.py", SLEEPY)
    run_id = ry(env, "job", "launch", "-f", str(f), "--executor", executor).stdout.strip()
    wait_for_file(tmp_path / "pids")
    worker = worker_of(home, run_id)
    # For 2 s, as fast as they go: many land inside the handling of another.
    until = time.monotonic() + 2
    while time.monotonic() < until and not gone(worker["pid"]):
        os.kill(worker["pid"], signal.SIGTERM)
    storage = Instance(home).storage
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not gone(worker["pid"]):
        time.sleep(0.05)
    run = storage.get_run(run_id)
    assert gone(worker["pid"]), f"the worker still runs 20 s after the SIGTERMs; run {run.status.value}"
    assert run is not None and run.status is RunStatus.CANCELED, (run.status, types_of(home, run_id))
    (failure,) = storage.get_events(run_id, types=[EventType.STEP_FAILURE])
    assert failure.event.failure is not None and failure.event.failure.kind.value == "canceled"
    assert types_of(home, run_id).count("RUN_CANCELED") == 1
    assert live_in_group(worker["pgid"]) == []


@pytest.mark.parametrize("monitor", ["wait", "show"])
def test_killed_worker_is_noticed_by_whoever_looks(
    home: Path, tmp_path: Path, env: dict[str, str], reap: None, monitor: str
) -> None:
    f = write(tmp_path / "sleepy.py", SLEEPY)
    run_id = ry(env, "job", "launch", "-f", str(f)).stdout.strip()
    wait_for_file(tmp_path / "pids")
    worker = worker_of(home, run_id)
    pgid = os.getpgid(worker["pid"])
    assert pgid == worker["pgid"] == worker["pid"]  # the worker leads its own process group
    os.killpg(pgid, signal.SIGKILL)  # kill -9 the whole group: worker and step processes
    started = time.monotonic()
    proc = ry(env, "run", monitor, run_id, *(["--json"] if monitor == "show" else []))
    took = time.monotonic() - started
    assert took < 10, f"noticed after {took:.1f}s"
    if monitor == "wait":
        assert proc.returncode == 1
        assert "run failure: run worker died before the run finished" in proc.stdout
    else:
        assert proc.returncode == 0, proc.stderr
        shown = json.loads(proc.stdout)
        assert shown["status"] == "FAILURE" and "worker" in shown["failure"]["message"]
        assert shown["failure"]["kind"] == "worker_lost"
    storage = Instance(home).storage
    run = storage.get_run(run_id)
    assert run is not None and run.status is RunStatus.FAILURE
    (failure,) = storage.get_events(run_id, types=[EventType.RUN_FAILURE])
    assert "worker" in failure.event.message and str(worker["pid"]) in failure.event.message
    assert failure.event.failure is not None and failure.event.failure.kind.value == "worker_lost"
    assert live_in_group(worker["pgid"]) == []


# -- re-execution ------------------------------------------------------------------------------------


def test_reexecute_from_failure_reuses_the_parents_outputs(
    home: Path, tmp_path: Path, env: dict[str, str], reap: None
) -> None:
    f = write(tmp_path / "flaky.py", FLAKY)
    count, marker = tmp_path / "a-runs.txt", tmp_path / "marker"
    env = {**env, "RY_COUNT": str(count), "RY_MARKER": str(marker)}
    first = ry(env, "job", "launch", "-f", str(f), "--wait")
    assert first.returncode == 1
    parent_id = first.stdout.splitlines()[0]
    assert "RuntimeError: marker file is missing" in first.stdout
    assert count.read_text() == "a ran\n"

    marker.touch()
    again = ry(env, "run", "reexecute", parent_id, "--from-failure", "--wait")
    assert again.returncode == 0, again.stdout + again.stderr
    child_id = again.stdout.splitlines()[0]
    storage = Instance(home).storage
    child = storage.get_run(child_id)
    assert child is not None and child.status is RunStatus.SUCCESS
    assert child.parent_run_id == parent_id and child.step_selection == ["b", "c"]
    assert count.read_text() == "a ran\n"  # step a did not run again
    ran = [s.event.step_key for s in storage.get_events(child_id, types=[EventType.STEP_SUCCESS])]
    assert ran == ["b", "c"]
    parent = storage.get_run(parent_id)
    assert parent is not None and parent.status is RunStatus.FAILURE  # the parent's record is unchanged


# -- many runs at once ------------------------------------------------------------------------------


def test_twenty_runs_launched_at_once(home: Path, tmp_path: Path, env: dict[str, str], reap: None) -> None:
    f = write(tmp_path / "three.py", THREE_STEPS)
    n = 20
    launches = [
        subprocess.Popen([str(RUNYARD), "job", "launch", "-f", str(f), "--tag", f"i={i}"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(n)
    ]
    run_ids = []
    for p in launches:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        run_ids.append(out.strip())
    assert len(set(run_ids)) == n
    waits = [
        subprocess.Popen([str(RUNYARD), "run", "wait", r, "--json"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for r in run_ids
    ]
    for p in waits:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, out + err
        assert json.loads(out)["status"] == "SUCCESS"
    storage = Instance(home).storage
    tags = set()
    for run_id in run_ids:
        run = storage.get_run(run_id)
        assert run is not None and run.status is RunStatus.SUCCESS
        tags.add(run.tags["i"])
        counts = Counter(types_of(home, run_id))
        assert counts == Counter({
            "RUN_QUEUED": 1, "RUN_STARTING": 1, "RUN_LAUNCHED": 1, "RUN_START": 1, "STEP_START": 3,
            "STEP_OUTPUT": 3, "STEP_SUCCESS": 3, "STEP_STDOUT": 1, "RUN_SUCCESS": 1,
        }), (run_id, counts)
    assert tags == {str(i) for i in range(n)}
