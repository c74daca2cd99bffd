"""The conformance kit: the behaviour every executor must show, ours and third-party alike.

Subclass `ExecutorConformance`, set ``executor`` (and ``executor_config`` when the
executor needs settings), and run pytest. Tests that need a capability the executor's
spec does not declare are skipped, and the skip names the capability.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from runyard.engine import Cancellation
from runyard.events import EventType, FailureKind
from runyard.execution import ExecutionResult, execute_job
from runyard.instance import Instance
from runyard.plugin import Capabilities
from runyard.storage import RunStatus
from runyard.testing import jobs


def max_overlap(result: ExecutionResult, keys: set[str] | None = None) -> int:
    """Most steps running at once, from STEP_START and terminal event timestamps."""
    marks: list[tuple[float, int]] = []
    for ev in result.events:
        if keys is not None and ev.step_key not in keys:
            continue
        if ev.type is EventType.STEP_START:
            marks.append((ev.timestamp, 1))
        elif ev.type in (EventType.STEP_SUCCESS, EventType.STEP_FAILURE):
            marks.append((ev.timestamp, -1))
    marks.sort(key=lambda m: (m[0], m[1]))  # an end at the same instant frees a slot first
    peak = cur = 0
    for _, d in marks:
        cur += d
        peak = max(peak, cur)
    return peak


class ExecutorConformance:
    """Reusable tests for an executor. Set ``executor`` in the subclass."""

    executor: ClassVar[str] = ""
    executor_config: ClassVar[Mapping[str, Any]] = {}

    # -- helpers a subclass may override -----------------------------------------------

    @pytest.fixture
    def instance(self, runyard_instance: Instance) -> Instance:
        """The instance runs use; override to configure storage or outputs."""
        return runyard_instance

    def capabilities(self, instance: Instance) -> Capabilities:
        return instance.registry.executor(self.executor).capabilities

    def require(self, instance: Instance, capability: str) -> None:
        if not getattr(self.capabilities(instance), capability):
            pytest.skip(f"executor '{self.executor}' lacks capability '{capability}'")

    def execute(
        self,
        instance: Instance,
        job: Any,
        *,
        config: Mapping[str, Any] | None = None,
        run_config: Mapping[str, Any] | None = None,
        cancellation: Cancellation | None = None,
    ) -> ExecutionResult:
        assert self.executor, "set `executor = \"name\"` on the conformance subclass"
        cfg = {**self.executor_config, **(config or {})}
        rc = {**(run_config or {}), "execution": {self.executor: cfg}}
        return execute_job(job, instance=instance, executor=self.executor, run_config=rc, cancellation=cancellation)

    # -- the contract --------------------------------------------------------------------

    def test_chain_runs_in_dependency_order(self, instance: Instance) -> None:
        result = self.execute(instance, jobs.chain_job)
        assert result.success, result.events
        assert result.output_for("double_2") == 12
        first_end = next(e.timestamp for e in result.events
                         if e.step_key == "double" and e.type is EventType.STEP_SUCCESS)
        second_start = next(e.timestamp for e in result.events
                            if e.step_key == "double_2" and e.type is EventType.STEP_START)
        assert second_start >= first_end

    def test_run_is_recorded_in_storage(self, instance: Instance) -> None:
        result = self.execute(instance, jobs.chain_job)
        run = instance.storage.get_run(result.run_id)
        assert run is not None and run.status is RunStatus.SUCCESS
        assert run.executor == self.executor
        types = [s.event.type for s in instance.storage.get_events(result.run_id)]
        assert types[0] is EventType.RUN_START and types[-1] is EventType.RUN_SUCCESS
        assert types.count(EventType.STEP_SUCCESS) == 3

    def test_fan_in_receives_every_upstream_output(self, instance: Instance) -> None:
        result = self.execute(instance, jobs.fan_job)
        assert result.success, result.events
        assert result.output_for("total") == 20
        assert sorted(k for k in result.step_states if k.startswith("double")) == [
            "double", "double_2", "double_3", "double_4", "double_5"
        ]

    def test_failure_is_reported_and_downstream_skipped(self, instance: Instance) -> None:
        result = self.execute(instance, jobs.failing_job)
        assert result.status is RunStatus.FAILURE
        failure = result.failure_for("boom")
        assert failure is not None and failure.kind is FailureKind.ERROR
        assert failure.error_class == "builtins.ValueError"
        assert "kit boom 1" in failure.message
        assert failure.traceback and "raise ValueError" in failure.traceback
        assert result.step_states["double"] == "skipped"
        assert result.step_states["independent"] == "success"
        assert any(e.type is EventType.STEP_SKIPPED and e.step_key == "double" for e in result.events)

    def test_retries_until_success(self, instance: Instance) -> None:
        result = self.execute(instance, jobs.retry_job)
        assert result.success, result.events
        assert result.output_for("flaky") == 3
        retries = [e for e in result.events if e.type is EventType.STEP_RETRY]
        assert [e.data["next_attempt"] for e in retries] == [2, 3]
        attempt_ids = {e.attempt_id for e in result.events if e.type is EventType.STEP_FAILURE}
        assert len(attempt_ids) == 2  # every attempt has its own id

    def test_timeout_stops_the_step(self, instance: Instance) -> None:
        self.require(instance, "enforces_timeouts")
        started = time.monotonic()
        result = self.execute(instance, jobs.timeout_job)
        elapsed = time.monotonic() - started
        assert result.status is RunStatus.FAILURE
        failure = result.failure_for("sleepy")
        assert failure is not None and failure.kind is FailureKind.TIMEOUT
        assert result.step_states["double"] == "skipped"
        assert elapsed < 15, f"a 1 s timeout took {elapsed:.1f}s to stop a 30 s step"

    def test_max_concurrent_is_respected(self, instance: Instance) -> None:
        caps = self.capabilities(instance)
        limit = 2 if (caps.max_concurrency or 2) >= 2 else 1
        result = self.execute(instance, jobs.wide_job, config={"max_concurrent": limit})
        assert result.success, result.events
        assert max_overlap(result) <= limit

    def test_tag_concurrency_limit_is_respected(self, instance: Instance) -> None:
        limits = [{"key": "kit/db", "value": "primary", "limit": 1}]
        result = self.execute(instance, jobs.tagged_job, config={"tag_concurrency_limits": limits})
        assert result.success, result.events
        db_keys = {k for k in result.step_states if k.startswith("db_nap")}
        assert len(db_keys) == 4
        assert max_overlap(result, db_keys) == 1

    def test_cancel_stops_running_step_and_skips_the_rest(self, instance: Instance, tmp_path: Path) -> None:
        self.require(instance, "can_terminate")
        scratch = tmp_path / "kit-scratch"
        scratch.mkdir()
        cancellation = Cancellation()

        def cancel_when_started() -> None:
            deadline = time.monotonic() + 60
            while not (scratch / "started").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            cancellation.cancel()

        watcher = threading.Thread(target=cancel_when_started, daemon=True)
        watcher.start()
        started = time.monotonic()
        result = self.execute(
            instance, jobs.cancel_job, run_config={"kit": {"scratch": str(scratch)}}, cancellation=cancellation
        )
        elapsed = time.monotonic() - started
        watcher.join(5)
        assert result.status is RunStatus.CANCELED
        failure = result.failure_for("block")
        assert failure is not None and failure.kind is FailureKind.CANCELED
        assert result.step_states["double"] == "skipped"
        assert elapsed < 30, f"cancel took {elapsed:.1f}s to stop a 60 s step"
