"""The ecs run launcher on the emulator, beyond the kit: a worker's exit code and its
CloudWatch log in the run's failure, a task that fails to start, a task ECS forgets, and
storage a task could not reach refused before anything starts."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from runyard import CodePointer, ConfigError, EventType, RunStatus
from runyard.testing.launchers import JOBS, launch_job, launcher_of, wait_for

JOBS_FILE = Path(__file__).resolve().parent / "ecs_jobs.py"


def _launch(instance: Any, job_name: str, *, module: bool = False, run_config: dict[str, Any] | None = None) -> Any:
    pointer = CodePointer(module=JOBS) if module else CodePointer(file=str(JOBS_FILE))
    return launch_job(instance, pointer, job_name, run_config=run_config, executor="in_process")


def _containers_of(task_arn: str) -> list[str]:
    out = subprocess.run(["docker", "ps", "-q", "--filter", f"label=com.amazonaws.ecs.task-arn={task_arn}"],
                         check=True, capture_output=True, text=True).stdout.split()
    assert out, f"no container of task {task_arn} on the engine"
    return out


def _failure(instance: Any, run_id: str) -> str:
    (ev,) = [s.event for s in instance.storage.get_events(run_id, types=[EventType.RUN_FAILURE])]
    return ev.message


@pytest.fixture
def launcher_instance(runyard_make_instance: Any, ecs_settings: dict[str, Any]) -> Any:
    return runyard_make_instance({"run_launcher": {"ecs": ecs_settings}})


def test_a_worker_exit_code_and_its_cloudwatch_log_become_the_run_failure(launcher_instance: Any) -> None:
    run = _launch(launcher_instance, "crash_job")
    result = wait_for(launcher_instance, run.run_id, timeout=120)
    assert result.run.status is RunStatus.FAILURE
    reason = _failure(launcher_instance, run.run_id)
    assert "exited with code 3" in reason and "EssentialContainerExited" in reason, reason
    # The last log lines come from CloudWatch Logs (the awslogs stream of the task): the
    # supervisor's lines around the worker (the step's own output is captured in events).
    assert f"run worker for run {run.run_id} exited with status 3" in reason, reason


def test_missing_image_fails_the_run_with_task_failed_to_start(
    runyard_make_instance: Any, ecs_settings: dict[str, Any]
) -> None:
    instance = runyard_make_instance({"run_launcher": {"ecs": {**ecs_settings, "image": "runyard-test/absent:x"}}})
    run = _launch(instance, "crash_job")
    result = wait_for(instance, run.run_id, timeout=60)
    assert result.run.status is RunStatus.FAILURE
    reason = _failure(instance, run.run_id)
    assert "failed to start" in reason and "TaskFailedToStart" in reason and "absent" in reason, reason


def test_a_vanished_task_is_unknown_for_the_grace_then_the_run_fails(
    launcher_instance: Any, ecs_settings: dict[str, Any], ministack: str
) -> None:
    scratch = Path(launcher_instance.home) / "scratch"
    scratch.mkdir()
    run = _launch(launcher_instance, "kit_heartbeat_job", module=True, run_config={"kit": {"scratch": str(scratch)}})
    deadline = time.monotonic() + 60
    while not (scratch / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (scratch / "started").exists()
    launcher, worker = launcher_of(launcher_instance, run.run_id)
    # The worker dies without a word (its container killed on the engine), and then ECS
    # forgets the task (as it does after a cluster is deleted, or STOPPED tasks expire, or an
    # emulator restarts: here the emulator's reset): DescribeTasks says MISSING for it.
    subprocess.run(["docker", "kill", "--signal", "KILL", *_containers_of(worker["task_arn"])], check=True,
                   capture_output=True)
    urllib.request.urlopen(urllib.request.Request(f"{ministack}/_ministack/reset", method="POST"), timeout=30)
    began = time.monotonic()
    first = launcher.check_health(launcher_instance.storage.get_run(run.run_id), worker)
    assert first.status.value == "unknown" and "MISSING" in first.message, first
    result = wait_for(launcher_instance, run.run_id, timeout=60)
    assert result.run.status is RunStatus.FAILURE
    assert time.monotonic() - began >= ecs_settings["missing_grace"] - 0.5
    reason = _failure(launcher_instance, run.run_id)
    assert "vanished" in reason and "MISSING" in reason, reason


def test_storage_a_task_cannot_reach_is_refused_before_launch(
    runyard_make_instance: Any, ecs_settings: dict[str, Any], boto: Any
) -> None:
    # SQLite on this machine, and the home not mounted: no task could reach it.
    settings = {**ecs_settings, "volumes": []}
    instance = runyard_make_instance({"run_launcher": {"ecs": settings}})
    before = boto("ecs").list_tasks(cluster=ecs_settings["cluster"], desiredStatus="RUNNING")["taskArns"]
    with pytest.raises(Exception) as info:
        _launch(instance, "crash_job")
    assert "SQLite" in str(info.value) and "volumes" in str(info.value)
    # PostgreSQL at a loopback address, from a task not on the host's network.
    pg = runyard_make_instance({
        "storage": {"postgres": {"url": "postgresql://postgres@127.0.0.1:5432/runyard_ecs_unused"}},
        "run_launcher": {"ecs": {**ecs_settings, "network_mode": "bridge"}},
    })
    from runyard.plugin import locate_storage
    from runyard_ecs.launcher import EcsRunLauncher
    from runyard_ecs.settings import EcsLauncherConfig

    cfg = EcsLauncherConfig(**{k: v for k, v in ecs_settings.items() if k not in (
        "log_configuration", "network_mode")}, network_mode="bridge")
    launcher = EcsRunLauncher(cfg, str(pg.home))
    assert locate_storage(pg).host == "127.0.0.1"
    with pytest.raises(ConfigError, match="network_mode: host"):
        launcher._check_storage(pg, str(pg.home))
    assert boto("ecs").list_tasks(cluster=ecs_settings["cluster"], desiredStatus="RUNNING")["taskArns"] == before
    json.dumps(before)


def test_an_unmounted_home_gets_its_runyard_yaml_from_secrets_manager_not_the_overrides(
    ecs_settings: dict[str, Any], boto: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A home outside every mounted volume, PostgreSQL storage the task reaches on the host's
    # network: the run worker needs the instance's runyard.yaml from somewhere else.
    import os
    import shutil
    import tempfile
    import uuid

    import psycopg
    import yaml
    from psycopg import sql
    from runyard import Instance

    sm = boto("secretsmanager")
    name = f"runyard/ecs-tests/config-{uuid.uuid4().hex[:8]}"
    arn = sm.create_secret(Name=name, SecretString="-")["ARN"]
    home = Path(tempfile.mkdtemp(prefix="runyard-ecs-unmounted-"))
    assert not str(home).startswith(str(tmp_path_factory.getbasetemp()))
    url = os.environ.get("RUNYARD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    schema = f"runyard_ecstest_{uuid.uuid4().hex[:8]}"

    def configure(**more: Any) -> Instance:
        (home / "runyard.yaml").write_text(yaml.safe_dump({
            "storage": {"postgres": {"url": url, "schema": schema}},
            "run_launcher": {"ecs": {**ecs_settings, **more}}}))
        return Instance(home)

    try:
        with pytest.raises(ConfigError, match=r"run_launcher\.ecs\.config_secret: required: RUNYARD_HOME .* is not "
                                              r"mounted .* set secrets_in_overrides: true"):
            _launch(configure(), "hello_job")
        instance = configure(config_secret=arn)
        run = _launch(instance, "hello_job")
        result = wait_for(instance, run.run_id, timeout=120)
        assert result.run.status is RunStatus.SUCCESS, [s.event for s in instance.storage.get_events(run.run_id)]
        text = (home / "runyard.yaml").read_text()
        assert sm.get_secret_value(SecretId=arn)["SecretString"] == text
        _, worker = launcher_of(instance, run.run_id)
        (task,) = boto("ecs").describe_tasks(cluster=ecs_settings["cluster"], tasks=[worker["task_arn"]])["tasks"]
        seen = json.dumps(task, default=str)
        assert schema not in seen  # nothing of runyard.yaml
        env = task["overrides"]["containerOverrides"][0]["environment"]
        assert "RUNYARD_ECS_CONFIG" not in {e["name"] for e in env}
        instance.storage.close()
    finally:
        sm.delete_secret(SecretId=arn, ForceDeleteWithoutRecovery=True)
        shutil.rmtree(home, ignore_errors=True)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
