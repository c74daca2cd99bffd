"""`runyard.plugin.StreamedAttempt`: the order `poll` reports a streamed attempt's events in,
whatever order its streams were read in (shared by the docker and k8s handlers)."""

from __future__ import annotations

from runyard.definitions import CodePointer
from runyard.events import Event, EventType, FailureInfo, FailureKind
from runyard.plugin import StepRequest, StreamedAttempt


def _attempt() -> StreamedAttempt:
    return StreamedAttempt(StepRequest(
        run_id="r" * 32, step_key="s", attempt=1, attempt_id="a1", job_name="j",
        code_pointer=CodePointer(module="runyard.testing.jobs"), output_store="/tmp/unused", inputs={},
    ))


def _worker(att: StreamedAttempt, type_: EventType, **data: object) -> Event:
    return att.event(type_, dict(data))


def test_stderr_read_before_the_start_waits_for_it_and_the_ending_comes_last() -> None:
    att = _attempt()
    with att.lock:
        att.add_stderr("warning: read before the start\n")
    first = att.update(started=True)
    assert not first.done and first.started and list(first.events) == [], "stderr reported before STEP_START"
    with att.lock:
        att.take(_worker(att, EventType.STEP_START))
        att.take(_worker(att, EventType.STEP_SUCCESS))  # held back: the attempt is not over
        att.take(_worker(att, EventType.STEP_FAILURE))  # a second ending is ignored
        att.take(_worker(att, EventType.STEP_STDOUT, text="late\n"))
    second = att.update()
    assert [e.type for e in second.events] == [EventType.STEP_START, EventType.STEP_STDOUT, EventType.STEP_STDERR]
    assert second.events[-1].data["text"] == "warning: read before the start\n" and not second.done
    with att.lock:
        att.add_stderr("after\n")
        att.done = True
    last = att.update()
    assert last.done and last.failure is None
    assert [e.type for e in last.events] == [EventType.STEP_STDERR, EventType.STEP_SUCCESS]
    assert att.update().done and not att.update().events  # over once, then nothing more


def test_an_attempt_over_without_a_start_still_reports_its_stderr_and_its_failure() -> None:
    att = _attempt()
    with att.lock:
        att.add_stderr("ModuleNotFoundError: no runyard in the image\n")
        att.done = True
    update = att.update(lost=lambda: FailureInfo(kind=FailureKind.NOT_STARTED, message="never started"))
    assert update.done and update.failure is not None and update.failure.kind is FailureKind.NOT_STARTED
    assert [e.data["text"] for e in update.events] == ["ModuleNotFoundError: no runyard in the image\n"]
    default = _attempt()
    with default.lock:
        default.done = True
    assert default.update().failure.kind is FailureKind.WORKER_LOST  # type: ignore[union-attr]
