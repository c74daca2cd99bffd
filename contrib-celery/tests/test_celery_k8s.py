"""What the celery_k8s executor does when things go wrong, against real Redis, real
``runyard celery worker --steps-in k8s`` processes and the real test cluster: the step's
stderr tail in its failure, a pool process or a whole worker SIGKILLed mid-step (its Job is
found by label and deleted; the step fails WORKER_LOST and is retried), a queue nobody
consumes, cancel (running Jobs deleted, queued tasks revoked), Job settings that differ
between run and worker, and the install hint when runyard-k8s is missing.

The jobs are celery_docker's (`celery_docker_jobs`): the same steps, in pods here."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from celery_support import (
    HERE,
    K8S_TEST_LABEL,
    SESSION,
    assert_lost_then_retried,
    in_thread,
    k8s_executor_config,
    queue,
    wait_until,
)
from runyard import Cancellation, CodePointer, ExecutionResult, Instance, RunStatus, execute_job
from runyard.plugin import EventType, FailureKind, preload_job

JOBS = HERE / "celery_docker_jobs.py"


def job(name: str) -> Any:
    return preload_job(CodePointer(file=str(JOBS)), name)


def run(instance: Instance, name: str, config: dict[str, Any], scratch: Path,
        cancellation: Cancellation | None = None) -> ExecutionResult:
    return execute_job(job(name), instance=instance, executor="celery_k8s", cancellation=cancellation,
                       run_config={"scratch": str(scratch), "execution": {"celery_k8s": config}})


def jobs_of(cluster: Any, namespace: str, step: str | None = None) -> list[dict[str, Any]]:
    """This session's step Jobs (of ``step``), by label, as the reaper finds them."""
    sel = f"{K8S_TEST_LABEL}={SESSION},runyard.io/kind=step" + (f",runyard.io/step-key={step}" if step else "")
    return k8s_cluster_jobs(cluster, namespace, sel)


def k8s_cluster_jobs(cluster: Any, namespace: str, selector: str) -> list[dict[str, Any]]:
    return [j for j in cluster.list_jobs(namespace, selector) if not (j.get("metadata") or {}).get("deletionTimestamp")]


def pool_pids(worker: Any) -> list[int]:
    """The worker's pool processes (its children but the reaper)."""
    return [p for p in worker.children()
            if b"k8s_reaper" not in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_non_zero_exit_carries_the_stderr_tail(
    runyard_instance: Instance, scratch: Path, session_k8s_workers: Any, k8s_section: dict[str, Any]
) -> None:
    config = k8s_executor_config("redis", queue("k8s-redis-main"), k8s_section)
    result = run(runyard_instance, "loud_later_job", config, scratch)
    assert result.status is RunStatus.FAILURE
    step = "dies_loudly_a_moment_later"
    failure = result.failure_for(step)
    assert failure is not None and failure.kind is FailureKind.WORKER_LOST, result.events
    assert failure.exit_code == 3 and "exited with code 3" in failure.message
    assert "the last words before exit 3" in failure.message and "about to fail" in failure.message
    stderr = "".join(e.data.get("text", "") for e in result.events
                     if e.type is EventType.STEP_STDERR and e.step_key == step)
    assert "the last words before exit 3" in stderr
    assert result.step_states["plus_one"] == "skipped"


def test_pool_process_killed_mid_step_deletes_its_job_and_is_retried(
    runyard_instance: Instance, scratch: Path, k8s_cluster: Any, k8s_namespace: str, start_k8s_worker: Any,
    k8s_section: dict[str, Any]
) -> None:
    q = queue("k8s-redis-pool")
    worker = start_k8s_worker("redis", [q], concurrency=1)
    config = k8s_executor_config("redis", q, k8s_section)
    thread, box = in_thread(lambda: run(runyard_instance, "lost_once_job", config, scratch))
    wait_until((scratch / "lost_once.1.started").exists, 90, "the first attempt to start in its pod")
    (first,) = jobs_of(k8s_cluster, k8s_namespace, "lost_once")
    (pool,) = pool_pids(worker)
    os.kill(pool, signal.SIGKILL)  # the pool process watching the Job: nobody left to delete it
    # The worker's reaper finds the Job by its labels and deletes it.
    wait_until(lambda: first["metadata"]["name"] not in
               [j["metadata"]["name"] for j in jobs_of(k8s_cluster, k8s_namespace, "lost_once")], 30,
               "the dead pool process's Job to be deleted")
    assert_lost_then_retried(thread, box, "lost_once", 2)


def test_whole_worker_killed_mid_step_leaves_no_job_and_fails_worker_lost(
    runyard_instance: Instance, scratch: Path, k8s_cluster: Any, k8s_namespace: str, start_k8s_worker: Any,
    k8s_section: dict[str, Any]
) -> None:
    q = queue("k8s-redis-lonely")
    worker = start_k8s_worker("redis", [q], concurrency=1)
    config = k8s_executor_config("redis", q, k8s_section, worker_lost_timeout=3.0)
    thread, box = in_thread(lambda: run(runyard_instance, "block_job", config, scratch))
    wait_until((scratch / "blocker.1.started").exists, 90, "the step to start in its pod")
    assert jobs_of(k8s_cluster, k8s_namespace, "blocker")
    worker.kill(signal.SIGKILL)  # the main process and its pool: nobody is left to report
    thread.join(60)
    assert not thread.is_alive(), "the run hung after its worker was killed"
    result: ExecutionResult = box["result"]
    failure = result.failure_for("blocker")
    assert failure is not None and failure.kind is FailureKind.WORKER_LOST, result.events
    assert worker.name in failure.message
    wait_until(lambda: not jobs_of(k8s_cluster, k8s_namespace, "blocker"), 30,
               "the killed worker's step Job to be deleted by its reaper")


def test_queue_nobody_consumes_fails_not_started_after_queue_timeout(
    runyard_instance: Instance, scratch: Path, session_k8s_workers: Any, k8s_section: dict[str, Any]
) -> None:
    config = k8s_executor_config("redis", queue("k8s-nobody"), k8s_section, queue_timeout=1.0)
    result = run(runyard_instance, "block_job", config, scratch)
    failure = result.failure_for("blocker")
    assert failure is not None and failure.kind is FailureKind.NOT_STARTED, result.events
    assert "queue_timeout" in failure.message
    assert f"runyard celery worker --steps-in k8s -q {queue('k8s-nobody')}" in failure.message


def test_cancel_deletes_the_running_job_and_revokes_the_queued_task(
    runyard_instance: Instance, scratch: Path, k8s_cluster: Any, k8s_namespace: str, start_k8s_worker: Any,
    k8s_section: dict[str, Any]
) -> None:
    q = queue("k8s-redis-cancel")
    start_k8s_worker("redis", [q], concurrency=1)  # one runs, the other waits in the broker
    config = k8s_executor_config("redis", q, k8s_section, queue_timeout=None, max_concurrent=2)
    cancellation = Cancellation()
    thread, box = in_thread(lambda: run(runyard_instance, "two_blockers_job", config, scratch, cancellation))
    wait_until(lambda: any(scratch.glob("*.1.started")), 90, "one step to start in its pod")
    cancellation.cancel()
    thread.join(60)
    assert not thread.is_alive()
    result: ExecutionResult = box["result"]
    assert result.status is RunStatus.CANCELED
    for key in ("blocker", "second"):
        failure = result.failure_for(key)
        assert failure is not None and failure.kind is FailureKind.CANCELED, (key, result.events)
    wait_until(lambda: not jobs_of(k8s_cluster, k8s_namespace), 30, "the canceled step's Job to be deleted")
    assert len(list(scratch.glob("*.1.started"))) == 1  # the queued one never started


def test_worker_refuses_a_run_whose_job_settings_differ(
    runyard_instance: Instance, scratch: Path, session_k8s_workers: Any, k8s_section: dict[str, Any]
) -> None:
    config = k8s_executor_config("redis", queue("k8s-redis-main"), k8s_section,
                                 k8s_extra={"service_account_name": "powerful"})
    result = run(runyard_instance, "noop_job", config, scratch)
    failure = result.failure_for("noop")
    assert failure is not None and failure.kind is FailureKind.NOT_STARTED, result.events
    assert "differ at: service_account_name" in failure.message


def test_launcher_refuses_a_run_whose_executor_disagrees_before_creating_anything(
    runyard_make_instance: Any, tmp_path: Path
) -> None:
    """No cluster needed: the pair is checked before the launcher talks to one."""
    from runyard.testing.launchers import launch_job

    k8s = {"image": "jobs:1", "namespace": "etl", "kubeconfig_file": str(tmp_path / "no-such-kubeconfig")}
    instance = runyard_make_instance({
        "run_launcher": {"celery_k8s": {"broker": "redis://127.0.0.1:6379/13", "k8s": k8s}},
        "executor": {"celery_k8s": {"broker": "redis://127.0.0.1:6379/13", "k8s": {**k8s, "image": "jobs:2"}}},
    })
    with pytest.raises(Exception) as e:
        launch_job(instance, CodePointer(file=str(JOBS)), "noop_job")
    text = str(e.value)
    assert "run_launcher.celery_k8s.k8s.image ('jobs:1')" in text and "executor.celery_k8s.k8s.image ('jobs:2')" in text
