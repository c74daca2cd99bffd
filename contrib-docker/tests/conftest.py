"""Fixtures of the runyard-docker tests: a real Docker engine and a locally built image.

The engine is started by the project's own script when it is not running
(`scripts/services.sh docker`, which installs docker.io if needed), and the image is
built without a registry (`scripts/build-test-image.sh`). Either failing is a test
*error*, never a skip. At the end of the session, any container, network or volume the
tests left behind is an error too (and is removed).
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parent
JOBS_FILE = TESTS / "docker_jobs.py"
TEST_LABEL = "runyard.test"
# The test image's base carries runyard.test=1, so every container made from it has that label,
# whoever started it (other sessions' Kubernetes pods, ECS tasks, Celery workers on the shared
# engine). What this session creates carries its own id too, and only that is checked (and
# removed) at the end.
SESSION_LABEL = "runyard.test.session"
SESSION = uuid.uuid4().hex
TEST_LABELS = {TEST_LABEL: "1", SESSION_LABEL: SESSION}


def _run(cmd: list[str], what: str, timeout: float) -> str:
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish within {timeout:.0f}s: {' '.join(cmd)}", pytrace=False)
    if done.returncode != 0:
        pytest.fail(f"{what} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}",
                    pytrace=False)
    return done.stdout.strip()


def _ours(client: Any, basetemp: str) -> tuple[set[str], set[str], set[str]]:
    # Containers of runs of the tests' instances (under pytest's basetemp), labelled by the
    # tests or not (a container the plugin forgot to label for the tests still counts), and
    # whatever carries this session's label. The list call alone, no inspect of each: another
    # session's container can be removed between the two (NotFound).
    mine = f"{SESSION_LABEL}={SESSION}"
    containers = {
        c["Id"]
        for c in client.api.containers(all=True, filters={"label": ["runyard.run_id"]})
        if (c.get("Labels") or {}).get("runyard.instance", "").startswith(basetemp + "/")
    }
    containers |= {c["Id"] for c in client.api.containers(all=True, filters={"label": [mine]})}
    networks = {n.id for n in client.networks.list(filters={"label": [mine]})}
    volumes = {v.id for v in client.volumes.list(filters={"label": [mine]})}
    return containers, networks, volumes


@pytest.fixture(scope="session")
def docker_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A docker SDK client of a running engine (started by scripts/services.sh if down).

    On teardown, fails if containers (labelled runyard.run_id or runyard.test), networks
    or volumes (labelled runyard.test) created during the session are left, removing them.
    """
    _run(["bash", "scripts/services.sh", "docker"], "starting the Docker engine (scripts/services.sh docker)", 300)
    import docker

    client = docker.from_env(timeout=120)
    basetemp = str(tmp_path_factory.getbasetemp())
    before = _ours(client, basetemp)
    yield client
    # Removal runs on attempt threads right after a container exits: give them a moment.
    deadline = time.monotonic() + 20
    while True:
        after = _ours(client, basetemp)
        left = [a - b for a, b in zip(after, before, strict=True)]
        if not any(left) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    if any(left):
        import docker.errors

        names = []
        for cid in left[0]:
            try:
                c = client.containers.get(cid)
            except docker.errors.NotFound:
                continue  # it went by itself meanwhile: not left behind
            names.append(f"container {c.name} {c.labels}")
            c.remove(force=True, v=True)
        for nid in left[1]:
            names.append(f"network {nid[:12]}")
            client.networks.get(nid).remove()
        for vid in left[2]:
            names.append(f"volume {vid}")
            client.volumes.get(vid).remove(force=True)
        if names:
            pytest.fail("the docker tests left these behind (now removed):\n" + "\n".join(names), pytrace=False)


@pytest.fixture(scope="session")
def docker_image(docker_client: Any) -> str:
    """The project image (runyard + runyard-docker from this checkout), built locally."""
    return _run(["bash", "scripts/build-test-image.sh"], "building the test image (scripts/build-test-image.sh)",
                900).splitlines()[-1]


@pytest.fixture
def docker_settings(docker_image: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Executor/launcher settings for the tests: the local image, never pulled, labelled,
    with pytest's temporary directories at the same path (the kit's cancel test writes
    a file there from inside the step)."""
    base = str(tmp_path_factory.getbasetemp())
    return {
        "image": docker_image,
        "pull_policy": "never",
        "labels": dict(TEST_LABELS),
        "volumes": [f"{base}:{base}"],
        "terminate_grace": 2,
    }


@pytest.fixture
def docker_instance(runyard_make_instance: Callable[..., Any], docker_settings: dict[str, Any]) -> Any:
    return runyard_make_instance({"executor": {"docker": {**docker_settings, "max_concurrent": 2}}})


@pytest.fixture(scope="session")
def docker_job() -> Callable[[str], Any]:
    """Loads a job of tests/docker_jobs.py (a file code pointer: mounted into containers)."""
    from runyard import CodePointer
    from runyard.plugin import preload_job

    return lambda name: preload_job(CodePointer(file=str(JOBS_FILE)), name)


@pytest.fixture
def run_containers(docker_client: Any) -> Callable[[str], list[Any]]:
    """The containers (any state) labelled with a run id."""
    import docker.errors

    def containers(run_id: str) -> list[Any]:
        # Listing inspects each container: one removed meanwhile (the executor's short-lived
        # probe, a step just finished) is a 404, not an error of the code under test.
        for _ in range(20):
            try:
                return docker_client.containers.list(all=True, filters={"label": [f"runyard.run_id={run_id}"]})
            except docker.errors.NotFound:
                time.sleep(0.05)
        return docker_client.containers.list(all=True, filters={"label": [f"runyard.run_id={run_id}"]})

    return containers


class TcpEngine:
    """The local engine reached over TCP through a small forwarder to its socket, as a
    remote engine is (its bind mounts would name paths on another machine). `stop` cuts
    every connection, as an engine going down does."""

    def __init__(self) -> None:
        import os
        import socket
        import socketserver
        import threading

        sock_path = (os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock").removeprefix("unix://")
        self.sockets: set[socket.socket] = set()
        sockets = self.sockets

        def pump(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                try:
                    b.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        class Forward(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                up = socket.socket(socket.AF_UNIX)
                up.connect(sock_path)
                sockets.update((up, self.request))
                back = threading.Thread(target=pump, args=(up, self.request), daemon=True)
                back.start()
                pump(self.request, up)
                back.join(30)
                up.close()

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Forward)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"tcp://127.0.0.1:{self.server.server_address[1]}"
        self.stopped = False

    def stop(self) -> None:
        import socket

        if self.stopped:
            return
        self.stopped = True
        self.server.shutdown()
        self.server.server_close()
        for s in list(self.sockets):
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


@pytest.fixture
def tcp_engine() -> Iterator[TcpEngine]:
    engine = TcpEngine()
    yield engine
    engine.stop()
