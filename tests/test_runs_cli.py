"""The run commands of the CLI (`job launch`, `run …`, `config explain`) and progress output,
run as subprocesses of the installed console script; outcomes are read from storage."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from runyard import CodePointer
from runyard.events import EventType
from runyard.instance import Instance
from runyard.loader import load_job
from runyard.runs import create_run
from runyard.storage import RunStatus

RUNYARD = Path(sys.executable).parent / "runyard"

TWO_STEPS = """
import logging
import sys
from runyard import job, step

@step
def emit() -> int:
    print("emitting 21")
    print("a warning on stderr", file=sys.stderr)
    logging.getLogger("emitter").warning("careful now")
    return 21

@step
def double(x: int) -> int:
    print(f"doubling {x}")
    return x * 2

@job
def solo():
    double(emit())
"""

FAILING = """
from runyard import job, step

@step
def emit() -> int:
    return 1

@step
def boom(x: int) -> int:
    raise ValueError(f"kaput {x}")

@step
def after(x: int) -> int:
    return x

@job
def failing():
    after(boom(emit()))
"""

WITH_EXECUTOR = """
from runyard import job, step

@step
def emit() -> int:
    return 1

@job(executor="in_process", executor_config={"max_concurrent": 1})
def configured():
    emit()

@job(executor="k8s")
def elsewhere():
    emit()
"""

NEW_COMMANDS = [
    ["job", "launch"], ["run"], ["run", "list"], ["run", "show"], ["run", "logs"], ["run", "wait"],
    ["run", "cancel"], ["run", "reexecute"], ["run", "delete"], ["config"], ["config", "explain"],
]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def ry(home: Path, *args: str, env: dict[str, str] | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "RUNYARD_HOME": str(home), **(env or {})}
    return subprocess.run(
        [str(RUNYARD), *args], env=full_env, cwd=home.parent, capture_output=True, text=True, timeout=timeout,
    )


def launched(home: Path, *args: str) -> str:
    """Launch and wait; the run id is the first line of stdout."""
    proc = ry(home, "job", "launch", *args, "--wait")
    assert proc.returncode in (0, 1), proc.stderr
    return proc.stdout.splitlines()[0]


# -- help ------------------------------------------------------------------------------------


def test_help_of_every_new_command(home: Path) -> None:
    env = {**os.environ, "RUNYARD_HOME": str(home)}
    procs = [
        (p, subprocess.Popen([str(RUNYARD), *p, "--help"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True))
        for p in NEW_COMMANDS
    ]
    for p, proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (p, err)
        assert out.startswith(f"Usage: runyard {' '.join(p)}"), (p, out)
        summary = out.split("\n\n")[1].strip()
        assert summary and "\n" not in summary, (p, summary)  # a one-line summary
        assert "Example" in out and "  runyard " in out, (p, out)
        assert err == ""


def test_top_level_help_lists_the_groups_without_importing_them(home: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "runyard", "--help"],
        env={**os.environ, "RUNYARD_HOME": str(home)}, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "  run " in proc.stdout and "  config " in proc.stdout
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "runyard.cli" in imported
    assert not {"runyard.cli.run", "runyard.cli.config", "runyard.cli.job", "runyard.runs"} & imported
    assert not [m for m in imported if m.split(".")[0] == "rich"]


def test_rich_is_imported_only_for_a_terminal(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "solo.py", TWO_STEPS)
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "runyard", "job", "execute", "-f", str(f)],
        env={**os.environ, "RUNYARD_HOME": str(home)}, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "runyard.cli._progress" in imported
    assert not [m for m in imported if m.split(".")[0] == "rich"]


# -- launch, exit codes, --json ------------------------------------------------------------------


def test_launch_prints_the_run_id_and_the_run_succeeds(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "solo.py", TWO_STEPS)
    proc = ry(home, "job", "launch", "-f", str(f), "--tag", "team=data")
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.strip()
    assert len(run_id) == 32
    waited = ry(home, "run", "wait", run_id)
    assert waited.returncode == 0, waited.stderr
    lines = waited.stdout.strip().splitlines()
    assert lines[:2] == ["step emit succeeded in " + lines[0].rsplit(" ", 1)[1],
                         "step double succeeded in " + lines[1].rsplit(" ", 1)[1]]
    assert lines[-1].startswith(f"run {run_id} SUCCESS in ") and lines[-1].endswith("(2 success)")
    stored = Instance(home).storage.get_run(run_id)
    assert stored is not None and stored.status is RunStatus.SUCCESS and stored.tags == {"team": "data"}


def test_launch_json_and_wait_json(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "solo.py", TWO_STEPS)
    proc = ry(home, "job", "launch", "-f", str(f), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"run_id", "job_name", "status"} and out["job_name"] == "solo"
    assert out["status"] in ("STARTING", "STARTED", "SUCCESS")
    waited = ry(home, "run", "wait", out["run_id"], "--json")
    assert waited.returncode == 0, waited.stderr
    result = json.loads(waited.stdout)
    assert result["status"] == "SUCCESS" and result["timed_out"] is False and result["failure"] is None
    assert result["steps"] == {"emit": "success", "double": "success"}
    both = ry(home, "job", "launch", "-f", str(f), "--wait", "--json")
    assert both.returncode == 0, both.stderr
    assert json.loads(both.stdout)["status"] == "SUCCESS"


def test_exit_codes(home: Path, tmp_path: Path) -> None:
    ok = write(tmp_path / "solo.py", TWO_STEPS)
    bad = write(tmp_path / "failing.py", FAILING)
    assert ry(home, "job", "launch", "-f", str(ok), "--wait").returncode == 0
    failed = ry(home, "job", "launch", "-f", str(bad), "--wait")
    assert failed.returncode == 1
    assert "step boom failed (attempt 1, error): ValueError: kaput 1" in failed.stdout
    assert "step after skipped: upstream step 'boom' did not succeed" in failed.stdout
    assert failed.stdout.strip().splitlines()[-1].endswith("(1 failed, 1 skipped, 1 success)")
    run_id = failed.stdout.splitlines()[0]
    assert ry(home, "run", "wait", run_id).returncode == 1  # a finished run: its outcome at once
    # An executor whose required settings are missing (k8s needs an image) is a configuration
    # error: exit 2, the key named, no traceback, nothing launched.
    not_configured = ry(home, "job", "launch", "-f", str(ok), "--executor", "k8s")
    assert not_configured.returncode == 2
    assert not_configured.stderr.strip().startswith(
        "error: --executor: image: required key 'image' is missing"
    ), not_configured.stderr
    assert "Traceback" not in not_configured.stderr
    usage = ry(home, "job", "launch")
    assert usage.returncode == 2 and "give exactly one of -f FILE and -m MODULE" in usage.stderr
    # Nothing was recorded for the runs that could not be created.
    assert len(Instance(home).storage.list_runs()) == 2


def test_config_error_of_launch_has_no_traceback_unless_debug(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "solo.py", TWO_STEPS)
    (home / "runyard.yaml").write_text("run_launcher:\n  default: {workers: 3}\n")
    proc = ry(home, "job", "launch", "-f", str(f))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {home.resolve() / 'runyard.yaml'}: run_launcher.default: unknown key 'workers' (allowed keys: none)"
    )
    debug = ry(home, "--debug", "job", "launch", "-f", str(f))
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr


def test_run_show_unknown_id_exits_2(home: Path) -> None:
    for args in (["run", "show", "nope"], ["run", "wait", "nope"], ["run", "cancel", "nope"], ["run", "logs", "nope"]):
        proc = ry(home, *args)
        assert proc.returncode == 2, args
        assert proc.stderr.strip() == f"error: no run 'nope' in {home.resolve()}; `runyard run list` shows the runs"


def test_run_list_and_show_json_shapes(home: Path, tmp_path: Path) -> None:
    ok = write(tmp_path / "solo.py", TWO_STEPS)
    bad = write(tmp_path / "failing.py", FAILING)
    first = launched(home, "-f", str(ok))
    second = launched(home, "-f", str(bad))
    listed = ry(home, "run", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["run_id"] for r in rows] == [second, first]  # newest first
    assert set(rows[0]) == {
        "run_id", "job_name", "status", "executor", "tags", "parent_run_id", "step_selection", "code_pointer",
        "run_config", "created_at", "started_at", "ended_at", "duration", "queue_position",
    }
    assert [r["status"] for r in rows] == ["FAILURE", "SUCCESS"]
    only_failed = json.loads(ry(home, "run", "list", "--status", "failure", "--json").stdout)
    assert [r["run_id"] for r in only_failed] == [second]
    assert len(json.loads(ry(home, "run", "list", "--limit", "1", "--json").stdout)) == 1
    table = ry(home, "run", "list").stdout.splitlines()
    assert table[0].split() == ["RUN_ID", "JOB", "STATUS", "CREATED", "DURATION", "TAGS"]
    assert table[1].startswith(second[:12]) and "FAILURE" in table[1]

    shown = ry(home, "run", "show", second[:10], "--json")  # a unique prefix is enough
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["run_id"] == second and data["status"] == "FAILURE"
    assert data["failure"] == {"message": "step(s) failed: boom"}
    assert data["launcher"] == "default" and isinstance(data["worker"]["pid"], int)
    assert data["resolution"]["executor"]["name"] == "multi_or_in_process"
    assert data["resolution"]["run_launcher"]["name"] == "default"
    emit = data["steps"]["emit"]
    assert (emit["state"], emit["attempts"], emit["failure"]) == ("success", 1, None)
    # Per-step timings: when each attempt started and ended, and how it ended.
    (timing,) = emit["timings"]
    assert timing["attempt"] == 1 and timing["outcome"] == "success"
    assert data["started_at"] <= timing["started_at"] <= timing["ended_at"] <= data["ended_at"]
    assert emit["duration"] == timing["duration"] == timing["ended_at"] - timing["started_at"]
    assert emit["started_at"] == timing["started_at"] and emit["ended_at"] == timing["ended_at"]
    assert data["steps"]["after"] == {"state": "skipped", "attempts": 0, "failure": None, "started_at": None,
                                      "ended_at": None, "duration": None, "timings": []}
    boom = data["steps"]["boom"]
    assert boom["state"] == "failed" and boom["attempts"] == 1
    assert [t["outcome"] for t in boom["timings"]] == ["failure"]
    assert boom["failure"]["message"] == "ValueError: kaput 1"
    assert boom["failure"]["error_class"] == "builtins.ValueError" and boom["failure"]["kind"] == "error"

    text = ry(home, "run", "show", second).stdout
    assert f"run       {second}" in text and "status    FAILURE" in text
    assert "reason    step(s) failed: boom" in text
    assert any(line.split()[:3] == ["boom", "failed", "1"] and line.endswith("ValueError: kaput 1")
               for line in text.splitlines())
    assert any(line.split()[:3] == ["emit", "success", "1"] and line.split()[3].endswith("s")
               for line in text.splitlines()), text
    # The failed step's error and traceback, not only in --json.
    assert "step 'boom' failed (error): ValueError: kaput 1" in text
    assert "Traceback (most recent call last)" in text and 'raise ValueError(f"kaput' in text


def test_run_list_when_empty(home: Path) -> None:
    proc = ry(home, "run", "list")
    assert proc.returncode == 0 and proc.stdout.strip() == "no runs"
    assert json.loads(ry(home, "run", "list", "--json").stdout) == []
    bad = ry(home, "run", "list", "--status", "sleeping")
    assert bad.returncode == 2 and "Invalid value for '--status'" in bad.stderr


# -- logs ---------------------------------------------------------------------------------------


def test_logs_and_step_filter(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "solo.py", TWO_STEPS)
    run_id = launched(home, "-f", str(f))
    every = ry(home, "run", "logs", run_id)
    assert every.returncode == 0, every.stderr
    lines = every.stdout.splitlines()
    assert "[emit] emitting 21" in lines
    assert "[emit] a warning on stderr" in lines
    assert "[emit] WARNING emitter: careful now" in lines
    assert "[double] doubling 21" in lines
    one = ry(home, "run", "logs", run_id, "--step", "double")
    assert one.returncode == 0, one.stderr
    assert one.stdout.splitlines() == ["doubling 21"]
    unknown = ry(home, "run", "logs", run_id, "--step", "triple")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == f"error: run {run_id} has no step 'triple' (its steps: emit, double)"


# -- config explain ----------------------------------------------------------------------------------


def test_config_explain_shows_each_setting_and_its_layer(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "jobs.py", WITH_EXECUTOR)
    (home / "runyard.yaml").write_text(
        "executor:\n  in_process:\n    tag_concurrency_limits: [{key: db, limit: 1}]\n"
    )
    cfg = home.resolve() / "runyard.yaml"
    proc = ry(home, "config", "explain", "-f", str(f), "-j", "configured", "--executor", "in_process", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    ex = data["executor"]
    assert ex["name"] == "in_process" and ex["source"] == "--executor"
    assert ex["settings"] == [
        {"key": "max_concurrent", "value": 1, "source": "job 'configured'", "path": "executor_config.max_concurrent"},
        {"key": "tag_concurrency_limits", "value": [{"key": "db", "limit": 1}], "source": str(cfg),
         "path": "executor.in_process.tag_concurrency_limits"},
    ]
    # The built-in default (multi_or_in_process) names another executor: not a layer of this one.
    assert [layer["source"] for layer in ex["layers"]] == ["--executor", "job 'configured'", str(cfg)]
    assert ex["overridden"] == [] and data["max_concurrent"] == 1
    assert data["max_concurrent_from"] == "job 'configured': executor_config.max_concurrent"
    assert data["capabilities"]["max_concurrency"] == 1
    launcher = data["run_launcher"]
    assert (launcher["name"], launcher["source"], launcher["path"], launcher["settings"]) == (
        "default", "default", "run_launcher.default", []
    )

    text = ry(home, "config", "explain", "-f", str(f), "-j", "configured", "--executor", "in_process").stdout
    assert "executor: in_process   (from --executor)" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    assert rows["max_concurrent"].split()[1:] == ["1", "job", "'configured':", "executor_config.max_concurrent"]
    assert rows["tag_concurrency_limits"].rstrip().endswith(f"{cfg}: executor.in_process.tag_concurrency_limits")
    assert "  steps at once: 1   (job 'configured': executor_config.max_concurrent)" in text

    # Without --executor the job names one whose required setting it lacks: the same error a
    # run gets, naming where the settings came from.
    missing = ry(home, "config", "explain", "-f", str(f), "-j", "elsewhere")
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith(
        "error: job 'elsewhere': executor_config.image: required key 'image' is missing"
    ), missing.stderr
    # With --executor the job's choice is shown as overridden.
    over = json.loads(ry(home, "config", "explain", "-f", str(f), "-j", "elsewhere", "--executor", "in_process",
                         "--json").stdout)
    assert over["executor"]["overridden"] == [
        {"name": "k8s", "source": "job 'elsewhere'", "path": "executor_config", "config": {}}
    ]
    assert over["executor"]["settings"][0] == {
        "key": "max_concurrent", "value": None, "source": "default", "path": "executor.in_process.max_concurrent"
    }


def test_config_explain_run_config_and_defaults(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "solo.py", TWO_STEPS)
    plain = json.loads(ry(home, "config", "explain", "-f", str(f), "--json").stdout)
    assert plain["executor"]["name"] == "multi_or_in_process"
    assert plain["executor"]["source"] == "default"
    section = "executor.multi_or_in_process"
    assert plain["executor"]["settings"][:4] == [
        {"key": "max_concurrent", "value": None, "source": "default", "path": f"{section}.max_concurrent"},
        {"key": "tag_concurrency_limits", "value": [], "source": "default",
         "path": f"{section}.tag_concurrency_limits"},
        {"key": "start_method", "value": "forkserver", "source": "default", "path": f"{section}.start_method"},
        {"key": "terminate_grace", "value": 5.0, "source": "default", "path": f"{section}.terminate_grace"},
    ]
    assert plain["max_concurrent"] == os.cpu_count() and plain["max_concurrent_from"] == "the number of CPUs"
    assert plain["instance_config_exists"] is False
    cfg = write(tmp_path / "run.yaml", "execution:\n  in_process: {tag_concurrency_limits: [{key: x, limit: 2}]}\n")
    layered = json.loads(ry(home, "config", "explain", "-f", str(f), "-c", str(cfg), "--json").stdout)
    assert layered["executor"]["source"] == str(cfg)
    assert layered["executor"]["settings"][1]["source"] == str(cfg)
    assert layered["executor"]["settings"][1]["path"] == "execution.in_process.tag_concurrency_limits"
    broken = write(tmp_path / "broken.yaml", "execution:\n  in_process: {max_concurrent: lots}\n")
    err = ry(home, "config", "explain", "-f", str(f), "-c", str(broken))
    assert err.returncode == 2
    assert err.stderr.strip() == (
        f"error: {broken}: execution.in_process.max_concurrent: expected an integer, got 'lots' (a string)"
    )


# -- delete, cancel, reexecute ------------------------------------------------------------------------


def test_delete_refuses_an_unfinished_run(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "solo.py", TWO_STEPS)
    instance = Instance(home)
    job_def, loc = load_job(CodePointer(file=str(f.resolve())), None)
    queued = create_run(instance, job_def, pointer=CodePointer(file=str(f.resolve())))
    refused = ry(home, "run", "delete", queued.run_id)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"error: run {queued.run_id} is QUEUED: cancel it first (runyard run cancel {queued.run_id}) or pass --force"
    )
    assert instance.storage.get_run(queued.run_id) is not None
    forced = ry(home, "run", "delete", queued.run_id, "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.strip() == f"deleted run {queued.run_id}"
    assert instance.storage.get_run(queued.run_id) is None
    assert instance.storage.get_events(queued.run_id) == []

    done = launched(home, "-f", str(f))
    assert ry(home, "run", "delete", done).returncode == 0
    assert instance.storage.get_run(done) is None


def test_cancel_of_a_queued_and_of_a_finished_run(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "solo.py", TWO_STEPS)
    instance = Instance(home)
    pointer = CodePointer(file=str(f.resolve()))
    queued = create_run(instance, load_job(pointer, None)[0], pointer=pointer)
    proc = ry(home, "run", "cancel", queued.run_id)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"run {queued.run_id} CANCELED"
    stored = instance.storage.get_run(queued.run_id)
    assert stored is not None and stored.status is RunStatus.CANCELED
    again = ry(home, "run", "cancel", queued.run_id)
    assert again.returncode == 0 and "already ended CANCELED" in again.stdout
    assert ry(home, "run", "wait", queued.run_id).returncode == 1  # canceled: exit 1


def test_reexecute_usage_errors(home: Path, tmp_path: Path) -> None:
    ok = write(tmp_path / "solo.py", TWO_STEPS)
    run_id = launched(home, "-f", str(ok))
    both = ry(home, "run", "reexecute", run_id, "--from-failure", "--steps", "emit")
    assert both.returncode == 2 and "give --from-failure or --steps, not both" in both.stderr
    succeeded = ry(home, "run", "reexecute", run_id, "--from-failure")
    assert succeeded.returncode == 2
    assert succeeded.stderr.strip() == f"error: run {run_id} succeeded: nothing to re-execute from failure"
    unknown = ry(home, "run", "reexecute", run_id, "--steps", "triple")
    assert unknown.returncode == 2 and "has no step matching 'triple'" in unknown.stderr


def test_reexecute_selected_steps_reads_the_parents_outputs(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "solo.py", TWO_STEPS)
    parent = launched(home, "-f", str(f))
    proc = ry(home, "run", "reexecute", parent, "--steps", "double", "--wait", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "SUCCESS" and out["parent_run_id"] == parent and out["step_selection"] == ["double"]
    assert out["steps"] == {"double": "success"}
    storage = Instance(home).storage
    starts = [s.event.step_key for s in storage.get_events(out["run_id"], types=[EventType.STEP_START])]
    assert starts == ["double"]


# -- progress ------------------------------------------------------------------------------------


def test_plain_progress_of_job_execute(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "failing.py", FAILING)
    proc = ry(home, "job", "execute", "-f", str(f))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("step emit succeeded in ")
    assert lines[1] == "step boom failed (attempt 1, error): ValueError: kaput 1"
    assert "step after skipped: upstream step 'boom' did not succeed" in lines
    assert lines[-1].startswith("run ") and lines[-1].endswith("(1 failed, 1 skipped, 1 success)")
    assert "\x1b[" not in proc.stdout  # no terminal codes when not a terminal


def _run_on_terminal(home: Path, args: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run the CLI with stdout on a pseudo-terminal; return its exit status and output."""
    leader, follower = pty.openpty()
    env = {**os.environ, "RUNYARD_HOME": str(home), "TERM": "xterm", "COLUMNS": "120"}
    proc = subprocess.Popen([str(RUNYARD), *args], env=env, stdin=subprocess.DEVNULL, stdout=follower,
                            stderr=subprocess.PIPE, cwd=home.parent)
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.1)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    code = proc.wait(timeout=10)
    return code, b"".join(chunks).decode(errors="replace")


SLOWISH = """
import time
from runyard import job, step

@step
def first() -> int:
    time.sleep(0.4)
    return 1

@step
def second(x: int) -> int:
    time.sleep(0.4)
    raise RuntimeError("second went wrong")

@job
def slowish():
    second(first())
"""


@pytest.mark.parametrize("command", [["job", "execute"], ["job", "launch", "--wait"]])
def test_live_progress_on_a_terminal(home: Path, tmp_path: Path, command: list[str]) -> None:
    f = write(tmp_path / "slowish.py", SLOWISH)
    code, out = _run_on_terminal(home, [*command, "-f", str(f)])
    assert code == 1, out
    assert "done · " in out and " failed · " in out  # the live line, redrawn
    assert "step second failed (attempt 1, error): RuntimeError: second went wrong" in out
    assert "1/2 done" in out
    last = [line for line in out.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert "FAILURE in " in last and last.rstrip().endswith("(1 failed, 1 success)")


SLEEPY = """
import os
import time
from pathlib import Path
from runyard import job, step

@step
def nap() -> int:
    Path(os.environ["RY_STARTED"]).write_text("x")
    time.sleep(60)
    return 1

@step
def later(x: int) -> int:
    return x

@job
def sleepy():
    later(nap())
"""


def test_ctrl_c_cancels_job_execute(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "sleepy.py", SLEEPY)
    started = tmp_path / "started"
    env = {**os.environ, "RUNYARD_HOME": str(home), "RY_STARTED": str(started)}
    proc = subprocess.Popen([str(RUNYARD), "job", "execute", "-f", str(f)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(2)  # SIGINT, as Ctrl-C sends
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, out + err
    assert "canceling the run" in err
    assert "step nap failed (attempt 1, canceled): step 'nap' was stopped: the run was canceled" in out
    assert out.splitlines()[-1].endswith("(1 failed, 1 skipped)")
    (run,) = Instance(home).storage.list_runs()
    assert run.status is RunStatus.CANCELED


# -- run ids: empty and ambiguous prefixes, deleting several runs ------------------------------


def _add_finished_runs(home: Path, *run_ids: str) -> None:
    from runyard.storage import RunRecord

    storage = Instance(home).storage
    for run_id in run_ids:
        storage.add_run(RunRecord(run_id=run_id, job_name="solo", status=RunStatus.SUCCESS, ended_at=time.time()))


RUN_ID_COMMANDS = [["show"], ["logs"], ["wait"], ["cancel"], ["reexecute"], ["delete"], ["delete", "--force"]]


@pytest.mark.parametrize("command", RUN_ID_COMMANDS)
@pytest.mark.parametrize("run_id", ["", "  "])
def test_an_empty_run_id_is_refused_by_every_command(home: Path, command: list[str], run_id: str) -> None:
    _add_finished_runs(home, "a" * 32)
    proc = ry(home, "run", command[0], run_id, *command[1:])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "the run id is empty" in proc.stderr and "Traceback" not in proc.stderr
    assert [r.run_id for r in Instance(home).storage.list_runs()] == ["a" * 32]  # nothing deleted


@pytest.mark.parametrize("command", RUN_ID_COMMANDS)
def test_an_ambiguous_prefix_is_refused_and_lists_the_matches(home: Path, command: list[str]) -> None:
    first, second, other = "abc1" + "0" * 28, "abc2" + "0" * 28, "ffff" + "0" * 28
    _add_finished_runs(home, first, second, other)
    proc = ry(home, "run", command[0], "abc", *command[1:])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "prefix 'abc' matches 2 runs" in proc.stderr
    assert first in proc.stderr and second in proc.stderr and other not in proc.stderr
    assert len(Instance(home).storage.list_runs()) == 3
    # A unique prefix still works, and a full id is taken as it is.
    assert ry(home, "run", "show", "abc2").returncode == 0
    assert ry(home, "run", "show", first).returncode == 0


def test_deleting_several_runs_needs_yes_without_a_terminal(home: Path) -> None:
    ids = ["1" * 32, "2" * 32, "3" * 32]
    _add_finished_runs(home, *ids)
    proc = ry(home, "run", "delete", "1111", "2222")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refusing to delete 2 runs without confirmation; pass --yes" in proc.stderr
    assert len(Instance(home).storage.list_runs()) == 3
    # One bad id among several deletes nothing.
    proc = ry(home, "run", "delete", "1111", "nope", "--yes")
    assert proc.returncode == 2 and "no run 'nope'" in proc.stderr
    assert len(Instance(home).storage.list_runs()) == 3
    proc = ry(home, "run", "delete", "1111", "2222", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert [r.run_id for r in Instance(home).storage.list_runs()] == ["3" * 32]
    # One run needs no confirmation; the same run named twice is one run.
    proc = ry(home, "run", "delete", "3333", "3" * 32)
    assert proc.returncode == 0, proc.stderr
    assert Instance(home).storage.list_runs() == []


def test_deleting_several_runs_asks_on_a_terminal(home: Path) -> None:
    _add_finished_runs(home, "1" * 32, "2" * 32)
    leader, follower = pty.openpty()
    env = {**os.environ, "RUNYARD_HOME": str(home)}
    proc = subprocess.Popen([str(RUNYARD), "run", "delete", "1111", "2222"], env=env, stdin=follower,
                            stdout=follower, stderr=subprocess.PIPE, cwd=home.parent)
    os.close(follower)
    out = b""
    deadline = time.monotonic() + 30
    while b"22222222222222222222222222222222  solo  SUCCESS" not in out:
        assert time.monotonic() < deadline and proc.poll() is None, out
        if select.select([leader], [], [], 0.1)[0]:
            out += os.read(leader, 65536)
    os.write(leader, b"n\n")
    assert proc.wait(timeout=30) == 2
    os.close(leader)
    assert b"about to delete 2 runs" in out
    assert "delete them?" in proc.stderr.read().decode()  # readline prompts on stderr
    assert len(Instance(home).storage.list_runs()) == 2
