"""Fixtures of the runyard-k8s tests: a real single-node Kubernetes and a locally built image.

The cluster is the project's own (`scripts/services.sh k8s`: Kubernetes 1.20 built from
Debian's source package, kubelet on the local Docker engine), found through
``.ci/state/k8s.kubeconfig`` (or ``$RUNYARD_K8S_KUBECONFIG``). When it is not running, the
fixture starts it; under ``CI=true`` it also builds it on a cache miss, and a cluster that
cannot start is a test *error*. Elsewhere, with no binaries built yet, the tests skip and
say how to build them.

Every test runs in one namespace made for the session (``runyard-test-XXXX``, labelled
``runyard.test=1``). At the end of the session any Job, pod or Secret left in it is an
error, and the namespace itself is deleted.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parent
JOBS_FILE = TESTS / "k8s_jobs.py"
TEST_LABEL = "runyard.test"
KUBECONFIG = Path(os.environ.get("RUNYARD_K8S_KUBECONFIG") or ROOT / ".ci" / "state" / "k8s.kubeconfig")


def _run(cmd: list[str], what: str, timeout: float) -> str:
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish within {timeout:.0f}s: {' '.join(cmd)}", pytrace=False)
    if done.returncode != 0:
        pytest.fail(f"{what} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}",
                    pytrace=False)
    return done.stdout.strip()


def _binaries_built() -> bool:
    out = subprocess.run(["bash", "-c", ". scripts/services.sh && _load k8s && _k8s_cache_ok \"$(k8s_bin_dir)\""],
                         cwd=ROOT, capture_output=True, text=True)
    return out.returncode == 0


@pytest.fixture(scope="session")
def k8s_kubeconfig() -> str:
    """The test cluster's kubeconfig, the cluster started (and in CI built) if needed."""
    if os.environ.get("CI") != "true" and not _binaries_built():
        pytest.skip("NO KUBERNETES: the test cluster's binaries are not built on this machine, so the k8s tests "
                    "cannot run; build and start it with `bash scripts/services.sh k8s` (~15 min once), "
                    "then run them again (under CI=true this is an error, not a skip)")
    _run(["bash", "scripts/services.sh", "k8s"], "starting Kubernetes (scripts/services.sh k8s)", 1800)
    assert KUBECONFIG.is_file(), f"scripts/services.sh k8s wrote no kubeconfig at {KUBECONFIG}"
    return str(KUBECONFIG)


@pytest.fixture(scope="session")
def k8s_image() -> str:
    """The project image (runyard + psycopg from this checkout), built locally: the step
    worker (`runyard api execute-step`) and the run worker are core runyard."""
    _run(["bash", "scripts/services.sh", "docker"], "starting the Docker engine", 300)
    return _run(["bash", "scripts/build-test-image.sh"], "building the test image (scripts/build-test-image.sh)",
                900).splitlines()[-1]


@pytest.fixture(scope="session")
def k8s_cluster(k8s_kubeconfig: str) -> Iterator[Any]:
    """An adapter `Cluster` for the test cluster (the same calls the backend makes)."""
    from runyard_k8s._k8s import Cluster
    from runyard_k8s.settings import K8sSettings

    cluster = Cluster(K8sSettings(image="unused", kubeconfig_file=k8s_kubeconfig), "tests")
    yield cluster
    cluster.close()


def namespace_objects(cluster: Any, namespace: str) -> list[str]:
    """Jobs, pods and Secrets in the namespace made by runyard (labelled runyard.io/run-id)."""
    sel = "runyard.io/run-id"
    jobs = [f"job {j['metadata']['name']}" for j in cluster.list_jobs(namespace, sel)]
    pods, _ = cluster.list_pods(namespace, sel)
    return (jobs + [f"pod {p['metadata']['name']} ({(p.get('status') or {}).get('phase')})" for p in pods]
            + [f"secret {s['metadata']['name']}" for s in cluster.list_secrets(namespace, sel)])


@pytest.fixture(scope="session")
def k8s_namespace(k8s_cluster: Any) -> Iterator[str]:
    """A namespace for the session; anything runyard left in it fails the session."""
    name = f"runyard-test-{secrets.token_hex(3)}"
    k8s_cluster.create_namespace(name, {TEST_LABEL: "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the controller-manager makes the namespace's default ServiceAccount
        try:
            k8s_cluster.core.read_namespaced_service_account("default", name, _preload_content=False)
            break
        except Exception:
            time.sleep(0.2)
    yield name
    deadline = time.monotonic() + 30
    while (left := namespace_objects(k8s_cluster, name)) and time.monotonic() < deadline:
        time.sleep(0.5)
    k8s_cluster.delete_namespace(name)
    if left:
        pytest.fail(f"the k8s tests left these in namespace {name} (now deleted with it):\n" + "\n".join(left),
                    pytrace=False)


@pytest.fixture
def k8s_settings(k8s_image: str, k8s_kubeconfig: str, k8s_namespace: str,
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Executor/launcher settings for the tests: the local image (never pulled), the
    session's namespace, pytest's temporary directories and the tests directory mounted
    at the same paths (hostPath: one node), short watchdogs."""
    base = str(tmp_path_factory.getbasetemp())
    return {
        "image": k8s_image,
        "image_pull_policy": "Never",
        "namespace": k8s_namespace,
        "kubeconfig_file": k8s_kubeconfig,
        "labels": {TEST_LABEL: "1"},
        "volumes": [{"name": "pytest-tmp", "hostPath": {"path": base}},
                    {"name": "tests", "hostPath": {"path": str(TESTS)}}],
        "volume_mounts": [{"name": "pytest-tmp", "mountPath": base},
                          {"name": "tests", "mountPath": str(TESTS), "readOnly": True}],
        "terminate_grace": 2,
        "pod_creation_timeout": 20,
        "pending_timeout": 20,
        "image_pull_timeout": 10,
        "ttl_seconds_after_finished": 120,
    }


@pytest.fixture
def k8s_instance(runyard_make_instance: Callable[..., Any], k8s_settings: dict[str, Any]) -> Any:
    return runyard_make_instance({"executor": {"k8s": {**k8s_settings, "max_concurrent": 3}}})


@pytest.fixture(scope="session")
def k8s_job() -> Callable[[str], Any]:
    """Loads a job of tests/k8s_jobs.py (a file code pointer: mounted into pods)."""
    from runyard import CodePointer
    from runyard.plugin import preload_job

    return lambda name: preload_job(CodePointer(file=str(JOBS_FILE)), name)


PG_ADMIN_URL = os.environ.get("RUNYARD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_DATABASE = "runyard_k8s_test"  # this branch's own database (created once)


@pytest.fixture(scope="session")
def k8s_postgres_url() -> str:
    """A PostgreSQL database of the k8s tests on the host (pods reach it on the node's network)."""
    import psycopg
    from psycopg import sql

    _run(["bash", "scripts/services.sh", "postgres"], "starting PostgreSQL", 300)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)).fetchone() is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(PG_DATABASE)))
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + PG_DATABASE


@pytest.fixture
def k8s_postgres_schema(k8s_postgres_url: str) -> Iterator[str]:
    """A schema of its own for one test's instance, dropped afterwards."""
    import psycopg
    from psycopg import sql

    schema = f"runyard_k8stest_{secrets.token_hex(4)}"
    yield schema
    with psycopg.connect(k8s_postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def k8s_launcher_instance(runyard_make_instance: Callable[..., Any], k8s_settings: dict[str, Any],
                          k8s_postgres_url: str, k8s_postgres_schema: str) -> Any:
    """Runs launched in pods: PostgreSQL storage on the host's loopback, so the run pods
    share the node's network (pod_spec.hostNetwork); RUNYARD_HOME is under pytest's
    basetemp, mounted at the same path."""
    return runyard_make_instance({
        "storage": {"postgres": {"url": k8s_postgres_url, "schema": k8s_postgres_schema}},
        # A run that ends by itself is swept by the next check_health (the daemon's) or by its
        # Job's TTL: short here, so a kit test that never asks again leaves nothing at the
        # session's end (the suite's own 120 s outlived the last tests on a quiet machine).
        "run_launcher": {"k8s": {**k8s_settings, "pod_spec": {"hostNetwork": True},
                                 "ttl_seconds_after_finished": 15}},
    })
