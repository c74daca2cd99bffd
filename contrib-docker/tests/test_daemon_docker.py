"""`runyard daemon` with the docker run launcher: a run container killed with SIGKILL ends
the run FAILURE within 10 s with no CLI call in between, with the engine's reason and its
recorded time of death (the container's FinishedAt), not the time it was noticed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from runyard import Instance, RunStatus

from .test_launcher import TESTS, home, runyard, wait_for  # noqa: F401 - home: the fixture


def test_daemon_fails_a_killed_run_container_within_10s(home: Path, run_containers: Any) -> None:  # noqa: F811
    log = open(home / "daemon.log", "w")  # noqa: SIM115 - owned by the daemon process
    daemon = subprocess.Popen([sys.executable, "-m", "runyard", "daemon", "run"],
                              env={**os.environ, "RUNYARD_HOME": str(home)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: runyard(home, "daemon", "status", "--json").returncode == 0, "the daemon to start", 60)
        done = runyard(home, "job", "launch", "--json", "-f", str(TESTS / "docker_jobs.py"), "-j", "slow_job")
        assert done.returncode == 0, done.stdout + done.stderr
        run_id = json.loads(done.stdout)["run_id"]
        wait_for(
            lambda: any(c.labels.get("runyard.kind") == "step" and c.status == "running"
                        for c in run_containers(run_id)),
            "the step container to run", 120,
        )
        (worker,) = [c for c in run_containers(run_id) if c.labels.get("runyard.kind") == "run"]
        killed_at = time.time()
        worker.kill(signal="SIGKILL")
        storage = Instance(home).storage
        # Storage only from here on: the daemon is the one that notices.
        # The status is set first, the event with the details right after: wait for both.
        wait_for(lambda: storage.get_run(run_id).status is RunStatus.FAILURE  # type: ignore[union-attr]
                 and any(s.event.type.value == "RUN_FAILURE" for s in storage.get_events(run_id)),
                 "the run to end FAILURE", 60)
        (failure,) = [s.event for s in storage.get_events(run_id) if s.event.type.value == "RUN_FAILURE"]
        assert "was killed by SIGKILL (exit code 137)" in failure.message, failure.message
        assert failure.data["detected_at"] - killed_at <= 10.0, (failure.data, killed_at)
        run = storage.get_run(run_id)
        assert run is not None and run.ended_at is not None
        # The engine's FinishedAt: within a second of the kill (clocks of one machine).
        assert abs(run.ended_at - killed_at) < 1.0, (run.ended_at, killed_at)
        wait_for(lambda: run_containers(run_id) == [], "the run's containers to be removed", 30)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        log.close()
    assert "marked_failed run=" + run_id in (home / "daemon.log").read_text()
