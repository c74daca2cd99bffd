"""The engine, exercised through the in-process executor and a few tiny custom step handlers."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from runyard import ConfigError, EventType, FailureKind, RetryPolicy, RunyardError, job, step
from runyard.execution import execute_job
from runyard.instance import Instance
from runyard.plugin import (
    API_VERSION,
    Capabilities,
    Event,
    ExecutorSpec,
    StepHandler,
    StepRequest,
    StepUpdate,
    execute_step,
    hookimpl,
)
from runyard.registry import PluginRegistry
from runyard.storage import RunStatus

# -- custom step handlers used below ------------------------------------------------------


class _Handle:
    def __init__(self, request: StepRequest) -> None:
        self.request = request
        self.polls = 0


class DoubleReportHandler(StepHandler):
    """Runs the step, reports its events (ending in STEP_SUCCESS), then on the next poll
    reports a late STEP_FAILURE for the same attempt."""

    def launch(self, request: StepRequest) -> _Handle:
        return _Handle(request)

    def poll(self, handle: _Handle) -> StepUpdate:
        handle.polls += 1
        if handle.polls == 1:
            return StepUpdate.running(execute_step(handle.request))
        r = handle.request
        late = Event(
            type=EventType.STEP_FAILURE,
            run_id=r.run_id,
            step_key=r.step_key,
            attempt=r.attempt,
            attempt_id=r.attempt_id,
            message="late failure report",
            data={"failure": {"kind": "worker_lost", "message": "late failure report"}},
        )
        return StepUpdate.finished([late])


class SameBatchDoubleReportHandler(StepHandler):
    """Reports STEP_SUCCESS and then STEP_FAILURE for one attempt in a single poll."""

    def launch(self, request: StepRequest) -> _Handle:
        return _Handle(request)

    def poll(self, handle: _Handle) -> StepUpdate:
        events = list(execute_step(handle.request))
        r = handle.request
        events.append(
            Event(type=EventType.STEP_FAILURE, run_id=r.run_id, step_key=r.step_key, attempt=r.attempt,
                  attempt_id=r.attempt_id, message="duplicate", data={"failure": {"kind": "error", "message": "dup"}})
        )
        return StepUpdate.finished(events)


class LaunchFailsHandler(StepHandler):
    def launch(self, request: StepRequest) -> Any:
        raise RuntimeError("no capacity left on the cluster")

    def poll(self, handle: Any) -> StepUpdate:  # pragma: no cover - never launched
        raise AssertionError("poll of a step that never launched")


class VanishingHandler(StepHandler):
    """Says the attempt is over without any STEP_SUCCESS or STEP_FAILURE (a lost worker)."""

    def launch(self, request: StepRequest) -> _Handle:
        return _Handle(request)

    def poll(self, handle: _Handle) -> StepUpdate:
        r = handle.request
        start = Event(type=EventType.STEP_START, run_id=r.run_id, step_key=r.step_key,
                      attempt=r.attempt, attempt_id=r.attempt_id)
        return StepUpdate.finished([start])


class SuccessWithoutOutputHandler(StepHandler):
    """Runs the step but loses its STEP_OUTPUT: reports STEP_START and STEP_SUCCESS only."""

    def launch(self, request: StepRequest) -> _Handle:
        return _Handle(request)

    def poll(self, handle: _Handle) -> StepUpdate:
        events = [ev for ev in execute_step(handle.request) if ev.type is not EventType.STEP_OUTPUT]
        return StepUpdate.finished(events)


class QueuedHandler(StepHandler):
    """Each attempt waits QUEUED seconds "in a queue", reports that it started, then takes
    RUNS seconds before the step runs; terminate ends it at once."""

    QUEUED = 1.5
    RUNS = 0.3

    def launch(self, request: StepRequest) -> _Handle:
        handle = _Handle(request)
        handle.launched = time.monotonic()  # type: ignore[attr-defined]
        handle.stopped = False  # type: ignore[attr-defined]
        return handle

    def poll(self, handle: _Handle) -> StepUpdate:
        if handle.stopped:  # type: ignore[attr-defined]
            return StepUpdate.finished()
        age = time.monotonic() - handle.launched  # type: ignore[attr-defined]
        if age < self.QUEUED:
            return StepUpdate.running()
        if age < self.QUEUED + self.RUNS:
            return StepUpdate.running(started=True)
        return StepUpdate.finished(execute_step(handle.request))

    def terminate(self, handle: _Handle, kind: FailureKind) -> None:
        handle.stopped = True  # type: ignore[attr-defined]

    def wait(self, timeout: float) -> None:
        time.sleep(min(timeout, 0.02))


class LongRunningQueuedHandler(QueuedHandler):
    QUEUED = 0.2
    RUNS = 2.0


class _SpecPlugin:
    def __init__(self, *specs: ExecutorSpec) -> None:
        self.specs = list(specs)

    @hookimpl
    def runyard_executors(self) -> list[ExecutorSpec]:
        return self.specs


def _register(registry: PluginRegistry, name: str, handler: str, **caps: Any) -> None:
    spec = ExecutorSpec(
        name=name, handler=handler, capabilities=Capabilities(**caps), default_max_concurrent=1, api_version=API_VERSION
    )
    registry.register(_SpecPlugin(spec), name=f"test-{name}", distribution="runyard-tests")


# -- steps and jobs -------------------------------------------------------------------------


@step
def emit(value: int) -> int:
    return value


@step
def double(x: int) -> int:
    return x * 2


@step
def boom(x: int) -> int:
    raise ValueError(f"boom {x}")


def _bump(context) -> int:  # type: ignore[no-untyped-def]
    counter = Path(context.run_config["scratch"]) / context.step_key
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    return n


@step(retry=RetryPolicy(max_retries=2, delay=0.1, backoff=3.0))
def flaky(context) -> int:  # type: ignore[no-untyped-def]
    if context.attempt < 3:
        raise RuntimeError(f"attempt {context.attempt} fails")
    return context.attempt


@job
def retry_job():  # type: ignore[no-untyped-def]
    flaky()


def test_retries_wait_with_backoff() -> None:
    result = retry_job.execute_in_process()
    assert result.success, result.events
    assert result.output_for("flaky") == 3
    retries = [e for e in result.events if e.type is EventType.STEP_RETRY]
    assert [e.data["next_attempt"] for e in retries] == [2, 3]
    assert [e.data["delay"] for e in retries] == pytest.approx([0.1, 0.3])
    assert [e.data["kind"] for e in retries] == ["error", "error"]
    starts = [e for e in result.events if e.type is EventType.STEP_START]
    assert [e.attempt for e in starts] == [1, 2, 3]
    fails = [e for e in result.events if e.type is EventType.STEP_FAILURE]
    # The delay is observed: the next attempt starts no sooner than delay after the failure.
    assert starts[1].timestamp - fails[0].timestamp >= 0.1 - 0.01
    assert starts[2].timestamp - fails[1].timestamp >= 0.3 - 0.01
    assert len({e.attempt_id for e in starts}) == 3


@step(retry=RetryPolicy(max_retries=2))
def always_fails() -> int:
    raise RuntimeError("never works")


@job
def exhausted_job():  # type: ignore[no-untyped-def]
    double(always_fails())


def test_retries_stop_after_max_retries() -> None:
    result = exhausted_job.execute_in_process()
    assert result.status is RunStatus.FAILURE
    fails = [e for e in result.events if e.type is EventType.STEP_FAILURE and e.step_key == "always_fails"]
    assert [e.attempt for e in fails] == [1, 2, 3]
    assert result.step_states == {"always_fails": "failed", "double": "skipped"}
    with pytest.raises(RunyardError) as e:
        exhausted_job.execute_in_process(raise_on_error=True)
    assert "ended FAILURE" in str(e.value) and "always_fails" in str(e.value)


@step(timeout=0.3, retry=RetryPolicy(max_retries=3, retry_on={FailureKind.ERROR}))
def slow_counted(context) -> int:  # type: ignore[no-untyped-def]
    _bump(context)
    import time

    time.sleep(10)
    return 0


@job
def timeout_not_retried_job():  # type: ignore[no-untyped-def]
    slow_counted()


def test_retry_on_does_not_retry_other_kinds(tmp_path: Path) -> None:
    result = timeout_not_retried_job.execute_in_process(run_config={"scratch": str(tmp_path)})
    assert result.status is RunStatus.FAILURE
    failure = result.failure_for("slow_counted")
    assert failure is not None and failure.kind is FailureKind.TIMEOUT
    assert "timeout of 0.3s" in failure.message
    assert not [e for e in result.events if e.type is EventType.STEP_RETRY]
    assert (tmp_path / "slow_counted").read_text() == "1"


@step(retry=RetryPolicy(max_retries=3, retry_on={FailureKind.TIMEOUT}))
def error_counted(context) -> int:  # type: ignore[no-untyped-def]
    _bump(context)
    raise ValueError("plain error")


@job
def error_not_retried_job():  # type: ignore[no-untyped-def]
    error_counted()


def test_retry_on_timeout_only_does_not_retry_errors(tmp_path: Path) -> None:
    result = error_not_retried_job.execute_in_process(run_config={"scratch": str(tmp_path)})
    assert result.status is RunStatus.FAILURE
    assert result.failure_for("error_counted").kind is FailureKind.ERROR  # type: ignore[union-attr]
    assert (tmp_path / "error_counted").read_text() == "1"


@job
def branches_job():  # type: ignore[no-untyped-def]
    e = emit(1)
    bad = boom(e)
    double.alias("after_bad")(double.alias("after_bad_1")(bad))
    double.alias("good")(double.alias("good_1")(e))


def test_failure_skips_downstream_and_other_branches_continue() -> None:
    result = branches_job.execute_in_process()
    assert result.status is RunStatus.FAILURE
    assert dict(result.step_states) == {
        "emit": "success",
        "boom": "failed",
        "after_bad_1": "skipped",
        "after_bad": "skipped",
        "good_1": "success",
        "good": "success",
    }
    assert result.output_for("good") == 4
    skipped = {e.step_key: e.message for e in result.events if e.type is EventType.STEP_SKIPPED}
    assert skipped == {
        "after_bad_1": "skipped: upstream step 'boom' did not succeed",
        "after_bad": "skipped: upstream step 'boom' did not succeed",
    }
    failure = result.failure_for("boom")
    assert failure is not None and failure.kind is FailureKind.ERROR
    assert failure.message == "ValueError: boom 1"
    assert failure.error_class == "builtins.ValueError"
    run_end = result.events[-1]
    assert run_end.type is EventType.RUN_FAILURE and run_end.message == "step(s) failed: boom"
    with pytest.raises(RunyardError) as e:
        result.output_for("after_bad")
    assert str(e.value) == "step 'after_bad' has no output: it ended skipped"
    with pytest.raises(KeyError):
        result.output_for("nope")


@job
def chain_job():  # type: ignore[no-untyped-def]
    double(double(emit(3)))


@pytest.mark.parametrize("persistent", [False, True])
def test_outputs_via_output_for(persistent: bool, runyard_instance: Instance) -> None:
    result = chain_job.execute_in_process(instance=runyard_instance if persistent else None)
    assert result.success
    assert [result.output_for(k) for k in ("emit", "double", "double_2")] == [3, 6, 12]
    outputs = {e.step_key: e.data for e in result.events if e.type is EventType.STEP_OUTPUT}
    assert outputs["double_2"]["type"] == "int"
    ref = outputs["double_2"]["ref"]
    # A file store's reference also names the record in the run's pack file (issue 18).
    assert ref == f"{result.run_id}/double_2" if not persistent else ref.startswith(f"{result.run_id}/double_2/")


@step
def noisy() -> str:
    print("to stdout")
    print("to stderr", file=sys.stderr)
    logging.getLogger("tests.noisy").warning("disk %s%% full", 95)
    return "done"


@job
def noisy_job():  # type: ignore[no-untyped-def]
    noisy()


def test_stdout_stderr_and_logging_are_captured_as_events() -> None:
    result = noisy_job.execute_in_process()
    assert result.success
    by_type = {e.type: e for e in result.events_for("noisy")}
    assert by_type[EventType.STEP_STDOUT].data == {"text": "to stdout\n"}
    assert by_type[EventType.STEP_STDERR].data == {"text": "to stderr\n"}
    log = by_type[EventType.STEP_LOG]
    assert log.message == "disk 95% full"
    assert log.data == {"level": "WARNING", "logger": "tests.noisy"}
    assert log.attempt == 1 and log.attempt_id == by_type[EventType.STEP_START].attempt_id


@step
def chatty_failure() -> int:
    print("before the crash")
    raise RuntimeError("crash")


@job
def chatty_failure_job():  # type: ignore[no-untyped-def]
    chatty_failure()


def test_output_is_captured_for_a_failing_step_too() -> None:
    result = chatty_failure_job.execute_in_process()
    texts = [e.data["text"] for e in result.events if e.type is EventType.STEP_STDOUT]
    assert texts == ["before the crash\n"]
    assert result.failure_for("chatty_failure").message == "RuntimeError: crash"  # type: ignore[union-attr]


@step
def introspect(context, x: int) -> dict:  # type: ignore[no-untyped-def]
    context.log.warning("in %s", context.step_key)
    return {
        "run_id": context.run_id,
        "step_key": context.step_key,
        "attempt": context.attempt,
        "run_config": dict(context.run_config),
        "x": x,
    }


@job
def context_job():  # type: ignore[no-untyped-def]
    introspect.alias("look")(emit(7))


def test_context_parameter() -> None:
    rc = {"ops": {"threshold": 3}, "name": "test"}
    result = context_job.execute_in_process(run_config=rc)
    assert result.success, result.events
    assert result.output_for("look") == {
        "run_id": result.run_id,
        "step_key": "look",
        "attempt": 1,
        "run_config": rc,
        "x": 7,
    }
    logs = [e for e in result.events if e.type is EventType.STEP_LOG]
    assert [(e.message, e.data["logger"]) for e in logs] == [("in look", "runyard.step.look")]


# -- custom handlers ------------------------------------------------------------------------


def test_first_terminal_state_wins(runyard_instance: Instance, runyard_registry: PluginRegistry) -> None:
    _register(runyard_registry, "dup", "tests.test_engine:DoubleReportHandler")
    result = execute_job(chain_job, instance=runyard_instance, executor="dup")
    assert result.success, result.events
    assert result.run.executor == "dup"
    assert dict(result.step_states) == {"emit": "success", "double": "success", "double_2": "success"}
    assert result.output_for("double_2") == 12
    stored = [s.event for s in runyard_instance.storage.get_events(result.run_id)]
    assert not [e for e in stored if e.type is EventType.STEP_FAILURE], "the late report must be dropped"
    assert [e.step_key for e in stored if e.type is EventType.STEP_SUCCESS] == ["emit", "double", "double_2"]


def test_first_terminal_state_wins_within_one_poll(
    runyard_instance: Instance, runyard_registry: PluginRegistry
) -> None:
    _register(runyard_registry, "dup1", "tests.test_engine:SameBatchDoubleReportHandler")
    result = execute_job(chain_job, instance=runyard_instance, executor="dup1")
    assert result.success, result.events
    assert not [e for e in result.events if e.type is EventType.STEP_FAILURE]
    assert result.output_for("double_2") == 12


@step(timeout=5)
def timed(context) -> int:  # type: ignore[no-untyped-def]
    return _bump(context)


@job
def timed_job():  # type: ignore[no-untyped-def]
    double(timed())


def test_executor_that_cannot_enforce_timeouts_is_rejected_before_the_run(
    runyard_instance: Instance, runyard_registry: PluginRegistry, tmp_path: Path
) -> None:
    _register(runyard_registry, "lax", "tests.test_engine:DoubleReportHandler", enforces_timeouts=False)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(ConfigError) as e:
        execute_job(timed_job, instance=runyard_instance, executor="lax", run_config={"scratch": str(scratch)})
    msg = str(e.value)
    assert msg.startswith("step 'timed' has timeout=5s but executor 'lax' cannot enforce timeouts"), msg
    assert "remove the timeout or use an executor that can (e.g. in_process)" in msg
    assert runyard_instance.storage.list_runs() == []  # no run was started
    assert list(scratch.iterdir()) == []  # no step executed


def test_launch_failure_is_not_started(runyard_instance: Instance, runyard_registry: PluginRegistry) -> None:
    _register(runyard_registry, "nolaunch", "tests.test_engine:LaunchFailsHandler")
    result = execute_job(chain_job, instance=runyard_instance, executor="nolaunch")
    assert result.status is RunStatus.FAILURE
    failure = result.failure_for("emit")
    assert failure is not None
    assert failure.kind is FailureKind.NOT_STARTED
    assert failure.message == "launch failed: RuntimeError: no capacity left on the cluster"
    assert dict(result.step_states) == {"emit": "failed", "double": "skipped", "double_2": "skipped"}


def test_done_without_terminal_event_is_worker_lost(
    runyard_instance: Instance, runyard_registry: PluginRegistry
) -> None:
    _register(runyard_registry, "vanish", "tests.test_engine:VanishingHandler")
    result = execute_job(chain_job, instance=runyard_instance, executor="vanish")
    assert result.status is RunStatus.FAILURE
    failure = result.failure_for("emit")
    assert failure is not None
    assert failure.kind is FailureKind.WORKER_LOST
    assert failure.message == "step 'emit' ended without reporting success or failure"
    assert result.step_states["double"] == "skipped"


def test_success_without_output_is_a_step_failure_not_a_crash_of_the_engine(
    runyard_instance: Instance, runyard_registry: PluginRegistry
) -> None:
    """A handler that reports STEP_SUCCESS without the STEP_OUTPUT fails that step with a
    message saying so; downstream steps are skipped instead of the engine raising KeyError
    when it launches them."""
    _register(runyard_registry, "nooutput", "tests.test_engine:SuccessWithoutOutputHandler")
    result = execute_job(chain_job, instance=runyard_instance, executor="nooutput")
    assert result.status is RunStatus.FAILURE
    failure = result.failure_for("emit")
    assert failure is not None and failure.kind is FailureKind.WORKER_LOST
    assert "step 'emit' reported success without reporting its output" in failure.message
    assert dict(result.step_states) == {"emit": "failed", "double": "skipped", "double_2": "skipped"}
    assert not [e for e in result.events if e.type is EventType.STEP_SUCCESS]


# -- timeouts of steps that wait in a queue first ---------------------------------------------


@step(timeout=1.0)
def quick() -> int:
    return 7


@job
def quick_job():  # type: ignore[no-untyped-def]
    quick()


@pytest.mark.parametrize("reports_start", [True, False])
def test_time_queued_counts_against_the_timeout_only_without_reports_start(
    runyard_instance: Instance, runyard_registry: PluginRegistry, reports_start: bool
) -> None:
    _register(runyard_registry, "queued", "tests.test_engine:QueuedHandler", enforces_timeouts=True,
              can_terminate=True, reports_start=reports_start)
    result = execute_job(quick_job, instance=runyard_instance, executor="queued")
    if reports_start:  # 1.5 s queued, 0.3 s running: within the 1 s timeout counted from the start
        assert result.success, result.events
    else:
        failure = result.failure_for("quick")
        assert failure is not None and failure.kind is FailureKind.TIMEOUT, result.events


def test_a_step_that_started_is_still_timed_out(
    runyard_instance: Instance, runyard_registry: PluginRegistry
) -> None:
    _register(runyard_registry, "slowrun", "tests.test_engine:LongRunningQueuedHandler", enforces_timeouts=True,
              can_terminate=True, reports_start=True)
    started = time.monotonic()
    result = execute_job(quick_job, instance=runyard_instance, executor="slowrun")
    failure = result.failure_for("quick")
    assert failure is not None and failure.kind is FailureKind.TIMEOUT, result.events
    assert time.monotonic() - started > 1.1  # 0.2 s queued + the 1 s timeout from the start


# -- unserializable outputs -----------------------------------------------------------------


@step
def make_lambda() -> Any:
    return lambda: 1


@step
def make_lock() -> Any:
    return threading.Lock()


@job
def unpicklable_job():  # type: ignore[no-untyped-def]
    double(make_lambda())
    make_lock()
    emit(1)


def test_unserializable_output_fails_the_step_naming_key_and_type(runyard_instance: Instance) -> None:
    result = unpicklable_job.execute_in_process(instance=runyard_instance)
    assert result.status is RunStatus.FAILURE
    assert dict(result.step_states) == {
        "make_lambda": "failed", "double": "skipped", "make_lock": "failed", "emit": "success",
    }
    lam = result.failure_for("make_lambda")
    assert lam is not None and lam.kind is FailureKind.ERROR
    assert "step 'make_lambda'" in lam.message and "function" in lam.message
    lock = result.failure_for("make_lock")
    assert lock is not None and lock.kind is FailureKind.ERROR
    assert "step 'make_lock'" in lock.message and "lock" in lock.message
    assert lock.error_class == "runyard.errors.OutputSerializationError"


# -- a stopped attempt is waited for once, within one bounded drain ------------------------


class NeverStopsHandler(StepHandler):
    """A broken handler: its steps never end and `terminate` does nothing (a fake: the
    point is an attempt the engine cannot get rid of)."""

    def launch(self, request: StepRequest) -> _Handle:
        return _Handle(request)

    def poll(self, handle: _Handle) -> StepUpdate:
        return StepUpdate.running()

    def terminate(self, handle: _Handle, kind: FailureKind) -> None:
        pass

    def wait(self, timeout: float) -> None:
        time.sleep(min(timeout, 0.01))


@step
def forever() -> int:  # never called: NeverStopsHandler does not run steps
    return 0


@job
def forever_job():  # type: ignore[no-untyped-def]
    double(forever())


@step(timeout=0.3)
def forever_timed() -> int:
    return 0


@job
def forever_timed_job():  # type: ignore[no-untyped-def]
    double(forever_timed())


def _gave_up(result: Any) -> list[Event]:
    return [e for e in result.events if e.type is EventType.ENGINE and e.data.get("gave_up")]


def test_cancel_drains_a_stopped_attempt_once_not_twice(
    runyard_instance: Instance, runyard_registry: PluginRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runyard import engine

    monkeypatch.setattr(engine, "DRAIN_TIMEOUT", 1.0)
    _register(runyard_registry, "stuck", "tests.test_engine:NeverStopsHandler", can_terminate=True)
    cancellation = engine.Cancellation()
    threading.Timer(0.3, cancellation.cancel).start()
    started = time.monotonic()
    result = execute_job(forever_job, instance=runyard_instance, executor="stuck", cancellation=cancellation)
    elapsed = time.monotonic() - started
    assert result.status is RunStatus.CANCELED
    # 0.3 s running + one 1 s drain; the old engine drained again after the cancel (2.3 s).
    assert 1.2 <= elapsed < 2.0, elapsed
    (gave_up,) = _gave_up(result)
    assert gave_up.step_key == "forever"
    assert "gave up waiting for stopped step 'forever'" in gave_up.message


def test_timed_out_attempt_is_given_up_once_after_its_drain(
    runyard_instance: Instance, runyard_registry: PluginRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runyard import engine

    monkeypatch.setattr(engine, "DRAIN_TIMEOUT", 1.0)
    _register(runyard_registry, "stuck2", "tests.test_engine:NeverStopsHandler", enforces_timeouts=True,
              can_terminate=True)
    started = time.monotonic()
    result = execute_job(forever_timed_job, instance=runyard_instance, executor="stuck2")
    elapsed = time.monotonic() - started
    failure = result.failure_for("forever_timed")
    assert failure is not None and failure.kind is FailureKind.TIMEOUT
    assert 1.2 <= elapsed < 2.0, elapsed  # the 0.3 s timeout, then one 1 s drain
    assert len(_gave_up(result)) == 1

