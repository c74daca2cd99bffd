"""Installing only this backend: wheels of the workspace, a fresh virtual environment,
``pip install "runyard[dask]"``, and then the plugin list, a run on dask, and the install
hint for a backend that is not installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

JOB = textwrap.dedent(
    '''
    from runyard import job, step


    @step
    def where() -> str:
        # Proves the step ran on dask: get_worker() raises ValueError outside a Dask worker.
        from distributed import get_worker

        return get_worker().address


    @step
    def double(address: str) -> str:
        return address * 2


    @job
    def hello():
        double(where())
    '''
)


def uv() -> str:
    found = ROOT / ".tools" / "bin" / "uv"
    exe = str(found) if found.exists() else shutil.which("uv")
    assert exe, "uv is needed to build the workspace's wheels: scripts/test.sh installs it into .tools/"
    return exe


def sh(*args: str, timeout: float = 600, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


@pytest.mark.slow
def test_install_runyard_dask_alone_from_wheels(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    built = sh(uv(), "build", "--all-packages", "--wheel", "-o", str(wheels), cwd=ROOT)
    assert built.returncode == 0, built.stderr
    (core,) = wheels.glob("runyard-0.1.0-*.whl")

    venv = tmp_path / "venv"
    made = sh(sys.executable, "-m", "venv", str(venv))
    assert made.returncode == 0, made.stderr
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # The core and the plugin come from the wheels just built; dask and the rest from the index.
    installed = sh(*pip, "--find-links", str(wheels), f"runyard[dask] @ {core.as_uri()}")
    assert installed.returncode == 0, installed.stdout + installed.stderr

    freeze = sh(str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json")
    dists = {d["name"].lower() for d in json.loads(freeze.stdout)}
    assert {"runyard", "runyard-dask", "dask", "distributed"} <= dists
    assert not dists & {"runyard-docker", "runyard-k8s", "runyard-celery", "celery", "docker", "kubernetes"}
    # The installed plugin is the workspace's (it has the worker-side module), not a namesake.
    check = sh(str(venv / "bin" / "python"), "-c", "import runyard_dask.remote, runyard_dask.handler")
    assert check.returncode == 0, check.stderr

    runyard = str(venv / "bin" / "runyard")
    home = tmp_path / "home"
    home.mkdir()
    (home / "runyard.yaml").write_text(
        "executor:\n  dask:\n    cluster_kwargs: {n_workers: 1, threads_per_worker: 1, processes: true}\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env |= {"RUNYARD_HOME": str(home)}

    listed = sh(runyard, "plugin", "list", "--json", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    plugins = {(p["kind"], p["name"]): p for p in json.loads(listed.stdout)}
    assert plugins[("executor", "dask")]["distribution"] == "runyard-dask"
    assert plugins[("executor", "dask")]["loads"] is True
    names = {name for _, name in plugins}
    assert not names & {"docker", "k8s", "celery"}

    job_file = tmp_path / "hello.py"
    job_file.write_text(JOB)
    ran = sh(runyard, "job", "execute", "-f", str(job_file), env=env, cwd=tmp_path, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "SUCCESS" in ran.stdout and "step double succeeded" in ran.stdout

    celery = sh(runyard, "job", "execute", "-f", str(job_file), "--executor", "celery", env=env, cwd=tmp_path)
    assert celery.returncode == 2
    assert "executor 'celery' is not installed: pip install \"runyard[celery]\"" in celery.stderr
