"""Live events (issue 14): what the engine does with events handlers report while a step
runs (`StepHandler.report`), and that it writes them in batches, not a commit per line.
Real engine, in_process executor and SQLite storage."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from runyard import job, step
from runyard.engine import FLUSH_EVERY, Cancellation
from runyard.events import Event, EventType
from runyard.execution import execute_job
from runyard.instance import Instance
from runyard.plugin import StepHandler
from runyard.storage import RunStatus

LINES = 3000


@step
def chatter() -> int:
    # Spread over about a second, so that several flush intervals pass while it prints.
    for i in range(LINES):
        print(f"line {i}")
        if i % 300 == 0:
            time.sleep(0.1)
    return 1


@job
def chatter_job():  # type: ignore[no-untyped-def]
    chatter()


def test_a_chatty_step_is_written_in_batches_not_per_line(tmp_path: Path) -> None:
    batches: list[int] = []
    result = execute_job(chatter_job, instance=Instance(tmp_path / "home"), executor="in_process",
                         on_events=lambda events: batches.append(len(events)))
    assert result.success
    text = "".join(e.data["text"] for e in result.events_for("chatter") if e.type is EventType.STEP_STDOUT)
    assert text == "".join(f"line {i}\n" for i in range(LINES)), "the output lost, doubled or reordered lines"
    pieces = [e for e in result.events_for("chatter") if e.type is EventType.STEP_STDOUT]
    took = max(e.timestamp for e in result.events) - min(e.timestamp for e in result.events)
    # Whole lines a few times a second (worker.LIVE_EVERY), not one event per print.
    assert 2 <= len(pieces) <= took / 0.1 + 4, f"{len(pieces)} output events for {LINES} lines in {took:.2f}s"
    # One write per flush interval at most, plus the start and the end of the run.
    assert len(batches) <= took / FLUSH_EVERY + 5, f"{len(batches)} writes to storage in {took:.2f}s: {batches}"


@step
def says_then_blocks(context) -> int:  # type: ignore[no-untyped-def]
    print("before the cancel", flush=True)
    context.log.warning("logged before the cancel")
    Path(context.run_config["gate"]).touch()
    time.sleep(60)
    return 1


@job
def blocking_job():  # type: ignore[no-untyped-def]
    says_then_blocks()


def test_output_of_a_canceled_in_process_step_is_kept(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    cancellation = Cancellation()
    instance = Instance(tmp_path / "home")

    def cancel_when_it_said() -> None:
        deadline = time.monotonic() + 60
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        cancellation.cancel()

    threading.Thread(target=cancel_when_it_said, daemon=True).start()
    result = execute_job(blocking_job, instance=instance, executor="in_process", run_config={"gate": str(gate)},
                         cancellation=cancellation)
    assert result.status is RunStatus.CANCELED
    stored = [s.event for s in instance.storage.get_events(result.run_id, step_key="says_then_blocks")]
    assert "before the cancel\n" in [e.data.get("text") for e in stored if e.type is EventType.STEP_STDOUT]
    assert "logged before the cancel" in [e.message for e in stored if e.type is EventType.STEP_LOG]
    assert [e.type for e in stored if e.type is EventType.STEP_START] == [EventType.STEP_START]


class _Recorder(StepHandler):
    """A handler that only exists to be connected to a reporter (no backend is needed)."""


def test_report_takes_live_events_only() -> None:
    from runyard.plugin import ExecutorConfig, HandlerContext

    context = HandlerContext(run_id="r", instance_home=None, output_store="", max_concurrent=1)
    handler = _Recorder(ExecutorConfig(), context)
    assert not handler.reports_connected
    with pytest.raises(RuntimeError, match="before an engine connected it"):
        handler.report([])
    got: list[Sequence[Event]] = []
    handler.connect_reporter(got.append)
    assert handler.reports_connected
    handler.report([Event(type=EventType.STEP_LOG, run_id="r", step_key="s", message="hi")])
    assert len(got) == 1


def test_engine_rejects_outputs_and_endings_reported_live(tmp_path: Path) -> None:
    from runyard.engine import Engine
    from runyard.plan import ExecutionPlan
    from runyard.plugin import Capabilities, ExecutorConfig, HandlerContext

    context = HandlerContext(run_id="r", instance_home=None, output_store="", max_concurrent=1)
    handler = _Recorder(ExecutorConfig(), context)
    engine = Engine(plan=ExecutionPlan.build(chatter_job, None), handler=handler, capabilities=Capabilities(),
                    run_id="r", sink=lambda events: None, code_pointer=None,  # type: ignore[arg-type]
                    output_store="", max_concurrent=1)
    with pytest.raises(ValueError, match="return STEP_SUCCESS from poll"):
        handler.report([Event(type=EventType.STEP_SUCCESS, run_id="r", step_key="chatter")])
    # An event of no attempt of this run is dropped, not written.
    handler.report([Event(type=EventType.STEP_LOG, run_id="r", step_key="chatter", attempt_id="nope")])
    assert not engine._buffer
