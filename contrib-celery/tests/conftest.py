"""Fixtures of the Celery tests: real brokers and real `runyard celery worker` processes
(see celery_support.py). The tests' directory goes on sys.path so that the tests and the
workers import the job module ``celery_test_jobs`` by the same name."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from celery_support import (  # noqa: E402
    BROKERS,
    Worker,
    executor_config,
    queue,
    require_broker,
    write_home,
)

os.environ.setdefault("RYT_CELERY_OTHER_QUEUE", queue("other"))


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Any]:
    """``start_worker(broker, queues, concurrency=2)``: a ready worker, stopped at teardown."""
    workers: list[Worker] = []

    def start(broker: str, queues: list[str], *, concurrency: int = 2, wait: bool = True,
              args: tuple[str, ...] = (), **extra: Any) -> Worker:
        require_broker(broker)
        home = write_home(tmp_path / f"worker-home-{len(workers)}", executor_config(broker, queues[0], **extra))
        w = Worker(home, queues, concurrency=concurrency, args=args)
        workers.append(w)
        return w.wait_ready() if wait else w

    yield start
    for w in workers:
        w.stop()


@pytest.fixture(scope="session")
def session_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Worker]]:
    """One worker per broker for the whole session, consuming that broker's main queue."""
    workers: dict[str, Worker] = {}
    try:
        for broker in BROKERS:
            require_broker(broker)
            home = write_home(tmp_path_factory.mktemp(f"celery-{broker}"),
                              executor_config(broker, queue(f"{broker}-main")))
            workers[broker] = Worker(home, [queue(f"{broker}-main")], concurrency=4)
        for w in workers.values():
            w.wait_ready()
        yield workers
    finally:
        for w in workers.values():
            w.stop()




@pytest.fixture(scope="session", autouse=True)
def _remove_session_queues() -> Iterator[None]:
    """The brokers are shared: at the end, delete this session's queues (RabbitMQ declares
    them durable) and its Redis keys, leaving other users' alone."""
    yield
    import redis
    from kombu import Connection

    prefix = queue("")
    for db_url in (BROKERS["redis"]["broker"], BROKERS["redis"]["broker"].rsplit("/", 1)[0] + "/12"):
        client = redis.Redis.from_url(db_url)
        keys = list(client.scan_iter(match=f"*{prefix}*"))
        if keys:
            client.delete(*keys)
    with Connection(BROKERS["rabbitmq"]["broker"], connect_timeout=5) as conn:
        channel = conn.channel()
        for name in (queue("rabbitmq-main"), queue("redeliver"), queue("json-rabbitmq")):
            try:
                channel.queue_delete(name)
            except Exception:  # never declared in this session (a subset of the tests ran)
                channel = conn.channel()
