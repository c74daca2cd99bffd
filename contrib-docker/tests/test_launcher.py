"""The docker run launcher on the real engine: a run in a container (its steps in
containers of their own), cancel, a dead run container, storage it could not reach."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml
from runyard import ConfigError, Instance, RunRecord, RunStatus

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def home(runyard_home: Path, docker_settings: dict[str, Any]) -> Path:
    (runyard_home / "runyard.yaml").write_text(
        yaml.safe_dump(
            {
                "executor": {"docker": {**docker_settings, "max_concurrent": 2}},
                "run_launcher": {"docker": docker_settings},
            }
        )
    )
    return runyard_home


def runyard(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RUNYARD_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "runyard", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def wait_for(predicate: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_launch_wait_runs_the_worker_and_its_steps_in_containers(home: Path, run_containers: Any) -> None:
    done = runyard(home, "job", "launch", "--wait", "--json", "-f", str(TESTS / "docker_jobs.py"), "-j", "hello_job")
    assert done.returncode == 0, done.stdout + done.stderr
    instance = Instance(home)
    (run,) = instance.storage.list_runs()
    assert run.status is RunStatus.SUCCESS and run.executor == "docker"
    launched = [s.event for s in instance.storage.get_events(run.run_id) if s.event.type.value == "RUN_LAUNCHED"]
    assert launched[0].data["launcher"] == "docker"
    assert launched[0].data["worker"]["container_name"].startswith("runyard-run-")
    starts = [s.event for s in instance.storage.get_events(run.run_id) if s.event.type.value == "STEP_START"]
    hosts = {e.data["host"] for e in starts}
    assert len(starts) == 2 and len(hosts) == 2  # each step in a container of its own
    # The worker removes its own container; steps' containers go as they finish.
    wait_for(lambda: run_containers(run.run_id) == [], "the run's containers to be removed", 20)


def test_cancel_stops_the_run_container_and_its_step_containers(home: Path, run_containers: Any) -> None:
    done = runyard(home, "job", "launch", "--json", "-f", str(TESTS / "docker_jobs.py"), "-j", "slow_job")
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = json.loads(done.stdout)["run_id"]
    wait_for(
        lambda: any(c.labels.get("runyard.kind") == "step" and c.status == "running" for c in run_containers(run_id)),
        "the step container to run",
    )
    started = time.monotonic()
    cancel = runyard(home, "run", "cancel", run_id)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    assert time.monotonic() - started < 30
    run = Instance(home).storage.get_run(run_id)
    assert run is not None and run.status is RunStatus.CANCELED
    wait_for(lambda: run_containers(run_id) == [], "the run's containers to be removed", 20)


def test_a_killed_run_container_fails_the_run_with_its_last_log_lines(
    home: Path, run_containers: Any, docker_client: Any
) -> None:
    done = runyard(home, "job", "launch", "--json", "-f", str(TESTS / "docker_jobs.py"), "-j", "slow_job")
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = json.loads(done.stdout)["run_id"]
    wait_for(
        lambda: any(c.labels.get("runyard.kind") == "step" and c.status == "running" for c in run_containers(run_id)),
        "the step container to run",
    )
    (worker,) = [c for c in run_containers(run_id) if c.labels.get("runyard.kind") == "run"]
    worker.kill(signal="SIGKILL")
    waited = runyard(home, "run", "wait", run_id, "--timeout", "60")
    assert waited.returncode == 1, waited.stdout + waited.stderr
    instance = Instance(home)
    run = instance.storage.get_run(run_id)
    assert run is not None and run.status is RunStatus.FAILURE
    (failure,) = [s.event for s in instance.storage.get_events(run_id) if s.event.type.value == "RUN_FAILURE"]
    assert "run worker died" in failure.message and "was killed by SIGKILL (exit code 137)" in failure.message
    assert f"runyard run worker for run {run_id}" in failure.message  # the container's last log lines
    # The orphaned step container and the dead run container are removed with it.
    wait_for(lambda: run_containers(run_id) == [], "the run's containers to be removed", 20)


def test_a_vanished_run_container_fails_the_run(home: Path, run_containers: Any) -> None:
    done = runyard(home, "job", "launch", "--json", "-f", str(TESTS / "docker_jobs.py"), "-j", "slow_job")
    run_id = json.loads(done.stdout)["run_id"]
    wait_for(lambda: [c for c in run_containers(run_id) if c.labels.get("runyard.kind") == "run"], "the run container")
    for c in run_containers(run_id):
        if c.labels.get("runyard.kind") == "run":
            c.remove(force=True)
    waited = runyard(home, "run", "wait", run_id, "--timeout", "60")
    assert waited.returncode == 1
    instance = Instance(home)
    (failure,) = [s.event for s in instance.storage.get_events(run_id) if s.event.type.value == "RUN_FAILURE"]
    assert "vanished" in failure.message
    wait_for(lambda: run_containers(run_id) == [], "the run's step containers to be removed", 20)


def _launcher(home: Path, settings: dict[str, Any], storage: dict[str, Any] | None) -> Any:
    from runyard import Instance
    from runyard_docker.launcher import DockerRunLauncher

    config: dict[str, Any] = {"run_launcher": {"docker": settings}}
    if storage is not None:
        config["storage"] = storage
    (home / "runyard.yaml").write_text(yaml.safe_dump(config))
    instance = Instance(home)
    cfg = instance.plugin_config("run_launcher", instance.sections["run_launcher"])
    return DockerRunLauncher(cfg, str(home))


def _run() -> RunRecord:
    return RunRecord(job_name="hello_job", code_pointer={"file": str(TESTS / "docker_jobs.py")}, run_config={},
                     executor="in_process", tags={}, parent_run_id=None, step_selection=None)


def test_postgres_on_loopback_is_rejected_before_launch_on_a_bridge_network(
    runyard_home: Path, docker_settings: dict[str, Any], run_containers: Any
) -> None:
    launcher = _launcher(runyard_home, docker_settings,
                         {"postgres": {"url": "postgresql://postgres@127.0.0.1:5432/postgres"}})
    run = _run()
    with pytest.raises(ConfigError, match=r"PostgreSQL at 127\.0\.0\.1, which a container on a bridge network "
                                          r"cannot reach .* Set network: host"):
        launcher.launch(run)
    assert run_containers(run.run_id) == []


def test_sqlite_without_the_home_mounted_is_rejected_before_launch(
    runyard_home: Path, docker_settings: dict[str, Any], run_containers: Any
) -> None:
    settings = {**docker_settings, "volumes": [], "mount_home": False}
    launcher = _launcher(runyard_home, settings, None)
    run = _run()
    with pytest.raises(ConfigError, match=r"run_launcher\.docker\.mount_home: false, but the run's SQLite storage"):
        launcher.launch(run)
    assert run_containers(run.run_id) == []


def test_launch_with_a_missing_image_exits_2_before_any_container(home: Path, run_containers: Any) -> None:
    config = yaml.safe_load((home / "runyard.yaml").read_text())
    config["run_launcher"]["docker"]["image"] = "runyard-test/not-built:0"
    (home / "runyard.yaml").write_text(yaml.safe_dump(config))
    done = runyard(home, "job", "launch", "-f", str(TESTS / "docker_jobs.py"), "-j", "hello_job")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "run_launcher.docker.image: image 'runyard-test/not-built:0' is not in the Docker engine" in done.stderr
    assert "runyard docker build-image" in done.stderr
    (run,) = Instance(home).storage.list_runs()
    assert run.status is RunStatus.FAILURE
    assert run_containers(run.run_id) == []


def test_postgres_storage_works_from_a_run_container_on_the_host_network(
    runyard_home: Path, docker_settings: dict[str, Any], run_containers: Any
) -> None:
    import uuid

    import psycopg
    from psycopg import sql

    url = os.environ.get("RUNYARD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    schema = f"runyard_dockertest_{uuid.uuid4().hex[:8]}"
    (runyard_home / "runyard.yaml").write_text(yaml.safe_dump({
        "storage": {"postgres": {"url": url, "schema": schema}},
        "run_launcher": {"docker": {**docker_settings, "network": "host"}},
    }))
    try:
        done = runyard(runyard_home, "job", "launch", "--wait", "-f", str(TESTS / "docker_jobs.py"), "-j", "hello_job")
        assert done.returncode == 0, done.stdout + done.stderr
        instance = Instance(runyard_home)
        (run,) = instance.storage.list_runs()
        assert run.status is RunStatus.SUCCESS
        starts = [s.event for s in instance.storage.get_events(run.run_id) if s.event.type.value == "STEP_START"]
        assert len(starts) == 2
        instance.storage.close()
        wait_for(lambda: run_containers(run.run_id) == [], "the run container to be removed", 20)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _binds(container: Any) -> list[str]:
    container.reload()
    return list(container.attrs["HostConfig"].get("Binds") or [])


@pytest.mark.parametrize(
    ("executor", "setting", "mounted"),
    [("in_process", None, False), ("docker", None, True), ("in_process", True, True), ("docker", False, False)],
)
def test_the_docker_socket_is_mounted_only_for_runs_that_need_it(
    runyard_home: Path, docker_settings: dict[str, Any], docker_client: Any, executor: str, setting: bool | None,
    mounted: bool,
) -> None:
    settings = dict(docker_settings)
    if setting is not None:
        settings["mount_docker_socket"] = setting
    launcher = _launcher(runyard_home, settings, None)
    run = attrs.evolve(_run(), executor=executor)
    worker = launcher.launch(run)
    try:
        binds = _binds(docker_client.containers.get(worker["container_id"]))
        assert any(b.endswith(":/var/run/docker.sock:rw") for b in binds) is mounted, binds
    finally:
        launcher.terminate(run, worker, force=True)


_KILL_RUN_WORKER = """
import os, signal
for pid in os.listdir('/proc'):
    # Not 1: docker-init, whose command line names the worker it started.
    if pid.isdigit() and int(pid) not in (1, os.getpid()):
        try:
            cmd = open(f'/proc/{pid}/cmdline', 'rb').read()
        except OSError:
            continue
        if b'runyard_docker.run_worker' in cmd:
            os.kill(int(pid), signal.SIGKILL)
            print('killed', pid)
"""


def test_no_container_outlives_a_run_worker_killed_inside_its_container(
    home: Path, run_containers: Any, docker_client: Any
) -> None:
    config = yaml.safe_load((home / "runyard.yaml").read_text())
    config["executor"]["docker"]["heartbeat_timeout"] = 5
    (home / "runyard.yaml").write_text(yaml.safe_dump(config))
    done = runyard(home, "job", "launch", "--json", "-f", str(TESTS / "docker_jobs.py"), "-j", "slow_job")
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = json.loads(done.stdout)["run_id"]
    wait_for(
        lambda: any(c.labels.get("runyard.kind") == "step" and c.status == "running" for c in run_containers(run_id)),
        "the step container to run",
    )
    (worker,) = [c for c in run_containers(run_id) if c.labels.get("runyard.kind") == "run"]
    code, out = worker.exec_run(["python3", "-c", _KILL_RUN_WORKER])
    # The worker's death ends its container (docker-init exits with it), and the engine may
    # then kill this exec too (137), after it printed what it killed.
    assert b"killed" in out and code in (0, 137), (code, out)
    # Nobody lists or waits for the run: the containers stop on their own.
    wait_for(lambda: not any(c.status == "running" for c in run_containers(run_id)),
             "no container of the run to be running", 45)
    # And the launcher's watcher has the run failed and every container removed.
    wait_for(lambda: run_containers(run_id) == [], "the run's containers to be removed", 90)
    run = Instance(home).storage.get_run(run_id)
    assert run is not None and run.status is RunStatus.FAILURE
    waited = runyard(home, "run", "wait", run_id, "--timeout", "60")
    assert waited.returncode == 1, waited.stdout + waited.stderr


def test_a_finished_run_container_without_the_socket_is_removed(
    runyard_home: Path, docker_settings: dict[str, Any], run_containers: Any, docker_client: Any
) -> None:
    (runyard_home / "runyard.yaml").write_text(yaml.safe_dump({
        "executor": {"in_process": {}},
        "run_launcher": {"docker": docker_settings},
    }))
    done = runyard(runyard_home, "job", "launch", "--wait", "--json", "-f", str(TESTS / "docker_jobs.py"),
                   "-j", "hello_job")
    assert done.returncode == 0, done.stdout + done.stderr
    (run,) = Instance(runyard_home).storage.list_runs()
    assert run.status is RunStatus.SUCCESS and run.executor == "in_process"
    wait_for(lambda: run_containers(run.run_id) == [], "the run container to be removed", 60)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"cpus": 1024}, r"run_launcher\.docker\.cpus: the Docker engine does not accept .*Range of CPUs"),
        ({"container_kwargs": {"shm_size": "lots"}},
         r"run_launcher\.docker\.container_kwargs\.shm_size: the Docker engine does not accept"),
    ],
)
def test_settings_the_engine_refuses_are_a_config_error_before_launch(
    runyard_home: Path, docker_settings: dict[str, Any], run_containers: Any, settings: dict[str, Any],
    expected: str,
) -> None:
    launcher = _launcher(runyard_home, {**docker_settings, **settings}, None)
    run = _run()
    with pytest.raises(ConfigError, match=expected):
        launcher.launch(run)
    assert run_containers(run.run_id) == []


def test_an_engine_gone_since_the_first_connection_gets_the_docker_host_message(
    runyard_home: Path, docker_settings: dict[str, Any], tcp_engine: Any
) -> None:
    from runyard_docker import _docker as d

    d.connect(tcp_engine.url, "run_launcher.docker")  # cached, as in a long-lived monitor
    tcp_engine.stop()
    launcher = _launcher(runyard_home, {**docker_settings, "docker_host": tcp_engine.url}, None)
    health = launcher.check_health(_run(), {"container_id": "0" * 64, "docker_host": tcp_engine.url})
    assert health.status == "unknown"
    assert f"run_launcher.docker.docker_host: the Docker engine at {tcp_engine.url} is not reachable" in health.message
    with pytest.raises(ConfigError, match=r"run_launcher\.docker\.docker_host: the Docker engine at tcp://\S+ is "
                                          r"not reachable"):
        launcher.terminate(_run(), {"container_id": "0" * 64, "docker_host": tcp_engine.url})
