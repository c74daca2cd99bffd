"""End to end: the installed ``runyard-threadpool`` distribution, selected in runyard.yaml,
runs a job through the ``runyard`` command line in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from runyard import EventType, Instance, RunStatus

FAN_JOB = '''
import os
import threading

from runyard import job, step

# The three `part` steps meet here: the run succeeds only if all three run at the same time.
_all_running = threading.Barrier(3, timeout=20)


@step
def part(i: int) -> dict:
    _all_running.wait()
    return {"i": i, "pid": os.getpid(), "thread": threading.current_thread().name}


@step
def combine(parts: list) -> dict:
    return {"total": sum(p["i"] for p in parts), "pids": sorted({p["pid"] for p in parts}),
            "threads": sorted(p["thread"] for p in parts)}


@job
def fan():
    combine([part(i) for i in range(3)])
'''

TIMEOUT_JOB = '''
from pathlib import Path

from runyard import job, step


@step
def first() -> int:
    Path(__file__).with_name("first-ran").write_text("yes")
    return 1


@step(timeout=5)
def slow(x: int) -> int:
    return x


@job
def with_timeout():
    slow(first())
'''


def runyard_exe() -> str:
    exe = Path(sys.executable).parent / "runyard"
    found = str(exe) if exe.exists() else shutil.which("runyard")
    assert found, "the runyard console script is not installed in this environment"
    return found


def run_cli(*args: str, home: Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [runyard_exe(), *args],
        env={**os.environ, "RUNYARD_HOME": str(home), **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


def write_config(home: Path, executor_config: dict) -> None:
    (home / "runyard.yaml").write_text(yaml.safe_dump({"executor": {"threadpool": executor_config}}))


def write_job(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def only_run(home: Path):  # type: ignore[no-untyped-def]
    inst = Instance(home)
    try:
        runs = inst.storage.list_runs()
        assert len(runs) == 1, runs
        run = runs[0]
        events = [s.event for s in inst.storage.get_events(run.run_id)]
        outputs = {e.step_key: inst.output_store(shared=True).get(e.data["ref"])
                   for e in events if e.type is EventType.STEP_OUTPUT}
        return run, events, outputs
    finally:
        inst.storage.close()


def test_job_runs_on_threadpool_named_in_runyard_yaml(home: Path, tmp_path: Path) -> None:
    write_config(home, {"max_concurrent": 3})
    job_file = write_job(tmp_path, "fan_job.py", FAN_JOB)

    proc = run_cli("job", "execute", "-f", str(job_file), home=home, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Concurrent steps capture their prints per thread, so the CLI's own stdout still works.
    assert "SUCCESS" in proc.stdout, proc.stdout

    run, events, outputs = only_run(home)
    assert run.executor == "threadpool"
    assert run.status is RunStatus.SUCCESS
    succeeded = {e.step_key for e in events if e.type is EventType.STEP_SUCCESS}
    assert succeeded == {"part", "part_2", "part_3", "combine"}
    assert not [e for e in events if e.type is EventType.STEP_FAILURE]
    assert next(e for e in events if e.type is EventType.RUN_START).data["executor"] == "threadpool"

    result = outputs["combine"]
    assert result["total"] == 0 + 1 + 2
    # One process (the CLI's), three distinct pool threads named with the default prefix.
    assert len(result["pids"]) == 1
    assert {e.data["pid"] for e in events if e.type is EventType.STEP_START} == set(result["pids"])
    assert len(set(result["threads"])) == 3
    assert all(t.startswith("runyard-step") for t in result["threads"]), result["threads"]


def test_config_values_can_come_from_the_environment(home: Path, tmp_path: Path) -> None:
    write_config(home, {"max_concurrent": 3, "thread_name_prefix": {"env": "YARD_THREAD_PREFIX"}})
    job_file = write_job(tmp_path, "fan_job.py", FAN_JOB)

    proc = run_cli("job", "execute", "-f", str(job_file), home=home, cwd=tmp_path,
                   env={"YARD_THREAD_PREFIX": "yard-worker"})
    assert proc.returncode == 0, proc.stdout + proc.stderr

    _, _, outputs = only_run(home)
    assert all(t.startswith("yard-worker") for t in outputs["combine"]["threads"]), outputs


def test_an_unset_variable_read_in_setup_exits_2_with_one_line(home: Path, tmp_path: Path) -> None:
    # setup() raises (resolve of an unset {env: NAME}); the engine still calls teardown,
    # which must not hide that error behind its own (an AttributeError on the missing pool).
    write_config(home, {"thread_name_prefix": {"env": "YARD_UNSET_PREFIX"}})
    job_file = write_job(tmp_path, "fan_job.py", FAN_JOB)
    env = {k: v for k, v in os.environ.items() if k != "YARD_UNSET_PREFIX"}
    proc = subprocess.run([runyard_exe(), "job", "execute", "-f", str(job_file)],
                          env={**env, "RUNYARD_HOME": str(home)}, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "YARD_UNSET_PREFIX" in lines[0] and "not set" in lines[0]
    assert "AttributeError" not in proc.stderr
    run, events, _ = only_run(home)
    assert run.status is RunStatus.FAILURE
    assert not [e for e in events if e.type is EventType.STEP_START]  # no step ran


def test_step_timeout_is_rejected_before_the_run(home: Path, tmp_path: Path) -> None:
    write_config(home, {"max_concurrent": 3})
    job_file = write_job(tmp_path, "timeout_job.py", TIMEOUT_JOB)

    proc = run_cli("job", "execute", "-f", str(job_file), home=home, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "step 'slow'" in proc.stderr
    assert "executor 'threadpool' cannot enforce timeouts" in proc.stderr
    # Rejected before anything ran or was recorded.
    assert not (tmp_path / "first-ran").exists()
    inst = Instance(home)
    try:
        assert inst.storage.list_runs() == []
    finally:
        inst.storage.close()

    # The same job is fine on an executor that enforces timeouts.
    proc = run_cli("job", "execute", "-f", str(job_file), "--executor", "in_process", home=home, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "first-ran").exists()


def test_plugin_list_shows_threadpool_from_its_distribution(home: Path, tmp_path: Path) -> None:
    proc = run_cli("plugin", "list", "--json", home=home, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [r for r in json.loads(proc.stdout) if r["name"] == "threadpool"]
    assert len(rows) == 1, proc.stdout
    assert rows[0]["kind"] == "executor"
    assert rows[0]["distribution"] == "runyard-threadpool"
    assert rows[0]["loads"] is True

    proc = run_cli("plugin", "list", home=home, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("threadpool "))
    assert line.split()[:3] == ["threadpool", "executor", "runyard-threadpool"]
