"""``python -m runyard_celery.k8s_reaper NODE``: deletes the step Jobs of a ``runyard celery
worker --steps-in k8s`` whose processes can no longer do it (see `k8s_worker.JobReaper`).

It reads JSON lines on stdin, ``{"run_id": ..., "attempt_id": ...}``: the Job of that
attempt started by worker NODE is deleted (its pool process died). At end of file (every
process of the worker has exited, however) every step Job and run-key Secret carrying
NODE's label is deleted, then it exits. Settings: ``executor.celery_k8s.k8s`` of the
worker's runyard.yaml ($RUNYARD_HOME, inherited from the worker).
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _sweep(k8s: Any, labels: dict[str, str]) -> None:
    from runyard_k8s.executor import delete_step_jobs

    try:
        delete_step_jobs(k8s, labels, where="executor.celery_k8s.k8s")
    except Exception as e:  # noqa: BLE001 - one failed sweep must not stop the next
        print(f"runyard celery k8s reaper: sweeping {labels} failed: {type(e).__name__}: {e}", file=sys.stderr)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m runyard_celery.k8s_reaper NODE  (stdin: a pipe from the worker)", file=sys.stderr)
        return 2
    node = argv[0]
    from runyard import Instance
    from runyard_k8s.settings import LABEL_ATTEMPT_ID, LABEL_RUN_ID

    from .k8s_settings import NODE_LABEL
    from .worker import instance_config

    k8s = instance_config(None, Instance.from_env(), "celery_k8s").k8s  # type: ignore[attr-defined]
    for line in sys.stdin.buffer:
        try:
            attempt = json.loads(line)
            labels = {NODE_LABEL: node, LABEL_RUN_ID: str(attempt["run_id"]),
                      LABEL_ATTEMPT_ID: str(attempt["attempt_id"])}
        except (ValueError, KeyError, TypeError):
            continue
        # Only the step Jobs: the lost process's key Secret is swept with the rest at the end.
        _sweep(k8s, labels)
    _sweep(k8s, {NODE_LABEL: node})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
