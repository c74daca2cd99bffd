"""Real Dask clusters for the tests: ``dask scheduler`` and ``dask worker`` processes on
127.0.0.1 with ports chosen by the OS, each started in a session of its own and killed by
process group at teardown, so that nothing outlives the suite.

dask and distributed are dependencies of runyard-dask: if they cannot be imported the
tests fail (the import below raises), they do not skip.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import distributed  # noqa: F401 - fail loudly, not skip, when the backend is missing
import pytest

BIN = Path(sys.executable).parent
START_TIMEOUT = 90.0  # seconds; the machine is shared and slow at times
# The engine (this process) and the workers started with the `dask` command share the step
# signing key through the environment, as in a real deployment (docs/security.md). It is set
# for each test of this folder only (`_signing_key`) and given to the CLI workers explicitly:
# set at import, it leaked into every test of a session that merely collected this folder.
SIGNING_KEY = f"runyard-dask-tests-{os.getpid()}-{time.time_ns()}"


@pytest.fixture(autouse=True)
def _signing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's side of the key, for this test only (monkeypatch restores the variable)."""
    monkeypatch.setenv("RUNYARD_SIGNING_KEY", SIGNING_KEY)


def trust_env(tmp_root: Path) -> dict[str, str]:
    """What the tests' CLI workers may run: job files and outputs under pytest's tmp folder,
    and the kit's job module."""
    grant = {"code_locations": [str(tmp_root), "runyard.testing"], "output_stores": [str(tmp_root)]}
    return {"RUNYARD_STEP_WORKER": json.dumps(grant)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CliCluster:
    """A scheduler and workers as separate OS processes (the ``dask`` command line)."""

    def __init__(self, workdir: Path, *, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        # The session's cluster starts before any test's `_signing_key`, so the key is given here.
        self.env = {**os.environ, "RUNYARD_SIGNING_KEY": SIGNING_KEY, **(env or {})}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers: dict[str, subprocess.Popen[bytes]] = {}  # worker name -> process
        self.scheduler_file = workdir / "scheduler.json"
        self.address = ""

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - kept open for the process
        proc = subprocess.Popen(
            # setpriv: SIGTERM if this test process dies without its teardown (a CI timeout);
            # in a session of its own, nothing else would stop it.
            ["setpriv", "--pdeathsig", "TERM", str(BIN / "dask"), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
            start_new_session=True,  # its own process group: teardown kills it and its children
        )
        log.close()
        self.procs.append(proc)
        return proc

    def start_scheduler(self) -> None:
        self._spawn(
            "scheduler",
            ["scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
             "--scheduler-file", str(self.scheduler_file)],
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.scheduler_file.exists():
                try:
                    self.address = json.loads(self.scheduler_file.read_text())["address"]
                    return
                except (ValueError, KeyError):
                    pass  # being written
            self._check_alive()
            time.sleep(0.05)
        raise RuntimeError(f"dask scheduler did not start in {START_TIMEOUT}s; see {self.workdir}/scheduler.log")

    def start_worker(self, name: str, *, nthreads: int = 2, resources: str | None = None) -> subprocess.Popen[bytes]:
        args = ["worker", "--scheduler-file", str(self.scheduler_file), "--host", "127.0.0.1", "--name", name,
                "--nthreads", str(nthreads), "--no-nanny", "--dashboard-address", "127.0.0.1:0",
                "--death-timeout", "60"]
        if resources:
            args += ["--resources", resources]
        proc = self._spawn(name, args)
        self.workers[name] = proc
        return proc

    def wait_for_workers(self, n: int) -> None:
        with distributed.Client(self.address, timeout=START_TIMEOUT, set_as_default=False) as client:
            client.wait_for_workers(n, timeout=START_TIMEOUT)

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                logs = "\n".join(f.read_text()[-2000:] for f in self.workdir.glob("*.log"))
                raise RuntimeError(f"a dask process exited with {p.returncode}:\n{logs}")

    def stop(self) -> None:
        for p in reversed(self.procs):
            _kill_group(p, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _kill_group(p, signal.SIGKILL)
            p.wait(10)


def _kill_group(p: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def start_cli_cluster(workdir: Path, *, env: dict[str, str] | None = None,
                      workers: tuple[tuple[str, str | None], ...] = (("w1", None), ("w2", None))) -> CliCluster:
    workdir.mkdir(parents=True, exist_ok=True)
    # Everything under the folder of pytest's tmp folders (pytest-of-USER/pytest-N).
    root = next((p for p in workdir.parents if p.name.startswith("pytest-") and p.parent.name.startswith("pytest-of")),
                workdir.parent)
    cluster = CliCluster(workdir, env={**trust_env(root), **(env or {})})
    try:
        cluster.start_scheduler()
        for name, resources in workers:
            cluster.start_worker(name, resources=resources)
        cluster.wait_for_workers(len(workers))
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def cli_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliCluster]:
    """One scheduler and two workers (``w1`` has the resource ``GPU=1``) for the session."""
    cluster = start_cli_cluster(
        tmp_path_factory.mktemp("dask-cli-cluster"), workers=(("w1", "GPU=1"), ("w2", None))
    )
    yield cluster
    cluster.stop()


@pytest.fixture
def make_cli_cluster(tmp_path: Path) -> Iterator[Callable[..., CliCluster]]:
    """A cluster of the test's own, for tests that kill its processes."""
    made: list[CliCluster] = []

    def make(**kw: object) -> CliCluster:
        c = start_cli_cluster(tmp_path / f"cluster-{len(made)}", **kw)  # type: ignore[arg-type]
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def write_job(directory: Path, source: str, name: str = "jobs.py") -> Path:
    path = directory / name
    path.write_text(source)
    return path
