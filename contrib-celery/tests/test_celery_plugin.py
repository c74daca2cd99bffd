"""The installed distribution as users meet it: the plugin module stays light, the CLI has
`runyard celery worker`, a job runs end to end through `runyard job execute`, and bad
settings are errors that name the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from celery_support import BROKERS, HERE, RUNYARD, executor_config, queue
from runyard import ConfigError, Instance, RunStatus, execute_job


def test_plugin_module_and_cli_hook_do_not_import_celery() -> None:
    code = (
        "import sys, click, runyard_celery.plugin as p\n"
        "g = click.Group()\n"
        "p.runyard_cli(cli=g)\n"
        "assert 'worker' in g.commands['celery'].commands\n"
        "backends = ('celery', 'kombu', 'billiard', 'redis', 'amqp')\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in backends)\n"
        "print(heavy)\n"
    )
    out = subprocess.check_output([sys.executable, "-c", code], text=True).strip()
    assert out == "[]"


def test_worker_help_is_available() -> None:
    out = subprocess.run([RUNYARD, "celery", "worker", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--concurrency" in out and "-q, --queues" in out


def test_job_runs_end_to_end_through_the_cli(tmp_path: Path, session_workers: Any) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "runyard.yaml").write_text(yaml.safe_dump(
        {"executor": {"celery": executor_config("redis", queue("redis-main"), max_concurrent=2)}}))
    env = {**os.environ, "RUNYARD_HOME": str(home), "PYTHONPATH": str(HERE)}
    proc = subprocess.run([RUNYARD, "job", "execute", "-m", "celery_test_jobs", "-j", "chain_job"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    instance = Instance(home)
    try:
        (run,) = instance.storage.list_runs()
        assert run.executor == "celery" and run.status is RunStatus.SUCCESS
    finally:
        instance.storage.close()


def test_validate_names_the_key_of_a_pinned_setting(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "runyard.yaml").write_text(yaml.safe_dump(
        {"executor": {"celery": {**BROKERS["redis"], "config_source": {"task_serializer": "pickle"}}}}))
    proc = subprocess.run([RUNYARD, "instance", "validate"], capture_output=True, text=True,
                          env={**os.environ, "RUNYARD_HOME": str(home)})
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "executor.celery" in text and "config_source" in text and "task_serializer" in text


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"broker": BROKERS["redis"]["broker"], "backend": "rpc://"}, r"executor\.celery\.backend: 'rpc://'"),
        ({"broker": BROKERS["rabbitmq"]["broker"]}, r"executor\.celery\.backend: required with the broker amqp"),
    ],
    ids=["rpc-backend", "amqp-without-backend"],
)
def test_unusable_backend_is_a_config_error(
    runyard_instance: Instance, settings: dict[str, Any], expected: str
) -> None:
    import celery_test_jobs as J

    with pytest.raises(ConfigError, match=expected):
        execute_job(J.chain_job, instance=runyard_instance, executor="celery",
                    run_config={"execution": {"celery": settings}})


@pytest.mark.parametrize("written", ["executor: celery\n", "executor:\n  celery: {default_queue: q}\n"])
def test_a_missing_broker_is_a_config_error_not_a_silent_default(tmp_path: Path, written: str) -> None:
    """Without `broker`, steps once went to redis://127.0.0.1:6379/0 unasked: whoever runs a
    Redis there (another user, a container) received every step's run config."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "runyard.yaml").write_text(written)
    env = {**os.environ, "RUNYARD_HOME": str(home)}
    for cmd in (["instance", "validate"], ["job", "execute", "-m", "celery_test_jobs", "-j", "chain_job"]):
        proc = subprocess.run([RUNYARD, *cmd], capture_output=True, text=True, timeout=60,
                              env={**env, "PYTHONPATH": str(HERE)})
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "executor.celery.broker: required key 'broker' is missing; add the URL" in proc.stderr
        assert "broker: redis://127.0.0.1:6379/0" in proc.stderr  # the fix, as an example
    worker = subprocess.run([RUNYARD, "celery", "worker"], capture_output=True, text=True, timeout=60,
                            env={**env, "RUNYARD_HOME": str(tmp_path / "empty-home")})
    assert worker.returncode == 2 and "executor.celery.broker is not set and no --broker was given" in worker.stderr


def test_plugin_list_shows_the_executor_from_its_distribution() -> None:
    out = subprocess.run([RUNYARD, "plugin", "list", "--json"], capture_output=True, text=True, check=True).stdout
    assert "runyard-celery" in out
    assert any(p.get("name") == "celery" for p in _flatten(json.loads(out)))


def _flatten(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, dict):
        return [data, *[x for v in data.values() for x in _flatten(v)]]
    if isinstance(data, list):
        return [x for v in data for x in _flatten(v)]
    return []


# -- Celery in front of containers: the half that is missing, the section that is missing ---------

FRONTED = [("docker", "runyard_docker", "celery-docker"), ("k8s", "runyard_k8s", "celery-k8s")]


@pytest.mark.parametrize(("backend", "package", "extra"), FRONTED, ids=["docker", "k8s"])
def test_missing_fronted_backend_is_an_install_hint(tmp_path: Path, backend: str, package: str, extra: str) -> None:
    """runyard-docker (runyard-k8s) cannot be uninstalled from the test environment: the
    subprocess makes its import fail (sys.modules entry None), as it fails where it is not
    installed; both the config check and the worker name the extra."""
    (tmp_path / "runyard.yaml").write_text(
        f"executor: {{celery_{backend}: {{broker: 'redis://127.0.0.1:6379/13', {backend}: {{image: 'x:1'}}}}}}\n")
    code = (f"import sys; sys.modules[{package!r}] = None; sys.argv = ['runyard', 'instance', 'validate']; "
            "from runyard.cli import main; main()")
    for argv in (code, code.replace("'instance', 'validate'", f"'celery', 'worker', '--steps-in', {backend!r}")):
        done = subprocess.run([sys.executable, "-c", argv], env={**os.environ, "RUNYARD_HOME": str(tmp_path)},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0, done.stdout
        text = done.stdout + done.stderr
        assert f'pip install "runyard[{extra}]"' in text, text


@pytest.mark.parametrize("backend", ["docker", "k8s"])
def test_fronted_worker_without_its_section_exits_2(tmp_path: Path, backend: str) -> None:
    (tmp_path / "runyard.yaml").write_text("executor: {celery: {broker: 'redis://127.0.0.1:6379/13'}}\n")
    done = subprocess.run([RUNYARD, "celery", "worker", "--steps-in", backend, "--code-location", str(HERE)],
                          env={**os.environ, "RUNYARD_HOME": str(tmp_path)}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"executor.celery_{backend} is not set" in done.stderr and f"--steps-in {backend}" in done.stderr


def test_plugin_module_imports_no_backend_client() -> None:
    code = ("import sys, runyard_celery.plugin as p; p.runyard_executors(); p.runyard_run_launchers(); "
            "print([m for m in ('celery', 'kombu', 'docker', 'kubernetes') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
