"""The conformance kit: the behaviour every executor must show, ours and third-party alike.

Subclass `ExecutorConformance`, set ``executor`` (and ``executor_config`` when the
executor needs settings), and run pytest. Tests that need a capability the executor's
spec does not declare are skipped, and the skip names the capability.

The kit checks behaviour, not timings alone. Its steps (`runyard.testing.jobs`) record in
a scratch directory who runs them (pid, process group, thread) and leave side effects (a
heartbeat file), so the kit sees from outside whether a stopped step really stopped,
whether its process group is gone, whether steps really ran at the same time. Some tests
drive the `StepHandler` directly (setup, launch, poll, terminate, wait, teardown), as
the engine does, to check the calls the engine alone would not exercise.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from runyard.definitions import CodePointer, JobDefinition
from runyard.engine import Cancellation, Engine
from runyard.errors import ConfigError
from runyard.events import Event, EventType, FailureInfo, FailureKind
from runyard.execution import ExecutionResult, execute_job, new_run_record, prepare_handler, validate_run
from runyard.instance import Instance
from runyard.plan import ExecutionPlan
from runyard.plugin import Capabilities, HandlerContext, StepHandler, StepRequest
from runyard.storage import RunStatus
from runyard.testing import jobs

_ENDINGS = (EventType.STEP_SUCCESS, EventType.STEP_FAILURE)
_WORKER_EVENTS = (EventType.STEP_START, EventType.STEP_LOG, EventType.STEP_STDOUT, EventType.STEP_STDERR,
                  EventType.STEP_OUTPUT, *_ENDINGS)
"""The events of an attempt that its worker reports (the engine writes the others)."""


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


# -- what the kit's steps left behind ------------------------------------------------------


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _proc_state(pid: int) -> str | None:
    """The state letter of a process (None: it does not exist). Linux /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()[0]


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended: only its exit status is left)."""
    return _proc_state(pid) not in (None, "Z", "X")


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` on this machine (Linux /proc)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path("/proc", name, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            found.append(int(name))
    return found


def wait_until(predicate: Callable[[], bool], within: float, every: float = 0.05) -> bool:
    deadline = time.monotonic() + within
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)


class StepTrace:
    """What a kit step recorded in the scratch directory about itself."""

    def __init__(self, scratch: Path, step_key: str, attempt: int = 1) -> None:
        self.scratch = scratch
        self.step_key = step_key
        path = scratch / f"{step_key}-{attempt}.json"
        self.info: dict[str, Any] | None = json.loads(path.read_text()) if path.exists() else None

    @property
    def ran(self) -> bool:
        return self.info is not None

    @property
    def local_process(self) -> bool:
        """The step ran in a process of its own that this machine's /proc shows."""
        i = self.info
        return bool(i and i["owns_process"] and i["pid_namespace"] == _pid_namespace() and Path("/proc").is_dir())

    @property
    def own_group(self) -> bool:
        i = self.info
        return bool(self.local_process and i and i["pgid"] == i["pid"])

    @property
    def per_step_process(self) -> bool:
        """The step's process is the handler's to end with the step: it leads a process
        group of its own, or the handler started it in the kit's group (no group of its own)."""
        i = self.info
        return self.own_group or bool(self.local_process and i and i["pgid"] == os.getpgid(0))

    def beats(self) -> list[float]:
        path = self.scratch / f"{self.step_key}.beat"
        if not path.exists():
            return []
        return [float(x) for x in path.read_text().split()]

    def leftovers(self) -> list[str]:
        """Processes of the step still running: its own, its group's, the one it started."""
        if not self.local_process or self.info is None:
            return []
        left = []
        pid, child = self.info["pid"], self.info.get("child")
        if self.per_step_process and process_alive(pid):
            left.append(f"the step's process {pid}")
        if self.own_group:
            members = [m for m in group_members(pid) if m != pid]
            if members:
                left.append(f"processes {members} of the step's process group {pid}")
        if child and process_alive(child) and not (self.own_group and child in group_members(pid)):
            left.append(f"process {child} that the step started")
        return left



class ExecutorConformance:
    """Reusable tests for an executor. Set ``executor`` in the subclass."""

    executor: ClassVar[str] = ""
    executor_config: ClassVar[Mapping[str, Any]] = {}
    stop_within: ClassVar[float] = 8.0
    """Seconds a handler may take from `terminate` (a timeout, a cancel) until the step's
    side effects stop and its processes are gone, SIGTERM grace included. Below the
    engine's own give-up (`runyard.engine.DRAIN_TIMEOUT`), so the handler must do it."""
    overlap: ClassVar[int] = 3
    """Steps that must really run at the same time at ``max_concurrent`` of that number
    (capped by the capabilities' ``max_concurrency``). Three, not two: a handler with a
    hidden pool of two must not pass."""
    events_survive_a_crash: ClassVar[bool] = True
    """Whether what a step reported before its process died (a log record) reaches the
    events. True for handlers that read the worker's events as they come (a stream, a
    file); set False only when the backend hands back an attempt's events in one piece at
    its end (a task's return value), so that a crash leaves nothing to pass along."""
    large_output_within: ClassVar[float] = 30.0
    """Seconds a run of one step printing `jobs.BIG_OUTPUT` characters may take before the
    kit cancels it (a handler that blocks the step's output would hang it)."""
    live_within: ClassVar[float] = 1.0
    """Seconds from a running step writing a line (or logging a record) until it is in
    storage, where `runyard run logs --follow` reads it."""
    live_start_within: ClassVar[float] = 120.0
    """Seconds the live-events test waits for its step to start (a container, a queue)."""
    overlap_wait: ClassVar[float] = 15.0
    """Seconds a step waits for the others to be running at once before it gives up."""

    @pytest.fixture
    def instance(self, runyard_instance: Instance) -> Instance:
        """The instance runs use; override to configure storage or outputs."""
        return runyard_instance

    def capabilities(self, instance: Instance) -> Capabilities:
        return instance.registry.executor(self.executor).capabilities

    def require(self, instance: Instance, capability: str) -> None:
        if not getattr(self.capabilities(instance), capability):
            pytest.skip(f"executor '{self.executor}' lacks capability '{capability}'")

    @pytest.fixture
    def scratch(self, tmp_path: Path) -> Path:
        """Where the kit's steps write what they did (in pytest's tmp_path: a container
        executor's tests mount it at the same path)."""
        d = tmp_path / "kit-scratch"
        d.mkdir()
        return d

    @staticmethod
    def kit_config(scratch: Path, **extra: Any) -> dict[str, Any]:
        """The ``run_config`` the kit's steps read: the scratch directory and who the kit is."""
        return {"kit": {"scratch": str(scratch), "test_pid": os.getpid(), "test_pgid": os.getpgid(0),
                        "pid_namespace": _pid_namespace(), **extra}}

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

    @pytest.fixture
    def handler_run(self, instance: Instance, scratch: Path) -> Iterator[HandlerRun]:
        """A handler of this executor, set up for a run of the kit's jobs, torn down after."""
        run = HandlerRun(self, instance, scratch)
        yield run
        run.close()

    def assert_stopped(self, result: ExecutionResult | None, scratch: Path, step_key: str,
                       stopped_at: float, *, attempt: int = 1, may_not_run: bool = False) -> None:
        """The step was stopped by the handler at ``stopped_at`` (wall clock): its heartbeat
        ended within `stop_within`, stays ended, and nothing of its processes is left.
        ``may_not_run``: stopped so early that it need not have started at all."""
        trace = StepTrace(scratch, step_key, attempt)
        if may_not_run and not trace.ran:
            time.sleep(1.0)  # a start the handler lost track of would show by now
            trace = StepTrace(scratch, step_key, attempt)
            if not trace.ran and not trace.beats():
                return
        assert trace.ran, f"step '{step_key}' never ran (nothing in {scratch})"
        if result is not None:
            gave_up = [e for e in result.events if e.type is EventType.ENGINE and e.data.get("gave_up")]
            assert not gave_up, (
                f"the engine gave up waiting for the stopped step: the handler did not stop it ({gave_up[0].message})"
            )

        def quiet() -> bool:
            before = len(trace.beats())
            time.sleep(4 * jobs.BEAT_EVERY)
            return len(trace.beats()) == before

        wait_until(lambda: quiet(), self.stop_within, every=0)
        beats = trace.beats()
        assert beats, f"step '{step_key}' never beat"
        late = beats[-1] - stopped_at
        assert late <= self.stop_within, (
            f"step '{step_key}' kept running {late:.1f}s after it was stopped (allowed: {self.stop_within:g}s)"
        )
        time.sleep(0.3)
        assert len(trace.beats()) == len(beats), f"step '{step_key}' still runs after it was stopped"
        wait_until(lambda: not trace.leftovers(), self.stop_within)
        left = trace.leftovers()
        assert not left, f"step '{step_key}' was stopped but these still run: {'; '.join(left)}"

    @staticmethod
    def _failure_time(result: ExecutionResult, step_key: str) -> float:
        """When the last attempt of ``step_key`` failed."""
        return [e.timestamp for e in result.events if e.step_key == step_key and e.type is EventType.STEP_FAILURE][-1]

    @staticmethod
    def _text(result: ExecutionResult, step_key: str, type_: EventType) -> str:
        """What STEP_STDOUT or STEP_STDERR events of ``step_key`` carry, joined."""
        return "".join(str(e.data.get("text", "")) for e in result.events_for(step_key) if e.type is type_)

    @staticmethod
    def _said(result: ExecutionResult, step_key: str, type_: EventType) -> str:
        return "".join(str(e.data.get("text", "")) + e.message + "\n"
                       for e in result.events_for(step_key) if e.type is type_)

    # -- the contract, cheapest checks of the most common defects first ---------------------

    def test_handler_wait_honours_its_timeout(self, handler_run: HandlerRun) -> None:
        h = handler_run

        def timed_wait(timeout: float) -> float:
            took: list[float] = []
            errors: list[BaseException] = []

            def call() -> None:
                t0 = time.monotonic()
                try:
                    h.handler.wait(timeout)
                except BaseException as e:
                    errors.append(e)
                took.append(time.monotonic() - t0)

            t = threading.Thread(target=call, daemon=True)
            t.start()
            t.join(timeout + 3)
            assert not errors, f"wait({timeout}) raised {errors[0]!r}"
            assert took, f"wait({timeout}) did not return within {timeout + 3:g}s"
            return took[0]

        for timeout in (0.0, 0.2):
            took = timed_wait(timeout)
            assert took < timeout + 1.5, f"wait({timeout}) took {took:.2f}s"
        handle = h.launch(jobs.quick_job, "quick_step")
        h.poll_until_done(handle, within=120)
        took = timed_wait(0.3)
        assert took < 1.8, f"wait(0.3) after a step ended took {took:.2f}s"

    @pytest.mark.parametrize("when", ["before", "after"])
    def test_setup_failure_calls_teardown_once_and_keeps_the_error(
        self, instance: Instance, scratch: Path, when: str
    ) -> None:
        """A setup that raises (``before`` acquiring anything, or ``after``) gets teardown
        called once, and the error the run reports is setup's own (a ConfigError the CLI
        turns into exit code 2), not one teardown raised on the half-set-up handler."""
        v, store_url, run_id = _validated(self, instance, jobs.quick_job, self.kit_config(scratch))
        teardowns: list[int] = []

        class SetupFails(v.handler_cls):  # type: ignore[name-defined, misc]
            def setup(self) -> None:
                if when == "after":
                    super().setup()
                raise ConfigError("kit: setup failed on purpose")

            def teardown(self) -> None:
                teardowns.append(1)
                super().teardown()

        handler = SetupFails(v.config, HandlerContext(
            run_id=run_id, instance_home=str(instance.home) if instance.home else None,
            output_store=store_url, max_concurrent=v.max_concurrent,
        ))
        recorded: list[Event] = []
        engine = Engine(
            plan=v.plan, handler=handler, capabilities=v.capabilities, run_id=run_id, sink=recorded.extend,
            code_pointer=_pointer(jobs.quick_job), output_store=store_url, max_concurrent=v.max_concurrent,
            run_config=self.kit_config(scratch),
        )
        with pytest.raises(BaseException) as raised:
            engine.run()
        assert isinstance(raised.value, ConfigError) and str(raised.value) == "kit: setup failed on purpose", (
            f"setup's ConfigError was replaced by {type(raised.value).__name__}: {raised.value}"
        )
        assert teardowns == [1], f"teardown was called {len(teardowns)} times"
        # The engine keeps setup's error even when teardown raises over it, and says so in an
        # ENGINE event: teardown must cope with a setup that did not finish.
        complaints = [e.message for e in recorded if e.type is EventType.ENGINE and "teardown" in e.message]
        assert not complaints, f"teardown failed after setup raised: {complaints}"

    def test_handler_terminate_is_idempotent_and_safe_after_completion(self, handler_run: HandlerRun) -> None:
        h = handler_run
        handle = h.launch(jobs.quick_job, "quick_step")
        update_events, failure = h.poll_until_done(handle, within=120)
        assert failure is None and any(e.type is EventType.STEP_SUCCESS for e in update_events), update_events
        for kind in (FailureKind.CANCELED, FailureKind.CANCELED, FailureKind.TIMEOUT):
            try:
                h.handler.terminate(handle, kind)
            except NotImplementedError:
                if h.capabilities.can_terminate:
                    raise
            # Anything else raised is a failure: terminate after completion must be harmless.
        h.handler.poll(handle)  # a poll after completion must not raise either

    def test_stdout_stderr_and_log_records_reach_the_events(self, instance: Instance) -> None:
        """What a step prints and logs reaches its events once each, in order: every log
        record with its level and logger, stdout and stderr apart, a last piece without a
        newline included; on failure too."""
        result = self.execute(instance, jobs.chatty_job)
        assert result.status is RunStatus.FAILURE
        assert result.step_states == {"chatty": "success", "chatty_failing": "failed"}, (
            f"{result.step_states}; failures: {[e.message for e in result.events if e.type is EventType.STEP_FAILURE]}"
        )
        for key, what in (("chatty", "line"), ("chatty_failing", "before failing")):
            out = self._text(result, key, EventType.STEP_STDOUT)
            err = self._text(result, key, EventType.STEP_STDERR)
            for text, stream in ((f"kit stdout {what}\n", out), (f"kit unterminated stdout {what}", out),
                                 (f"kit stderr {what}\n", err)):
                name = "STEP_STDOUT" if stream is out else "STEP_STDERR"
                assert stream.count(text) == 1, (
                    f"step '{key}': {text!r} is in its {name} events {stream.count(text)} times, not once: {stream!r}"
                )
            assert "kit stderr" not in out and "kit stdout" not in err, "stdout and stderr are mixed up"
            logs = [(e.message, e.data.get("level"), e.data.get("logger"))
                    for e in result.events_for(key) if e.type is EventType.STEP_LOG and "kit " in e.message]
            expected = [(f"kit {lv.lower()} log {what}", lv, f"runyard.step.{key}") for lv in jobs.LOG_LEVELS]
            assert logs == expected, (
                f"step '{key}': its context.log records (at INFO and above) reached the STEP_LOG events as "
                f"{logs} (message, level, logger); expected each once, in order: {expected}"
            )
            types = [e.type for e in result.events_for(key) if e.type in _WORKER_EVENTS]
            assert types[:1] == [EventType.STEP_START], (
                f"step '{key}': its events do not start with STEP_START: {types}"
            )
            ending = EventType.STEP_SUCCESS if key == "chatty" else EventType.STEP_FAILURE
            assert types[-1:] == [ending] and all(t not in _ENDINGS for t in types[:-1]), (
                f"step '{key}': its events do not end with one {ending.value}: {types}"
            )
            if key == "chatty":
                assert EventType.STEP_OUTPUT in types, f"step '{key}': no STEP_OUTPUT before its ending: {types}"
        failure = result.failure_for("chatty_failing")
        assert failure is not None and failure.kind is FailureKind.ERROR
        assert failure.error_class == "builtins.ValueError" and "kit chatty failure" in failure.message

    def test_large_output_reaches_the_events_without_hanging(self, instance: Instance) -> None:
        """A step printing far more than a pipe holds is not blocked by its handler (a step
        is never a hang), and all it printed reaches its events. A run still going after
        `large_output_within` seconds is canceled, so a handler that blocks it fails here."""
        cancellation = Cancellation()
        watchdog = threading.Timer(self.large_output_within, cancellation.cancel)
        watchdog.daemon = True
        watchdog.start()
        started = time.monotonic()
        try:
            result = self.execute(instance, jobs.loud_job, cancellation=cancellation)
        finally:
            watchdog.cancel()
        assert result.success, (
            f"a step printing {jobs.BIG_OUTPUT + 1} characters did not succeed within "
            f"{time.monotonic() - started:.1f}s (canceled after {self.large_output_within:g}s): "
            f"{result.status}, {result.failure_for('loud')}"
        )
        loud = self._text(result, "loud", EventType.STEP_STDOUT)
        assert loud == "x" * jobs.BIG_OUTPUT + "\n", (
            f"a step printing {jobs.BIG_OUTPUT + 1} characters had {len(loud)} of them in its STEP_STDOUT events"
        )

    def test_running_step_start_and_first_output_are_in_storage_before_it_ends(
        self, instance: Instance, scratch: Path
    ) -> None:
        """A running step's STEP_START, a line it printed and a record it logged reach
        storage while it runs, within `live_within` seconds of being written, and so does
        the ending of the step before it: the step waits until the kit has seen them (or
        gives up after a while, and the test fails)."""
        found: dict[str, float] = {}
        said: dict[str, Any] = {}
        wanted = {
            "STEP_START of 'live_talker'": lambda e: e.type is EventType.STEP_START and e.step_key == "live_talker",
            "its stdout line": lambda e: e.type is EventType.STEP_STDOUT and e.step_key == "live_talker"
            and "kit live line\n" in str(e.data.get("text", "")),
            "its context.log record": lambda e: e.type is EventType.STEP_LOG and e.message == "kit live log",
            "STEP_SUCCESS of the step before it": lambda e: e.type is EventType.STEP_SUCCESS and e.step_key == "emit",
        }

        def watch() -> None:
            try:
                path = scratch / "live-said"
                if not wait_until(path.exists, self.live_start_within, every=0.02):
                    return
                said.update(json.loads(path.read_text()))
                give_up = said["t"] + self.live_within + 10
                while time.time() < give_up and len(found) < len(wanted):
                    for stored in instance.storage.get_events(said["run_id"]):
                        for name, matches in wanted.items():
                            if name not in found and matches(stored.event):
                                found[name] = time.time()
                    time.sleep(0.02)
            finally:
                (scratch / "live-seen").touch()  # the step may end now

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        result = self.execute(instance, jobs.live_job,
                              run_config=self.kit_config(scratch, live_wait=self.live_start_within + 30))
        watcher.join(15)
        assert said, f"step 'live_talker' never said it printed: {[e.message for e in result.events]}"
        assert result.success, [e.message for e in result.events if e.type is EventType.STEP_FAILURE]
        missing = [name for name in wanted if name not in found]
        assert not missing, (
            f"while step 'live_talker' ran (it waited {self.live_within + 10:g}s after printing), storage never "
            f"had: {', '.join(missing)}; the executor reports them only when the step ends (report them as they "
            "come: StepHandler.report, docs/plugins.md)"
        )
        late = {name: round(t - said["t"], 2) for name, t in found.items() if t - said["t"] > self.live_within}
        assert not late, (
            f"reached storage later than {self.live_within:g}s after the step wrote them (seconds): {late}"
        )
        out = self._text(result, "live_talker", EventType.STEP_STDOUT)
        assert out.count("kit live line\n") == 1, (
            f"the live line is in the step's output {out.count('kit live line')} times, not once"
        )
        starts = [e for e in result.events_for("live_talker") if e.type is EventType.STEP_START]
        assert len(starts) == 1, f"step 'live_talker' has {len(starts)} STEP_START events"

    def test_crashes_are_reported_with_their_kind(self, instance: Instance, scratch: Path) -> None:
        result = self.execute(instance, jobs.crash_job, run_config=self.kit_config(scratch))
        if not StepTrace(scratch, "exit_3").info or not StepTrace(scratch, "exit_3").info["owns_process"]:  # type: ignore[index]
            pytest.skip(f"steps of executor '{self.executor}' do not run in a process of their own: "
                        "a step that exits or kills itself would take others down")
        assert result.status is RunStatus.FAILURE
        exited = result.failure_for("exit_3")
        assert exited is not None, result.events
        assert exited.kind is FailureKind.WORKER_LOST, f"a step process exiting with 3 reported as {exited}"
        assert exited.exit_code == 3, f"exit code lost: {exited}"
        assert "3" in exited.message, exited.message
        assert result.step_states["double"] == "skipped"
        # Exit status 0 without an ending is a crash too: the step never returned.
        assert result.step_states["exit_0"] == "failed", (
            f"a step process that exited 0 without the step returning was recorded as {result.step_states['exit_0']}"
        )
        quit0 = result.failure_for("exit_0")
        assert quit0 is not None and quit0.kind is FailureKind.WORKER_LOST and quit0.exit_code == 0, (
            f"a step process exiting with 0 without an ending reported as {quit0} "
            "(expected WORKER_LOST with exit_code=0, from the handler)"
        )
        for key in ("exit_3", "exit_0") if self.events_survive_a_crash else ():
            said = [e.message for e in result.events_for(key) if e.type is EventType.STEP_LOG]
            assert f"kit last words of {key}" in said, (
                f"step '{key}' logged a record, then its process ended: the record did not reach its events "
                f"(a crash must keep the events reported before it): {said}"
            )
        killed = result.failure_for("kill_self")
        assert killed is not None, result.events
        # SIGKILL is not OOM unless the handler knows the OOM killer sent it.
        assert killed.kind is FailureKind.SIGNAL, f"a step process killed by SIGKILL reported as {killed}"
        assert killed.signal == 9, f"signal lost: {killed}"

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

    def test_max_concurrent_steps_really_run_at_the_same_time(self, instance: Instance, scratch: Path) -> None:
        cap = self.capabilities(instance).max_concurrency
        n = min(self.overlap, cap) if cap is not None else self.overlap
        if n < 2:
            pytest.skip(f"executor '{self.executor}' lacks capability 'max_concurrency' >= 2 (it has {cap})")
        result = self.execute(
            instance, jobs.rendezvous_job, config={"max_concurrent": n},
            run_config=self.kit_config(scratch, overlap=n, overlap_wait=self.overlap_wait),
        )
        assert result.success, (
            f"at max_concurrent={n}, {n} steps were not running at the same time: "
            f"{[e.message for e in result.events if e.type is EventType.STEP_FAILURE]}"
        )
        assert n <= max_overlap(result) <= n

    def test_handler_terminate_twice_stops_a_running_step(self, handler_run: HandlerRun, scratch: Path) -> None:
        h = handler_run
        if not h.capabilities.can_terminate:
            pytest.skip(f"executor '{h.executor}' lacks capability 'can_terminate'")
        trace = StepTrace(scratch, "beat_until_canceled")
        handle = h.launch(jobs.beat_cancel_job, "beat_until_canceled")
        errors: list[BaseException] = []
        stopped_at: list[float] = []

        def stop_when_beating() -> None:
            wait_until(lambda: len(trace.beats()) >= 3, 120)
            stopped_at.append(time.time())
            for _ in range(2):  # the second call must be harmless
                try:
                    h.handler.terminate(handle, FailureKind.CANCELED)
                except BaseException as e:
                    errors.append(e)

        stopper = threading.Thread(target=stop_when_beating, daemon=True)
        stopper.start()
        try:
            h.poll_until_done(handle, within=120 + self.stop_within,
                              until=lambda: stopped_at[0] + self.stop_within + 1 if stopped_at else None)
        finally:
            stopper.join(10)
        assert not errors, f"terminate raised: {errors[0]!r}"
        assert stopped_at, "the step never started beating"
        self.assert_stopped(None, scratch, "beat_until_canceled", stopped_at[0])
        h.handler.terminate(handle, FailureKind.CANCELED)  # after it ended: still harmless
        h.handler.poll(handle)

    def test_handler_terminate_right_after_launch_stops_the_step(self, handler_run: HandlerRun,
                                                                  scratch: Path) -> None:
        """A terminate that comes as soon as `launch` returned (a cancel at that moment),
        before the step's process or container may exist, is not lost: the attempt ends
        within `stop_within`, and the step never runs on."""
        h = handler_run
        if not h.capabilities.can_terminate:
            pytest.skip(f"executor '{h.executor}' lacks capability 'can_terminate'")
        handle = h.launch(jobs.beat_cancel_job, "beat_until_canceled")
        stopped_at = time.time()
        h.handler.terminate(handle, FailureKind.CANCELED)
        h.poll_until_done(handle, within=120, until=lambda: stopped_at + self.stop_within + 1)
        self.assert_stopped(None, scratch, "beat_until_canceled", stopped_at, may_not_run=True)

    def test_timeout_stops_the_step(self, instance: Instance, scratch: Path) -> None:
        self.require(instance, "enforces_timeouts")
        started = time.monotonic()
        result = self.execute(instance, jobs.beat_timeout_job, run_config=self.kit_config(scratch))
        elapsed = time.monotonic() - started
        assert result.status is RunStatus.FAILURE
        failure = result.failure_for("beat_timed")
        assert failure is not None and failure.kind is FailureKind.TIMEOUT, result.events
        assert result.step_states["double"] == "skipped"
        # The attempt that timed out is the retry (the first attempt failed at once).
        self.assert_stopped(result, scratch, "beat_timed", self._failure_time(result, "beat_timed"), attempt=2)
        assert elapsed < 3 + self.stop_within + 10, f"a 3 s timeout took {elapsed:.1f}s to end the run"

    def test_cancel_stops_running_step_and_skips_the_rest(self, instance: Instance, scratch: Path) -> None:
        self.require(instance, "can_terminate")
        cancellation = Cancellation()
        canceled_at: list[float] = []
        trace = StepTrace(scratch, "beat_until_canceled")

        def cancel_when_beating() -> None:
            wait_until(lambda: len(trace.beats()) >= 3, 120)
            canceled_at.append(time.time())
            cancellation.cancel()

        watcher = threading.Thread(target=cancel_when_beating, daemon=True)
        watcher.start()
        result = self.execute(instance, jobs.beat_cancel_job, run_config=self.kit_config(scratch),
                              cancellation=cancellation)
        watcher.join(5)
        assert canceled_at, f"the step never started beating: {result.events}"
        assert result.status is RunStatus.CANCELED
        failure = result.failure_for("beat_until_canceled")
        assert failure is not None and failure.kind is FailureKind.CANCELED
        assert result.step_states["double"] == "skipped"
        # The step ignores SIGTERM when it has a process of its own: the stop must not rely on it.
        self.assert_stopped(result, scratch, "beat_until_canceled", canceled_at[0])

    def test_step_processes_do_not_outlive_the_run(self, instance: Instance, scratch: Path) -> None:
        result = self.execute(instance, jobs.leave_child_job, run_config=self.kit_config(scratch))
        assert result.success, result.events
        trace = StepTrace(scratch, "leave_child_behind")
        if not trace.per_step_process:
            pytest.skip(f"steps of executor '{self.executor}' do not run in processes of their own on this "
                        "machine (in the kit's process, on a worker's thread, in a shared worker process, "
                        "or in a container)")
        wait_until(lambda: not trace.leftovers(), self.stop_within)
        left = trace.leftovers()
        assert not left, f"the run is over but these processes of its step still run: {'; '.join(left)}"

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

    def test_retries_until_success(self, instance: Instance) -> None:
        result = self.execute(instance, jobs.retry_job)
        assert result.success, result.events
        assert result.output_for("flaky") == 3
        retries = [e for e in result.events if e.type is EventType.STEP_RETRY]
        assert [e.data["next_attempt"] for e in retries] == [2, 3]
        attempt_ids = {e.attempt_id for e in result.events if e.type is EventType.STEP_FAILURE}
        assert len(attempt_ids) == 2  # every attempt has its own id
        # Every event of an attempt carries its attempt number: 1, then 2 and 3 for the retries.
        numbers: dict[str | None, set[int | None]] = {}
        for e in result.events_for("flaky"):
            if e.type in _WORKER_EVENTS:
                numbers.setdefault(e.attempt_id, set()).add(e.attempt)
        assert sorted(numbers.values(), key=str) == [{1}, {2}, {3}], (
            f"attempt numbers carried by the events of each attempt (by attempt_id): {numbers}"
        )

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

# -- driving a handler directly --------------------------------------------------------------


def _pointer(job: JobDefinition) -> CodePointer:
    return job.code_pointer or CodePointer(module="__main__")


def _validated(kit: ExecutorConformance, instance: Instance, job: JobDefinition,
               run_config: Mapping[str, Any]) -> tuple[Any, str, str]:
    """The run's validated settings, its output store's URL and a recorded run's id."""
    from types import SimpleNamespace

    from runyard.worker import register_job

    rc = {**run_config, "execution": {kit.executor: dict(kit.executor_config)}}
    validated = validate_run(job, instance=instance, executor=kit.executor, definitions=None, run_config=rc,
                             step_selection=None, parent_run_id=None)
    res = validated.resolution
    register_job(_pointer(job), job)
    store = instance.output_store(shared=res.capabilities.needs_shared_outputs)
    record = new_run_record(job, _pointer(job), rc, res, None, None, None)
    instance.storage.add_run(record)
    # The handler class and config exactly as a run gets them (one resolved max_concurrent).
    _, handler = prepare_handler(res, instance, run_id=record.run_id, output_store=store.url)
    v = SimpleNamespace(plan=validated.plan, config=handler.config, max_concurrent=res.max_concurrent,
                        capabilities=res.capabilities, handler_cls=type(handler))
    return v, store.url, record.run_id


class HandlerRun:
    """A handler of the kit's executor, set up as the engine sets it up, for tests that
    call it directly. `close` terminates what is left and tears it down."""

    def __init__(self, kit: ExecutorConformance, instance: Instance, scratch: Path) -> None:
        self.executor = kit.executor
        self.instance = instance
        self.run_config = kit.kit_config(scratch)
        v, self.store_url, self.run_id = _validated(kit, instance, jobs.quick_job, self.run_config)
        self.capabilities: Capabilities = v.capabilities
        self.handler: StepHandler = v.handler_cls(v.config, HandlerContext(
            run_id=self.run_id, instance_home=str(instance.home) if instance.home else None,
            output_store=self.store_url, max_concurrent=v.max_concurrent,
        ))
        self._kit = kit
        self._handles: list[Any] = []
        self._ended: list[Any] = []
        self.handler.setup()

    def launch(self, job: JobDefinition, step_key: str) -> Any:
        from runyard.worker import register_job

        register_job(_pointer(job), job)
        plan = ExecutionPlan.build(job, None)
        step = plan.steps[step_key].node.step
        request = StepRequest(
            run_id=self.run_id, step_key=step_key, attempt=1, attempt_id=uuid.uuid4().hex[:16],
            job_name=job.name, code_pointer=_pointer(job), output_store=self.store_url, inputs={},
            run_config={**self.run_config, "execution": {self.executor: dict(self._kit.executor_config)}},
            timeout=step.timeout, tags=step.tags,
        )
        handle = self.handler.launch(request)
        self._handles.append(handle)
        return handle

    def poll_until_done(
        self, handle: Any, within: float, until: Callable[[], float | None] | None = None
    ) -> tuple[list[Event], FailureInfo | None]:
        """Poll (and wait) as the engine does until the attempt is over, for at most
        ``within`` seconds, or until the wall-clock time ``until()`` returns, once it
        returns one (a stopped attempt must be over by then)."""
        events: list[Event] = []
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            limit = until() if until is not None else None
            if limit is not None and time.time() > limit:
                raise AssertionError(
                    f"the attempt was stopped, yet poll did not report it over within {self._kit.stop_within:g}s; "
                    f"its events: {events}"
                )
            update = self.handler.poll(handle)
            events.extend(update.events)
            if update.done:
                self._ended.append(handle)
                return events, update.failure
            self.handler.wait(0.05)
        raise AssertionError(f"the attempt did not end within {within:g}s; its events: {events}")

    def close(self) -> None:
        """Stop what a failed test left running (errors here are not the test's verdict:
        the tests check terminate and poll themselves), then tear the handler down."""
        try:
            for handle in self._handles:
                if any(handle is e for e in self._ended):
                    continue
                try:
                    self.handler.terminate(handle, FailureKind.CANCELED)
                    deadline = time.monotonic() + self._kit.stop_within
                    while time.monotonic() < deadline and not self.handler.poll(handle).done:
                        time.sleep(0.05)
                except Exception:  # noqa: S110 - best effort clean-up
                    pass
        finally:
            self.handler.teardown()
