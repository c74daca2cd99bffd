"""What the celery_docker executor does when things go wrong, against real brokers, real
``runyard celery worker --steps-in docker`` processes and the real Docker engine: the
step's stderr tail in its failure, a pool process or a whole worker killed mid-step (the
container is found by label and removed), a queue nobody consumes, cancel (running
containers stopped, queued tasks revoked), settings that differ between run and worker,
and the install hint when runyard-docker is missing."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from celery_support import (
    DOCKER_TEST_LABEL,
    HERE,
    SESSION,
    assert_lost_then_retried,
    docker_executor_config,
    in_thread,
    queue,
    wait_until,
)
from runyard import Cancellation, CodePointer, ExecutionResult, Instance, RunStatus, execute_job
from runyard.plugin import EventType, FailureKind, preload_job

JOBS = HERE / "celery_docker_jobs.py"


def job(name: str) -> Any:
    return preload_job(CodePointer(file=str(JOBS)), name)


@pytest.fixture
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp()


def run(instance: Instance, name: str, config: dict[str, Any], scratch: Path,
        cancellation: Cancellation | None = None) -> ExecutionResult:
    return execute_job(job(name), instance=instance, executor="celery_docker", cancellation=cancellation,
                       run_config={"scratch": str(scratch), "execution": {"celery_docker": config}})


def containers_of(engine: Any, step: str | None = None, all: bool = True) -> list[Any]:
    import docker

    labels = [f"{DOCKER_TEST_LABEL}={SESSION}"] + ([f"runyard.step_key={step}"] if step else [])
    for _ in range(10):
        try:
            return engine.containers.list(all=all, filters={"label": labels})
        except docker.errors.NotFound:  # one was removed between the SDK's list and its inspect
            continue
    return engine.containers.list(all=all, filters={"label": labels})


def test_non_zero_exit_carries_the_stderr_tail(
    runyard_instance: Instance, scratch: Path, shared: Path, session_docker_workers: Any, docker_image: str
) -> None:
    config = docker_executor_config("redis", queue("docker-redis-main"), docker_image, shared)
    result = run(runyard_instance, "loud_job", config, scratch)
    assert result.status is RunStatus.FAILURE
    failure = result.failure_for("dies_loudly")
    assert failure is not None and failure.kind is FailureKind.WORKER_LOST, result.events
    assert failure.exit_code == 3
    assert "the last words before exit 3" in failure.message and "about to fail" in failure.message
    stderr = "".join(e.data.get("text", "") for e in result.events
                     if e.type is EventType.STEP_STDERR and e.step_key == "dies_loudly")
    assert "the last words before exit 3" in stderr
    assert result.step_states["plus_one"] == "skipped"


def test_step_error_and_events_come_back_from_the_container(
    runyard_instance: Instance, scratch: Path, shared: Path, session_docker_workers: Any, docker_image: str
) -> None:
    config = docker_executor_config("rabbitmq", queue("docker-rabbitmq-main"), docker_image, shared)
    result = run(runyard_instance, "raises_job", config, scratch)
    failure = result.failure_for("raises")
    assert failure is not None and failure.kind is FailureKind.ERROR
    assert failure.error_class == "builtins.ValueError" and "inside the container" in failure.message


def test_events_stream_back_while_the_step_runs(
    runyard_instance: Instance, scratch: Path, shared: Path, session_docker_workers: Any, docker_image: str
) -> None:
    """The step prints, then waits for a file: its first events reach storage before it ends."""
    config = docker_executor_config("redis", queue("docker-redis-main"), docker_image, shared)
    thread, box = in_thread(lambda: run(runyard_instance, "streamed_job", config, scratch))
    try:
        def printed() -> bool:
            runs = runyard_instance.storage.list_runs()
            return bool(runs) and any(
                e.event.type is EventType.STEP_STDOUT and "early line" in e.event.data.get("text", "")
                for e in runyard_instance.storage.get_events(runs[0].run_id))
        wait_until(printed, 60, "the step's first line to reach storage while it runs")
    finally:
        (scratch / "go").write_text("1")
        thread.join(60)
    result: ExecutionResult = box["result"]
    assert result.success, result.events
    assert result.output_for("streamed") == 7
    assert sum("early line" in e.data.get("text", "") for e in result.events) == 1  # not repeated at the end


def test_pool_process_killed_mid_step_removes_its_container_and_is_retried(
    runyard_instance: Instance, scratch: Path, shared: Path, docker_engine: Any, start_docker_worker: Any,
    docker_image: str
) -> None:
    q = queue("docker-redis-pool")
    start_docker_worker("redis", [q], concurrency=1)
    config = docker_executor_config("redis", q, docker_image, shared)
    thread, box = in_thread(lambda: run(runyard_instance, "lost_once_job", config, scratch))
    wait_until((scratch / "lost_once.1.started").exists, 90, "the first attempt to start in its container")
    (container,) = containers_of(docker_engine, "lost_once", all=False)
    owner = container.labels["runyard.celery_worker"]
    os.kill(int(owner.rsplit("/", 1)[1]), signal.SIGKILL)  # the pool process watching the container
    # Its reaper finds the container by its labels and removes it.
    wait_until(lambda: not any(c.id == container.id for c in containers_of(docker_engine, "lost_once")), 30,
               "the dead pool process's container to be removed")
    assert_lost_then_retried(thread, box, "lost_once", 2)


def test_whole_worker_killed_mid_step_leaves_no_container_and_fails_worker_lost(
    runyard_instance: Instance, scratch: Path, shared: Path, docker_engine: Any, start_docker_worker: Any,
    docker_image: str
) -> None:
    q = queue("docker-redis-lonely")
    worker = start_docker_worker("redis", [q], concurrency=1)
    config = docker_executor_config("redis", q, docker_image, shared, worker_lost_timeout=3.0)
    thread, box = in_thread(lambda: run(runyard_instance, "block_job", config, scratch))
    wait_until((scratch / "blocker.1.started").exists, 90, "the step to start in its container")
    assert containers_of(docker_engine, "blocker", all=False)
    worker.kill(signal.SIGKILL)  # the main process and its pool: nobody is left to report
    thread.join(60)
    assert not thread.is_alive(), "the run hung after its worker was killed"
    result: ExecutionResult = box["result"]
    failure = result.failure_for("blocker")
    assert failure is not None and failure.kind is FailureKind.WORKER_LOST, result.events
    assert worker.name in failure.message
    wait_until(lambda: not containers_of(docker_engine, "blocker"), 30,
               "the killed worker's step container to be removed")


def test_queue_nobody_consumes_fails_not_started_after_queue_timeout(
    runyard_instance: Instance, scratch: Path, shared: Path, session_docker_workers: Any, docker_image: str
) -> None:
    config = docker_executor_config("redis", queue("docker-nobody"), docker_image, shared, queue_timeout=1.0)
    result = run(runyard_instance, "block_job", config, scratch)
    failure = result.failure_for("blocker")
    assert failure is not None and failure.kind is FailureKind.NOT_STARTED, result.events
    assert "queue_timeout" in failure.message and queue("docker-nobody") in failure.message
    assert f"runyard celery worker --steps-in docker -q {queue('docker-nobody')}" in failure.message


def test_cancel_stops_the_running_container_and_revokes_the_queued_task(
    runyard_instance: Instance, scratch: Path, shared: Path, docker_engine: Any, start_docker_worker: Any,
    docker_image: str
) -> None:
    q = queue("docker-redis-cancel")
    start_docker_worker("redis", [q], concurrency=1)  # one runs, the other waits in the broker
    config = docker_executor_config("redis", q, docker_image, shared, queue_timeout=None, max_concurrent=2)
    cancellation = Cancellation()
    thread, box = in_thread(lambda: run(runyard_instance, "two_blockers_job", config, scratch, cancellation))
    wait_until(lambda: any(scratch.glob("*.1.started")), 90, "one step to start in its container")
    cancellation.cancel()
    thread.join(60)
    assert not thread.is_alive()
    result: ExecutionResult = box["result"]
    assert result.status is RunStatus.CANCELED
    for key in ("blocker", "second"):
        failure = result.failure_for(key)
        assert failure is not None and failure.kind is FailureKind.CANCELED, (key, result.events)
    wait_until(lambda: not containers_of(docker_engine), 30, "the canceled step's container to be removed")
    assert len(list(scratch.glob("*.1.started"))) == 1  # the queued one never started


def test_worker_refuses_a_run_whose_container_settings_differ(
    runyard_instance: Instance, scratch: Path, shared: Path, session_docker_workers: Any, docker_image: str
) -> None:
    config = docker_executor_config("redis", queue("docker-redis-main"), docker_image, shared,
                                    docker={"memory": "1g"})
    result = run(runyard_instance, "noop_job", config, scratch)
    failure = result.failure_for("noop")
    assert failure is not None and failure.kind is FailureKind.NOT_STARTED, result.events
    assert "differ at: memory" in failure.message
