"""Removes a run's step containers once the run worker that started them is gone.

``python -m runyard_docker.reaper RUN_ID`` is started by the docker executor's `setup`
in a session of its own, with a pipe from the run worker on its stdin. It blocks reading
the pipe; end of file means the run worker closed it (teardown) or died (killed, crashed,
its process group killed by `runyard run cancel`). It then stops and removes every
container labelled with the run id as a step, so no step container outlives its run.
"""

from __future__ import annotations

import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m runyard_docker.reaper RUN_ID  (stdin: a pipe from the run worker)", file=sys.stderr)
        return 2
    run_id = args[0]
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except OSError:
        pass
    import docker

    from .plugin import LABEL_KIND, LABEL_RUN_ID

    host = os.environ.get("RUNYARD_DOCKER_REAPER_HOST") or None
    client = docker.DockerClient(base_url=host, timeout=60) if host else docker.from_env(timeout=60)
    keep_exited = os.environ.get("RUNYARD_DOCKER_CLEANUP", "always") != "always"
    filters = {"label": [f"{LABEL_RUN_ID}={run_id}", f"{LABEL_KIND}=step"]}
    # Twice: a create the worker sent just before it died may land after the first sweep.
    for sweep in range(2):
        for c in client.containers.list(all=True, filters=filters):
            if keep_exited and c.status == "exited":
                continue
            try:
                c.remove(force=True, v=True)
            except docker.errors.APIError:
                pass
        if sweep == 0:
            time.sleep(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
