"""Helpers of the Celery tests. Real brokers, real workers: every test here talks to Redis or RabbitMQ on this machine
(started by scripts/services.sh, never faked) and to `runyard celery worker` processes that
the fixtures start in their own process groups and kill at teardown.

Isolation from other users of the same brokers: results live in Redis database 13, and
every queue name carries this session's id, so parallel sessions never take each other's
tasks. A broker that cannot be reached fails the tests (it is not a reason to skip).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

SESSION = uuid.uuid4().hex[:8]
REDIS = os.environ.get("RUNYARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
RABBITMQ = os.environ.get("RUNYARD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
BROKERS = {
    "redis": {"broker": REDIS, "backend": REDIS},
    "rabbitmq": {"broker": RABBITMQ, "backend": REDIS},
}
RUNYARD = str(Path(sys.executable).with_name("runyard"))
# Workers get SIGTERM if this test process dies without its teardown (killed by a CI timeout,
# Ctrl-C twice): they run in sessions of their own, so nothing else would stop them.
DIE_WITH_PYTEST = ["setpriv", "--pdeathsig", "TERM"]
HERE = Path(__file__).resolve().parent


# Both sides read the step signing key from the environment: the tests' engine (this process,
# for each test of this folder: conftest's `_signing_key`) and the workers it starts (given
# explicitly, since session workers start before any test's fixture). Never put in os.environ
# at import: that leaked it into every test of a session that merely collected this folder.
SIGNING_KEY = f"runyard-celery-tests-{SESSION}-{uuid.uuid4().hex}"
# What the tests' workers may run: the test job modules, with outputs anywhere under pytest's
# temporary folder (each test's instance keeps its outputs in its own tmp_path).
CODE_LOCATIONS = ("celery_test_jobs", "runyard.testing")


def trust_args(output_root: Path) -> tuple[str, ...]:
    return (*(a for m in CODE_LOCATIONS for a in ("--code-location", m)), "--output-store", str(output_root))


def queue(name: str) -> str:
    """A queue name unique to this test session."""
    return f"ryt-{SESSION}-{name}"


def executor_config(broker: str, default_queue: str, **extra: Any) -> dict[str, Any]:
    return {**BROKERS[broker], "default_queue": default_queue, **extra}


def require_broker(broker: str) -> None:
    """Fail (not skip) with the fix when the broker is not there."""
    from kombu import Connection

    url = BROKERS[broker]["broker"]
    try:
        with Connection(url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1, timeout=10)
    except Exception as e:
        pytest.fail(
            f"the {broker} broker at {url} is unreachable ({e}); start it with: bash scripts/services.sh {broker}",
            pytrace=False,
        )


class Worker:
    """One `runyard celery worker` process group, started for a test and killed after it."""

    def __init__(self, home: Path, queues: list[str], *, concurrency: int = 2, name: str | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.home = home
        self.queues = queues
        self.name = name or f"ryt-{SESSION}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
        self.log = home / f"worker-{self.name.split('@')[0]}.log"
        self._checked = 0  # bytes of the log assert_alive has read
        self._gave_up = False
        # PYTHONPATH: the workers import the tests' job module (celery_test_jobs) like any user job.
        env = {**os.environ, "RUNYARD_SIGNING_KEY": SIGNING_KEY, "RUNYARD_HOME": str(home),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [*DIE_WITH_PYTEST, RUNYARD, "celery", "worker", "-q", ",".join(queues), "-c", str(concurrency),
             "-n", self.name, "-l", "INFO", *args],
            env=env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown kills the pool children too
            cwd=str(home),
        )

    def wait_ready(self, timeout: float = 60) -> Worker:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker {self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            if b" ready." in self.log.read_bytes():
                return self
            time.sleep(0.1)
        raise AssertionError(f"worker {self.name} not ready after {timeout}s:\n{self.tail()}")

    def assert_alive(self, when: str) -> None:
        """Fails the test if this worker exited, or its consumer gave up (Celery logs
        "Unrecoverable error" and shuts down, e.g. when RabbitMQ closed its channel)."""
        with self.log.open("rb") as f:  # only what was written since the last check
            f.seek(self._checked)
            new = f.read()
        self._checked += len(new)
        self._gave_up = self._gave_up or b"Unrecoverable error" in new
        if self.proc.poll() is not None or self._gave_up:
            pytest.fail(f"the session worker {self.name} died {when} (exit code {self.proc.poll()}); "
                        f"its log ends:\n{self.tail(60)}", pytrace=False)

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None or _group_alive(self.proc.pid):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """SIGTERM the group (warm shutdown), SIGKILL what is left after 10 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.kill(signal.SIGKILL)
        self.proc.wait(10)
        deadline = time.monotonic() + 10
        while _group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _group_alive(self.proc.pid), f"worker {self.name} left processes behind"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_home(home: Path, config: dict[str, Any], executor: str = "celery") -> Path:
    home.mkdir(parents=True, exist_ok=True)
    (home / "runyard.yaml").write_text(yaml.safe_dump({"executor": {executor: config}}))
    return home


# -- celery_docker: Celery workers that run each step in a container ---------------------

DOCKER_TEST_LABEL = "runyard.celery_test"
"""Every step container of these tests carries it (value: the session id): the session
fails if one is left behind, and removes it."""


def docker_section(image: str, shared: Path, **extra: Any) -> dict[str, Any]:
    """The workers' container settings: the locally built image, never pulled; pytest's
    temporary folder (outputs, scratch files) at the same path in every container."""
    return {"image": image, "pull_policy": "never", "labels": {"runyard.test": "1", DOCKER_TEST_LABEL: SESSION},
            "volumes": [f"{shared}:{shared}"], "terminate_grace": 2, **extra}


def docker_executor_config(broker: str, default_queue: str, image: str, shared: Path, *,
                           docker: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    section = docker_section(image, shared, **(docker or {}))
    return {**executor_config(broker, default_queue, **extra), "docker": section}


def docker_trust_args(output_root: Path) -> tuple[str, ...]:
    # The celery_docker jobs are loaded by file: their directory is a code location too.
    return (*trust_args(output_root), "--code-location", str(HERE), "--steps-in", "docker")


# -- celery_k8s: Celery workers that run each step as a Kubernetes Job --------------------------

K8S_TEST_LABEL = "runyard.celery_k8s_test"
"""Every step Job of these tests carries it (value: the session id). Not DOCKER_TEST_LABEL:
the kubelet runs pods on the same Docker engine with their labels, and the docker tests'
session check must not take a pod's container for a step container they left behind."""


def k8s_job_settings(image: str, kubeconfig: str, namespace: str, shared: Path, **extra: Any) -> dict[str, Any]:
    """The workers' Job settings: the locally built image, never pulled; the session's
    namespace; pytest's temporary folder (outputs, scratch files) and this folder (the jobs,
    loaded by file) at the same paths in every pod (hostPath: one node); short watchdogs."""
    return {
        "image": image, "image_pull_policy": "Never", "namespace": namespace, "kubeconfig_file": kubeconfig,
        "labels": {"runyard.test": "1", K8S_TEST_LABEL: SESSION},
        "volumes": [{"name": "pytest-tmp", "hostPath": {"path": str(shared)}},
                    {"name": "tests", "hostPath": {"path": str(HERE)}}],
        "volume_mounts": [{"name": "pytest-tmp", "mountPath": str(shared)},
                          {"name": "tests", "mountPath": str(HERE), "readOnly": True}],
        "terminate_grace": 2, "pod_creation_timeout": 60, "pending_timeout": 60, "image_pull_timeout": 10,
        "ttl_seconds_after_finished": 120, **extra,
    }


def k8s_executor_config(broker: str, default_queue: str, k8s: dict[str, Any], *,
                        k8s_extra: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {**executor_config(broker, default_queue, **extra), "k8s": {**k8s, **(k8s_extra or {})}}


def k8s_trust_args(output_root: Path) -> tuple[str, ...]:
    return (*trust_args(output_root), "--code-location", str(HERE), "--steps-in", "k8s")


def leftover_containers(client: Any) -> list[Any]:
    return client.containers.list(all=True, filters={"label": [f"{DOCKER_TEST_LABEL}={SESSION}"]})


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes: it runs no step code.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` on a thread; its result (or error) lands in the box under "result" ("error")."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # surfaced by the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def assert_lost_then_retried(thread: threading.Thread, box: dict[str, Any], step: str, output: Any) -> None:
    """The run on ``thread`` (see `in_thread`) ends, and succeeds with ``output`` from
    ``step``'s second attempt: the first failed WORKER_LOST (its pool process was killed)
    and was retried once, by the step's retry policy."""
    from runyard.plugin import EventType, FailureKind

    thread.join(120)
    assert not thread.is_alive(), "the run hung after the pool process was killed"
    result = box["result"]
    assert result.success, result.events
    assert result.output_for(step) == output
    first = [e for e in result.events if e.type is EventType.STEP_FAILURE and e.attempt == 1]
    assert len(first) == 1 and first[0].failure is not None
    assert first[0].failure.kind is FailureKind.WORKER_LOST, first[0].failure
    assert [e.data["next_attempt"] for e in result.events if e.type is EventType.STEP_RETRY] == [2]


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class FreezableProxy:
    """A TCP proxy in front of a real server that can stop forwarding (`freeze`) without
    closing anything: the server then looks alive but never answers, as behind a dead link."""

    def __init__(self, target_host: str, target_port: int) -> None:
        import threading

        self.target = (target_host, target_port)
        self.frozen = threading.Event()
        self.closed = threading.Event()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=10)
            upstream.settimeout(None)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        while not self.closed.is_set():
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            while self.frozen.is_set() and not self.closed.is_set():
                time.sleep(0.05)  # hold the data: the other side waits for an answer for ever
            try:
                dst.sendall(data)
            except OSError:
                return

    def freeze(self) -> None:
        self.frozen.set()

    def close(self) -> None:
        self.closed.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # close() alone leaves a blocked accept() listening
        except OSError:
            pass
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass
