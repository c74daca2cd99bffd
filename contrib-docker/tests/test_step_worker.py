"""The streaming step-worker pieces the container worker relies on, run on the host:
``execute_step(on_event=)``, ``runyard api execute-step --stream`` and
``python -m runyard_docker.step_worker`` (events while the step runs; fd 1 forwarded)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from runyard.plugin import CodePointer, Event, EventType, StepRequest, execute_step, grant_for_run, sign_request

KEY = "a-key-for-the-step-worker-tests-0123456789"

JOB = '''
import os, sys, time
from pathlib import Path
from runyard import job, step

@step
def waits(context):
    context.log.warning("waiting")
    go = Path(context.run_config["go"])
    deadline = time.monotonic() + 30
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    print("from python")
    os.system("echo from a subprocess")
    print("to stderr", file=sys.stderr)
    return 7

@job
def waiting():
    waits()
'''


def signed(request: StepRequest) -> str:
    return json.dumps(sign_request(request, KEY.encode()))


@pytest.fixture
def request_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    jobs = tmp_path / "jobs.py"
    jobs.write_text(JOB)
    # The key and allowance the executor gives a step container (the workers here inherit them).
    monkeypatch.setenv("RUNYARD_SIGNING_KEY", KEY)
    monkeypatch.setenv("RUNYARD_STEP_WORKER", json.dumps(grant_for_run(StepRequest(
        run_id="r1", step_key="waits", attempt=1, attempt_id="a1", job_name="waiting",
        code_pointer=CodePointer(file=str(jobs)), output_store=str(tmp_path / "out"), inputs={}))))

    def make(go: Path) -> StepRequest:
        return StepRequest(run_id="r1", step_key="waits", attempt=1, attempt_id="a1", job_name="waiting",
                           code_pointer=CodePointer(file=str(jobs)), output_store=str(tmp_path / "out"), inputs={},
                           run_config={"go": str(go)})

    return make


def test_on_event_sees_each_event_as_it_is_emitted(request_for: Any, tmp_path: Path) -> None:
    go = tmp_path / "go"
    seen: list[Event] = []

    def on_event(ev: Event) -> None:
        if ev.type is EventType.STEP_LOG:
            go.write_text("go")  # the step is still waiting for this file
        seen.append(ev)

    events = execute_step(request_for(go), on_event=on_event)
    assert seen == events
    assert [e.type for e in events][:2] == [EventType.STEP_START, EventType.STEP_LOG]
    assert events[-1].type is EventType.STEP_SUCCESS


@pytest.mark.parametrize("command", [["-m", "runyard", "api", "execute-step", "--stream"],
                                     ["-m", "runyard_docker.step_worker"]])
def test_worker_prints_events_while_the_step_runs(request_for: Any, tmp_path: Path, command: list[str]) -> None:
    go = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, *command, signed(request_for(go))], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        # Readers skip blank lines: the container worker starts with one (see _Channel).
        lines = (line for line in proc.stdout if line.strip())
        first = Event.from_json(next(lines))
        second = Event.from_json(next(lines))
        assert (first.type, second.type) == (EventType.STEP_START, EventType.STEP_LOG)
        assert not go.exists()  # both arrived while the step waited
        go.write_text("go")
        # Both keep the step's own output off the event stream: every line is an event.
        rest = [Event.from_json(line) for line in lines]
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    assert rest[-1].type is EventType.STEP_SUCCESS
    out = "".join(e.data["text"] for e in rest if e.type is EventType.STEP_STDOUT)
    assert "from python" in out
    # fd-level capture: a subprocess's output is an event too.
    assert "from a subprocess" in out
    assert [e.type for e in rest][-2:] == [EventType.STEP_OUTPUT, EventType.STEP_SUCCESS]
    err = "".join(e.data["text"] for e in rest if e.type is EventType.STEP_STDERR)
    if command[1] == "runyard_docker.step_worker":
        # stderr is left alone: the container's stderr, which the executor reads itself.
        assert "to stderr" in proc.stderr.read()  # type: ignore[union-attr]
    else:
        assert "to stderr" in err  # `runyard api execute-step` reports it as events


def test_worker_stops_itself_when_the_heartbeat_stops(request_for: Any, tmp_path: Path) -> None:
    import os
    import time

    beat = tmp_path / "heartbeat"
    beat.write_text("0")
    env = {**os.environ, "RUNYARD_DOCKER_HEARTBEAT": str(beat), "RUNYARD_DOCKER_HEARTBEAT_TIMEOUT": "1.5"}
    # The step waits 30 s for a go file that never comes.
    request = signed(request_for(tmp_path / "go"))
    proc = subprocess.Popen([sys.executable, "-m", "runyard_docker.step_worker", request],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # A heartbeat that changes keeps it alive well past the timeout.
        for i in range(1, 16):
            time.sleep(0.3)
            beat.write_text(str(i))
            assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
        stopped = time.monotonic()
        assert proc.wait(20) == 3
        assert time.monotonic() - stopped < 15
        assert "no heartbeat from the run worker for 1.5s" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait()
