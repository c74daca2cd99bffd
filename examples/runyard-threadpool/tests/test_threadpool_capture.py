"""Output capture of steps running at the same time in one process.

A thread-based executor runs several steps in one process at once; each step's prints and
log records must land in that step's events only, and the process's own stdout must keep
working afterwards.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from runyard import EventType, Instance, execute_job

JOBS = '''
import threading

from runyard import job, step

# Both steps are inside the step function (so both have set up capture) before either prints.
both_running = threading.Barrier(2, timeout=20)


@step
def talk(context, name: str) -> str:
    both_running.wait()
    print(f"printed by {name}")
    context.log.warning(f"logged by {name}")
    both_running.wait()
    return name


@job
def chatter():
    talk.alias("a")("a")
    talk.alias("b")("b")
'''



@pytest.fixture
def jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    name = f"threadpool_capture_jobs_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(JOBS))
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = sys.stdout, sys.stderr
    yield importlib.import_module(name)
    sys.stdout, sys.stderr = saved  # the race may leave them pointing at a step's buffer
    sys.modules.pop(name, None)


def captured(result, step_key: str, type_: EventType) -> str:  # type: ignore[no-untyped-def]
    return "".join(e.data.get("text", e.message + "\n") for e in result.events_for(step_key) if e.type is type_)


def test_concurrent_steps_capture_only_their_own_prints(runyard_instance: Instance, jobs: ModuleType) -> None:
    result = execute_job(jobs.chatter, instance=runyard_instance, executor="threadpool",
                         run_config={"execution": {"threadpool": {"max_concurrent": 2}}})
    assert result.success, result.events
    assert captured(result, "a", EventType.STEP_STDOUT) == "printed by a\n"
    assert captured(result, "b", EventType.STEP_STDOUT) == "printed by b\n"


def test_concurrent_steps_capture_only_their_own_logs(runyard_instance: Instance, jobs: ModuleType) -> None:
    result = execute_job(jobs.chatter, instance=runyard_instance, executor="threadpool",
                         run_config={"execution": {"threadpool": {"max_concurrent": 2}}})
    assert result.success, result.events
    assert captured(result, "a", EventType.STEP_LOG) == "logged by a\n"
    assert captured(result, "b", EventType.STEP_LOG) == "logged by b\n"


def test_steps_one_at_a_time_capture_their_own_output(runyard_instance: Instance, jobs: ModuleType) -> None:
    # With max_concurrent 1 there is no race (and no partner step to wait for).
    jobs.both_running = threading.Barrier(1)
    result = execute_job(jobs.chatter, instance=runyard_instance, executor="threadpool",
                         run_config={"execution": {"threadpool": {"max_concurrent": 1}}})
    assert result.success, result.events
    for key in ("a", "b"):
        assert captured(result, key, EventType.STEP_STDOUT) == f"printed by {key}\n"
        assert captured(result, key, EventType.STEP_LOG) == f"logged by {key}\n"
