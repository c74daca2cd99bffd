"""The `runyard` command line, run as a subprocess of the installed console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
from runyard import CodePointer
from runyard.instance import Instance
from runyard.outputs import FileOutputStore
from runyard.plugin import StepRequest
from runyard.storage import RunStatus

from .test_runs_cli import FAILING as FAILING_JOB  # one failing job for the CLI tests

RUNYARD = Path(sys.executable).parent / "runyard"

ONE_JOB = """
from runyard import job, step

@step
def emit() -> int:
    print("emitting 21")
    return 21

@step
def double(x: int) -> int:
    return x * 2

@job
def solo():
    double(emit())
"""

TWO_JOBS = """
from runyard import job, step

@step
def emit() -> int:
    return 1

@job
def beta():
    emit()

@job
def alpha():
    emit()
"""


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def run(home: Path, *args: str, cwd: Path | None = None, stdin: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "RUNYARD_HOME": str(home), **(env or {})}
    return subprocess.run(
        [str(RUNYARD), *args], env=full_env, cwd=cwd or home.parent, capture_output=True, text=True,
        input=stdin, timeout=60,
    )


# -- loading jobs ---------------------------------------------------------------------------


def test_execute_file_with_one_job_needs_no_job_name(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "solo.py", ONE_JOB)
    proc = run(home, "job", "execute", "-f", str(f))
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("run ") and " SUCCESS in " in last and last.endswith("(2 success)")
    assert proc.stderr == ""
    (stored,) = Instance(home).storage.list_runs()
    assert stored.job_name == "solo" and stored.status is RunStatus.SUCCESS
    assert stored.code_pointer == {"file": str(f.resolve())}


def test_execute_module(home: Path, tmp_path: Path) -> None:
    pkg = tmp_path / "src"
    pkg.mkdir()
    write(pkg / "ry_cli_jobs_mod.py", ONE_JOB)
    proc = run(home, "job", "execute", "-m", "ry_cli_jobs_mod", "--json", env={"PYTHONPATH": str(pkg)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "SUCCESS"
    assert out["steps"] == {"emit": "success", "double": "success"}
    run_record = Instance(home).storage.get_run(out["run_id"])
    assert run_record is not None and run_record.code_pointer == {"module": "ry_cli_jobs_mod"}


def test_missing_module(home: Path) -> None:
    proc = run(home, "job", "execute", "-m", "ry_no_such_module_here")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: module 'ry_no_such_module_here' not found; is it installed or on PYTHONPATH?"


def test_file_and_module_are_exclusive(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "solo.py", ONE_JOB)
    both = run(home, "job", "execute", "-f", str(f), "-m", "x")
    neither = run(home, "job", "execute")
    for proc in (both, neither):
        assert proc.returncode == 2
        assert "give exactly one of -f FILE and -m MODULE" in proc.stderr


def test_several_jobs_need_a_job_name(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "two.py", TWO_JOBS)
    proc = run(home, "job", "execute", "-f", str(f))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: -f {f.resolve()}: defines several jobs (alpha, beta); choose one with -j JOB"
    assert "Traceback" not in proc.stderr
    chosen = run(home, "job", "execute", "-f", str(f), "-j", "beta", "--json")
    assert chosen.returncode == 0, chosen.stderr
    assert json.loads(chosen.stdout)["steps"] == {"emit": "success"}


def test_job_list(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "two.py", TWO_JOBS)
    proc = run(home, "job", "list", "-f", str(f), "--json")
    assert proc.returncode == 0, proc.stderr
    assert [(j["name"], j["steps"]) for j in json.loads(proc.stdout)] == [("alpha", 1), ("beta", 1)]


def test_missing_job_file(home: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.py"
    proc = run(home, "job", "execute", "-f", str(missing))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: job file '{missing}' not found; check the path given to -f"
    assert "Traceback" not in proc.stderr


def test_unknown_job_lists_the_jobs(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "two.py", TWO_JOBS)
    proc = run(home, "job", "execute", "-f", str(f), "-j", "gamma")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: -f {f.resolve()}: no job named 'gamma'; jobs defined there: alpha, beta"


def test_job_file_that_fails_to_import(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "broken.py", "import runyard\nraise RuntimeError('half-written file')\n")
    proc = run(home, "job", "execute", "-f", str(f))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: error while importing '{f.resolve()}': RuntimeError: half-written file"
    )


# -- executing ------------------------------------------------------------------------------


def test_failing_job_exits_1_and_prints_the_steps_error(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "failing.py", FAILING_JOB)
    proc = run(home, "job", "execute", "-f", str(f))
    assert proc.returncode == 1, proc.stderr
    assert "step boom failed (attempt 1, error): ValueError: kaput 1" in proc.stdout
    assert 'raise ValueError(f"kaput {x}")' in proc.stdout  # the step's traceback
    last = proc.stdout.strip().splitlines()[-1]
    assert " FAILURE in " in last and "1 failed" in last and "1 skipped" in last and "1 success" in last


def test_tags_and_json_output(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "solo.py", ONE_JOB)
    proc = run(home, "job", "execute", "-f", str(f), "--tag", "team=data", "--tag", "env=test", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    stored = Instance(home).storage.get_run(out["run_id"])
    assert stored is not None and stored.tags == {"team": "data", "env": "test"}
    bad = run(home, "job", "execute", "-f", str(f), "--tag", "novalue")
    assert bad.returncode == 2
    assert "expected KEY=VALUE, got 'novalue'" in bad.stderr


def test_re_execute_selected_steps_from_the_command_line(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "solo.py", ONE_JOB)
    first = json.loads(run(home, "job", "execute", "-f", str(f), "--json").stdout)
    no_parent = run(home, "job", "execute", "-f", str(f), "--steps", "double")
    assert no_parent.returncode == 2
    assert no_parent.stderr.strip() == (
        "error: the selected steps read outputs of unselected step(s) emit; "
        "pass the run they come from (parent_run_id / --parent RUN_ID)"
    )
    again = run(home, "job", "execute", "-f", str(f), "--steps", "double", "--parent", first["run_id"], "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["steps"] == {"double": "success"}


def test_run_config_file(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "solo.py", ONE_JOB)
    cfg = write(tmp_path / "run.yaml", "execution:\n  in_process: {max_concurrent: 2}\n")
    proc = run(home, "job", "execute", "-f", str(f), "-c", str(cfg))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {cfg}: execution.in_process.max_concurrent: 2 is more than executor 'in_process' can run at once (1)"
    )


# -- config errors ----------------------------------------------------------------------------


def test_config_error_exits_2_without_traceback(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "solo.py", ONE_JOB)
    (home / "runyard.yaml").write_text("executor:\n  in_process:\n    max_concurrent: abc\n")
    proc = run(home, "job", "execute", "-f", str(f))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {home.resolve() / 'runyard.yaml'}: executor.in_process.max_concurrent: "
        "expected an integer, got 'abc' (a string)"
    )
    assert "Traceback" not in proc.stderr
    debug = run(home, "--debug", "job", "execute", "-f", str(f))
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr
    assert "ConfigError" in debug.stderr
    assert debug.stderr.strip().endswith("expected an integer, got 'abc' (a string)")


def test_malformed_instance_config_exits_2(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "solo.py", ONE_JOB)
    (home / "runyard.yaml").write_text("executor: [in_process\n")
    proc = run(home, "job", "execute", "-f", str(f))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {home.resolve() / 'runyard.yaml'}:2:1: malformed YAML: ")
    assert "Traceback" not in proc.stderr


def test_not_loaded_executor_exits_2(home: Path, tmp_path: Path) -> None:
    # A known backend that is installed but not loaded (disabled here) is a configuration
    # error (exit 2) that says why and how to use it, rather than telling the user to
    # install what is installed.
    f = write(tmp_path / "solo.py", ONE_JOB)
    proc = run(home, "job", "execute", "-f", str(f), "--executor", "k8s", env={"RUNYARD_DISABLE_PLUGINS": "k8s"})
    assert proc.returncode == 2
    msg = proc.stderr.strip()
    assert msg.startswith("error: --executor: executor 'k8s' is not loaded: plugin 'k8s' (runyard-k8s "), msg
    assert "remove 'k8s' from RUNYARD_DISABLE_PLUGINS" in msg and "pip install" not in msg


# -- help, plugins, api -------------------------------------------------------------------------


def _all_command_paths() -> list[list[str]]:
    from runyard.cli import cli

    paths: list[list[str]] = [[]]

    def walk(group: click.Group, prefix: list[str]) -> None:
        ctx = click.Context(group)
        for name in group.list_commands(ctx):
            cmd = group.get_command(ctx, name)
            assert cmd is not None, name
            paths.append([*prefix, name])
            if isinstance(cmd, click.Group):
                walk(cmd, [*prefix, name])

    walk(cli, [])
    return paths


def test_help_on_every_command(home: Path) -> None:
    paths = _all_command_paths()
    expected = {("job",), ("job", "list"), ("job", "execute"), ("plugin",), ("plugin", "list"), ("instance",),
                ("instance", "info"), ("instance", "validate"), ("api",), ("api", "execute-step"),
                ("api", "execute-run"), ("job", "launch"), ("run",), ("run", "list"), ("run", "show"), ("run", "logs"),
                ("run", "wait"), ("run", "cancel"), ("run", "reexecute"), ("run", "delete"), ("config",),
                ("config", "explain")}
    assert expected <= {tuple(p) for p in paths}
    env = {**os.environ, "RUNYARD_HOME": str(home)}
    procs = [
        (p, subprocess.Popen([str(RUNYARD), *p, "--help"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True))
        for p in paths
    ]
    for p, proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (p, err)
        assert out.startswith("Usage: runyard"), (p, out)
        assert "Example" in out, (p, out)
        assert err == "", (p, err)


def test_plugin_list_json(home: Path) -> None:
    proc = run(home, "plugin", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    in_process = [r for r in rows if r["name"] == "in_process"]
    assert in_process == [{
        "name": "in_process", "kind": "executor", "distribution": "runyard", "version": in_process[0]["version"],
        "loads": True, "description": "Every step in the run worker's own process, one at a time.",
    }]
    assert any(r["name"] == "sqlite" and r["kind"] == "storage" for r in rows)


def test_instance_info(home: Path) -> None:
    proc = run(home, "instance", "info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["home"] == str(home.resolve())
    assert info["config_file_exists"] is False
    assert info["executor"] is None and info["storage"] is None
    assert info["outputs"] == str(home.resolve() / "outputs")


@pytest.mark.parametrize("payload", ["{not json", '{"run_id": "r"}', "[]", ""])
def test_api_execute_step_with_malformed_request_exits_2(home: Path, payload: str) -> None:
    as_arg = run(home, "api", "execute-step", payload) if payload else None
    via_stdin = run(home, "api", "execute-step", stdin=payload)
    for proc in filter(None, (as_arg, via_stdin)):
        assert proc.returncode == 2, (payload, proc.stdout, proc.stderr)
        assert "malformed step request" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stdout == ""


def test_api_execute_step_runs_one_step(home: Path, tmp_path: Path) -> None:
    f = write(tmp_path / "solo.py", ONE_JOB)
    outputs = tmp_path / "outputs"
    request = StepRequest(
        run_id="r1", step_key="emit", attempt=1, attempt_id="a1", job_name="solo",
        code_pointer=CodePointer(file=str(f)), output_store=str(outputs), inputs={},
    )
    # Unsigned: allowed only because no key is configured and the caller says so (see
    # tests/test_step_worker_trust.py for what is refused).
    proc = run(home, "api", "execute-step", "--allow-unsigned", "--code-location", str(tmp_path),
               "--output-store", str(outputs), stdin=request.to_json())
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["type"] for e in events] == ["STEP_START", "STEP_STDOUT", "STEP_OUTPUT", "STEP_SUCCESS"]
    assert all(e["run_id"] == "r1" and e["step_key"] == "emit" and e["attempt_id"] == "a1" for e in events)
    assert events[1]["data"] == {"text": "emitting 21\n"}
    assert events[2]["data"]["type"] == "int" and events[2]["data"]["ref"].startswith("r1/emit/")
    assert FileOutputStore(outputs).get(events[2]["data"]["ref"]) == 21
