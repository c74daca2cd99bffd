"""The multiprocess executor's own edges: processes that die without reporting, memory
limits, timeouts and cancels that must take a step's children with them, output captured
at the file-descriptor level, a run worker killed while steps run, and jobs that cannot be
loaded in another process.

Jobs live in files under tmp_path and are loaded through a code pointer, as step processes
load them. Steps write the pids to watch into a scratch directory from the run config.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from runyard.definitions import CodePointer, JobDefinition
from runyard.engine import Cancellation
from runyard.errors import ConfigError
from runyard.events import EventType, FailureKind
from runyard.execution import ExecutionResult, execute_job
from runyard.instance import Instance
from runyard.loader import load_job
from runyard.plugin import StepRequest
from runyard.storage import RunStatus

METHODS = ["forkserver", "fork", "spawn"]
# Methods whose step processes' own children are cleaned up even when the run worker is
# SIGKILLed (fork: only the step processes themselves die with it; see the docs).
SUPERVISED = ["forkserver", "spawn"]

JOBS = '''
import ctypes
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from runyard import RetryPolicy, job, step

# Each import of this file, in whatever process, leaves a line here.
if os.environ.get("MP_TEST_IMPORTS"):
    with open(os.environ["MP_TEST_IMPORTS"], "a") as f:
        f.write(f"{os.getpid()}\\n")


def scratch(context) -> Path:
    return Path(context.run_config["scratch"])


def record_pids(context, child) -> None:
    # Written then renamed, so a reader never sees half a file.
    tmp = scratch(context) / f".{context.step_key}.tmp"
    tmp.write_text(f"{os.getpid()} {child.pid} {os.getppid()}")
    tmp.rename(scratch(context) / f"{context.step_key}-{context.attempt}.pids")


@step
def exit3() -> int:
    os._exit(3)


@step
def sigkill() -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return 0


@step
def segfault() -> int:
    ctypes.string_at(0)  # reads address 0: SIGSEGV
    return 0


@step
def hog() -> int:
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
    big = bytearray(4 << 30)
    return len(big)


@step
def sleeper(context) -> int:
    child = subprocess.Popen(["sleep", "300"])
    record_pids(context, child)
    time.sleep(300)
    return 0


@step(timeout=3.0)  # time enough for a spawned interpreter to start on a busy machine
def timed_sleeper(context) -> int:
    child = subprocess.Popen(["sleep", "300"])
    record_pids(context, child)
    time.sleep(300)
    return 0


@step(retry=RetryPolicy(max_retries=2))
def crash_then_succeed(context) -> int:
    if context.attempt == 1:
        os._exit(7)
    if context.attempt == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return context.attempt


@step(retry=RetryPolicy(max_retries=1))
def kill_fork_server(context) -> int:
    if context.attempt == 1:
        os.kill(os.getppid(), signal.SIGKILL)  # the fork server: we die with it
        time.sleep(30)
    return os.getppid()


@step
def chatty() -> int:
    print("print to stdout")
    os.write(1, b"fd 1 write\\n")
    os.write(2, b"fd 2 write\\n")
    print("print to stderr", file=sys.stderr)
    subprocess.run(["sh", "-c", "echo sub out; echo sub err >&2"], check=True)
    ctypes.CDLL(None).printf(b"C printf\\n")
    return 1


@step
def leave_background(context) -> int:
    same_group = subprocess.Popen(["sleep", "300"])
    detached = subprocess.Popen(["sleep", "300"], start_new_session=True)
    (scratch(context) / "background.pids").write_text(f"{same_group.pid} {detached.pid}")
    return 0


@step
def whoami() -> int:
    return os.getpid()


@step
def parent_cmdline() -> str:
    return Path(f"/proc/{os.getppid()}/cmdline").read_text().replace("\\0", " ")


@step
def inc(x: int) -> int:
    return x + 1


@job
def exit_job():
    exit3()


@job
def sigkill_job():
    sigkill()


@job
def segfault_job():
    segfault()


@job
def hog_job():
    hog()


@job
def timeout_job():
    inc(timed_sleeper())


@job
def cancel_job():
    inc(sleeper())


@job
def two_sleepers_job():
    sleeper()
    sleeper.alias("sleeper_2")()


@job
def retry_job():
    crash_then_succeed()


@job
def lost_server_job():
    kill_fork_server()


@job
def chatty_job():
    chatty()


@job
def background_job():
    leave_background()


@job
def pid_job():
    whoami()
    whoami.alias("whoami_2")()
    whoami.alias("whoami_3")()


@job
def parent_job():
    parent_cmdline()
'''


@pytest.fixture
def job_file(tmp_path: Path) -> Path:
    path = tmp_path / "mp_jobs.py"
    path.write_text(JOBS)
    return path


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    d = tmp_path / "scratch"
    d.mkdir()
    return d


@pytest.fixture
def load(job_file: Path) -> Callable[[str], JobDefinition]:
    def get(name: str) -> JobDefinition:
        job, _ = load_job(CodePointer(file=str(job_file)), name)
        return job

    return get


def run(
    instance: Instance, job: JobDefinition, method: str, scratch: Path, *,
    executor: str = "multiprocess", cancellation: Cancellation | None = None, **settings: Any,
) -> ExecutionResult:
    config = {"start_method": method, "terminate_grace": 1.0, **settings}
    return execute_job(
        job, instance=instance, executor=executor, cancellation=cancellation,
        run_config={"scratch": str(scratch), "execution": {executor: config}},
    )


def alive(pid: int) -> bool:
    """Still running: a zombie (dead, not yet reaped by its parent) does not count."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # ESRCH when it exits between open and read
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def gone(method: str, *pids: int) -> bool:
    """The processes were killed. With the fork server they are gone by the time the run
    returns: it reaps every process of the run (and what left its group is re-parented to
    it) before it exits. With fork, what a step started is re-parented to init, and a
    signal is delivered asynchronously: it may take a moment to die after the kill."""
    if method in SUPERVISED:
        return not any(alive(p) for p in pids)
    return wait_until(lambda: not any(alive(p) for p in pids), 3)


def pids(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()]


@pytest.fixture(params=METHODS)
def method(request: pytest.FixtureRequest) -> str:
    return request.param


# -- processes that die without reporting -------------------------------------------------


def test_exit_without_reporting_is_worker_lost_with_the_exit_code(
    runyard_instance: Instance, load: Callable[[str], JobDefinition], scratch: Path, method: str
) -> None:
    result = run(runyard_instance, load("exit_job"), method, scratch)
    assert result.status is RunStatus.FAILURE
    failure = result.failure_for("exit3")
    assert failure is not None and failure.kind is FailureKind.WORKER_LOST
    assert failure.exit_code == 3 and failure.signal is None
    assert "exited with code 3 without reporting success or failure" in failure.message
    # It never got to report its STEP_START: the executor does, with the process's pid.
    (start,) = [e for e in result.events_for("exit3") if e.type is EventType.STEP_START]
    assert f"(pid {start.data['pid']})" in failure.message


def test_killed_by_a_signal_is_signal_with_its_number(
    runyard_instance: Instance, load: Callable[[str], JobDefinition], scratch: Path, method: str
) -> None:
    result = run(runyard_instance, load("sigkill_job"), method, scratch)
    failure = result.failure_for("sigkill")
    assert failure is not None and failure.kind is FailureKind.SIGNAL
    assert failure.signal == signal.SIGKILL and failure.exit_code is None
    assert "killed by SIGKILL (9)" in failure.message


def test_segfault_is_signal_and_keeps_the_python_traceback(
    runyard_instance: Instance, load: Callable[[str], JobDefinition], scratch: Path, method: str
) -> None:
    result = run(runyard_instance, load("segfault_job"), method, scratch)
    failure = result.failure_for("segfault")
    assert failure is not None and failure.kind is FailureKind.SIGNAL
    assert failure.signal == signal.SIGSEGV
    # faulthandler writes the step's Python stack to stderr: stored, and quoted in the failure.
    stderr = [e for e in result.events_for("segfault") if e.type is EventType.STEP_STDERR]
    assert len(stderr) == 1 and "Segmentation fault" in stderr[0].data["text"]
    assert "in segfault" in failure.message


def test_memory_error_in_the_step_is_oom(
    runyard_instance: Instance, load: Callable[[str], JobDefinition], scratch: Path, method: str
) -> None:
    result = run(runyard_instance, load("hog_job"), method, scratch)
    failure = result.failure_for("hog")
    assert failure is not None and failure.kind is FailureKind.OOM, failure
    assert failure.error_class == "builtins.MemoryError"


def test_retries_apply_after_crashes(
    runyard_instance: Instance, load: Callable[[str], JobDefinition], scratch: Path, method: str
) -> None:
    result = run(runyard_instance, load("retry_job"), method, scratch)
    assert result.success, result.events
    assert result.output_for("crash_then_succeed") == 3
    failures = [e.failure for e in result.events if e.type is EventType.STEP_FAILURE]
    assert [(f.kind, f.exit_code, f.signal) for f in failures if f] == [
        (FailureKind.WORKER_LOST, 7, None),
        (FailureKind.SIGNAL, None, signal.SIGKILL),
    ]
    assert [e.data["next_attempt"] for e in result.events if e.type is EventType.STEP_RETRY] == [2, 3]


@pytest.mark.parametrize("method", SUPERVISED)
def test_a_dead_fork_server_fails_its_steps_and_the_next_attempt_gets_a_new_one(
    runyard_instance: Instance, load: Callable[[str], JobDefinition], scratch: Path, method: str
) -> None:
    started = time.monotonic()
    result = run(runyard_instance, load("lost_server_job"), method, scratch)
    assert time.monotonic() - started < 30
    assert result.success, result.events
    (failure,) = [e.failure for e in result.events if e.type is EventType.STEP_FAILURE]
    assert failure is not None
    # Either the fork server's death (end of file) or the step's own (PDEATHSIG) is seen first.
    assert failure.kind in (FailureKind.WORKER_LOST, FailureKind.SIGNAL), failure


@contextlib.contextmanager
def another_thread() -> Iterator[None]:
    """A second thread in this process while the block runs: the executor then starts its
    fork server as a fresh interpreter rather than by forking this process."""
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    try:
        yield
    finally:
        stop.set()
        other.join()


def wait_single_threaded(within: float = 15.0) -> None:
    """Wait until this (pytest's) process has no other thread: an earlier test's threads
    (a pool or a client winding down) may still be ending, and the executor would then
    rightly exec its fork server rather than fork."""
    from runyard.plugin import single_threaded

    deadline = time.monotonic() + within
    while not single_threaded():
        if time.monotonic() > deadline:
            others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
            pytest.fail(f"pytest's process still has other threads after {within:g}s: Python threads {others}, "
                        f"{len(os.listdir('/proc/self/task'))} native tasks in all: an earlier test leaks them, "
                        "or a native watchdog runs (pytest's faulthandler_timeout starts one)")
        time.sleep(0.05)


@pytest.mark.parametrize("threads", [False, True])
def test_the_fork_server_is_forked_from_a_single_threaded_run_worker_and_execd_otherwise(
    runyard_instance: Instance, load: Callable[[str], JobDefinition], scratch: Path, threads: bool
) -> None:
    if not threads:
        wait_single_threaded()
    with another_thread() if threads else contextlib.nullcontext():
        result = run(runyard_instance, load("parent_job"), "forkserver", scratch)
    assert result.success, result.events
    cmdline = result.output_for("parent_cmdline")
    # Exec'd: "python -m runyard_local.mp_zygote ..."; forked: this process's command line.
    assert ("runyard_local.mp_zygote" in cmdline) is threads, cmdline
    if not threads:
        assert cmdline == Path("/proc/self/cmdline").read_text().replace("\0", " ")


def test_a_fork_server_that_cannot_start_fails_the_steps_as_not_started(
    runyard_instance: Instance, load: Callable[[str], JobDefinition], scratch: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho 'no runyard here' >&2\nexit 3\n")
    broken.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(broken))
    started = time.monotonic()
    with another_thread():  # so that the fork server is exec'd (with the broken interpreter)
        result = run(runyard_instance, load("pid_job"), "forkserver", scratch)
    assert time.monotonic() - started < 30
    assert result.status is RunStatus.FAILURE
    failure = result.failure_for("whoami")
    assert failure is not None and failure.kind is FailureKind.NOT_STARTED, failure
    assert "the fork server exited with code 3 before it was ready" in failure.message
    assert "no runyard here" in failure.message


# -- stopping steps: the process and everything it started --------------------------------


def test_timeout_kills_the_step_process_and_its_children(
    runyard_instance: Instance, load: Callable[[str], JobDefinition], scratch: Path, method: str
) -> None:
    started = time.monotonic()
    result = run(runyard_instance, load("timeout_job"), method, scratch)
    assert time.monotonic() - started < 15
    failure = result.failure_for("timed_sleeper")
    assert failure is not None and failure.kind is FailureKind.TIMEOUT
    assert result.step_states["inc"] == "skipped"
    step_pid, child_pid, _ = pids(scratch / "timed_sleeper-1.pids")
    assert gone(method, step_pid, child_pid)


def test_cancel_kills_the_step_process_and_its_children(
    runyard_instance: Instance, load: Callable[[str], JobDefinition], scratch: Path, method: str
) -> None:
    cancellation = Cancellation()
    pid_file = scratch / "sleeper-1.pids"

    def cancel_when_started() -> None:
        wait_until(pid_file.exists, 60)
        cancellation.cancel()

    threading.Thread(target=cancel_when_started, daemon=True).start()
    started = time.monotonic()
    result = run(runyard_instance, load("cancel_job"), method, scratch, cancellation=cancellation)
    assert time.monotonic() - started < 30
    assert result.status is RunStatus.CANCELED
    failure = result.failure_for("sleeper")
    assert failure is not None and failure.kind is FailureKind.CANCELED
    step_pid, child_pid, _ = pids(pid_file)
    assert gone(method, step_pid, child_pid)


def _cancel_when(path: Path) -> Cancellation:
    cancellation = Cancellation()

    def watch() -> None:
        wait_until(path.exists, 60)
        cancellation.cancel()

    threading.Thread(target=watch, daemon=True).start()
    return cancellation


def test_sigkill_follows_sigterm_after_the_grace_period(
    runyard_instance: Instance, tmp_path: Path, scratch: Path, method: str
) -> None:
    path = tmp_path / "stubborn.py"
    path.write_text(textwrap.dedent('''
        import os, signal, time
        from pathlib import Path
        from runyard import job, step

        @step
        def stubborn(context) -> int:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            pid = Path(context.run_config["scratch"], "pid")
            Path(f"{pid}.tmp").write_text(str(os.getpid()))
            Path(f"{pid}.tmp").rename(pid)
            time.sleep(300)
            return 0

        @job
        def stubborn_job():
            stubborn()
    '''))
    job, _ = load_job(CodePointer(file=str(path)), "stubborn_job")
    started = time.monotonic()
    result = run(runyard_instance, job, method, scratch, terminate_grace=0.5,
                 cancellation=_cancel_when(scratch / "pid"))
    assert time.monotonic() - started < 30
    failure = result.failure_for("stubborn")
    assert failure is not None and failure.kind is FailureKind.CANCELED
    assert gone(method, int((scratch / "pid").read_text()))


def test_a_stopped_step_gets_to_run_its_finally_blocks(
    runyard_instance: Instance, tmp_path: Path, scratch: Path, method: str
) -> None:
    path = tmp_path / "tidy.py"
    path.write_text(textwrap.dedent('''
        import time
        from pathlib import Path
        from runyard import job, step

        @step
        def tidy(context) -> int:
            scratch = Path(context.run_config["scratch"])
            try:
                (scratch / "started").touch()
                time.sleep(300)
            finally:
                (scratch / "cleaned-up").touch()  # SIGTERM raised StepInterrupted here
            return 0

        @job
        def tidy_job():
            tidy()
    '''))
    job, _ = load_job(CodePointer(file=str(path)), "tidy_job")
    result = run(runyard_instance, job, method, scratch, cancellation=_cancel_when(scratch / "started"))
    failure = result.failure_for("tidy")
    assert failure is not None and failure.kind is FailureKind.CANCELED
    assert (scratch / "cleaned-up").exists()


def test_nothing_a_step_started_outlives_it(
    runyard_instance: Instance, load: Callable[[str], JobDefinition], scratch: Path, method: str
) -> None:
    result = run(runyard_instance, load("background_job"), method, scratch)
    assert result.success, result.events
    same_group, detached = pids(scratch / "background.pids")
    assert gone(method, same_group)  # killed with the step's process group when the step ended
    if method in SUPERVISED:
        # It left the group, but the fork server is a subreaper: killed at the end of the run.
        assert gone(method, detached)
    else:
        os.kill(detached, signal.SIGKILL)


DRIVER = '''
import sys
from runyard.definitions import CodePointer
from runyard.execution import execute_job
from runyard.loader import load_job

path, scratch, method = sys.argv[1:]
job, _ = load_job(CodePointer(file=path), "two_sleepers_job")
execute_job(job, executor="multiprocess",
            run_config={"scratch": scratch, "execution": {"multiprocess": {"start_method": method}}})
'''


@pytest.mark.parametrize("method", SUPERVISED)
def test_killing_the_run_worker_leaves_no_step_process(
    job_file: Path, scratch: Path, tmp_path: Path, method: str
) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "RUNYARD_HOME": str(tmp_path / "home"), "TMPDIR": str(tmp)}
    worker = subprocess.Popen([sys.executable, str(driver), str(job_file), str(scratch), method], env=env)
    try:
        files = [scratch / "sleeper-1.pids", scratch / "sleeper_2-1.pids"]
        assert wait_until(lambda: all(f.exists() for f in files), 60), "the steps never started"
        watched = [pid for f in files for pid in pids(f)]  # steps, their children, the fork server
        assert all(alive(p) for p in watched)
        worker.kill()
        worker.wait()
        assert wait_until(lambda: not any(alive(p) for p in watched), 5), [p for p in watched if alive(p)]
        # The fork server also removed the run's directory of step output files.
        assert wait_until(lambda: not list(tmp.glob("runyard-mp-*")), 5), list(tmp.iterdir())
    finally:
        worker.kill()
        worker.wait()


# -- output ----------------------------------------------------------------------------------


def test_stdout_and_stderr_are_captured_separately_at_the_fd_level(
    runyard_instance: Instance, load: Callable[[str], JobDefinition], scratch: Path, method: str
) -> None:
    result = run(runyard_instance, load("chatty_job"), method, scratch)
    assert result.success, result.events
    events = result.events_for("chatty")
    (out,) = [e.data["text"] for e in events if e.type is EventType.STEP_STDOUT]
    (err,) = [e.data["text"] for e in events if e.type is EventType.STEP_STDERR]
    # In the order written; C stdio's buffer is flushed when the step process ends.
    assert out == "print to stdout\nfd 1 write\nsub out\nC printf\n"
    assert err == "fd 2 write\nprint to stderr\nsub err\n"
    types = [e.type for e in events]
    assert types.index(EventType.STEP_STDERR) < types.index(EventType.STEP_OUTPUT) < types.index(
        EventType.STEP_SUCCESS
    )


# -- where jobs come from ----------------------------------------------------------------------


@pytest.mark.parametrize("zygote", ["forked", "exec"])
def test_the_fork_server_imports_the_job_once(
    runyard_instance: Instance, job_file: Path, scratch: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    zygote: str,
) -> None:
    imports = tmp_path / "imports.log"
    monkeypatch.setenv("MP_TEST_IMPORTS", str(imports))
    job, _ = load_job(CodePointer(file=str(job_file)), "pid_job")
    with another_thread() if zygote == "exec" else contextlib.nullcontext():
        result = run(runyard_instance, job, "forkserver", scratch)
    assert result.success, result.events
    step_pids = {result.output_for(k) for k in ("whoami", "whoami_2", "whoami_3")}
    importers = pids(imports)
    assert len(step_pids) == 3 and os.getpid() not in step_pids
    # This process; and the fork server if it was exec'd. Forked from this process, it looks
    # the job up in the module this process imported (so it fails for a job other processes
    # cannot load, as an exec'd one would) without importing it again.
    assert importers == [os.getpid()] if zygote == "forked" else (importers[0] == os.getpid() and len(importers) == 2)
    assert not step_pids & set(importers)


def test_spawn_imports_the_job_in_every_step_process(
    runyard_instance: Instance, job_file: Path, scratch: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    imports = tmp_path / "imports.log"
    monkeypatch.setenv("MP_TEST_IMPORTS", str(imports))
    job, _ = load_job(CodePointer(file=str(job_file)), "pid_job")
    result = run(runyard_instance, job, "spawn", scratch)
    assert result.success, result.events
    step_pids = {result.output_for(k) for k in ("whoami", "whoami_2", "whoami_3")}
    assert set(pids(imports)) == {os.getpid(), *step_pids}


def _local_job() -> JobDefinition:
    from runyard import job, step

    @step
    def local_step() -> int:
        return os.getpid()

    @job
    def local_job():  # type: ignore[no-untyped-def]
        local_step()

    return local_job


@pytest.mark.parametrize("method", SUPERVISED)
def test_a_job_other_processes_cannot_load_is_not_started(
    runyard_instance: Instance, scratch: Path, method: str
) -> None:
    result = run(runyard_instance, _local_job(), method, scratch)
    failure = result.failure_for("local_step")
    assert failure is not None and failure.kind is FailureKind.NOT_STARTED, failure
    # The job is not at module level, so its module, imported again, does not have it.
    assert "could not load" in failure.message and "job 'local_job'" in failure.message
    assert "loads the job from its code pointer" in failure.message


def test_a_job_defined_in_main_is_not_started_with_a_clear_message(
    runyard_instance: Instance, scratch: Path
) -> None:
    job = _local_job()
    job.code_pointer = None  # as for a job defined in an interactive session
    result = run(runyard_instance, job, "forkserver", scratch)
    failure = result.failure_for("local_step")
    assert failure is not None and failure.kind is FailureKind.NOT_STARTED
    assert "defined in __main__ without a file" in failure.message


def test_fork_runs_jobs_that_only_exist_in_the_run_worker(runyard_instance: Instance, scratch: Path) -> None:
    result = run(runyard_instance, _local_job(), "fork", scratch)
    assert result.success, result.events
    assert result.output_for("local_step") != os.getpid()


# -- multi_or_in_process ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "in_process"),
    [
        ({}, False),
        ({"mode": "multiprocess"}, False),
        ({"multiprocess": {"start_method": "spawn"}}, False),
        ({"mode": "in_process"}, True),
        ({"in_process": {}}, True),
        ({"mode": "in_process", "max_concurrent": 8}, True),
    ],
)
def test_multi_or_in_process_modes(
    runyard_instance: Instance, load: Callable[[str], JobDefinition], scratch: Path,
    config: dict[str, Any], in_process: bool,
) -> None:
    job = load("pid_job")
    result = execute_job(
        job, instance=runyard_instance, run_config={"execution": {"multi_or_in_process": config}}
    )
    assert result.success, result.events
    step_pids = {result.output_for(k) for k in ("whoami", "whoami_2", "whoami_3")}
    if in_process:
        assert step_pids == {os.getpid()}
        starts = sorted(e.timestamp for e in result.events if e.type is EventType.STEP_START)
        ends = sorted(e.timestamp for e in result.events if e.type is EventType.STEP_SUCCESS)
        assert all(end <= start for end, start in zip(ends, starts[1:], strict=False))  # one at a time
    else:
        assert os.getpid() not in step_pids and len(step_pids) == 3


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"start_method": "threads"}, "start_method: expected one of forkserver, fork, spawn, got 'threads'"),
        ({"mode": "sideways"}, "mode: expected one of multiprocess, in_process, got 'sideways'"),
        ({"mode": "in_process", "multiprocess": {}}, "mode: in_process contradicts multiprocess: {...}"),
        ({"in_process": {}, "multiprocess": {}}, "give one of in_process: {...} and multiprocess: {...}"),
        ({"in_process": {"max_concurrent": 2}}, "in_process: unknown key 'max_concurrent'"),
    ],
)
def test_multi_or_in_process_config_errors(
    runyard_instance: Instance, load: Callable[[str], JobDefinition], config: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as e:
        execute_job(load("pid_job"), instance=runyard_instance,
                    run_config={"execution": {"multi_or_in_process": config}})
    assert problem in str(e.value)


def test_multiprocess_runs_steps_at_once_up_to_max_concurrent(
    runyard_instance: Instance, load: Callable[[str], JobDefinition], scratch: Path
) -> None:
    cancellation = Cancellation()
    files = [scratch / "sleeper-1.pids", scratch / "sleeper_2-1.pids"]

    def cancel_when_both_run() -> None:
        wait_until(lambda: all(f.exists() for f in files), 60)
        cancellation.cancel()

    threading.Thread(target=cancel_when_both_run, daemon=True).start()
    result = run(runyard_instance, load("two_sleepers_job"), "forkserver", scratch,
                 cancellation=cancellation, max_concurrent=2)
    assert result.status is RunStatus.CANCELED
    assert all(f.exists() for f in files)  # both ran at once, or the cancel never came


# -- the kernel's OOM killer ---------------------------------------------------------------------

OOM_JOB = '''
from pathlib import Path
from runyard import job, step

@step
def hog() -> int:
    Path("/proc/self/oom_score_adj").write_text("1000")  # the victim: this process, not the run worker
    data = b"\\x01" * (1 << 30)  # written, so resident: more than the cgroup allows
    return len(data)

@job
def hog_job():
    hog()
'''

OOM_RUNNER = '''
import json, sys
from runyard.definitions import CodePointer
from runyard.execution import execute_job
from runyard.instance import Instance
from runyard.loader import load_job

job, _ = load_job(CodePointer(file=sys.argv[1]), "hog_job")
result = execute_job(job, instance=Instance.ephemeral(), executor="multiprocess",
                     run_config={"execution": {"multiprocess": {"start_method": sys.argv[2]}}})
failure = result.failure_for("hog")
print(json.dumps({"status": result.status.value, "kind": failure and failure.kind.value,
                  "message": failure and failure.message}))
'''


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    """A memory cgroup (v1 or v2) limited to 256 MiB, under this process's own: the run worker
    started in it shares the limit with its steps, as a run in a container would. Needs root
    and a memory controller, which Linux CI machines have: the test fails, not skips, without."""
    if sys.platform != "linux":
        pytest.skip("the OOM killer and memory cgroups are Linux's")
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = [line.split(":", 2)[2] for line in lines if "memory" in line.split(":")[1].split(",")]
    if v1:
        parent, limit_file = Path("/sys/fs/cgroup/memory", v1[0].lstrip("/")), "memory.limit_in_bytes"
    else:
        v2 = [line.split(":", 2)[2] for line in lines if line.startswith("0::")]
        assert v2, f"no memory cgroup in /proc/self/cgroup: {lines}"
        parent, limit_file = Path("/sys/fs/cgroup", v2[0].lstrip("/")), "memory.max"
    group = parent / f"runyard-oom-test-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        (group / limit_file).write_text(str(256 << 20))
        yield group
    finally:
        # Empty once every process of the run has exited; the test waited for the run worker.
        assert wait_until(lambda: not (group / "cgroup.procs").read_text().split(), 10)
        group.rmdir()


@pytest.mark.parametrize("method", ["forkserver", "fork"])
def test_a_step_the_kernels_oom_killer_kills_fails_as_oom(
    tmp_path: Path, memory_cgroup: Path, method: str
) -> None:
    import json

    job_file = tmp_path / "hog.py"
    job_file.write_text(OOM_JOB)
    procs = memory_cgroup / "cgroup.procs"
    proc = subprocess.run(
        [sys.executable, "-c", OOM_RUNNER, str(job_file), method],
        preexec_fn=lambda: procs.write_text(str(os.getpid())),  # the run worker joins the cgroup
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout.splitlines()[-1])
    assert outcome["status"] == "FAILURE", outcome
    assert outcome["kind"] == "oom", outcome
    assert "OOM killer" in outcome["message"]


# -- pieces -------------------------------------------------------------------------------------


def _request() -> StepRequest:
    return StepRequest(
        run_id="r", step_key="s", attempt=1, attempt_id="a", job_name="j",
        code_pointer=CodePointer(module="m"), output_store="/tmp/x", inputs={},
    )


def test_a_sigkill_while_the_oom_killer_struck_is_oom() -> None:
    from runyard_local.multiprocess import _exit_failure

    failure = _exit_failure(_request(), {"pid": 12, "code": None, "signal": 9, "oom": True}, "")
    assert failure.kind is FailureKind.OOM and failure.signal == 9
    assert "OOM killer" in failure.message
    failure = _exit_failure(_request(), {"pid": 12, "code": None, "signal": 9, "oom": False}, "last words\n")
    assert failure.kind is FailureKind.SIGNAL and failure.message.endswith("its last stderr output:\nlast words")


def test_huge_output_keeps_its_beginning_and_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runyard_local import multiprocess

    monkeypatch.setattr(multiprocess, "_MAX_CAPTURE", 10)
    path = tmp_path / "out"
    path.write_bytes(b"abcdefghijklmnopqrstuvwxyz")
    assert multiprocess._read_capped(str(path)) == "abcde\n[... runyard: 16 bytes not stored ...]\nvwxyz"


@pytest.fixture(autouse=True)
def no_leftover_fork_servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """After every test: no fork server of this process is left, nor any run directory."""
    tmp = tmp_path / "run-tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield
    assert not list(tmp.glob("runyard-mp-*")), list(tmp.iterdir())
    me = str(os.getpid())
    leftovers = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        if fields[1] == me and b"mp_zygote" in cmdline:
            leftovers.append(stat.parent.name)
    assert not leftovers, f"fork servers left running: {leftovers}"
