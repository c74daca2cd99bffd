"""`runyard api execute-step`: a JSON StepRequest in, JSON-lines events out, in a real
subprocess, as container and pod executors will call it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
