"""The run worker, as the supervisor starts it: ``python -m runyard_supervised.worker RUN_ID LIMITS``.

It lowers its priority and caps its memory (both inherited by the processes its steps
start), then runs the run in this process with `runyard.plugin.execute_run`, the
in-process form of ``python -m runyard api execute-run RUN_ID``. SIGTERM cancels the run
(execute_run handles it). Exit status 0 if the run succeeded, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import resource
import sys

from runyard.plugin import RunStatus, execute_run


def main(argv: list[str]) -> int:
    run_id, limits = argv[0], json.loads(argv[1])
    if limits.get("nice"):
        os.nice(int(limits["nice"]))
    if limits.get("memory_mb"):
        cap = int(limits["memory_mb"]) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    print(f"runyard-supervised: run worker for run {run_id}, pid {os.getpid()}, nice {os.nice(0)}", flush=True)
    record = execute_run(run_id)  # the instance is $RUNYARD_HOME, set by the launcher
    print(f"runyard-supervised: run {run_id} ended {record.status.value}", flush=True)
    return 0 if record.status is RunStatus.SUCCESS else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
