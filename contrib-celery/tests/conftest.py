"""Fixtures of the Celery tests: real brokers and real `runyard celery worker` processes
(see celery_support.py). The tests' directory goes on sys.path so that the tests and the
workers import the job module ``celery_test_jobs`` by the same name."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from celery_support import (  # noqa: E402
    BROKERS,
    SIGNING_KEY,
    Worker,
    docker_executor_config,
    docker_trust_args,
    executor_config,
    k8s_executor_config,
    k8s_job_settings,
    k8s_trust_args,
    leftover_containers,
    queue,
    require_broker,
    trust_args,
    write_home,
)

ROOT = Path(__file__).resolve().parents[2]

os.environ.setdefault("RYT_CELERY_OTHER_QUEUE", queue("other"))


@pytest.fixture(autouse=True)
def _signing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's side of the step signing key, for this test only (monkeypatch restores it)."""
    monkeypatch.setenv("RUNYARD_SIGNING_KEY", SIGNING_KEY)


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A folder of the test's own for files the steps and the test exchange."""
    d = tmp_path / "scratch"
    d.mkdir()
    return d


SectionOf = Callable[..., dict[str, Any]]
"""``(broker, default_queue, **extra) -> the executor section`` of a kind of worker."""


def _starter(homes: Path, executor: str, section: SectionOf, args: tuple[str, ...]) -> tuple[Any, list[Worker]]:
    """``start(broker, queues, concurrency=2, wait=True, args=(), **extra)`` and the workers it
    started: one `runyard celery worker` per call, with a home of its own under ``homes``
    whose runyard.yaml has ``executor: {EXECUTOR: section(broker, queues[0], **extra)}``."""
    workers: list[Worker] = []

    def start(broker: str, queues: list[str], *, concurrency: int = 2, wait: bool = True,
              args: tuple[str, ...] = (), **extra: Any) -> Worker:
        require_broker(broker)
        home = write_home(homes / f"{executor}-worker-home-{len(workers)}", section(broker, queues[0], **extra),
                          executor)
        w = Worker(home, queues, concurrency=concurrency, args=(*base_args, *args))
        workers.append(w)
        return w.wait_ready() if wait else w

    base_args = args
    return start, workers


def _session_workers(tmp_path_factory: pytest.TempPathFactory, executor: str, section: SectionOf,
                     args: tuple[str, ...], prefix: str, brokers: tuple[str, ...] = tuple(BROKERS),
                     ) -> Iterator[dict[str, Worker]]:
    """One worker per broker (of ``brokers``) for the whole session, consuming queue
    ``PREFIX-BROKER-main`` (``PREFIX-`` left out when empty), 4 processes."""
    workers: dict[str, Worker] = {}
    start, started = _starter(tmp_path_factory.mktemp(f"session-{executor}"), executor, section, args)
    try:
        for broker in brokers:
            workers[broker] = start(broker, [queue(f"{prefix}{broker}-main")], concurrency=4, wait=False)
        for w in workers.values():
            w.wait_ready()
        yield workers
    finally:
        for w in started:
            w.stop()


_SESSION_WORKER_FIXTURES = ("session_workers", "session_docker_workers", "session_k8s_workers")


@pytest.fixture(autouse=True)
def _session_workers_stay_alive(request: pytest.FixtureRequest) -> Iterator[None]:
    """A session worker that died fails the test that saw it die, with its log, and every
    later test at once: without this, each later step sent to its queue would wait out the
    queue timeout (5 minutes a test) before failing."""
    used = [request.getfixturevalue(name) for name in _SESSION_WORKER_FIXTURES if name in request.fixturenames]
    for workers in used:
        for w in workers.values():
            w.assert_alive("before this test")
    yield
    for workers in used:
        for w in workers.values():
            w.assert_alive("during this test")


@pytest.fixture
def start_worker(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``start_worker(broker, queues, concurrency=2)``: a ready worker, stopped at teardown."""
    start, workers = _starter(tmp_path, "celery", executor_config, trust_args(tmp_path_factory.getbasetemp()))
    yield start
    for w in workers:
        w.stop()


@pytest.fixture(scope="session")
def session_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Worker]]:
    """One worker per broker for the whole session, consuming that broker's main queue."""
    yield from _session_workers(tmp_path_factory, "celery", executor_config,
                                trust_args(tmp_path_factory.getbasetemp()), "")


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Any]:
    """A docker SDK client of the running engine (scripts/services.sh docker starts one).
    At the end of the session, a step container of these tests left behind fails it (and is
    removed): nothing may outlive its run, whatever was killed."""
    import subprocess

    done = subprocess.run(["bash", "scripts/services.sh", "docker"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        pytest.fail(f"the Docker engine could not be started: {done.stderr[-2000:]}", pytrace=False)
    import docker

    client = docker.from_env(timeout=120)
    yield client
    left = []
    for c in leftover_containers(client):
        left.append(f"{c.name} {c.status} {c.labels}")
        c.remove(force=True, v=True)
    assert not left, "the celery_docker tests left containers behind (now removed):\n" + "\n".join(left)


@pytest.fixture(scope="session")
def docker_image(docker_engine: Any) -> str:
    """The project image (runyard and runyard-docker from this checkout), built without a registry."""
    import subprocess

    done = subprocess.run(["bash", "scripts/build-test-image.sh"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0:
        pytest.fail(f"building the test image failed:\n{done.stderr[-3000:]}", pytrace=False)
    return done.stdout.strip().splitlines()[-1]


def _docker_section(image: str, shared: Path) -> SectionOf:
    return lambda broker, q, **extra: docker_executor_config(broker, q, image, shared, **extra)


@pytest.fixture
def start_docker_worker(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, docker_image: str) -> Iterator[Any]:
    """``start_docker_worker(broker, queues, concurrency=2, docker={...}, **celery_settings)``: a ready
    ``runyard celery worker --steps-in docker``, stopped at teardown."""
    shared = tmp_path_factory.getbasetemp()
    start, workers = _starter(tmp_path, "celery_docker", _docker_section(docker_image, shared),
                              docker_trust_args(shared))
    yield start
    for w in workers:
        w.stop()


@pytest.fixture(scope="session")
def session_docker_workers(tmp_path_factory: pytest.TempPathFactory, docker_image: str) -> Iterator[dict[str, Worker]]:
    """One ``--steps-in docker`` worker per broker for the session, on that broker's docker queue."""
    shared = tmp_path_factory.getbasetemp()
    yield from _session_workers(tmp_path_factory, "celery_docker", _docker_section(docker_image, shared),
                                docker_trust_args(shared), "docker-")


# -- celery_k8s: the test cluster, namespace and image are runyard-k8s's own fixtures -------------

def _k8s_fixtures() -> Any:
    """contrib-k8s/tests/conftest.py, imported by path: its cluster fixtures are reused here
    rather than copied (they start the cluster, build the image, make a namespace for the
    session and fail it if anything of runyard is left in it)."""
    import importlib.util

    path = ROOT / "contrib-k8s" / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("runyard_k8s_test_fixtures", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_k8s = _k8s_fixtures()
k8s_kubeconfig = _k8s.k8s_kubeconfig
k8s_image = _k8s.k8s_image
k8s_cluster = _k8s.k8s_cluster
k8s_namespace = _k8s.k8s_namespace
k8s_postgres_url = _k8s.k8s_postgres_url
k8s_postgres_schema = _k8s.k8s_postgres_schema


@pytest.fixture(scope="session")
def k8s_section(k8s_image: str, k8s_kubeconfig: str, k8s_namespace: str,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The Job settings of the session's ``--steps-in k8s`` workers (and runs)."""
    return k8s_job_settings(k8s_image, k8s_kubeconfig, k8s_namespace, tmp_path_factory.getbasetemp())


def _k8s_section(k8s: dict[str, Any]) -> SectionOf:
    return lambda broker, q, **extra: k8s_executor_config(broker, q, k8s, **extra)


@pytest.fixture
def start_k8s_worker(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                     k8s_section: dict[str, Any]) -> Iterator[Any]:
    """``start_k8s_worker(broker, queues, concurrency=2, k8s={...}, **celery_settings)``: a ready
    ``runyard celery worker --steps-in k8s``, stopped at teardown."""
    start, workers = _starter(tmp_path, "celery_k8s", _k8s_section(k8s_section),
                              k8s_trust_args(tmp_path_factory.getbasetemp()))
    yield start
    for w in workers:
        w.stop()


@pytest.fixture(scope="session")
def session_k8s_workers(tmp_path_factory: pytest.TempPathFactory,
                        k8s_section: dict[str, Any]) -> Iterator[dict[str, Worker]]:
    """One ``--steps-in k8s`` worker for the session, on Redis (queue ``k8s-redis-main``): the
    celery_k8s tests use Redis only (see test_celery_k8s_conformance.py)."""
    yield from _session_workers(tmp_path_factory, "celery_k8s", _k8s_section(k8s_section),
                                k8s_trust_args(tmp_path_factory.getbasetemp()), "k8s-", brokers=("redis",))


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
        for name in (queue("rabbitmq-main"), queue("redeliver"), queue("json-rabbitmq"), queue("broker-option"),
                     queue("docker-rabbitmq-main"), queue("docker-rabbitmq-lonely")):
            try:
                channel.queue_delete(name)
            except Exception:  # never declared in this session (a subset of the tests ran)
                channel = conn.channel()
    assert not leftovers, f"the Celery tests left keys behind in the shared Redis: {leftovers[:10]}"
