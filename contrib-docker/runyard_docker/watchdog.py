"""The ``docker`` executor's watchdogs, so no step container outlives its run: the
heartbeat the run worker writes into every live step container (each stops itself when it
goes stale, see `step_worker`), and the reaper process that removes the run's step
containers if the run worker dies (see `reaper`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

from .lifecycle import tar


def heartbeat(timeout: float, stopping: threading.Event, live: Callable[[], list[Any]]) -> None:
    """Rewrite the heartbeat file in every live step container (``live()``) until
    ``stopping``: if this process dies, they stop themselves within ``timeout``."""
    interval = max(0.5, min(5.0, float(timeout) / 4))
    beat = 0
    while not stopping.wait(interval):
        beat += 1
        for container in live():
            try:
                container.put_archive("/tmp", tar({"runyard-heartbeat": str(beat).encode()}))
            except Exception:  # exited meanwhile, or the engine is slow: the next beat tries again
                pass


def start_reaper(run_id: str, cleanup: str, docker_host: str | None,
                 scope: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A process that removes this run's step containers (those carrying the ``scope``
    labels too, when given) if this one dies (see `reaper`)."""
    env = {**os.environ, "RUNYARD_DOCKER_CLEANUP": cleanup}
    if scope:
        env["RUNYARD_DOCKER_REAPER_SCOPE"] = json.dumps(dict(scope))
    if docker_host:
        env["RUNYARD_DOCKER_REAPER_HOST"] = docker_host
    # Its own session: killing the run worker's process group must not take it along.
    return subprocess.Popen(
        [sys.executable, "-m", "runyard_docker.reaper", run_id],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, start_new_session=True, close_fds=True,
    )


def stop_reaper(reaper: subprocess.Popen[bytes]) -> None:
    try:
        assert reaper.stdin is not None
        reaper.stdin.close()  # end of file: it sweeps (nothing left by now) and exits
    except OSError:
        pass
    # Reap it without holding up the end of the run.
    threading.Thread(target=reaper.wait, args=(30,), daemon=True).start()
