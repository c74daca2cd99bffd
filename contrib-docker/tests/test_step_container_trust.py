"""A real step container (the test image's ``runyard_docker.step_worker``) runs only what the
executor that started it allowed: requests signed with the run's key, naming the run's code
location and output store (given in its environment). Forged ones are refused, and the
attacker code, which would write a sentinel file in a folder mounted from the host, never runs.
"""

from __future__ import annotations

import base64
import json
import pickle
import uuid
from pathlib import Path
from typing import Any

import pytest
from runyard.plugin import CodePointer, Event, EventType, StepRequest, sign_request

from .conftest import TEST_LABELS

KEY = "the-run-key-the-executor-made-0123456789"
GOOD = "from runyard import job, step\n\n@step\ndef emit():\n    return 5\n\n@job\ndef good():\n    emit()\n"


class _Sentinel:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


@pytest.fixture
def step_container(docker_client: Any, docker_image: str, tmp_path: Path) -> Any:
    """``run(payload) -> events``: a step container with the environment the executor gives it
    for a run whose job lives in tmp_path/jobs and whose outputs go to tmp_path/outputs."""
    (tmp_path / "jobs").mkdir()
    (tmp_path / "outputs").mkdir()
    (tmp_path / "jobs" / "good_jobs.py").write_text(GOOD)
    grant = {"code_locations": [str(tmp_path / "jobs")], "output_stores": [str(tmp_path / "outputs")]}

    def run(payload: Any) -> list[Event]:
        out = docker_client.containers.run(
            docker_image, ["python3", "-m", "runyard_docker.step_worker", json.dumps(payload)],
            environment={"RUNYARD_SIGNING_KEY": KEY, "RUNYARD_STEP_WORKER": json.dumps(grant)},
            volumes={str(tmp_path): {"bind": str(tmp_path), "mode": "rw"}}, labels=TEST_LABELS,
            remove=True, stdout=True, stderr=False, init=True,
        )
        return [Event.from_json(line) for line in out.decode().splitlines() if line.startswith("{")]

    return run


def request(tmp_path: Path, **changes: Any) -> StepRequest:
    fields: dict[str, Any] = dict(
        run_id=f"trust-{uuid.uuid4().hex[:8]}", step_key="emit", attempt=1, attempt_id="a1", job_name="good",
        code_pointer=CodePointer(file=str(tmp_path / "jobs" / "good_jobs.py")),
        output_store=str(tmp_path / "outputs"), inputs={},
    )
    fields.update(changes)
    return StepRequest(**fields)


def refused(events: list[Event]) -> str:
    assert len(events) == 1, events
    failure = events[0].failure
    assert events[0].type is EventType.STEP_FAILURE and failure is not None
    assert failure.kind.value == "not_started"
    assert failure.message.startswith("step request refused by the worker: ")
    return failure.message


def evil(tmp_path: Path, sentinel: Path) -> str:
    folder = tmp_path / "attacker"
    folder.mkdir(exist_ok=True)
    path = folder / "evil_jobs.py"
    path.write_text(f"open({str(sentinel)!r}, 'w')\n" + GOOD)
    return str(path)


def test_step_containers_refuse_forged_requests(tmp_path: Path, step_container: Any) -> None:
    sentinel = tmp_path / "sentinel"
    blob = base64.b64encode(pickle.dumps(_Sentinel(sentinel))).decode()
    key = KEY.encode()
    # (a) a data: output store holding a pickle, even with a valid signature
    data_store = request(tmp_path, output_store=f"data:application/octet-stream;base64,{blob}", inputs={"x": "x"})
    assert "is not one of this worker's output stores" in refused(step_container(sign_request(data_store, key)))
    # ...and another folder of the host as the store, with an input reference climbing out of the real one
    assert "is not one of this worker's output stores" in refused(
        step_container(sign_request(request(tmp_path, output_store=str(tmp_path / "attacker")), key)))
    climbing = request(tmp_path, inputs={"x": "../attacker/pickle"})
    assert "is not a path inside the output store" in refused(step_container(sign_request(climbing, key)))
    # (b) a code pointer outside the run's code location
    outside = request(tmp_path, code_pointer=CodePointer(file=evil(tmp_path, sentinel)))
    assert "outside this worker's code locations" in refused(step_container(sign_request(outside, key)))
    # (c) unsigned
    assert "not signed" in refused(step_container(outside.to_dict()))
    # (d) altered after signing
    signed = sign_request(request(tmp_path), key)
    altered = {**signed, "code_pointer": {"file": evil(tmp_path, sentinel)}}
    assert "signature does not match" in refused(step_container(altered))
    assert not sentinel.exists(), "a step container ran attacker code"
    # The genuine request runs in the same container setup.
    events = step_container(signed)
    assert events[-1].type is EventType.STEP_SUCCESS, events
