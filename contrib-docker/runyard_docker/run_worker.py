"""The run worker inside a run container: ``python -m runyard_docker.run_worker RUN_ID``.

It runs the run in this process with `runyard.plugin.execute_run` (``runyard api
execute-run RUN_ID`` as a call: SIGTERM, passed on by the container's init, cancels the
run cleanly) and then, once the run has ended, removes its
own container through the mounted Docker socket, when there is one, according to the
cleanup policy. Otherwise (and if that fails) the watcher the launcher started on its own
machine removes it once it exits (see `reaper`). A container whose worker died (killed,
out of memory) stays until the launcher's health check has read its exit status and last
log lines into the run's failure, and is removed then.
"""

from __future__ import annotations

import os
import sys
import traceback


def _execute(run_id: str) -> int:
    """``runyard api execute-run RUN_ID`` in this process, with its exit status: 0 if the
    run succeeded, 1 if it did not (or the worker crashed), 2 if it could not be run."""
    from runyard import RunyardError
    from runyard.plugin import RunStatus, execute_run

    try:
        record = execute_run(run_id)  # the instance is $RUNYARD_HOME, set by the launcher
    except RunyardError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception:
        traceback.print_exc()
        return 1
    return 0 if record.status is RunStatus.SUCCESS else 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m runyard_docker.run_worker RUN_ID", file=sys.stderr)
        return 2
    run_id = args[0]
    name = os.environ.get("RUNYARD_DOCKER_CONTAINER", "")
    print(f"runyard run worker for run {run_id} in container {name or '?'}", flush=True)
    code = _execute(run_id)
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
