"""The run worker inside a run container: ``python -m runyard_docker.run_worker RUN_ID``.

It runs ``runyard api execute-run RUN_ID`` in this process (SIGTERM, passed on by the
container's init, cancels the run cleanly) and then, once the run has ended, removes its
own container through the mounted Docker socket, when there is one, according to the
cleanup policy. Otherwise (and if that fails) the watcher the launcher started on its own
machine removes it once it exits (see `reaper`). A container whose worker died (killed,
out of memory) stays until the launcher's health check has read its exit status and last
log lines into the run's failure, and is removed then.
"""

from __future__ import annotations

import os
import sys


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    return e.code if isinstance(e.code, int) else 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m runyard_docker.run_worker RUN_ID", file=sys.stderr)
        return 2
    run_id = args[0]
    name = os.environ.get("RUNYARD_DOCKER_CONTAINER", "")
    print(f"runyard run worker for run {run_id} in container {name or '?'}", flush=True)
    from runyard.cli import main as cli

    try:
        cli(["api", "execute-run", run_id])
        code = 0
    except SystemExit as e:
        code = _exit_code(e)
    print(f"run worker for run {run_id} exiting with status {code}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    _remove_own_container(run_id, name)
    return code


def _remove_own_container(run_id: str, name: str) -> None:
    policy = os.environ.get("RUNYARD_DOCKER_CLEANUP", "always")
    if not name or policy == "never":
        return
    try:
        from runyard import Instance, RunStatus

        run = Instance.from_env().storage.get_run(run_id)
        if run is None or not run.status.is_finished:
            return  # the health check reports what happened, then removes the container
        if policy == "on_success" and run.status is not RunStatus.SUCCESS:
            return
        if not (os.environ.get("DOCKER_HOST") or os.path.exists("/var/run/docker.sock")):
            return  # no socket mounted: the launcher's watcher removes the container once it exits
        import docker

        client = docker.from_env(timeout=30)
        # Removing the container we run in ends this process: it is the last thing we do.
        client.containers.get(name).remove(force=True, v=True)
    except Exception as e:  # no socket mounted, engine gone: `runyard docker cleanup` removes it later
        print(f"could not remove container {name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
