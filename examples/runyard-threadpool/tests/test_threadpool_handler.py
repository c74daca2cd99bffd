"""The thread-pool handler's own behaviour, beyond the conformance kit: waking early,
what a step escaping the worker looks like, and what cancel can and cannot do."""

from __future__ import annotations

import importlib
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from types import ModuleType

import pytest
from runyard import Cancellation, CodePointer, EventType, FailureKind, Instance, RunStatus, execute_job
from runyard.plugin import HandlerContext, StepRequest, StepUpdate
from runyard_threadpool.handler import ThreadPoolStepHandler
from runyard_threadpool.plugin import ThreadPoolConfig

JOBS = '''
import threading
from pathlib import Path

from runyard import job, step

release = threading.Event()
started = threading.Event()
marker = None  # set by the test: a file written when `hold` really ends


@step
def quick() -> int:
    return 1


@step
def bye() -> int:
    raise SystemExit(3)


@step
def hold() -> int:
    started.set()
    assert release.wait(30), "never released"
    Path(marker).write_text("finished")
    return 2


@step
def after(x: int) -> int:
    return x


@job
def exits():
    after(bye())


@job
def held():
    after(hold())
'''


@pytest.fixture
def jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    name = f"threadpool_test_jobs_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(JOBS))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    module.marker = str(tmp_path / "hold-finished")
    yield module
    module.release.set()  # never leave a pool thread blocked
    sys.modules.pop(name, None)


def make_handler(tmp_path: Path, max_concurrent: int) -> ThreadPoolStepHandler:
    context = HandlerContext(run_id="r1", instance_home=None, output_store=str(tmp_path / "outputs"),
                             max_concurrent=max_concurrent)
    handler = ThreadPoolStepHandler(ThreadPoolConfig(max_concurrent=max_concurrent), context)
    handler.setup()
    return handler


def request(handler: ThreadPoolStepHandler, jobs: ModuleType, step_key: str, attempt_id: str) -> StepRequest:
    return StepRequest(run_id="r1", step_key=step_key, attempt=1, attempt_id=attempt_id, job_name="held",
                       code_pointer=CodePointer(module=jobs.__name__), output_store=handler.context.output_store,
                       inputs={})


def test_wait_returns_when_a_step_finishes(tmp_path: Path, jobs: ModuleType) -> None:
    handler = make_handler(tmp_path, 2)
    try:
        handle = handler.launch(request(handler, jobs, "hold", "a1"))
        assert jobs.started.wait(10)
        assert handler.poll(handle) == handler.poll(handle) == StepUpdate.running()
        threading.Timer(0.2, jobs.release.set).start()
        started = time.monotonic()
        handler.wait(30)
        assert time.monotonic() - started < 10  # woken by the step's completion, not the timeout
        deadline = time.monotonic() + 10
        while not (update := handler.poll(handle)).done and time.monotonic() < deadline:
            handler.wait(0.1)
        assert update.done and update.failure is None
        assert [e.type for e in update.events][-1] is EventType.STEP_SUCCESS
    finally:
        handler.teardown()


def test_queued_step_is_dropped_by_terminate_running_one_is_not(tmp_path: Path, jobs: ModuleType) -> None:
    handler = make_handler(tmp_path, 1)
    try:
        running = handler.launch(request(handler, jobs, "hold", "a1"))
        assert jobs.started.wait(10)
        queued = handler.launch(request(handler, jobs, "hold", "a2"))  # the one thread is busy
        handler.terminate(queued, FailureKind.CANCELED)
        handler.terminate(queued, FailureKind.CANCELED)  # idempotent
        update = handler.poll(queued)
        assert update.done and update.failure is not None
        assert update.failure.kind is FailureKind.NOT_STARTED
        with pytest.raises(NotImplementedError, match="cannot be stopped"):
            handler.terminate(running, FailureKind.CANCELED)
        jobs.release.set()
        deadline = time.monotonic() + 10
        while not handler.poll(running).done and time.monotonic() < deadline:
            handler.wait(0.1)
        assert Path(jobs.marker).read_text() == "finished"
    finally:
        handler.teardown()


def test_step_raising_system_exit_is_reported_as_crashed(runyard_instance: Instance, jobs: ModuleType) -> None:
    result = execute_job(jobs.exits, instance=runyard_instance, executor="threadpool")
    assert result.status is RunStatus.FAILURE
    failure = result.failure_for("bye")
    assert failure is not None and failure.kind is FailureKind.ERROR
    assert failure.error_class == "builtins.SystemExit"
    assert failure.traceback and "raise SystemExit(3)" in failure.traceback
    assert result.step_states["after"] == "skipped"


def test_cancel_ends_the_run_but_the_thread_runs_to_completion(runyard_instance: Instance, jobs: ModuleType) -> None:
    cancellation = Cancellation()

    def cancel_then_release() -> None:
        if jobs.started.wait(10):
            cancellation.cancel()
            time.sleep(0.3)
        jobs.release.set()

    helper = threading.Thread(target=cancel_then_release, daemon=True)
    helper.start()
    result = execute_job(jobs.held, instance=runyard_instance, executor="threadpool", cancellation=cancellation)
    helper.join(10)

    assert result.status is RunStatus.CANCELED
    failure = result.failure_for("hold")
    assert failure is not None and failure.kind is FailureKind.CANCELED
    assert result.step_states["after"] == "skipped"
    # The engine says the step could not really be stopped, and indeed it ran to its end.
    notes = [e.message for e in result.events if e.type is EventType.ENGINE and e.step_key == "hold"]
    assert any("cannot be stopped" in m for m in notes), result.events
    assert Path(jobs.marker).read_text() == "finished"
