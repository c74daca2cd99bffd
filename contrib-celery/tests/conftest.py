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
    trust_args,
    write_home,
)

os.environ.setdefault("RYT_CELERY_OTHER_QUEUE", queue("other"))


@pytest.fixture
def start_worker(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``start_worker(broker, queues, concurrency=2)``: a ready worker, stopped at teardown."""
    workers: list[Worker] = []

    def start(broker: str, queues: list[str], *, concurrency: int = 2, wait: bool = True,
              args: tuple[str, ...] = (), **extra: Any) -> Worker:
        require_broker(broker)
        home = write_home(tmp_path / f"worker-home-{len(workers)}", executor_config(broker, queues[0], **extra))
        w = Worker(home, queues, concurrency=concurrency, args=(*trust_args(tmp_path_factory.getbasetemp()), *args))
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
            workers[broker] = Worker(home, [queue(f"{broker}-main")], concurrency=4,
                                     args=trust_args(tmp_path_factory.getbasetemp()))
        for w in workers.values():
            w.wait_ready()
        yield workers
    finally:
        for w in workers.values():
            w.stop()


_SENT: set[str] = set()  # the Celery task ids this session sent: their result keys are deleted at the end


@pytest.fixture(scope="session", autouse=True)
def _record_sent_tasks() -> Iterator[None]:
    """Records the ids of the tasks the celery executor sends in this process, so that the
    session can delete their results (which carry no session prefix) from the shared Redis."""
    from runyard_celery.handler import CeleryStepHandler

    launch = CeleryStepHandler.launch

    def recording(self: CeleryStepHandler, request: Any) -> Any:
        task = launch(self, request)
        _SENT.add(task.task_id)
        return task

    CeleryStepHandler.launch = recording  # type: ignore[method-assign]
    yield
    CeleryStepHandler.launch = launch  # type: ignore[method-assign]


@pytest.fixture(scope="session", autouse=True)
def _remove_session_queues(_record_sent_tasks: None) -> Iterator[None]:
    """The brokers are shared: at the end, delete this session's queues (RabbitMQ declares
    them durable), its results, its unacknowledged messages and its other Redis keys, leaving
    other users' alone; then check that nothing of this session is left."""
    yield
    import redis
    from kombu import Connection

    prefix = queue("")
    ids = sorted(_SENT)
    leftovers: list[str] = []
    for db_url in (BROKERS["redis"]["broker"], BROKERS["redis"]["broker"].rsplit("/", 1)[0] + "/12"):
        client = redis.Redis.from_url(db_url)
        keys = list(client.scan_iter(match=f"*{prefix}*"))
        keys += [f"celery-task-meta-{i}" for i in ids]
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
        # kombu's Redis transport keeps unacknowledged messages in the 'unacked' hash (and
        # 'unacked_index'), keyed by delivery tag: ours name this session's queues.
        for tag, payload in client.hscan_iter("unacked"):
            if prefix.encode() in payload:
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)
        leftovers += [f"{db_url}: {k.decode()}" for k in client.scan_iter(match=f"*{prefix}*")]
        leftovers += [f"{db_url}: result of {i}" for i in ids if client.exists(f"celery-task-meta-{i}")]
        leftovers += [f"{db_url}: unacked {t.decode()}" for t, p in client.hscan_iter("unacked")
                      if prefix.encode() in p]
    with Connection(BROKERS["rabbitmq"]["broker"], connect_timeout=5) as conn:
        channel = conn.channel()
        for name in (queue("rabbitmq-main"), queue("redeliver"), queue("json-rabbitmq"), queue("broker-option")):
            try:
                channel.queue_delete(name)
            except Exception:  # never declared in this session (a subset of the tests ran)
                channel = conn.channel()
    assert not leftovers, f"the Celery tests left keys behind in the shared Redis: {leftovers[:10]}"
