"""What the celery executor does when things go wrong, against real brokers and workers:
a broker that is down, a queue nobody consumes, a pool process or a whole worker killed
mid-step, timeouts and cancels (the step must really stop on the worker)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import celery_test_jobs as J
import pytest
from celery_support import BROKERS, FreezableProxy, executor_config, in_thread, pid_alive, queue, wait_until
from runyard import Cancellation, ExecutionResult, Instance, RunStatus, execute_job
from runyard.plugin import EventType, FailureKind
from runyard_celery.app import make_app


def run(instance: Instance, job: Any, broker: str, scratch: Path, *, queue_name: str | None = None,
        cancellation: Cancellation | None = None, **cfg: Any) -> ExecutionResult:
    config = executor_config(broker, queue_name or queue(f"{broker}-main"), **cfg)
    return execute_job(job, instance=instance, executor="celery", cancellation=cancellation,
                       run_config={"scratch": str(scratch), "execution": {"celery": config}})


def task_id_of(result: ExecutionResult, step_key: str) -> str:
    """The Celery task id of a step's (first) attempt: ``RUN_ID.ATTEMPT_ID``."""
    attempt_id = next(e.attempt_id for e in result.events
                      if e.step_key == step_key and e.type is EventType.STEP_FAILURE)
    return f"{result.run_id}.{attempt_id}"


def read_pid(path: Path, timeout: float = 60) -> int:
    wait_until(path.exists, timeout, f"{path.name} (the step to start on a worker)")
    wait_until(lambda: path.read_text().strip() != "", 5, f"{path.name} to be written")
    return int(path.read_text())


@pytest.mark.parametrize(
    "broker_url",
    ["redis://127.0.0.1:1/0", "amqp://guest:guest@127.0.0.1:1//"],
    ids=["redis", "amqp"],
)
def test_broker_down_at_launch_is_a_clear_error_not_a_hang(
    runyard_instance: Instance, scratch: Path, broker_url: str
) -> None:
    started = time.monotonic()
    expected = r"cannot reach the Celery broker at .*127\.0\.0\.1:1.*executor\.celery\.broker"
    with pytest.raises(Exception, match=expected):
        execute_job(J.chain_job, instance=runyard_instance, executor="celery",
                    run_config={"execution": {"celery": {"broker": broker_url, "backend": BROKERS["redis"]["backend"],
                                                         "connect_timeout": 3.0}}})
    assert time.monotonic() - started < 20


def test_queue_nobody_consumes_fails_after_queue_timeout(
    runyard_instance: Instance, scratch: Path, session_workers: Any
) -> None:
    started = time.monotonic()
    result = run(runyard_instance, J.elsewhere_job, "redis", scratch, queue_timeout=2.0)
    elapsed = time.monotonic() - started
    assert result.status is RunStatus.FAILURE
    failure = result.failure_for("elsewhere")
    assert failure is not None and failure.kind is FailureKind.NOT_STARTED
    assert f"no worker consumes queue '{J.OTHER_QUEUE}'" in failure.message
    assert "queue_timeout" in failure.message
    assert result.step_states["add_one"] == "skipped"
    # Bounded by queue_timeout (2 s), not by the step's own timeout (60 s).
    assert 2.0 <= elapsed < 20, elapsed
    assert not (scratch / "elsewhere.pid").exists()


def test_queue_timeout_does_not_count_time_running(
    runyard_instance: Instance, scratch: Path, start_worker: Any
) -> None:
    q = queue("running")
    worker = start_worker("redis", [q], concurrency=1)
    thread, box = in_thread(lambda: run(runyard_instance, J.slow_only_job, "redis", scratch, queue_name=q,
                                        queue_timeout=1.0))  # the step runs 3 s
    read_pid(scratch / "slow_start.pid")
    # Nobody consumes the queue any more: were running time counted, the inspection at
    # queue_timeout would fail the step NOT_STARTED.
    app = make_app(broker=BROKERS["redis"]["broker"], backend=BROKERS["redis"]["backend"])
    try:
        app.control.cancel_consumer(q, destination=[worker.name], reply=True, timeout=5)
    finally:
        app.close()
    thread.join(60)
    assert not thread.is_alive()
    result: ExecutionResult = box["result"]
    assert result.success, result.events
    assert (scratch / "slow_start.done").exists()


def test_queue_timeout_waits_on_while_a_consuming_worker_is_busy(
    runyard_instance: Instance, scratch: Path, start_worker: Any
) -> None:
    q = queue("busy")
    start_worker("redis", [q], concurrency=1)
    result = run(runyard_instance, J.two_slow_job, "redis", scratch, queue_name=q, queue_timeout=1.0)
    assert result.success, result.events
    starts = sorted(e.timestamp for e in result.events if e.type is EventType.STEP_START)
    assert starts[1] - starts[0] > 2.0  # the second step did wait in the queue past queue_timeout


def test_step_timeout_counts_from_its_start_not_its_time_queued(
    runyard_instance: Instance, scratch: Path, start_worker: Any
) -> None:
    q = queue("late")
    thread, box = in_thread(lambda: run(runyard_instance, J.quick_job, "redis", scratch, queue_name=q))
    time.sleep(4.0)  # queued for longer than the step's 3 s timeout: no worker consumes q yet
    assert thread.is_alive(), box
    start_worker("redis", [q], concurrency=1)
    thread.join(60)
    assert not thread.is_alive(), "the run hung"
    result: ExecutionResult = box["result"]
    assert result.success, result.events
    assert (scratch / "quick.done").exists()


def test_timeout_really_stops_the_step_on_the_worker(
    runyard_instance: Instance, scratch: Path, session_workers: Any
) -> None:
    started = time.monotonic()
    # time_limit_margin: Celery's hard time limit (the backstop, which would stop it too) is out of the picture.
    result = run(runyard_instance, J.timeout_job, "redis", scratch, time_limit_margin=120.0)
    failure = result.failure_for("overrun")
    assert failure is not None and failure.kind is FailureKind.TIMEOUT
    assert time.monotonic() - started < 20
    app = make_app(broker=BROKERS["redis"]["broker"], backend=BROKERS["redis"]["backend"])
    try:
        # The step would sleep 30 s: its task ends within the grace only if it was interrupted
        # on the worker, and its own last event says by what.
        task = app.AsyncResult(task_id_of(result, "overrun"))
        wait_until(lambda: task.state == "SUCCESS", 10, "the timed-out step's task to end on its worker")
        last = task.result["events"][-1]
        assert last["type"] == "STEP_FAILURE" and "SIGTERM" in last["message"], last
    finally:
        app.close()
    assert not (scratch / "overrun.done").exists()
    # The pool process itself survives a SIGTERM'd step and serves the next one.
    assert pid_alive(int((scratch / "overrun.pid").read_text()))


def test_step_ignoring_sigterm_is_killed_after_the_grace(
    runyard_instance: Instance, scratch: Path, session_workers: Any
) -> None:
    result = run(runyard_instance, J.stubborn_job, "redis", scratch, terminate_grace=1.0)
    failure = result.failure_for("stubborn")
    assert failure is not None and failure.kind is FailureKind.TIMEOUT
    pid = int((scratch / "stubborn.pid").read_text())
    wait_until(lambda: not pid_alive(pid), 15, f"pool process {pid}, which ignores SIGTERM, to be SIGKILLed")
    assert not (scratch / "stubborn.done").exists()


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_pool_process_killed_mid_step_is_retried(
    runyard_instance: Instance, scratch: Path, session_workers: Any, broker: str
) -> None:
    thread, box = in_thread(lambda: run(runyard_instance, J.kill_retry_job, broker, scratch))
    pid = read_pid(scratch / "killed_once.pid")
    os.kill(pid, signal.SIGKILL)
    thread.join(90)
    assert not thread.is_alive(), "the run hung after its step's process was killed"
    result: ExecutionResult = box["result"]
    assert result.success, result.events
    assert result.output_for("killed_once") == 2
    first = [e for e in result.events if e.type is EventType.STEP_FAILURE and e.attempt == 1]
    assert len(first) == 1 and first[0].failure is not None
    assert first[0].failure.kind is FailureKind.SIGNAL
    assert first[0].failure.signal == signal.SIGKILL
    assert [e.data["next_attempt"] for e in result.events if e.type is EventType.STEP_RETRY] == [2]


def test_pool_process_killed_without_retries_fails_the_step(
    runyard_instance: Instance, scratch: Path, session_workers: Any
) -> None:
    thread, box = in_thread(lambda: run(runyard_instance, J.kill_job, "redis", scratch))
    os.kill(read_pid(scratch / "killed.pid"), signal.SIGKILL)
    thread.join(90)
    assert not thread.is_alive(), "the run hung after its step's process was killed"
    result: ExecutionResult = box["result"]
    assert result.status is RunStatus.FAILURE
    failure = result.failure_for("killed")
    assert failure is not None and failure.kind is FailureKind.SIGNAL and failure.signal == signal.SIGKILL
    assert "pool process running it died" in failure.message
    assert result.step_states["add_one"] == "skipped"


def test_whole_worker_killed_mid_step_fails_the_step(
    runyard_instance: Instance, scratch: Path, start_worker: Any
) -> None:
    q = queue("lonely")
    worker = start_worker("redis", [q], concurrency=1)
    thread, box = in_thread(lambda: run(runyard_instance, J.block_job, "redis", scratch, queue_name=q,
                                        worker_lost_timeout=3.0))
    read_pid(scratch / "blocker.pid")
    worker.kill(signal.SIGKILL)  # the main process and its pool: nobody is left to report
    thread.join(60)
    assert not thread.is_alive(), "the run hung after its worker was killed"
    result: ExecutionResult = box["result"]
    failure = result.failure_for("blocker")
    assert failure is not None and failure.kind is FailureKind.WORKER_LOST
    assert worker.name in failure.message and "worker_lost_timeout" in failure.message


def test_result_backend_that_stops_answering_fails_the_step_within_worker_lost_timeout(
    runyard_instance: Instance, scratch: Path, start_worker: Any
) -> None:
    """Not a refused connection: a frozen link, where each read would block for Redis's
    default socket timeout (120 s)."""
    from urllib.parse import urlsplit

    real = urlsplit(BROKERS["redis"]["backend"])
    proxy = FreezableProxy(real.hostname or "127.0.0.1", real.port or 6379)
    try:
        backend = f"redis://127.0.0.1:{proxy.port}{real.path}"
        q = queue("frozen")
        start_worker("redis", [q], concurrency=1, backend=backend)
        thread, box = in_thread(lambda: run(runyard_instance, J.block_job, "redis", scratch, queue_name=q,
                                            backend=backend, worker_lost_timeout=3.0, connect_timeout=5.0))
        read_pid(scratch / "blocker.pid")
        time.sleep(0.5)  # the monitor has read STARTED
        proxy.freeze()
        frozen_at = time.monotonic()
        thread.join(60)
        assert not thread.is_alive(), "the run hung on a frozen result backend"
        elapsed = time.monotonic() - frozen_at
        result: ExecutionResult = box["result"]
        failure = result.failure_for("blocker")
        assert failure is not None and failure.kind is FailureKind.WORKER_LOST, result.events
        assert "result backend has not answered" in failure.message
        assert elapsed < 3.0 + 6.0, elapsed  # worker_lost_timeout + a few seconds, not 120 s per read
    finally:
        proxy.close()


def test_worker_broker_option_keeps_the_configured_backend(
    runyard_instance: Instance, scratch: Path, start_worker: Any
) -> None:
    """runyard.yaml says Redis for both; the worker is pointed at RabbitMQ with --broker. It
    must still write results to the configured backend, where the engine reads them."""
    q = queue("broker-option")
    start_worker("redis", [q], concurrency=1, args=("--broker", BROKERS["rabbitmq"]["broker"]))
    thread, box = in_thread(lambda: run(runyard_instance, J.chain_job, "rabbitmq", scratch, queue_name=q,
                                        queue_timeout=20.0))
    thread.join(60)
    assert not thread.is_alive(), "the run hung: its results went to another backend"
    result: ExecutionResult = box["result"]
    assert result.success, result.events
    assert result.output_for("add_one_2") == 5


def test_cancel_stops_running_steps_and_revokes_queued_ones(
    runyard_instance: Instance, scratch: Path, session_workers: Any, start_worker: Any
) -> None:
    cancellation = Cancellation()
    thread, box = in_thread(lambda: run(runyard_instance, J.cancel_mixed_job, "redis", scratch,
                                        cancellation=cancellation, queue_timeout=None))
    pid = read_pid(scratch / "blocker.pid")
    cancellation.cancel()
    thread.join(60)
    assert not thread.is_alive()
    result: ExecutionResult = box["result"]
    assert result.status is RunStatus.CANCELED
    for key in ("blocker", "elsewhere"):
        failure = result.failure_for(key)
        assert failure is not None and failure.kind is FailureKind.CANCELED, key
    app = make_app(broker=BROKERS["redis"]["broker"], backend=BROKERS["redis"]["backend"])
    try:
        # The running step was interrupted on its worker: the task's own result says so.
        task = app.AsyncResult(task_id_of(result, "blocker"))
        wait_until(lambda: task.state == "SUCCESS", 15, "the canceled step's task to end")
        last = task.result["events"][-1]
        assert last["type"] == "STEP_FAILURE" and "SIGTERM" in last["message"], last
        assert pid_alive(pid) and not (scratch / "blocker.done").exists()

        # The queued step's message is still in its queue. A worker that starts consuming it
        # now learns the revoked ids from the running workers and drops it instead of running it.
        queued = app.AsyncResult(task_id_of(result, "elsewhere"))
        start_worker("redis", [J.OTHER_QUEUE], concurrency=1)
        wait_until(lambda: queued.state == "REVOKED", 30, "the queued task to be dropped as revoked")
        time.sleep(1)
        assert not (scratch / "elsewhere.pid").exists()
    finally:
        app.close()


def test_cancel_with_the_broker_gone_still_ends_the_queued_step(
    runyard_instance: Instance, scratch: Path, session_workers: Any
) -> None:
    """terminate cannot revoke (the broker stopped answering after the launch): cancel must
    not block or raise, and the queued step must still end rather than be polled for ever."""
    from urllib.parse import urlsplit

    real = urlsplit(BROKERS["redis"]["broker"])
    proxy = FreezableProxy(real.hostname or "127.0.0.1", real.port or 6379)
    cancellation = Cancellation()
    try:
        broker = f"redis://127.0.0.1:{proxy.port}{real.path}"
        config = {"broker": broker, "backend": BROKERS["redis"]["backend"], "queue_timeout": None,
                  "connect_timeout": 2.0, "default_queue": queue("redis-main")}
        thread, box = in_thread(lambda: execute_job(
            J.elsewhere_job, instance=runyard_instance, executor="celery", cancellation=cancellation,
            run_config={"scratch": str(scratch), "execution": {"celery": config}}))
        time.sleep(3)  # sent and queued: nobody consumes its queue
        proxy.freeze()  # not refused: no answer at all, the worst case for a blocking client
        canceller, outcome = in_thread(cancellation.cancel)  # the engine calls terminate from here
        canceller.join(30)
        assert not canceller.is_alive(), "cancel blocked on the unreachable broker"
        assert "error" not in outcome, outcome
        thread.join(60)
        assert not thread.is_alive(), "the run hung: a queued step whose revoke failed was never finished"
    finally:
        proxy.close()
    assert "error" not in box, box
    result: ExecutionResult = box["result"]
    assert result.status is RunStatus.CANCELED
    failure = result.failure_for("elsewhere")
    assert failure is not None and failure.kind is FailureKind.CANCELED


def test_long_running_step_does_not_poll_the_backend_at_full_speed(
    runyard_instance: Instance, scratch: Path, session_workers: Any
) -> None:
    import redis

    client = redis.Redis.from_url(BROKERS["redis"]["backend"])

    def mgets() -> int:  # the monitor reads states with GET or MGET
        stats = client.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("get", "mget"))

    cancellation = Cancellation()
    thread, box = in_thread(lambda: run(runyard_instance, J.block_job, "redis", scratch, cancellation=cancellation))
    read_pid(scratch / "blocker.pid")
    time.sleep(3)  # past the fast polling that follows a change
    before = mgets()
    time.sleep(4)
    calls = mgets() - before
    cancellation.cancel()
    # ~8 reads at 0.5 s; at the fast pace (every 20 ms or less) it would be 200 or more. The
    # counts are server-wide, so other users of this Redis may add a few.
    thread.join(60)
    assert not thread.is_alive()
    assert calls < 60, calls


def test_bad_priority_tag_fails_the_step_before_sending(runyard_instance: Instance, scratch: Path) -> None:
    result = run(runyard_instance, J.bad_priority_job, "redis", scratch)
    failure = result.failure_for("bad_priority")
    assert failure is not None and failure.kind is FailureKind.NOT_STARTED
    assert "celery/priority='12'" in failure.message and "0 (lowest) to 9 (highest)" in failure.message


def test_rabbitmq_redelivers_the_step_of_a_dead_worker_to_another(
    runyard_instance: Instance, scratch: Path, start_worker: Any
) -> None:
    """Late acknowledgement: the message of a worker that died with the step unfinished goes
    back to the queue (RabbitMQ: as soon as the connection drops) and another worker runs it."""
    q = queue("redeliver")
    workers = [start_worker("rabbitmq", [q], concurrency=1, wait=False) for _ in range(2)]
    for w in workers:
        w.wait_ready()
    thread, box = in_thread(lambda: run(runyard_instance, J.slow_job, "rabbitmq", scratch, queue_name=q))
    first_pid = read_pid(scratch / "slow_start.pid")
    (running,) = [w for w in workers if first_pid in w.children()]
    (scratch / "slow_start.pid").unlink()
    running.kill(signal.SIGKILL)
    second_pid = read_pid(scratch / "slow_start.pid", timeout=30)
    (other,) = [w for w in workers if w is not running]
    assert second_pid in other.children()
    thread.join(60)
    assert not thread.is_alive()
    result: ExecutionResult = box["result"]
    assert result.success, result.events
    assert result.output_for("add_one") == second_pid + 1


def _rabbit_env(name: str, value: str | None = None) -> str:
    """Read (or set, for channels opened from now on) a setting of the running RabbitMQ node."""
    expr = (f"application:set_env(rabbit, {name}, {value})." if value is not None
            else f"application:get_env(rabbit, {name}).")
    out = subprocess.run(["rabbitmqctl", "eval", expr], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"rabbitmqctl eval {expr!r} failed: {out.stderr or out.stdout}"
    return out.stdout.strip()


def test_a_step_longer_than_rabbitmqs_consumer_timeout_runs_once_and_its_worker_lives_on(
    runyard_instance: Instance, scratch: Path, start_worker: Any
) -> None:
    """RabbitMQ closes the channel of a delivery left unacknowledged for longer than its
    consumer_timeout (30 min by default), which late acknowledgement does for any step
    that long. Celery used to call that unrecoverable: the worker exited and killed every
    step it ran, and the requeued message ran the long step again elsewhere, for ever.
    Here the node's timeout is 2 s (checked every second): the worker opens a new channel,
    the requeued copy of the step is dropped by whichever worker gets it, the step runs
    once to its end, and the workers go on serving."""
    saved = {name: _rabbit_env(name) for name in ("consumer_timeout", "channel_tick_interval")}
    q = queue("outlast")
    try:
        _rabbit_env("consumer_timeout", "2000")
        _rabbit_env("channel_tick_interval", "1000")
        workers = [start_worker("rabbitmq", [q], concurrency=1, wait=False) for _ in range(2)]
        for w in workers:
            w.wait_ready()
        result = execute_job(J.outlast_job, instance=runyard_instance, executor="celery", run_config={
            "scratch": str(scratch), "outlast_seconds": 10,
            "execution": {"celery": executor_config("rabbitmq", q)}})
    finally:
        for name, value in saved.items():  # e.g. {ok,1800000}, or undefined (the default)
            if value.startswith("{ok,"):
                _rabbit_env(name, value[4:-1])
            else:
                subprocess.run(["rabbitmqctl", "eval", f"application:unset_env(rabbit, {name})."],
                               capture_output=True, timeout=60)
    logs = "\n".join(w.log.read_text(errors="replace") for w in workers)
    assert "timed out" in logs, "RabbitMQ never closed the channel: the test proves nothing"
    assert result.success, result.events
    assert len((scratch / "outlast.starts").read_text().split()) == 1, "the step started twice"
    assert "not starting task" in logs, "the requeued copy was never seen and dropped"
    for w in workers:
        w.assert_alive("after its channel was closed")
    again = execute_job(J.chain_job, instance=runyard_instance, executor="celery", run_config={
        "scratch": str(scratch), "execution": {"celery": executor_config("rabbitmq", q, queue_timeout=30)}})
    assert again.success, again.events


def test_run_worker_can_fork_after_celery_runs(
    runyard_instance: Instance, scratch: Path, session_workers: Any
) -> None:
    """Pings and queue inspections leave no half-read Redis connection in kombu's pools,
    which close their connections again in every forked child (a later multiprocess run,
    for instance) and would block there for ever."""
    import multiprocessing

    assert run(runyard_instance, J.slow_job, "redis", scratch).success  # runs 3 s: its worker is pinged
    # A queue timeout where no worker at all answers the inspection (an empty database).
    lonely_db = BROKERS["redis"]["broker"].rsplit("/", 1)[0] + "/12"
    nobody = queue("fork-nobody")
    result = execute_job(J.chain_job, instance=runyard_instance, executor="celery", run_config={
        "execution": {"celery": {"broker": lonely_db, "default_queue": nobody, "queue_timeout": 1.0}}})
    failure = result.failure_for("emit")
    assert failure is not None and "no Celery worker answered" in failure.message
    import redis

    client = redis.Redis.from_url(lonely_db)
    client.delete(*client.keys(f"*{nobody}*"))
    child = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    child.start()
    child.join(30)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0, "a process forked after a celery run hung"
