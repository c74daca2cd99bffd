"""The run-launcher conformance kit: the behaviour every run launcher must show.

Subclass `RunLauncherConformance`, set ``launcher`` (and ``launcher_config`` when the
launcher needs settings), and run pytest::

    from runyard.testing.launchers import RunLauncherConformance

    class TestMyLauncher(RunLauncherConformance):
        launcher = "my_launcher"
        launcher_config = {"nice": 10}

The kit launches real runs through runyard's own run machinery (the same calls as
``runyard job launch``, ``run wait`` and ``run cancel``) on an instance whose
``runyard.yaml`` selects the launcher, and checks what the launcher's workers really do:

- ``launch`` returns while the run is still going, and the run succeeds; it works
  without the environment's ``bin`` directory on PATH;
- ``check_health`` says RUNNING for a live worker and FINISHED or DEAD (never RUNNING or
  UNKNOWN) once the run is over, from this process and from a fresh one;
- ``runyard run cancel``, from another process, ends the run CANCELED by the worker
  itself (its step is recorded canceled) within the grace period, and afterwards nothing
  the run started still runs (a step and a child process it spawned stop beating);
- ``terminate`` is idempotent, and safe on a finished run; with ``force`` on a running
  worker it stops everything the run started, though the worker had no chance to;
- a worker killed with SIGKILL is reported DEAD, with a reason naming the signal, the run
  ends FAILURE with that reason, and what the worker left running is stopped.

Requirements: the launcher is installed (a ``runyard`` entry point), since the kit runs
``runyard run cancel`` and health checks in fresh processes. The kit's jobs
(`runyard.testing.launcher_jobs`) run on the ``in_process`` executor, in the run worker
itself, and talk to the kit through files in a scratch directory under the instance's
``RUNYARD_HOME``: the worker must see that directory at the same path (it must see
``RUNYARD_HOME`` anyway, for SQLite storage). Override the ``instance`` fixture to
configure the instance otherwise (storage, outputs, the launcher's settings from other
fixtures), ``scratch`` to put the files elsewhere, and `leftovers` to add a check of your
own for things the run left behind (containers, pods).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from runyard.definitions import CodePointer
from runyard.events import EventType, FailureKind
from runyard.instance import Instance
from runyard.loader import load_job
from runyard.plugin import RunLauncher, WorkerHealth, WorkerStatus
from runyard.runs import check_run, create_run, get_launcher, launch_run, wait_for_run, worker_info
from runyard.storage import RunRecord, RunStatus

JOBS = "runyard.testing.launcher_jobs"
KILLED = re.compile(r"SIGKILL|signal 9\b|\b137\b")

def launch_job(instance: Instance, pointer: CodePointer, job_name: str, *,
               run_config: dict[str, Any] | None = None, executor: str | None = None) -> RunRecord:
    """Create a run of ``job_name`` and hand it to the instance's run launcher, as
    ``runyard job launch`` does; returns the run record as launched. For a backend's own
    launcher tests beyond the kit."""
    job, loc = load_job(pointer, job_name)
    run = create_run(instance, job, pointer=pointer, definitions=loc.definitions, run_config=run_config or {},
                     executor=executor)
    return launch_run(instance, run)


def wait_for(instance: Instance, run_id: str, timeout: float) -> Any:
    """Wait for a launched run to end, checking its worker's health every 0.5 s (a dead
    worker fails the run, as ``runyard run wait`` does); returns the run's result."""
    return wait_for_run(instance, run_id, timeout=timeout, health_every=0.5)


def launcher_of(instance: Instance, run_id: str) -> tuple[RunLauncher, dict[str, Any]]:
    """The run launcher of a launched run, rebuilt from the instance as a ``runyard run``
    command would, and the worker description its launch recorded."""
    name, worker = worker_info(instance, run_id)
    return get_launcher(instance, name)[1], dict(worker)


# Run in a fresh interpreter: the launcher rebuilt from the instance, as `runyard run ...`
# commands do, with no memory of the launch.
_FRESH = """
import json, sys
from runyard.instance import Instance
from runyard.runs import get_launcher, worker_info

home, run_id, what = sys.argv[1:4]
instance = Instance(home)
run = instance.storage.get_run(run_id)
name, worker = worker_info(instance, run_id)
_, launcher = get_launcher(instance, name)
if what == "check_health":
    health = launcher.check_health(run, worker)
    print(json.dumps({"status": str(health.status), "message": health.message}))
else:
    launcher.terminate(run, worker, force=(what == "force"))
    print(json.dumps({}))
"""


class Launched:
    """A run the kit launched: its record (as last read), the worker data, the scratch dir."""

    def __init__(self, instance: Instance, run: RunRecord, worker: Mapping[str, Any], scratch: Path) -> None:
        self.instance = instance
        self.run = run
        self.worker = worker
        self.scratch = scratch

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def refresh(self) -> RunRecord:
        self.run = self.instance.storage.get_run(self.run_id) or self.run
        return self.run

    def events(self, *types: EventType) -> list[Any]:
        stored = self.instance.storage.get_events(self.run_id, types=list(types) or None)
        return [s.event for s in stored]

    def story(self) -> str:
        """The run's events, for assertion messages."""
        lines = [f"run {self.run_id} is {self.refresh().status.value}; worker {dict(self.worker)}"]
        for ev in self.events():
            lines.append(f"  {ev.type.value} {ev.step_key or ''} {ev.message}"[:400])
        log = self.worker.get("log") if isinstance(self.worker, Mapping) else None
        if log and Path(str(log)).exists():
            lines.append("worker log:\n" + Path(str(log)).read_text(errors="replace")[-2000:])
        return "\n".join(lines)


class RunLauncherConformance:
    """Reusable tests for a run launcher. Set ``launcher`` in the subclass."""

    launcher: ClassVar[str] = ""
    launcher_config: ClassVar[Mapping[str, Any]] = {}
    executor: ClassVar[str] = "in_process"  # steps in the worker itself: the kill test relies on it
    killed_job: ClassVar[str] = "kit_killed_job"  # the job of the kill test (see `kill_worker`)

    launch_timeout: ClassVar[float] = 30.0  # `launch` must return within this
    start_timeout: ClassVar[float] = 120.0  # a launched worker must be running its step within this
    stop_timeout: ClassVar[float] = 30.0  # a terminated worker must have ended the run within this
    health_timeout: ClassVar[float] = 30.0  # a dead or finished worker must be reported within this
    cancel_grace: ClassVar[float] = 20.0  # `runyard run cancel --grace`; the worker must stop before it
    quiet_period: ClassVar[float] = 1.0  # heartbeats unchanged this long: nothing of the run runs

    # -- fixtures and hooks a subclass may override ---------------------------------------

    @pytest.fixture
    def instance(self, runyard_make_instance: Any) -> Instance:
        """The instance runs use: ``runyard.yaml`` selects the launcher with ``launcher_config``."""
        assert self.launcher, 'set `launcher = "name"` on the conformance subclass'
        return runyard_make_instance({"run_launcher": {self.launcher: dict(self.launcher_config)}})

    @pytest.fixture
    def scratch(self, instance: Instance) -> Iterator[Path]:
        """Where the kit's steps and the kit exchange files; the worker must see the same path."""
        assert instance.home is not None, "the kit needs an instance with a RUNYARD_HOME"
        path = instance.home / "kit-scratch"
        path.mkdir()
        yield path
        # Whatever a failing launcher left running stops now, not after its 300 s lifetime.
        (path / "stop").write_text("stop")
        time.sleep(0.3)

    def leftovers(self, launched: Launched) -> list[str]:
        """Descriptions of anything of the run still there once it ended and was terminated
        with ``force`` (containers, pods, cloud jobs). The kit's own check, that the step and
        its child stop beating, needs no help; override to add yours."""
        return []

    def kill_worker(self, launched: Launched) -> None:
        """SIGKILL the run worker of ``launched`` (a run of ``killed_job``) while its step
        runs. The kit's way: its step runs in the worker's own process (``in_process``) and
        kills it when ``kill`` appears. A launcher made for an executor whose steps run
        elsewhere sets ``executor``, ``killed_job = "kit_heartbeat_job"`` and kills the
        worker its own way here (from outside, as the OOM killer would)."""
        (launched.scratch / "kill").write_text("kill")

    # -- helpers ----------------------------------------------------------------------------

    def launcher_object(self, instance: Instance, launched: Launched) -> RunLauncher:
        name = worker_info(instance, launched.run_id)[0]
        return get_launcher(instance, name)[1]

    def start(self, instance: Instance, scratch: Path, job_name: str) -> Launched:
        """Create a run of ``job_name`` and launch it as ``runyard job launch`` does, with the
        environment's bin directory (and any other ``runyard`` command) off PATH, and fail
        if ``launch`` does not return within ``launch_timeout``."""
        pointer = CodePointer(module=JOBS)
        job, loc = load_job(pointer, job_name)
        run = create_run(
            instance,
            job,
            pointer=pointer,
            definitions=loc.definitions,
            run_config={"kit": {"scratch": str(scratch)}},
            executor=self.executor,
        )
        outcome: dict[str, Any] = {}

        def launch() -> None:
            try:
                outcome["run"] = launch_run(instance, run)
            except BaseException as e:  # reported below, in the test's thread
                outcome["error"] = e

        saved_path = os.environ.get("PATH", "")
        os.environ["PATH"] = os.pathsep.join(
            d for d in saved_path.split(os.pathsep) if d and not (Path(d) / "runyard").exists()
        )
        try:
            thread = threading.Thread(target=launch, name="kit-launch", daemon=True)
            started = time.monotonic()
            thread.start()
            thread.join(self.launch_timeout)
        finally:
            os.environ["PATH"] = saved_path
        if thread.is_alive():
            # Let a launch that waits for its worker return, so the test leaves nothing behind.
            for flag in ("go", "stop"):
                (scratch / flag).write_text(flag)
            thread.join(60)
            pytest.fail(
                f"launch() did not return within {self.launch_timeout:g}s (it returned after "
                f"{time.monotonic() - started:.1f}s, once the kit let the run end): it must return as soon as "
                "the run worker is started, not when the run ends",
                pytrace=False,
            )
        if "error" in outcome:
            raise AssertionError(f"launching the run failed: {outcome['error']!r}") from outcome["error"]
        name, worker = worker_info(instance, run.run_id)
        assert name == self.launcher, f"the run was launched with '{name}', not '{self.launcher}'"
        assert isinstance(worker, Mapping) and json.loads(json.dumps(worker)) == worker
        return Launched(instance, outcome["run"], worker, scratch)

    def wait_until_started(self, launched: Launched) -> dict[str, Any]:
        """Wait for the step to announce itself; fail early if the run ends first."""
        marker = launched.scratch / "started"
        deadline = time.monotonic() + self.start_timeout
        while not marker.exists():
            run = check_run(launched.instance, launched.refresh())
            if run.status.is_finished:
                pytest.fail(f"the run ended before its step started:\n{launched.story()}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"the step did not start within {self.start_timeout:g}s:\n{launched.story()}",
                            pytrace=False)
            time.sleep(0.05)
        return json.loads(marker.read_text())

    def health(self, instance: Instance, launched: Launched) -> WorkerHealth:
        health = self.launcher_object(instance, launched).check_health(launched.refresh(), launched.worker)
        assert isinstance(health, WorkerHealth), f"check_health returned {health!r}, not a WorkerHealth"
        assert isinstance(health.status, WorkerStatus)
        return health

    def health_when_not_running(self, instance: Instance, launched: Launched, timeout: float) -> WorkerHealth:
        deadline = time.monotonic() + timeout
        while True:
            health = self.health(instance, launched)
            if not health.is_running or time.monotonic() > deadline:
                return health
            time.sleep(0.1)

    def in_fresh_process(self, instance: Instance, launched: Launched, what: str) -> dict[str, Any]:
        """``check_health``, ``terminate`` or ``force`` (terminate with force) called from a
        new interpreter that knows the run only from storage."""
        done = subprocess.run(
            [sys.executable, "-c", _FRESH, str(instance.home), launched.run_id, what],
            env={**os.environ, "RUNYARD_HOME": str(instance.home)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{what} in a fresh process failed:\n{done.stdout}{done.stderr}"
        return json.loads(done.stdout.strip().splitlines()[-1])

    def beats(self, scratch: Path) -> tuple[str, str]:
        def read(name: str) -> str:
            try:
                return (scratch / name).read_text()
            except OSError:
                return ""

        return read("step-beat"), read("child-beat")

    def assert_beating(self, scratch: Path) -> None:
        first = self.beats(scratch)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = self.beats(scratch)
            if now[0] != first[0] and now[1] != first[1]:
                return
        pytest.fail("the kit's step and its child process are not beating: the kit cannot check anything",
                    pytrace=False)

    def assert_nothing_running(self, launched: Launched, when: str) -> None:
        """The step and the child it spawned have stopped beating, and `leftovers` is empty."""
        before = self.beats(launched.scratch)
        time.sleep(self.quiet_period)
        after = self.beats(launched.scratch)
        alive = [who for who, a, b in zip(("the step", "the step's child process"), before, after, strict=True)
                 if a != b]
        assert not alive, (
            f"{' and '.join(alive)} still running {when}: the launcher must stop every process of the run "
            f"(terminate with force, or when it reports the worker dead)\n{launched.story()}"
        )
        left = self.leftovers(launched)
        assert not left, f"left behind {when}: {left}"

    def wait_for_end(self, launched: Launched, timeout: float) -> RunRecord:
        result = wait_for_run(launched.instance, launched.run_id, timeout=timeout, health_every=0.5)
        assert not result.timed_out, f"the run did not end within {timeout:g}s:\n{launched.story()}"
        return launched.refresh()

    # -- the contract ---------------------------------------------------------------------------

    def test_launch_returns_at_once_and_the_run_succeeds(self, instance: Instance, scratch: Path) -> None:
        launched = self.start(instance, scratch, "kit_gated_job")
        self.wait_until_started(launched)
        assert launched.refresh().status is RunStatus.STARTED, launched.story()
        health = self.health(instance, launched)
        assert health.status is WorkerStatus.RUNNING, (
            f"check_health of a running worker said {health.status.value}: {health.message!r}"
        )
        (scratch / "go").write_text("go")
        run = self.wait_for_end(launched, self.start_timeout)
        assert run.status is RunStatus.SUCCESS, launched.story()
        outputs = {e.step_key: e.data["ref"] for e in launched.events(EventType.STEP_OUTPUT)}
        assert instance.output_store(shared=True).get(outputs["kit_plus_one"]) == 42

    def test_health_and_terminate_of_a_finished_run(self, instance: Instance, scratch: Path) -> None:
        (scratch / "go").write_text("go")  # the gate is open: the run ends by itself
        launched = self.start(instance, scratch, "kit_gated_job")
        run = self.wait_for_end(launched, self.start_timeout)
        assert run.status is RunStatus.SUCCESS, launched.story()
        health = self.health_when_not_running(instance, launched, self.health_timeout)
        assert health.is_gone, (
            f"the run ended {self.health_timeout:g}s ago, but check_health says {health.status.value} "
            f"({health.message!r}); expected FINISHED (or DEAD)"
        )
        fresh = self.in_fresh_process(instance, launched, "check_health")
        assert fresh["status"] in ("finished", "dead"), f"check_health in a fresh process: {fresh}"
        launcher = self.launcher_object(instance, launched)
        for force in (False, False, True, True):
            launcher.terminate(launched.refresh(), launched.worker, force=force)
        self.in_fresh_process(instance, launched, "terminate")
        assert check_run(instance, launched.refresh()).status is RunStatus.SUCCESS, launched.story()

    def test_cancel_from_another_process_ends_the_run_canceled(self, instance: Instance, scratch: Path) -> None:
        launched = self.start(instance, scratch, "kit_heartbeat_job")
        self.wait_until_started(launched)
        self.assert_beating(scratch)
        began = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "runyard", "run", "cancel", launched.run_id, "--grace", f"{self.cancel_grace:g}"],
            env={**os.environ, "RUNYARD_HOME": str(instance.home)},
            capture_output=True,
            text=True,
            timeout=self.cancel_grace + 120,
        )
        took = time.monotonic() - began
        assert done.returncode == 0, f"runyard run cancel failed:\n{done.stdout}{done.stderr}"
        assert launched.refresh().status is RunStatus.CANCELED, launched.story()
        canceled = [e for e in launched.events(EventType.STEP_FAILURE)
                    if e.step_key == "kit_beat" and e.failure is not None and e.failure.kind is FailureKind.CANCELED]
        assert canceled, (
            "terminate (without force) did not make the worker cancel its step: the worker must get SIGTERM "
            f"(or the equivalent) and end the run itself\n{launched.story()}"
        )
        assert took < self.cancel_grace, (
            f"runyard run cancel took {took:.1f}s, the whole {self.cancel_grace:g}s grace: the worker had ended "
            f"the run, but check_health did not report it gone\n{launched.story()}"
        )
        self.assert_nothing_running(launched, "after `runyard run cancel`")
        assert not self.health(instance, launched).is_running

    def test_terminate_is_idempotent_and_force_leaves_nothing(self, instance: Instance, scratch: Path) -> None:
        launched = self.start(instance, scratch, "kit_heartbeat_job")
        self.wait_until_started(launched)
        self.assert_beating(scratch)
        launcher = self.launcher_object(instance, launched)
        launcher.terminate(launched.refresh(), launched.worker)
        launcher.terminate(launched.refresh(), launched.worker)
        deadline = time.monotonic() + self.stop_timeout
        while not launched.refresh().status.is_finished and time.monotonic() < deadline:
            time.sleep(0.05)
        assert launched.run.status is RunStatus.CANCELED, (
            f"{self.stop_timeout:g}s after terminate() the run is {launched.run.status.value}, not CANCELED: "
            f"terminate without force must make the worker cancel the run\n{launched.story()}"
        )
        health = self.health_when_not_running(instance, launched, self.health_timeout)
        assert health.is_gone, f"the worker canceled the run, but check_health says {health}"
        for _ in range(2):
            launcher.terminate(launched.refresh(), launched.worker, force=True)
        self.in_fresh_process(instance, launched, "force")
        self.assert_nothing_running(launched, "after terminate(force=True)")
        launcher.terminate(launched.refresh(), launched.worker)
        assert launched.refresh().status is RunStatus.CANCELED

    def test_force_terminate_of_a_running_worker_leaves_nothing(self, instance: Instance, scratch: Path) -> None:
        # No polite request first: the worker gets no chance to clean up after its steps,
        # so whatever they started must be stopped by the launcher itself.
        launched = self.start(instance, scratch, "kit_heartbeat_job")
        self.wait_until_started(launched)
        self.assert_beating(scratch)
        launcher = self.launcher_object(instance, launched)
        launcher.terminate(launched.refresh(), launched.worker, force=True)
        self.assert_nothing_running(launched, "after terminate(force=True) of a running worker")
        health = self.health_when_not_running(instance, launched, self.health_timeout)
        assert health.is_gone, f"the worker was killed, but check_health says {health}"
        run = self.wait_for_end(launched, self.health_timeout)
        assert run.status is RunStatus.FAILURE, launched.story()  # its worker died before it ended

    def test_killed_worker_is_reported_dead_with_the_reason(self, instance: Instance, scratch: Path) -> None:
        launched = self.start(instance, scratch, self.killed_job)
        self.wait_until_started(launched)
        self.assert_beating(scratch)
        assert self.health(instance, launched).is_running, launched.story()
        self.kill_worker(launched)
        health = self.health_when_not_running(instance, launched, self.health_timeout)
        assert health.status is WorkerStatus.DEAD, (
            f"the worker was killed with SIGKILL; check_health says {health.status.value} ({health.message!r}), "
            "expected DEAD"
        )
        assert KILLED.search(health.message), (
            f"check_health says DEAD, but its reason {health.message!r} does not say the worker was killed by "
            "SIGKILL (name the signal, or exit code 137)"
        )
        run = self.wait_for_end(launched, self.health_timeout)
        assert run.status is RunStatus.FAILURE, launched.story()
        (failure,) = launched.events(EventType.RUN_FAILURE)
        assert KILLED.search(failure.message), f"the run's failure does not give the reason: {failure.message!r}"
        self.assert_nothing_running(launched, "after the worker was reported dead")
