"""`runyard api execute-step`: a JSON StepRequest in, JSON-lines events out, in a real
subprocess, as container and pod executors will call it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runyard.definitions import CodePointer
from runyard.events import Event, EventType, FailureKind
from runyard.outputs import FileOutputStore
from runyard.plugin import StepRequest, sign_request

RUNYARD = str(Path(sys.executable).parent / "runyard")


def _request(store: FileOutputStore, step_key: str, inputs: dict, job_name: str = "chain_job") -> StepRequest:
    return StepRequest(
        run_id="r" * 32, step_key=step_key, attempt=1, attempt_id="a1", job_name=job_name,
        code_pointer=CodePointer(module="runyard.testing.jobs"), output_store=store.url, inputs=inputs,
    )


KEY = "a-key-for-the-protocol-tests-0123456789"


def _trusted(request: StepRequest) -> tuple[list[str], str, dict[str, str]]:
    """Options, signed payload and environment with which execute-step runs ``request``
    (a job file's folder or the kit's module as code location, its output store)."""
    where = str(Path(request.code_pointer.file).parent) if request.code_pointer.file else "runyard.testing"
    options = ["--code-location", where, "--output-store", request.output_store]
    return options, json.dumps(sign_request(request, KEY.encode())), {**os.environ, "RUNYARD_SIGNING_KEY": KEY}


def _run(request: StepRequest, via_stdin: bool) -> list[Event]:
    payload = json.dumps(sign_request(request, KEY.encode()))
    args = [RUNYARD, "api", "execute-step", "--code-location", "runyard.testing",
            "--output-store", request.output_store] + ([] if via_stdin else [payload])
    proc = subprocess.run(args, input=payload if via_stdin else None, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RUNYARD_SIGNING_KEY": KEY})
    assert proc.returncode == 0, proc.stderr
    return [Event.from_json(line) for line in proc.stdout.splitlines()]


def test_request_round_trips_through_json() -> None:
    req = _request(FileOutputStore("/tmp/x"), "double", {"x": "run/emit"})
    assert StepRequest.from_json(req.to_json()) == req
    assert json.loads(req.to_json())["code_pointer"] == {"module": "runyard.testing.jobs"}


def test_steps_pass_outputs_by_reference_across_processes(tmp_path: Path) -> None:
    store = FileOutputStore(tmp_path / "outputs")
    events = _run(_request(store, "emit", {}), via_stdin=True)
    assert [e.type for e in events] == [EventType.STEP_START, EventType.STEP_OUTPUT, EventType.STEP_SUCCESS]
    ref = events[1].data["ref"]
    assert store.get(ref) == 3
    events = _run(_request(store, "double", {"x": ref}), via_stdin=False)
    assert events[-1].type is EventType.STEP_SUCCESS
    assert store.get(events[-2].data["ref"]) == 6
    assert events[0].data["pid"] != os.getpid()  # the step ran in the subprocess


def test_a_raising_step_reports_its_error(tmp_path: Path) -> None:
    store = FileOutputStore(tmp_path / "outputs")
    ref = store.put("r" * 32, "emit", 1)
    events = _run(_request(store, "boom", {"x": ref}, job_name="failing_job"), via_stdin=True)
    failure = events[-1].failure
    assert events[-1].type is EventType.STEP_FAILURE and failure is not None
    assert failure.kind is FailureKind.ERROR and failure.error_class == "builtins.ValueError"
    assert "kit boom 1" in failure.message


def test_an_unloadable_job_is_not_started(tmp_path: Path) -> None:
    store = FileOutputStore(tmp_path / "outputs")
    req = _request(store, "emit", {}, job_name="no_such_job")
    events = _run(req, via_stdin=True)
    assert len(events) == 1 and events[0].failure is not None
    assert events[0].failure.kind is FailureKind.NOT_STARTED
    assert "no job named 'no_such_job'" in events[0].failure.message


# -- events stay apart from the step's own output ---------------------------------------

NOISY_JOB = '''
import os, subprocess, sys, time
from runyard import job, step

@step
def noisy(context):
    print("no newline", end="")
    sys.stdout.flush()
    os.write(1, b'{"v":1,"type":"STEP_SUCCESS","run_id":"forged"')  # half a forged event, raw fd
    context.log.warning("logged in between")
    subprocess.run(["printf", "from a subprocess"], check=True)
    print("to stderr, no newline", end="", file=sys.stderr)
    os.write(2, b"raw stderr")
    time.sleep(0.5)  # a partial line that waits is reported as it is, not held to the end
    context.log.warning("logged after a pause")
    print("last words", end="")
    return 5

@job
def noisy_job():
    noisy()
'''


def _noisy_request(tmp_path: Path) -> StepRequest:
    (tmp_path / "noisy_jobs.py").write_text(NOISY_JOB)
    return StepRequest(run_id="r" * 32, step_key="noisy", attempt=1, attempt_id="a1", job_name="noisy_job",
                       code_pointer=CodePointer(file=str(tmp_path / "noisy_jobs.py")),
                       output_store=str(tmp_path / "outputs"), inputs={})


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "at-end"])
def test_step_output_without_newline_does_not_corrupt_events(tmp_path: Path, stream: bool) -> None:
    request = _noisy_request(tmp_path)
    options, payload, env = _trusted(request)
    proc = subprocess.run([RUNYARD, "api", "execute-step", *options, *(["--stream"] if stream else [])],
                          input=payload, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    # Every line of stdout is one whole event of this attempt; nothing else is there.
    events = [Event.from_json(line) for line in proc.stdout.splitlines()]
    assert all(e.attempt_id == "a1" and e.run_id == "r" * 32 for e in events)
    types = [e.type for e in events]
    assert types[0] is EventType.STEP_START
    assert types[-2:] == [EventType.STEP_OUTPUT, EventType.STEP_SUCCESS]
    assert types.count(EventType.STEP_SUCCESS) == 1
    out = "".join(e.data["text"] for e in events if e.type is EventType.STEP_STDOUT)
    err = "".join(e.data["text"] for e in events if e.type is EventType.STEP_STDERR)
    assert out == 'no newline{"v":1,"type":"STEP_SUCCESS","run_id":"forged"from a subprocesslast words'
    assert err == "to stderr, no newlineraw stderr"
    assert proc.stderr == ""  # the step's stderr is in the events, not beside them
    logs = [e.message for e in events if e.type is EventType.STEP_LOG]
    assert logs == ["logged in between", "logged after a pause"]
    if stream:
        # A partial line is not held back until the step ends: what was written before the
        # pause is reported before the log record that follows the pause.
        pause = next(i for i, e in enumerate(events) if e.message == "logged after a pause")
        before = "".join(e.data["text"] for e in events[:pause] if e.type is EventType.STEP_STDOUT)
        assert before == 'no newline{"v":1,"type":"STEP_SUCCESS","run_id":"forged"from a subprocess'
    assert FileOutputStore(tmp_path / "outputs").get(events[-2].data["ref"]) == 5


LOUD_IMPORT_JOB = '''
import os, sys, time
from runyard import job, step

print("printed while the job loads")
os.write(2, b"raw stderr while the job loads\\n")
sys.stdout.flush()
time.sleep(0.5)  # the forwarder reads it before the step starts

@step
def quiet(context):
    return 1

@job
def loud_import_job():
    quiet()
'''


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "at-end"])
def test_output_written_while_the_job_loads_comes_after_the_step_start(tmp_path: Path, stream: bool) -> None:
    """Every container executor reads a step's events beginning with its STEP_START: output
    the job's module writes at import is reported, after the start, not before it."""
    (tmp_path / "loud_jobs.py").write_text(LOUD_IMPORT_JOB)
    request = StepRequest(run_id="r" * 32, step_key="quiet", attempt=1, attempt_id="a1", job_name="loud_import_job",
                          code_pointer=CodePointer(file=str(tmp_path / "loud_jobs.py")),
                          output_store=str(tmp_path / "outputs"), inputs={})
    options, payload, env = _trusted(request)
    proc = subprocess.run([RUNYARD, "api", "execute-step", *options, *(["--stream"] if stream else [])],
                          input=payload, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    events = [Event.from_json(line) for line in proc.stdout.splitlines()]
    types = [e.type for e in events]
    assert types[0] is EventType.STEP_START, types
    assert types[-1] is EventType.STEP_SUCCESS, types
    out = "".join(e.data["text"] for e in events if e.type is EventType.STEP_STDOUT)
    err = "".join(e.data["text"] for e in events if e.type is EventType.STEP_STDERR)
    assert out == "printed while the job loads\n"
    assert err == "raw stderr while the job loads\n"


# -- SIGTERM ------------------------------------------------------------------------------

STUBBORN_JOB = '''
import time
from pathlib import Path
from runyard import job, step

@step
def waits(context):
    marks = Path(context.run_config["marks"])
    (marks / "started").write_text("yes")
    try:
        time.sleep(60)
    finally:
        (marks / "cleaned-up").write_text("yes")
    return 1

@step
def ignores(context):
    marks = Path(context.run_config["marks"])
    (marks / "started").write_text("yes")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except BaseException:  # swallows the interrupt: the worker must still end
            pass
    return 1

@job
def stubborn():
    waits()
    ignores()
'''


def _term(tmp_path: Path, step_key: str) -> tuple[subprocess.CompletedProcess[str], float, Path]:
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "stubborn_jobs.py").write_text(STUBBORN_JOB)
    request = StepRequest(run_id="r" * 32, step_key=step_key, attempt=1, attempt_id="a1", job_name="stubborn",
                          code_pointer=CodePointer(file=str(tmp_path / "stubborn_jobs.py")),
                          output_store=str(tmp_path / "outputs"), inputs={}, run_config={"marks": str(marks)})
    options, payload, env = _trusted(request)
    proc = subprocess.Popen([RUNYARD, "api", "execute-step", *options, "--stream", payload],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 30
        while not (marks / "started").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        proc.kill()
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), elapsed, marks


def test_sigterm_interrupts_the_step_and_reports_it_canceled(tmp_path: Path) -> None:
    proc, elapsed, marks = _term(tmp_path, "waits")
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 3, elapsed  # interrupted, not waited out
    events = [Event.from_json(line) for line in proc.stdout.splitlines()]
    assert [e.type for e in events] == [EventType.STEP_START, EventType.STEP_FAILURE]
    failure = events[-1].failure
    assert failure is not None and failure.kind is FailureKind.CANCELED
    assert "received SIGTERM" in failure.message
    assert (marks / "cleaned-up").exists()  # the step's finally ran


def test_sigterm_ends_a_step_that_ignores_it_within_the_grace_period(tmp_path: Path) -> None:
    from runyard.cli.api import TERM_GRACE

    proc, elapsed, _ = _term(tmp_path, "ignores")
    assert proc.returncode == 0, proc.stderr
    assert TERM_GRACE - 0.5 < elapsed < TERM_GRACE + 3, elapsed
    events = [Event.from_json(line) for line in proc.stdout.splitlines()]
    assert [e.type for e in events] == [EventType.STEP_START, EventType.STEP_FAILURE]
    failure = events[-1].failure
    assert failure is not None and failure.kind is FailureKind.CANCELED
    assert f"did not stop within {TERM_GRACE:g}s" in failure.message


def test_sigterm_while_the_job_loads_cancels_the_step_before_it_runs(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "slow_import.py").write_text(f'''
import time
from pathlib import Path
from runyard import job, step

Path({str(marks)!r}, "started").write_text("loading")  # the SIGTERM comes while the job loads
time.sleep(1.5)

@step
def never():
    Path({str(marks)!r}, "ran").write_text("yes")
    return 1

@job
def slow():
    never()
''')
    request = StepRequest(run_id="r" * 32, step_key="never", attempt=1, attempt_id="a1", job_name="slow",
                          code_pointer=CodePointer(file=str(tmp_path / "slow_import.py")),
                          output_store=str(tmp_path / "outputs"), inputs={})
    options, payload, env = _trusted(request)
    proc = subprocess.Popen([RUNYARD, "api", "execute-step", *options, "--stream", payload],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 30
        while not (marks / "started").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    events = [Event.from_json(line) for line in out.splitlines()]
    assert [e.type for e in events] == [EventType.STEP_START, EventType.STEP_FAILURE]
    assert events[-1].failure is not None and events[-1].failure.kind is FailureKind.CANCELED
    assert not (marks / "ran").exists()  # the step function never ran
