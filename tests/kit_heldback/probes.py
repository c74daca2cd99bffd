"""Probes: one check per clause, independent of the kit, that a held-back variant really
breaks the contract (and the reference keeps it). A variant the kit passes is then a
defect the kit misses, not a variant that is not broken after all.

Each probe takes a `ProbeEnv` (an executor registered in a throwaway registry, an instance,
a scratch directory) and raises AssertionError saying what is wrong.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from runyard import ExecutionResult, JobDefinition, RunStatus, execute_job
from runyard.plugin import (
    CodePointer,
    EventType,
    ExecutorConfig,
    FailureKind,
    HandlerContext,
    StepHandler,
    StepRequest,
)

from . import probe_jobs, variants
from .catalog import REFERENCE, VARIANTS
from .plugin import executor_name
from .reference import ReferenceStepHandler

WORKER_EVENTS = (EventType.STEP_START, EventType.STEP_LOG, EventType.STEP_STDOUT, EventType.STEP_STDERR,
                 EventType.STEP_OUTPUT, EventType.STEP_SUCCESS, EventType.STEP_FAILURE)
POINTER = CodePointer(module=probe_jobs.__name__)


def handler_class(variant: str) -> type[StepHandler]:
    if variant == REFERENCE:
        return ReferenceStepHandler
    return getattr(variants, next(v.handler for v in VARIANTS if v.name == variant))  # type: ignore[no-any-return]


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended). Linux /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] not in ("Z", "X")


def wait_until(predicate: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


class ProbeEnv:
    def __init__(self, variant: str, instance: Any, scratch: Path) -> None:
        self.variant = variant
        self.executor = executor_name(variant)
        self.instance = instance
        self.scratch = scratch

    def execute(self, job: JobDefinition, *, max_concurrent: int = 4, **probe: Any) -> ExecutionResult:
        rc = {"probe": {"scratch": str(self.scratch), **probe},
              "execution": {self.executor: {"max_concurrent": max_concurrent}}}
        try:
            return execute_job(job, instance=self.instance, executor=self.executor, run_config=rc)
        except Exception as e:  # the run itself broke: that is the probe's verdict, said plainly
            raise AssertionError(f"running {job.name} raised {type(e).__name__}: {e}") from e

    @contextmanager
    def handler(self) -> Iterator[StepHandler]:
        """The variant's handler, set up as the engine would, driven directly; torn down after."""
        h = handler_class(self.variant)(ExecutorConfig(), HandlerContext(
            run_id=uuid.uuid4().hex, instance_home=None, output_store=str(self.scratch / "outputs"), max_concurrent=4,
        ))
        h.setup()
        try:
            yield h
        finally:
            h.teardown()

    def request(self, job: JobDefinition, step_key: str, run_id: str = "probe") -> StepRequest:
        return StepRequest(
            run_id=run_id, step_key=step_key, attempt=1, attempt_id=uuid.uuid4().hex[:16], job_name=job.name,
            code_pointer=POINTER, output_store=str(self.scratch / "outputs"), inputs={},
            run_config={"probe": {"scratch": str(self.scratch)}},
        )

    def beats(self, name: str) -> list[float]:
        path = self.scratch / f"{name}.beat"
        return [float(x) for x in path.read_text().split()] if path.exists() else []


def _worker_events(result: ExecutionResult, step_key: str) -> list[Any]:
    return [e for e in result.events_for(step_key) if e.type in WORKER_EVENTS]


# -- the probes ---------------------------------------------------------------------------------


def events_complete_once_in_order(env: ProbeEnv) -> None:
    """Every record and byte the step produced is reported once, with its level, logger and
    stream, STEP_START first and STEP_OUTPUT right before STEP_SUCCESS; the output reaches
    the downstream step."""
    result = env.execute(probe_jobs.talk_job)
    assert result.success, result.events
    assert result.output_for("after_talk") == 8, "the step's output did not reach the downstream step"
    events = _worker_events(result, "talk")
    types = [e.type for e in events]
    assert types[:1] == [EventType.STEP_START], f"the events do not start with STEP_START: {types}"
    assert types[-2:] == [EventType.STEP_OUTPUT, EventType.STEP_SUCCESS], (
        f"the events do not end with STEP_OUTPUT, STEP_SUCCESS: {types}"
    )
    logs = [(e.message, e.data.get("level"), e.data.get("logger")) for e in events if e.type is EventType.STEP_LOG]
    expected = [(f"probe {lv.lower()} record", lv, "runyard.step.talk") for lv in ("INFO", "WARNING", "ERROR")]
    assert logs == expected, f"log records reported as {logs}, expected each once: {expected}"
    out = "".join(e.data.get("text", "") for e in events if e.type is EventType.STEP_STDOUT)
    err = "".join(e.data.get("text", "") for e in events if e.type is EventType.STEP_STDERR)
    assert out == "probe stdout line\nprobe unterminated tail", f"stdout reported as {out!r}"
    assert err == "probe stderr line\n", f"stderr reported as {err!r}"


def crash_is_failure_with_its_events(env: ProbeEnv) -> None:
    """A worker that ends without an ending is a failure, with the events it sent before;
    one killed by SIGKILL is SIGNAL 9."""
    result = env.execute(probe_jobs.crash_job)
    assert result.status is RunStatus.FAILURE, f"a run whose step died ended {result.status}"
    assert result.step_states["last_words"] == "failed", (
        f"a step that exited without returning is '{result.step_states['last_words']}'"
    )
    failure = result.failure_for("last_words")
    assert failure is not None and failure.kind is FailureKind.WORKER_LOST, failure
    # Said by the handler, which knows the exit status (not the engine's fallback for a
    # success without an output).
    assert failure.exit_code == 0, f"the failure of a worker that exited 0 does not say so: {failure}"
    said = [e.message for e in result.events_for("last_words") if e.type is EventType.STEP_LOG]
    assert said == ["probe last words"], f"what the step logged before it died was reported as {said}"
    killed = result.failure_for("killed")
    assert killed is not None and killed.kind is FailureKind.SIGNAL and killed.signal == 9, killed


def attempts_stamped_right(env: ProbeEnv) -> None:
    """Each attempt's events carry its own attempt number and attempt_id; a failure keeps its traceback."""
    result = env.execute(probe_jobs.retry_job)
    assert result.success, result.events
    events = _worker_events(result, "second_time_lucky")
    by_id: dict[str | None, set[int | None]] = {}
    for e in events:
        by_id.setdefault(e.attempt_id, set()).add(e.attempt)
    assert len(by_id) == 2, f"two attempts reported {len(by_id)} attempt ids: {by_id}"
    assert sorted(by_id.values(), key=str) == [{1}, {2}], f"attempt numbers per attempt id: {by_id}"
    for e in events:
        if e.type is EventType.STEP_LOG:
            assert e.message == f"probe attempt {e.attempt}", f"'{e.message}' was reported as attempt {e.attempt}"
    failure = next(e.failure for e in events if e.type is EventType.STEP_FAILURE)
    assert failure is not None and failure.traceback and "raise ValueError" in failure.traceback, (
        f"the first attempt's failure lost its traceback: {failure}"
    )


def no_child_outlives_the_run(env: ProbeEnv) -> None:
    """A child the step started that ignores SIGTERM is gone once the run is over."""
    result = env.execute(probe_jobs.stubborn_job)
    assert result.success, result.events
    info = json.loads((env.scratch / "stubborn.json").read_text())
    wait_until(lambda: not process_alive(info["pid"]), 5)
    assert not process_alive(info["pid"]), f"the step's child {info['pid']} (it ignores SIGTERM) outlived the run"


def timed_out_retry_is_stopped(env: ProbeEnv) -> None:
    """A retry (attempt 2) that runs past its timeout is stopped then, not at the run's end or never."""
    result = env.execute(probe_jobs.retry_timeout_job)
    ended = time.time()
    failure = result.failure_for("beat_on_retry")
    assert failure is not None and failure.kind is FailureKind.TIMEOUT, result.events
    stopped_at = max(e.timestamp for e in result.events_for("beat_on_retry") if e.type is EventType.STEP_FAILURE)
    gave_up = [e.message for e in result.events if e.type is EventType.ENGINE and e.data.get("gave_up")]
    assert not gave_up, f"the engine gave up waiting for the timed-out retry: {gave_up}"
    count = len(env.beats("retry"))
    time.sleep(1.0)
    beats = env.beats("retry")
    assert len(beats) == count, f"the timed-out retry still runs {time.time() - ended:.1f}s after the run ended"
    if beats:
        assert beats[-1] - stopped_at <= 4.0, f"the timed-out retry ran {beats[-1] - stopped_at:.1f}s past its timeout"


def terminate_right_after_launch(env: ProbeEnv) -> None:
    """An attempt terminated as soon as it is launched (a cancel at that moment) never runs on."""
    with env.handler() as h:
        handle = h.launch(env.request(probe_jobs.beat_job, "beat"))
        h.terminate(handle, FailureKind.CANCELED)
        deadline = time.monotonic() + 8
        done = False
        while time.monotonic() < deadline and not done:
            done = h.poll(handle).done
            h.wait(0.05)
        beats = len(env.beats("beat"))
        time.sleep(0.5)
        assert len(env.beats("beat")) == beats, "a step terminated right after its launch runs on"
        assert done, "a step terminated right after its launch was not reported done within 8s"


def big_output_does_not_hang(env: ProbeEnv) -> None:
    """A step that writes far more than a pipe holds ends, and all it wrote is reported."""
    started = time.monotonic()
    result = env.execute(probe_jobs.shout_job)
    assert result.success, (
        f"a step writing {probe_jobs.BIG_OUTPUT} characters did not end "
        f"({time.monotonic() - started:.1f}s): {result.failure_for('shout')}"
    )
    out = "".join(e.data.get("text", "") for e in result.events_for("shout") if e.type is EventType.STEP_STDOUT)
    assert len(out) == probe_jobs.BIG_OUTPUT + 1, f"{len(out)} of {probe_jobs.BIG_OUTPUT + 1} characters reported"


def three_run_at_once(env: ProbeEnv) -> None:
    """At max_concurrent=3, three launched steps run at the same time."""
    result = env.execute(probe_jobs.meet_job, max_concurrent=3, meet=3, meet_wait=8)
    assert result.success, [e.message for e in result.events if e.type is EventType.STEP_FAILURE]


def wait_zero_returns(env: ProbeEnv) -> None:
    """``wait(0)`` returns at once, with nothing running."""
    with env.handler() as h:
        t = threading.Thread(target=h.wait, args=(0.0,), daemon=True)
        t.start()
        t.join(2)
        blocked = t.is_alive()
        if blocked:
            h._changed.set()  # type: ignore[attr-defined]  # release the probe's thread (the reference's flag)
        assert not blocked, "wait(0) did not return within 2s"


def safe_after_completion(env: ProbeEnv) -> None:
    """poll and terminate (twice) after an attempt is over are harmless."""
    with env.handler() as h:
        handle = h.launch(env.request(probe_jobs.quick_job, "quick"))
        assert wait_until(lambda: h.poll(handle).done, 60), "a quick step did not end within 60s"
        for call, args in ((h.poll, ()), (h.terminate, (FailureKind.CANCELED,)), (h.terminate, (FailureKind.TIMEOUT,))):
            try:
                call(handle, *args)
            except Exception as e:
                raise AssertionError(f"{call.__name__} after the attempt ended raised {type(e).__name__}: {e}") from e


PROBES: dict[str, Callable[[ProbeEnv], None]] = {
    f.__name__: f
    for f in (
        events_complete_once_in_order,
        crash_is_failure_with_its_events,
        attempts_stamped_right,
        no_child_outlives_the_run,
        timed_out_retry_is_stopped,
        terminate_right_after_launch,
        big_output_does_not_hang,
        three_run_at_once,
        wait_zero_returns,
        safe_after_completion,
    )
}
