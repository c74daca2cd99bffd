"""Watching runs from the CLI (issue 14): `run logs --follow` shows output while the step
runs, a canceled step's output is kept, `run logs` of a silent run says so, `run list`
filters and pages. Real runs (the default launcher and executor) and a real SQLite
storage; the console script runs as a subprocess."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path

import pytest
from runyard.instance import Instance
from runyard.storage import RunRecord, RunStatus

from .test_runs_cli import RUNYARD, ry, write

WAITS_FOR_FILE = """
import sys
import time
from pathlib import Path
from runyard import job, step

@step
def talk() -> int:
    print("first line", flush=True)
    print("an error line", file=sys.stderr, flush=True)
    gate = Path(__file__).with_name("gate")
    deadline = time.monotonic() + 60
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    print("second line", flush=True)
    return 1

@job
def talker():
    talk()
"""

SILENT = """
from runyard import job, step

@step
def quiet() -> int:
    return 1

@job
def silent():
    quiet()
"""


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def _launch(home: Path, job_file: Path) -> str:
    proc = ry(home, "job", "launch", "-f", str(job_file))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()[0]


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    """``proc``'s stdout lines as they come (a thread reads them; EOF is "")."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=read, daemon=True).start()
    return lines


def test_logs_follow_prints_output_while_the_step_runs(home: Path, tmp_path: Path) -> None:
    job_file = write(tmp_path / "talker.py", WAITS_FOR_FILE)
    run_id = _launch(home, job_file)
    follow = subprocess.Popen(
        [str(RUNYARD), "run", "logs", run_id, "--follow"], env={**os.environ, "RUNYARD_HOME": str(home)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
    )
    lines = _lines(follow)
    try:
        # The step waits for the gate: these lines can only come while it runs.
        got = {lines.get(timeout=60).strip(), lines.get(timeout=10).strip()}
        assert got == {"[talk] first line", "[talk] an error line"}, ry(home, "run", "show", run_id).stdout
        assert not (tmp_path / "gate").exists()
        (tmp_path / "gate").touch()
        assert follow.wait(timeout=60) == 0, follow.stderr.read() if follow.stderr else ""
    finally:
        follow.kill()
    rest = []
    while (line := lines.get(timeout=10)) != "":
        rest.append(line.rstrip("\n"))
    assert rest == ["[talk] second line"]
    # Written once each: what was followed is what is stored.
    again = ry(home, "run", "logs", run_id).stdout.splitlines()
    assert sorted(again) == ["[talk] an error line", "[talk] first line", "[talk] second line"]


def test_a_canceled_steps_output_is_kept(home: Path, tmp_path: Path) -> None:
    job_file = write(tmp_path / "talker.py", WAITS_FOR_FILE)  # no gate: it waits until canceled
    run_id = _launch(home, job_file)
    instance = Instance(home)

    def printed() -> bool:
        return any(s.event.data.get("text") == "first line\n" for s in instance.storage.get_events(run_id))

    deadline = time.monotonic() + 60
    while not printed() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert printed(), "the step's first line never reached storage while it ran"
    cancel = ry(home, "run", "cancel", run_id)
    assert cancel.returncode == 0, cancel.stderr
    stored = instance.storage.get_run(run_id)
    assert stored is not None and stored.status is RunStatus.CANCELED
    logs = ry(home, "run", "logs", run_id)
    assert logs.returncode == 0, logs.stderr
    assert "[talk] first line" in logs.stdout.splitlines()
    assert "[talk] second line" not in logs.stdout


def test_logs_of_a_run_without_output_say_so(home: Path, tmp_path: Path) -> None:
    proc = ry(home, "job", "launch", "-f", str(write(tmp_path / "silent.py", SILENT)), "--wait")
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.splitlines()[0]
    logs = ry(home, "run", "logs", run_id)
    assert logs.returncode == 0 and logs.stdout == ""
    assert f"run {run_id} (SUCCESS) has no output" in logs.stderr
    step = ry(home, "run", "logs", run_id, "--step", "quiet")
    assert step.returncode == 0 and f"step 'quiet' of run {run_id} (SUCCESS) has no output" in step.stderr


def test_run_list_filters_by_job_status_tag_and_time_and_pages(home: Path) -> None:
    storage = Instance(home).storage
    now = time.time()
    made = []
    for i in range(7):
        run = RunRecord(
            job_name="etl" if i % 2 == 0 else "report",
            tags={"team": "data" if i < 4 else "web"},
            status=RunStatus.SUCCESS if i % 3 else RunStatus.FAILURE,
            created_at=now - (7 - i) * 3600,  # one an hour, the newest an hour ago
        )
        storage.add_run(run)
        made.append(run)

    def ids(*args: str) -> list[str]:
        proc = ry(home, "run", "list", "--json", *args)
        assert proc.returncode == 0, proc.stderr
        return [r["run_id"] for r in json.loads(proc.stdout)]

    newest_first = [r.run_id for r in reversed(made)]
    assert ids() == newest_first
    assert ids("--job", "etl") == [r.run_id for r in reversed(made) if r.job_name == "etl"]
    assert ids("--status", "failure") == [r.run_id for r in reversed(made) if r.status is RunStatus.FAILURE]
    assert ids("--tag", "team=web") == [r.run_id for r in reversed(made) if r.tags["team"] == "web"]
    assert ids("--tag", "team=web", "--job", "report") == [made[5].run_id]
    assert ids("--tag", "team=web", "--status", "failure") == [made[6].run_id]
    assert ids("--since", "2.5h") == newest_first[:2]  # created in the last two and a half hours
    older = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now - 5.5 * 3600))
    assert ids("--until", older) == newest_first[5:]
    # Pages: --limit and --offset walk the same order without gaps or repeats.
    pages = [ids("--limit", "3", "--offset", str(o)) for o in (0, 3, 6)]
    assert sum(pages, []) == newest_first
    table = ry(home, "run", "list", "--limit", "3")
    assert "next page: --offset 3" in table.stderr and "team=" in table.stdout
    none = ry(home, "run", "list", "--job", "nothing")
    assert none.returncode == 0 and none.stdout.strip() == "no runs of job nothing"
    for bad, option in ((["--since", "yesterday"], "--since"), (["--tag", "team"], "--tag")):
        proc = ry(home, "run", "list", *bad)
        assert proc.returncode == 2 and option in proc.stderr, proc.stderr



def test_a_run_whose_worker_dies_mid_step_shows_the_step_started(home: Path, tmp_path: Path) -> None:
    import signal

    from runyard.events import EventType
    from runyard.runs import worker_info

    job_file = write(tmp_path / "talker.py", WAITS_FOR_FILE)  # no gate: it waits
    run_id = _launch(home, job_file)
    instance = Instance(home)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(s.event.data.get("text") == "first line\n" for s in instance.storage.get_events(run_id)):
            break
        time.sleep(0.05)
    _, worker = worker_info(instance, run_id)
    assert worker is not None and isinstance(worker.get("pid"), int), worker
    group = os.getpgid(worker["pid"])
    assert group != os.getpgid(0), "the run worker shares this test's process group"
    os.killpg(group, signal.SIGKILL)  # the run worker and its step, at once
    shown = ry(home, "run", "show", run_id, "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["status"] == "FAILURE", data  # noticed by the look
    talk = data["steps"]["talk"]
    assert talk["attempts"] == 1 and talk["started_at"] is not None, talk
    starts = [s for s in instance.storage.get_events(run_id, step_key="talk") if s.event.type is EventType.STEP_START]
    assert len(starts) == 1
