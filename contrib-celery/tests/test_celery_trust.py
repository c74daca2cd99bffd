"""A real `runyard celery worker` on the real brokers obeys its own configuration only.

Each attack is a message an intruder with access to the broker could publish. The attacker's
code would write a sentinel file (when its module is imported, or when its pickle is loaded);
every test checks that the file does not exist, and that the worker reported the refusal
(a STEP_FAILURE, NOT_STARTED, saying why) instead of hanging.
"""

from __future__ import annotations

import base64
import pickle
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery_support import BROKERS, RUNYARD, SIGNING_KEY, queue, wait_until, write_home
from runyard.plugin import CodePointer, HandlerContext, StepRequest, sign_request
from runyard_celery.app import make_app
from runyard_celery.handler import CeleryStepHandler
from runyard_celery.settings import TASK_NAME, CeleryConfig

KEY = SIGNING_KEY.encode()


class _Sentinel:
    """Unpickling this creates the file: what a pickle in an attacker's store would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def evil_file(tmp_path: Path, sentinel: Path) -> Path:
    """A job file outside the worker's code locations that writes ``sentinel`` when imported."""
    folder = tmp_path / "attacker"
    folder.mkdir(exist_ok=True)
    path = folder / f"evil_{uuid.uuid4().hex[:8]}.py"
    path.write_text(
        f"open({str(sentinel)!r}, 'w').write('imported')\n"
        "from runyard import job, step\n\n@step\ndef emit():\n    return 1\n\n@job\ndef slow_job():\n    emit()\n"
    )
    return path


def request(tmp_path: Path, **changes: Any) -> StepRequest:
    """A request the worker would run: the test jobs module, outputs under pytest's tmp folder."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    fields: dict[str, Any] = dict(
        run_id=f"trust-{uuid.uuid4().hex[:8]}", step_key="slow_start", attempt=1,
        attempt_id=uuid.uuid4().hex[:16], job_name="slow_job", code_pointer=CodePointer(module="celery_test_jobs"),
        output_store=str(tmp_path / "outputs"), inputs={}, run_config={"scratch": str(scratch)},
    )
    fields.update(changes)
    return StepRequest(**fields)


@pytest.fixture
def send(session_workers: Any) -> Any:
    """``send(payload, task=TASK_NAME)``: publish a JSON task to the session's Redis worker and
    return its AsyncResult; the app is closed at teardown."""
    app = make_app(broker=BROKERS["redis"]["broker"], backend=BROKERS["redis"]["backend"])

    def publish(payload: Any, task: str = TASK_NAME, **options: Any) -> Any:
        return app.send_task(task, args=[payload] if task == TASK_NAME else payload, queue=queue("redis-main"),
                             **options)

    yield publish
    app.close()


def refusal(result: Any) -> str:
    wait_until(lambda: result.state in ("SUCCESS", "FAILURE"), 30, "the worker to answer the request")
    assert result.state == "SUCCESS", result.result
    events = result.result["events"]
    assert len(events) == 1, events
    (ev,) = events
    assert ev["type"] == "STEP_FAILURE"
    failure = ev["data"]["failure"]
    assert failure["kind"] == "not_started"
    assert failure["message"].startswith("step request refused by the worker: ")
    return str(failure["message"])


def test_a_forged_data_output_store_is_refused_unread(tmp_path: Path, send: Any) -> None:
    """(a) The classic: inputs named in a ``data:`` store holding a pickle. Even correctly
    signed (a leaked key), the store is not one of the worker's, so nothing is unpickled."""
    sentinel = tmp_path / "unpickled"
    blob = base64.b64encode(pickle.dumps(_Sentinel(sentinel))).decode()
    forged = request(tmp_path, step_key="add_one", job_name="add_job",
                     output_store=f"data:application/octet-stream;base64,{blob}", inputs={"x": "x"})
    for payload in (sign_request(forged, KEY), forged.to_dict()):
        refusal(send(payload))
        assert not sentinel.exists(), "the worker unpickled an input from the request's own store"
    assert "output store 'data:application/octet-stream" in refusal(send(sign_request(forged, KEY)))


def test_a_code_pointer_outside_the_code_locations_is_refused_unimported(tmp_path: Path, send: Any) -> None:
    """(b) A signed request whose code pointer names a file the worker was not given."""
    sentinel = tmp_path / "imported"
    forged = request(tmp_path, code_pointer=CodePointer(file=str(evil_file(tmp_path, sentinel))))
    message = refusal(send(sign_request(forged, KEY)))
    assert "outside this worker's code locations (celery_test_jobs, runyard.testing" in message
    # A module the worker did not name is refused too, whatever it is.
    message = refusal(send(sign_request(request(tmp_path, code_pointer=CodePointer(module="antigravity")), KEY)))
    assert "code pointer -m antigravity is outside" in message
    assert not sentinel.exists(), "the worker imported a job file outside its code locations"


def test_an_unsigned_request_is_refused(tmp_path: Path, send: Any) -> None:
    """(c) The request the engine would send, but without a signature: nothing runs."""
    plain = request(tmp_path)
    message = refusal(send(plain.to_dict()))
    assert "not signed" in message
    sentinel = tmp_path / "imported"
    refusal(send(request(tmp_path, code_pointer=CodePointer(file=str(evil_file(tmp_path, sentinel)))).to_dict()))
    time.sleep(0.5)
    assert not Path(plain.run_config["scratch"], "slow_start.pid").exists(), "an unsigned step ran"
    assert not sentinel.exists()


def test_an_altered_signed_request_is_refused(tmp_path: Path, send: Any) -> None:
    """(d) A genuine signed request with its code pointer (or anything else) swapped afterwards."""
    sentinel = tmp_path / "imported"
    signed = sign_request(request(tmp_path), KEY)
    altered = {**signed, "code_pointer": {"file": str(evil_file(tmp_path, sentinel))}}
    assert "signature does not match" in refusal(send(altered))
    assert "signature does not match" in refusal(send({**signed, "run_config": {"scratch": "/"}}))
    other_key = b"another-key-of-32-characters!!!!"
    assert "signature does not match" in refusal(send(sign_request(request(tmp_path), other_key)))
    assert not sentinel.exists()
    # The untouched request runs: the refusals were about the changes, nothing else.
    result = send(signed)
    wait_until(lambda: result.state == "SUCCESS", 30, "the genuine request to succeed")
    assert result.result["events"][-1]["type"] == "STEP_SUCCESS"


@pytest.mark.parametrize("task", ["celery.accumulate", "celery.chord_unlock", "celery.map", "celery.backend_cleanup"])
def test_celery_builtin_tasks_are_not_run(tmp_path: Path, send: Any, session_workers: Any, task: str) -> None:
    """(e) Celery's built-in tasks are not registered on a runyard worker: the message is
    rejected as an unregistered task and never runs (its result is Celery's NotRegistered)."""
    task_id = f"builtin-{uuid.uuid4().hex}"
    result = send([1, 2], task=task, task_id=task_id)
    worker = session_workers["redis"]
    wait_until(lambda: task_id in worker.log.read_text(errors="replace"), 20, "the worker to see the message")
    time.sleep(0.5)
    log = worker.log.read_text(errors="replace")
    assert f"Received unregistered task of type '{task}'" in log
    wait_until(lambda: result.state != "PENDING", 10, "the rejection to be recorded")
    assert result.state == "FAILURE" and type(result.result).__name__ == "NotRegistered", result.result


def test_a_step_outside_the_allowance_fails_its_run_step_with_the_reason(tmp_path: Path, session_workers: Any) -> None:
    """Through the executor itself: the attempt ends in a failure that names the refusal."""
    sentinel = tmp_path / "imported"
    cfg = CeleryConfig(**BROKERS["redis"], default_queue=queue("redis-main"))
    handler = CeleryStepHandler(cfg, HandlerContext(run_id="r", instance_home=None,
                                                    output_store=str(tmp_path / "outputs"), max_concurrent=1))
    handler.setup()
    try:
        handle = handler.launch(request(tmp_path, code_pointer=CodePointer(file=str(evil_file(tmp_path, sentinel)))))
        deadline = time.monotonic() + 30
        while not (update := handler.poll(handle)).done and time.monotonic() < deadline:
            handler.wait(0.1)
    finally:
        handler.teardown()
    assert update.done
    assert update.events[-1].type.value == "STEP_FAILURE"
    assert "outside this worker's code locations" in update.events[-1].message
    assert not sentinel.exists()


def _start(home: Path, env_key: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "RUNYARD_SIGNING_KEY"}
    env["RUNYARD_HOME"] = str(home)
    if env_key is not None:
        env["RUNYARD_SIGNING_KEY"] = env_key
    return subprocess.run([RUNYARD, "celery", "worker", "-q", queue("never"), *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_worker_without_key_or_code_locations_does_not_start(tmp_path: Path) -> None:
    home = write_home(tmp_path / "home", {**BROKERS["redis"], "default_queue": queue("never")})
    proc = _start(home, None, "--code-location", "celery_test_jobs")
    assert proc.returncode == 2
    assert "no step signing key is configured" in proc.stderr and "RUNYARD_SIGNING_KEY" in proc.stderr
    proc = _start(home, SIGNING_KEY)
    assert proc.returncode == 2
    assert "no code locations" in proc.stderr and "--code-location" in proc.stderr
    proc = _start(home, "short", "--code-location", "celery_test_jobs")
    assert proc.returncode == 2 and "at least 16" in proc.stderr
