"""Fixtures of the runyard-ecs tests: an ECS API that runs real containers (ministack,
started by `scripts/services.sh ministack` on loopback, its tasks on the local Docker
engine) and the locally built project image (`scripts/build-test-image.sh`).

An emulator or image that cannot be brought up is a test *error* (never a skip), here and
under CI=true. Tasks run with ``networkMode: host`` and host volumes mounting pytest's
temporary directories and this tests directory at the same paths, so the SQLite storage,
the outputs and the job file are the same files inside the tasks and out.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parent
JOBS_FILE = TESTS / "ecs_jobs.py"
STATE = ROOT / ".ci" / "state" / "ministack"
REGION = "us-east-1"


def _run(cmd: list[str], what: str, timeout: float) -> str:
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish within {timeout:.0f}s: {' '.join(cmd)}", pytrace=False)
    if done.returncode != 0:
        pytest.fail(f"{what} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}",
                    pytrace=False)
    return done.stdout.strip()


def _remove_task_containers() -> None:
    """Remove the containers of this suite's ECS tasks. ministack reaps a stopped task's
    container only about a minute after it stopped, so the last tests' containers would
    still be on the engine when the session ends (and other suites check for leftovers)."""
    ps = subprocess.run(["docker", "ps", "-aq", "--filter", "label=ministack=ecs", "--filter", "label=runyard.test=1"],
                        capture_output=True, text=True)
    ids = ps.stdout.split()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)


@pytest.fixture(scope="session")
def ministack() -> Iterator[str]:
    """The endpoint URL of a running ministack (started by scripts/services.sh if down).
    Sets fake AWS credentials and the region in os.environ for the session: the run
    workers and the kit's fresh processes inherit them."""
    _run(["bash", "scripts/services.sh", "ministack"], "starting ministack (scripts/services.sh ministack)", 300)
    state = dict(line.split("=", 1) for line in STATE.read_text().splitlines() if "=" in line)
    endpoint = state["endpoint"]
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": REGION})
    yield endpoint
    _remove_task_containers()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ecs_image(ministack: str) -> str:
    """The project image (runyard from this checkout), built locally, never pulled."""
    return _run(["bash", "scripts/build-test-image.sh"], "building the test image (scripts/build-test-image.sh)",
                900).splitlines()[-1]


@pytest.fixture(scope="session")
def boto(ministack: str) -> Callable[[str], Any]:
    """A boto3 client of the emulator: ``boto("ecs")``, ``boto("logs")``."""
    import boto3

    return lambda service: boto3.client(service, endpoint_url=ministack, region_name=REGION)


SIGNING_SECRET = "runyard/ecs-tests/signing-key"


@pytest.fixture
def signing_key_secret(boto: Callable[[str], Any]) -> str:
    """The ARN of the step workers' signing key in the emulator's Secrets Manager (made
    again when a test reset the emulator)."""
    sm = boto("secretsmanager")
    try:
        return sm.describe_secret(SecretId=SIGNING_SECRET)["ARN"]
    except sm.exceptions.ResourceNotFoundException:
        return sm.create_secret(Name=SIGNING_SECRET, SecretString=secrets.token_hex(32))["ARN"]


@pytest.fixture
def ecs_settings(ministack: str, ecs_image: str, tmp_path_factory: pytest.TempPathFactory,
                 signing_key_secret: str) -> dict[str, Any]:
    base = str(tmp_path_factory.getbasetemp())
    return {
        "endpoint_url": ministack,
        "region": REGION,
        "cluster": "runyard-ecs-tests",
        "image": ecs_image,
        "launch_type": "EC2",
        "network_mode": "host",
        "memory": 512,
        "volumes": [f"{base}:{base}", f"{TESTS}:{TESTS}:ro"],
        "log_configuration": {"group": "/runyard/ecs-tests", "stream_prefix": "runyard"},
        "poll_interval": 0.2,
        "missing_grace": 3,
        "tags": {"runyard.test": "1"},
        "signing_key_secret": signing_key_secret,
    }


@pytest.fixture
def ecs_instance(runyard_make_instance: Callable[..., Any], ecs_settings: dict[str, Any]) -> Any:
    return runyard_make_instance({"executor": {"ecs": {**ecs_settings, "max_concurrent": 2}}})


@pytest.fixture(scope="session")
def ecs_job() -> Callable[[str], Any]:
    """Loads a job of tests/ecs_jobs.py (a file code pointer: mounted into the tasks)."""
    from runyard import CodePointer
    from runyard.plugin import preload_job

    return lambda name: preload_job(CodePointer(file=str(JOBS_FILE)), name)
