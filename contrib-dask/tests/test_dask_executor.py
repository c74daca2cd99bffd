"""The dask executor's own behaviour on real clusters: configuration errors, an unreachable
scheduler, a worker killed mid-step, worker resources, concurrent runs on one cluster,
and steps interrupted on their worker by a timeout or a cancel."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from runyard import Cancellation, CodePointer, ConfigError, EventType, FailureKind, Instance, RunStatus, execute_job
from runyard.plugin import preload_job
from runyard_dask.handler import dask_key, parse_resources

from .conftest import CliCluster, free_port, write_job

JOBS = '''
import os
import time
from pathlib import Path

from runyard import RetryPolicy, job, step


def _scratch(context) -> Path:
    return Path(context.run_config["scratch"])


@step(retry=RetryPolicy(max_retries=1, retry_on=["worker_lost"]))
def hold(context) -> dict:
    if context.attempt == 1:
        (_scratch(context) / "pid").write_text(str(os.getpid()))
        time.sleep(120)
    return {"attempt": context.attempt, "pid": os.getpid()}


@job
def lose_worker():
    hold()


@step(retry=RetryPolicy(max_retries=1, retry_on=["worker_lost"]))
def hold_once(context) -> dict:
    pid = _scratch(context) / "pid"
    if context.attempt == 1 and not pid.exists():  # a rerun of attempt 1 by Dask returns at once
        pid.write_text(str(os.getpid()))
        time.sleep(120)
    return {"attempt": context.attempt, "pid": os.getpid()}


@job
def lose_worker_once():
    hold_once()


def _whoami() -> dict:
    from distributed import get_worker
    from distributed.worker import thread_state

    # get_current_task() looks the key up by thread, and the step runs in a thread of its
    # own; the task's thread-local state (copied to it) has the key.
    return {"worker": get_worker().name, "key": thread_state.key}


@step(tags={"dask/resources": {"GPU": 1}})
def on_gpu(i: int) -> dict:
    time.sleep(0.05)
    return _whoami()


@step
def anywhere(i: int) -> dict:
    time.sleep(0.05)
    return _whoami()


@job
def gpu_job():
    for i in range(4):
        on_gpu(i)
    for i in range(4):
        anywhere(i)


@step(tags={"dask/resources": "TPU=1"})
def on_tpu() -> int:
    return 1


@job
def tpu_job():
    on_tpu()


@step(tags={"dask/resources": "GPU"})
def bad_tag() -> int:
    return 1


@job
def bad_tag_job():
    bad_tag()


def _spin(context) -> int:
    # Pure Python: an interrupt lands at the next instruction.
    (_scratch(context) / "started").write_text("x")
    try:
        n = 0
        while True:
            n += 1
    finally:
        (_scratch(context) / "interrupted").write_text(context.step_key)


@step(timeout=1.5)
def spin_timeout(context) -> int:
    return _spin(context)


@step
def spin(context) -> int:
    return _spin(context)


@job
def spin_timeout_job():
    spin_timeout()


@job
def spin_job():
    spin()
'''


@pytest.fixture
def jobs_file(tmp_path: Path) -> Path:
    return write_job(tmp_path, JOBS, "dask_test_jobs.py")


def load(path: Path, name: str) -> Any:
    return preload_job(CodePointer(file=str(path)), name)


def run(instance: Instance, job: Any, cfg: dict[str, Any], run_config: dict[str, Any] | None = None, **kw: Any) -> Any:
    rc = {**(run_config or {}), "execution": {"dask": cfg}}
    return execute_job(job, instance=instance, executor="dask", run_config=rc, **kw)


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout}s"
        time.sleep(0.02)


# -- the plugin module ---------------------------------------------------------------


def test_plugin_module_imports_neither_dask_nor_distributed() -> None:
    code = (
        "import sys, runyard_dask.plugin, runyard.registry as r\n"
        "r.default_registry().executor('dask')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))"
    )
    out = subprocess.check_output([sys.executable, "-c", code], text=True).strip()
    assert out == "[]"


# -- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        ({"local_scheduler": "thread"}, "local_scheduler: expected one of threads, processes, synchronous"),
        ({"address": "tcp://127.0.0.1:1", "local_scheduler": "threads"}, "address and local_scheduler: give one"),
        ({"address": "tcp://127.0.0.1:1", "cluster_kwargs": {"n_workers": 1}}, "cluster_kwargs: these configure"),
        ({"connect_timeout": 0.0}, "connect_timeout: expected a number of seconds above 0"),
        ({"queue_timeout": -1}, "queue_timeout: expected a number of seconds above 0"),
        ({"local_scheduler": "synchronous", "max_concurrent": 4},
         "max_concurrent: local_scheduler 'synchronous' runs one step at a time, got max_concurrent=4"),
        ({"adress": "tcp://x:1"}, "unknown key 'adress'"),
    ],
)
def test_bad_config_names_the_key(runyard_instance: Instance, jobs_file: Path, cfg: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        run(runyard_instance, load(jobs_file, "tpu_job"), cfg)
    assert "dask" in str(err.value) and expected in str(err.value)
    assert runyard_instance.storage.list_runs() == []  # refused before a run was recorded


def test_cluster_class_that_does_not_import_fails_the_run_clearly(runyard_instance: Instance, jobs_file: Path) -> None:
    with pytest.raises(ValueError, match=r"executor.dask.cluster_class: cannot import 'nowhere.Cluster'"):
        run(runyard_instance, load(jobs_file, "tpu_job"), {"cluster_class": "nowhere.Cluster"})


def test_resource_tag_forms() -> None:
    assert parse_resources("s", {"dask/resources": str({"GPU": 1})}) == {"GPU": 1.0}
    assert parse_resources("s", {"dask/resources": '{"GPU": 2, "MEMORY": 4e9}'}) == {"GPU": 2.0, "MEMORY": 4e9}
    assert parse_resources("s", {"dask/resources": "GPU=1, MEMORY=4e9"}) == {"GPU": 1.0, "MEMORY": 4e9}
    assert parse_resources("s", {"runyard/resources": "GPU=1", "dask/resources": "GPU=2"}) == {"GPU": 2.0}
    assert parse_resources("s", {"other": "x"}) == {}
    for bad in ("GPU", "{'GPU': 'one'}", "GPU=-1", "{}"):
        with pytest.raises(ConfigError, match=r"step 's': tag 'dask/resources' = .* is not a resource mapping"):
            parse_resources("s", {"dask/resources": bad})


# -- reaching the cluster -----------------------------------------------------------------


def test_unreachable_scheduler_fails_the_run_within_connect_timeout(
    runyard_instance: Instance, jobs_file: Path
) -> None:
    port = free_port()  # nothing listens there
    with socket.socket() as s:  # keep it from being handed out again while we test
        s.bind(("127.0.0.1", port))
        started = time.monotonic()
        with pytest.raises(ConnectionError) as err:
            run(runyard_instance, load(jobs_file, "tpu_job"), {"address": f"tcp://127.0.0.1:{port}",
                                                                "connect_timeout": 2})
        elapsed = time.monotonic() - started
    msg = str(err.value)
    assert f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port} within connect_timeout=2s" in msg
    assert "executor.dask.address" in msg
    assert elapsed < 2 + 15, f"took {elapsed:.1f}s"
    (run_record,) = runyard_instance.storage.list_runs()
    assert run_record.status is RunStatus.FAILURE


def test_worker_killed_mid_step_becomes_a_retry(
    runyard_instance: Instance, jobs_file: Path, tmp_path: Path, make_cli_cluster: Any
) -> None:
    # allowed-failures=0: the scheduler gives up on a task at the first worker death
    # (KilledWorker) instead of rerunning it, so runyard's retry policy decides.
    cluster: CliCluster = make_cli_cluster(env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"})
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    pids = {p.pid: name for name, p in cluster.workers.items()}

    def kill_the_worker_running_it() -> None:
        wait_for(scratch / "pid")
        pid = int((scratch / "pid").read_text())
        assert pid in pids, f"step ran in pid {pid}, not in a worker process {pids}"
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_worker_running_it, daemon=True)
    killer.start()
    started = time.monotonic()
    result = run(runyard_instance, load(jobs_file, "lose_worker"), {"address": cluster.address},
                 run_config={"scratch": str(scratch)})
    elapsed = time.monotonic() - started
    killer.join(5)
    assert result.success, result.events
    failures = [e for e in result.events if e.type is EventType.STEP_FAILURE]
    assert len(failures) == 1 and failures[0].attempt == 1
    assert failures[0].failure.kind is FailureKind.WORKER_LOST
    assert "the Dask worker running it died" in failures[0].message
    out = result.output_for("hold")
    assert out["attempt"] == 2 and out["pid"] != int((scratch / "pid").read_text())
    assert elapsed < 60, f"a killed worker took {elapsed:.1f}s to become a retry"


def test_temporary_cluster_worker_death_is_runyards_retry_not_a_silent_dask_rerun(
    runyard_instance: Instance, jobs_file: Path, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    def kill_the_worker_running_it() -> None:
        wait_for(scratch / "pid", 120)
        pid = int((scratch / "pid").read_text())
        assert pid != os.getpid()
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_worker_running_it, daemon=True)
    killer.start()
    # Two worker processes: with Dask's default allowed-failures the scheduler would rerun
    # attempt 1 on the other worker itself, and runyard would never see the death.
    cfg = {"cluster_kwargs": {"n_workers": 2, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1"}}
    result = run(runyard_instance, load(jobs_file, "lose_worker_once"), cfg, run_config={"scratch": str(scratch)})
    killer.join(5)
    failures = [e for e in result.events if e.type is EventType.STEP_FAILURE]
    assert len(failures) == 1 and failures[0].attempt == 1, result.events
    assert failures[0].failure.kind is FailureKind.WORKER_LOST
    assert result.success and result.output_for("hold_once")["attempt"] == 2


# -- resources and keys -------------------------------------------------------------------


def test_resource_tag_runs_steps_only_on_workers_that_have_it(
    runyard_instance: Instance, jobs_file: Path, cli_cluster: CliCluster
) -> None:
    result = run(runyard_instance, load(jobs_file, "gpu_job"), {"address": cli_cluster.address})
    assert result.success, result.events
    gpu = [result.output_for(k) for k in result.step_states if k.startswith("on_gpu")]
    assert len(gpu) == 4 and {o["worker"] for o in gpu} == {"w1"}  # only w1 has GPU=1


def test_step_no_worker_can_run_fails_not_started(
    runyard_instance: Instance, jobs_file: Path, cli_cluster: CliCluster
) -> None:
    started = time.monotonic()
    result = run(runyard_instance, load(jobs_file, "tpu_job"), {"address": cli_cluster.address,
                                                                 "no_worker_timeout": 1.0})
    elapsed = time.monotonic() - started
    failure = result.failure_for("on_tpu")
    assert failure is not None and failure.kind is FailureKind.NOT_STARTED
    assert "no worker has the resources {'TPU': 1.0}" in failure.message
    assert elapsed < 20


def test_bad_resource_tag_fails_the_step_at_launch(
    runyard_instance: Instance, jobs_file: Path, cli_cluster: CliCluster
) -> None:
    result = run(runyard_instance, load(jobs_file, "bad_tag_job"), {"address": cli_cluster.address})
    failure = result.failure_for("bad_tag")
    assert failure is not None and failure.kind is FailureKind.NOT_STARTED
    assert "tag 'dask/resources' = 'GPU' is not a resource mapping" in failure.message


def test_two_runs_of_one_job_at_once_do_not_collide(
    runyard_instance: Instance, jobs_file: Path, cli_cluster: CliCluster
) -> None:
    job = load(jobs_file, "gpu_job")
    results: list[Any] = [None, None]

    def go(i: int) -> None:
        results[i] = run(runyard_instance, job, {"address": cli_cluster.address})

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None and r.success for r in results), results
    assert results[0].run_id != results[1].run_id
    for r in results:
        starts = {e.step_key: e.attempt_id for e in r.events if e.type is EventType.STEP_START}
        for key, attempt_id in starts.items():
            assert r.output_for(key)["key"] == f"runyard-{r.run_id}-{key}-{attempt_id}"


def test_dask_key_carries_run_step_and_attempt() -> None:
    from runyard.plugin import StepRequest

    req = StepRequest(run_id="r1", step_key="s", attempt=2, attempt_id="a2", job_name="j",
                      code_pointer=CodePointer(module="m"), output_store="/tmp/x", inputs={})
    assert dask_key(req) == "runyard-r1-s-a2"


# -- stopping steps on their worker ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["cli", "threads"])
def test_timeout_interrupts_the_step_on_its_worker(
    runyard_instance: Instance, jobs_file: Path, tmp_path: Path, cli_cluster: CliCluster, mode: str
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    cfg = {"address": cli_cluster.address} if mode == "cli" else {"local_scheduler": "threads"}
    started = time.monotonic()
    result = run(runyard_instance, load(jobs_file, "spin_timeout_job"), cfg, run_config={"scratch": str(scratch)})
    assert time.monotonic() - started < 20
    failure = result.failure_for("spin_timeout")
    assert failure is not None and failure.kind is FailureKind.TIMEOUT
    wait_for(scratch / "interrupted", 20)  # the step's own `finally` ran: it was stopped, not abandoned


def test_cancel_interrupts_the_step_on_its_worker(
    runyard_instance: Instance, jobs_file: Path, tmp_path: Path, cli_cluster: CliCluster
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    cancellation = Cancellation()

    def cancel_when_started() -> None:
        wait_for(scratch / "started")
        cancellation.cancel()

    threading.Thread(target=cancel_when_started, daemon=True).start()
    result = run(runyard_instance, load(jobs_file, "spin_job"), {"address": cli_cluster.address},
                 run_config={"scratch": str(scratch)}, cancellation=cancellation)
    assert result.status is RunStatus.CANCELED
    failure = result.failure_for("spin")
    assert failure is not None and failure.kind is FailureKind.CANCELED
    wait_for(scratch / "interrupted", 20)


# -- temporary clusters and local schedulers --------------------------------------------------

CHAIN = '''
import os

from runyard import job, step


@step
def emit() -> int:
    return os.getpid()


@step
def pid_of(_: int) -> int:
    return os.getpid()


@job
def chain():
    pid_of(emit())
'''


def test_adaptive_temporary_cluster_scales_up_from_zero(runyard_instance: Instance, tmp_path: Path) -> None:
    job = load(write_job(tmp_path, CHAIN, "chain_jobs.py"), "chain")
    cfg = {
        "cluster_class": "distributed:LocalCluster",
        "cluster_kwargs": {"n_workers": 0, "threads_per_worker": 1, "processes": True},
        "adapt_kwargs": {"minimum": 0, "maximum": 1, "interval": "100ms"},
        "client_kwargs": {"name": "runyard-adaptive-test"},
    }
    result = run(runyard_instance, job, cfg)
    assert result.success, result.events
    assert result.output_for("pid_of") != os.getpid()  # ran in a worker process the cluster added


@pytest.mark.parametrize(
    ("scheduler", "same_process"), [("synchronous", True), ("threads", True), ("processes", False)]
)
def test_local_schedulers_run_without_distributed(
    runyard_instance: Instance, tmp_path: Path, scheduler: str, same_process: bool
) -> None:
    job = load(write_job(tmp_path, CHAIN, "chain_jobs.py"), "chain")
    result = run(runyard_instance, job, {"local_scheduler": scheduler})
    assert result.success, result.events
    assert (result.output_for("pid_of") == os.getpid()) is same_process


def test_local_scheduler_refuses_resource_tags(runyard_instance: Instance, jobs_file: Path) -> None:
    result = run(runyard_instance, load(jobs_file, "tpu_job"), {"local_scheduler": "threads"})
    failure = result.failure_for("on_tpu")
    assert failure is not None and failure.kind is FailureKind.NOT_STARTED
    assert "only distributed workers have" in failure.message


def test_scheduler_lost_mid_step_fails_the_step_without_hanging(
    runyard_instance: Instance, jobs_file: Path, tmp_path: Path, make_cli_cluster: Any
) -> None:
    cluster: CliCluster = make_cli_cluster()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    scheduler = cluster.procs[0]

    def kill_the_scheduler() -> None:
        wait_for(scratch / "pid")
        os.killpg(scheduler.pid, signal.SIGKILL)

    threading.Thread(target=kill_the_scheduler, daemon=True).start()
    started = time.monotonic()
    result = run(runyard_instance, load(jobs_file, "lose_worker"), {"address": cluster.address, "connect_timeout": 5},
                 run_config={"scratch": str(scratch)})
    elapsed = time.monotonic() - started
    assert result.status is RunStatus.FAILURE
    failures = [e.failure for e in result.events if e.type is EventType.STEP_FAILURE]
    assert failures and all(f.kind in (FailureKind.WORKER_LOST, FailureKind.NOT_STARTED) for f in failures), failures
    assert elapsed < 90, f"losing the scheduler took {elapsed:.1f}s to fail the run"


SLEEPER = '''
import time

from runyard import job, step


@step
def sleeper() -> int:
    time.sleep(3)
    return 1


@step
def quick() -> int:
    return 7


@job
def both():
    sleeper()
    quick()
'''


def test_run_step_gives_its_thread_back_after_grace_and_later_steps_are_unharmed(tmp_path: Path) -> None:
    from runyard.plugin import StepRequest, sign_request
    from runyard_dask import remote

    path = write_job(tmp_path, SLEEPER, "sleeper_jobs.py")
    key = "a-key-for-this-test-only-0123456789"
    # What the engine's worker plugin does on the workers of a cluster of its own.
    remote.install_grant("r", key, {"code_locations": [str(tmp_path)], "output_stores": [str(tmp_path / "out")]})

    def request(step: str, attempt_id: str) -> dict[str, Any]:
        return sign_request(StepRequest.from_dict({
            "run_id": "r", "step_key": step, "attempt": 1, "attempt_id": attempt_id, "job_name": "both",
            "code_pointer": {"file": str(path)}, "output_store": str(tmp_path / "out"), "inputs": {}}), key.encode())

    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(remote.run_step(request("sleeper", "a1"), "k-sleep", 0.2)))
    t.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert remote.interrupt("k-sleep", "timeout") is True
    t.join(10)
    # Blocked in time.sleep, the step cannot take the exception yet: the task returns after the grace.
    assert time.monotonic() - started < 2
    assert out == {"events": [], "abandoned": True, "interrupted": "timeout"}
    # The step threads left are healthy: the interrupt does not land in a later step.
    for i in range(5):
        result = remote.run_step(request("quick", f"q{i}"), f"k-quick-{i}")
        assert [e["type"] for e in result["events"]][-1] == "STEP_SUCCESS", result
    assert remote.interrupt("never-ran", "canceled") is False
    early = remote.run_step(request("quick", "q-early"), "never-ran")
    assert early == {"events": [], "abandoned": False, "interrupted": "canceled"}


# -- timeouts count from the step's start, not from its time in Dask's queue ----------------

QUEUED = '''
import time

from runyard import job, step


@step
def long() -> int:
    time.sleep(4)
    return 1


@step(timeout=2)
def queued() -> int:
    return 2


@step(timeout=1.5)
def overrun() -> int:
    n = 0
    end = time.monotonic() + 30
    while time.monotonic() < end:  # pure Python: the interrupt lands at once
        n += 1
    return n


@step
def untimed() -> int:
    return 3


@job
def queued_job():
    long()
    queued()


@job
def overrun_job():
    long()
    overrun()


@job
def untimed_job():
    long()
    untimed()
'''

# One worker thread: of two independent steps, one waits in Dask's queue while the other runs.
ONE_THREAD = {"cluster_kwargs": {"n_workers": 1, "threads_per_worker": 1, "processes": False}}


def _event_time(result: Any, step: str, kind: EventType) -> float:
    (t,) = [e.timestamp for e in result.events if e.step_key == step and e.type is kind]
    return t


def test_step_queued_behind_a_long_step_does_not_time_out(runyard_instance: Instance, tmp_path: Path) -> None:
    job = load(write_job(tmp_path, QUEUED, "queued_jobs.py"), "queued_job")
    result = run(runyard_instance, job, ONE_THREAD)
    assert result.success, [(e.step_key, e.type, e.message) for e in result.events]
    # It did wait: it started only once the long step had ended, far past its 2 s timeout.
    assert _event_time(result, "queued", EventType.STEP_START) >= _event_time(result, "long", EventType.STEP_SUCCESS)
    assert result.output_for("queued") == 2


def test_step_running_past_its_timeout_after_queueing_is_timeout(runyard_instance: Instance, tmp_path: Path) -> None:
    job = load(write_job(tmp_path, QUEUED, "queued_jobs.py"), "overrun_job")
    started = time.monotonic()
    result = run(runyard_instance, job, ONE_THREAD)
    elapsed = time.monotonic() - started
    failure = result.failure_for("overrun")
    assert failure is not None and failure.kind is FailureKind.TIMEOUT, result.events
    assert result.output_for("long") == 1
    # Queued ~4 s behind `long`, then stopped 1.5 s into its run, not after 30 s.
    assert 4 + 1.5 <= elapsed < 25, f"took {elapsed:.1f}s"
    # Its timeout ran from its start, after `long` ended (its STEP_START is discarded with its result).
    timed_out = _event_time(result, "overrun", EventType.STEP_FAILURE)
    assert timed_out - _event_time(result, "long", EventType.STEP_SUCCESS) >= 1.4


def test_queue_timeout_fails_a_step_that_waits_too_long_to_start(runyard_instance: Instance, tmp_path: Path) -> None:
    job = load(write_job(tmp_path, QUEUED, "queued_jobs.py"), "untimed_job")
    result = run(runyard_instance, job, {**ONE_THREAD, "queue_timeout": 1})
    failure = result.failure_for("untimed")
    assert failure is not None and failure.kind is FailureKind.NOT_STARTED, result.events
    assert "waited 1s in Dask's queue without starting (executor.dask.queue_timeout=1s)" in failure.message
    assert result.output_for("long") == 1


@pytest.mark.parametrize("scheduler", ["synchronous", "threads", "processes"])
def test_local_scheduler_does_not_import_distributed(tmp_path: Path, scheduler: str) -> None:
    path = write_job(tmp_path, CHAIN, "chain_jobs.py")
    code = (
        "import os, sys\n"
        "from runyard import CodePointer, execute_job\n"
        "from runyard.plugin import preload_job\n"
        f"job = preload_job(CodePointer(file={str(path)!r}), 'chain')\n"
        f"rc = {{'execution': {{'dask': {{'local_scheduler': {scheduler!r}}}}}}}\n"
        "r = execute_job(job, executor='dask', run_config=rc)\n"
        "assert r.success, r.events\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'distributed'))"
    )
    env = {**os.environ, "RUNYARD_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
