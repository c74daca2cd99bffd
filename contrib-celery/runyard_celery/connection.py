"""The ``celery`` executor's connection and preflight: the app a handler sends with, the
check that its broker and result backend answer, and the refusals of steps that no
Celery worker could run (checked before a task is sent)."""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery
from kombu.utils.url import maybe_sanitize_url
from runyard import RunyardError
from runyard.plugin import StepRequest, resolve

from .app import make_app
from .settings import PRIORITY_TAG, CeleryConfig


class CeleryBrokerError(RunyardError):
    """The broker or result backend cannot be reached."""


def open_app(cfg: CeleryConfig) -> tuple[Celery, str, str]:
    """The handler's app, its broker URL and its default queue; raises (the app closed)
    when the broker or backend cannot be reached."""
    broker = resolve(cfg.broker) or ""
    backend = resolve(cfg.backend)
    default_queue = resolve(cfg.default_queue) or "runyard"
    app = make_app(
        broker=broker,
        backend=backend,
        include=(),  # only workers import the job modules
        default_queue=default_queue,
        # Redis's default socket timeout is 120 s: a backend that stops answering (a dead
        # link, not a refused connection) would block each fetch that long, far past
        # worker_lost_timeout. Bounded here unless the user set them.
        config_source={"broker_connection_timeout": cfg.connect_timeout,
                       "redis_socket_connect_timeout": cfg.connect_timeout,
                       "redis_socket_timeout": min(cfg.connect_timeout, cfg.worker_lost_timeout),
                       **cfg.config_source},
    )
    # Celery's Redis backend subscribes this process to every task it sends, for
    # AsyncResult.get(); the monitor reads states itself, so nobody would drain them.
    app.backend.on_task_call = lambda producer, task_id: None  # type: ignore[method-assign]
    try:
        check_reachable(app, broker, cfg.connect_timeout)
    except BaseException:
        app.close()
        raise
    return app, broker, default_queue


def check_reachable(app: Any, broker: str, timeout: float) -> None:
    """Fail the run at once, naming the URL, when the broker or backend is down, rather
    than letting the first task's publish retry for ever."""
    problems: list[str] = []

    def check() -> None:
        try:
            with app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
        except Exception as e:
            problems.append(
                f"cannot reach the Celery broker at {maybe_sanitize_url(broker)} "
                f"(executor.celery.broker): {type(e).__name__}: {str(e).rstrip('.')}"
            )
            return
        try:
            app.backend.get_task_meta("runyard-connection-check")
        except Exception as e:
            problems.append(
                f"cannot reach the Celery result backend at {maybe_sanitize_url(app.conf.result_backend)} "
                f"(executor.celery.backend): {type(e).__name__}: {str(e).rstrip('.')}"
            )

    thread = threading.Thread(target=check, name="runyard-celery-connect", daemon=True)
    thread.start()
    thread.join(timeout * 2 + 1)
    if thread.is_alive():
        problems.append(
            f"the Celery broker at {maybe_sanitize_url(broker)} or its result backend did not answer "
            f"within {timeout * 2 + 1:g}s (executor.celery.connect_timeout is {timeout:g}s)"
        )
    if problems:
        raise CeleryBrokerError(f"{problems[0]}. Start it, or fix the URL (runyard.yaml or the run config).")


def refusal(request: StepRequest) -> str | None:
    """Why no Celery worker could run this step, or None."""
    if request.output_store.startswith("memory://"):
        return (
            f"step '{request.step_key}' was not started: Celery workers cannot read the in-memory output "
            "store of this process; run with a RUNYARD_HOME (outputs under it) or set outputs: to a shared "
            "path or URL in runyard.yaml"
        )
    if request.code_pointer.module == "__main__":
        return (
            f"step '{request.step_key}' was not started: job '{request.job_name}' was defined in __main__ "
            "without a file, so no Celery worker can load it; define it in a file (-f) or a module (-m)"
        )
    priority = request.tags.get(PRIORITY_TAG)
    if priority is not None and not (priority.isdigit() and 0 <= int(priority) <= 9):
        return (
            f"step '{request.step_key}' was not started: tag {PRIORITY_TAG}={priority!r} must be an integer "
            "from 0 (lowest) to 9 (highest)"
        )
    return None
