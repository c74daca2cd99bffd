"""Removes a run's containers once the process that should have removed them is gone.

Two modes, each a small process in a session of its own:

``python -m runyard_docker.reaper RUN_ID``
    started by the docker executor's `setup`, with a pipe from the run worker on its
    stdin. It blocks reading the pipe; end of file means the run worker closed it
    (teardown) or died (killed, crashed, its process group killed by `runyard run
    cancel`). It then stops and removes every container labelled with the run id as a
    step. Inside a run container it dies with that container: the step containers then
    stop themselves when their heartbeat stops (see `step_worker`), and the launcher's
    watcher below removes them.

``python -m runyard_docker.reaper --run-container RUN_ID CONTAINER_ID``
    started on the launching machine by the docker run launcher. It waits for the run
    container to exit, then removes the run's step containers and, once the run has
    ended, the run container (both per ``cleanup``). When the container exited before
    its run ended (the worker died), it leaves the container for the health check, which
    reads its exit status and logs into the run's failure, and runs that check itself
    (``runyard run wait``), so that nobody has to list runs for the containers to go.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

_SETTLE = 10.0  # seconds the step sweep keeps looking for a create that was in flight


def _client() -> Any:
    import docker

    host = os.environ.get("RUNYARD_DOCKER_REAPER_HOST") or None
    return docker.DockerClient(base_url=host, timeout=60) if host else docker.from_env(timeout=60)


def remove_steps(client: Any, run_id: str, *, keep_exited: bool, settle: float = _SETTLE,
                 scope: dict[str, str] | None = None) -> None:
    """Remove the run's step containers (those carrying the ``scope`` labels too, when given).
    A create sent just before the worker died may land after a first sweep, so sweep until
    none is found for ``settle`` seconds."""
    import docker.errors

    from .settings import LABEL_KIND, LABEL_RUN_ID

    filters = {"label": [f"{LABEL_RUN_ID}={run_id}", f"{LABEL_KIND}=step",
                         *(f"{k}={v}" for k, v in (scope or {}).items())]}
    quiet_since = time.monotonic()
    while True:
        found = False
        try:
            # sparse: no inspect per container, which a container being removed (by an
            # earlier sweep) answers with 404 and would end the sweep with an exception.
            listed = client.containers.list(all=True, filters=filters, sparse=True)
        except docker.errors.APIError:
            listed, found = [], True  # the engine is busy or flaky: look again
        for c in listed:
            if keep_exited and c.status in ("exited", "dead"):
                continue
            found = True
            try:
                c.remove(force=True, v=True)
            except docker.errors.APIError:
                pass
        now = time.monotonic()
        if found:
            quiet_since = now
        elif now - quiet_since >= settle:
            return
        time.sleep(0.5)


def _watch_pipe(run_id: str) -> int:
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except OSError:
        pass
    keep_exited = os.environ.get("RUNYARD_DOCKER_CLEANUP", "always") != "always"
    # Set by a handler that shares the run with others (DockerStepHandler's scope): only its containers.
    scope = json.loads(os.environ.get("RUNYARD_DOCKER_REAPER_SCOPE") or "{}")
    remove_steps(_client(), run_id, keep_exited=keep_exited, settle=3.0, scope=scope)
    return 0


def _wait_exit(client: Any, container_id: str) -> Any:
    """The container once it is no longer running; None when it is gone."""
    import docker.errors
    import requests.exceptions

    unreachable_since: float | None = None
    while True:
        try:
            container = client.containers.get(container_id)
            if container.status not in ("created", "running", "restarting", "paused"):
                return container
            container.wait(timeout=300)
            container.reload()
            return container
        except docker.errors.NotFound:
            return None
        except (requests.exceptions.RequestException, docker.errors.APIError):
            # The engine is slow or restarting: keep watching, but not forever.
            now = time.monotonic()
            unreachable_since = unreachable_since or now
            if now - unreachable_since > 600:
                raise
            time.sleep(5)
            continue


def _watch_container(run_id: str, container_id: str) -> int:
    import docker.errors
    from runyard import Instance

    policy = os.environ.get("RUNYARD_DOCKER_CLEANUP", "always")
    client = _client()
    container = _wait_exit(client, container_id)
    instance = Instance.from_env()
    try:
        run = instance.storage.get_run(run_id)
    finally:
        instance.storage.close()
    ended = run is None or run.status.is_finished
    success = run is not None and run.status.value == "SUCCESS"
    keep = policy == "never" or (policy == "on_success" and not success)
    if policy != "never" or not ended:
        # Steps still running have nobody to report to; finished ones go per the policy.
        remove_steps(client, run_id, keep_exited=keep)
    if container is None:
        return 0
    if not ended:
        # The worker died: the health check reads the container's exit status and logs
        # into the run's failure, then removes it.
        subprocess.run([sys.executable, "-m", "runyard", "run", "wait", run_id, "--timeout", "60"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        return 0
    if not keep:
        try:
            container.remove(force=True, v=True)
        except docker.errors.APIError:
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "--run-container":
        return _watch_container(args[1], args[2])
    if len(args) != 1:
        print("usage: python -m runyard_docker.reaper RUN_ID  (stdin: a pipe from the run worker)\n"
              "       python -m runyard_docker.reaper --run-container RUN_ID CONTAINER_ID", file=sys.stderr)
        return 2
    return _watch_pipe(args[0])


if __name__ == "__main__":
    sys.exit(main())
