"""The ``celery_k8s`` executor's worker side: each step attempt as a Kubernetes Job of its
own, through the ``k8s`` executor's step handler (`runyard_k8s.executor.K8sStepHandler`).

No Job code lives here, nor any Celery task logic (`handler_task.HandlerTask` has that):
this module makes the k8s handler for a run from the worker's Job settings
(``executor.celery_k8s.k8s`` in its runyard.yaml), one step at a time, scoped by two labels
(`NODE_LABEL`: this worker; `PROCESS_LABEL`: the pool process). So a step Job is created,
labelled, watched, its log followed, its full log and exit status read and only then
deleted exactly as under the ``k8s`` executor, with the same settings and step tags; and a
handler's sweeps remove only its own Jobs, not those other pool processes run for the same run.

What no handler can clean up, because its process died, the worker's `JobReaper` does: a
process of its own (`k8s_reaper`) that deletes by label the Job of an attempt whose pool
process was lost (SIGKILL, OOM, Celery's hard time limit), and every Job of this worker once
the last process of the worker is gone, however it ended.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import Any

from runyard import Instance
from runyard.plugin import HandlerContext, StepHandler

from .handler_task import HandlerTask
from .k8s_settings import INSTALL_HINT, K8S_TASK_NAME, NODE_LABEL, PROCESS_LABEL

try:
    from runyard_k8s.executor import K8sStepHandler
    from runyard_k8s.settings import K8sExecutorConfig
except ImportError as e:  # runyard-celery without runyard-k8s
    raise ImportError(f"{INSTALL_HINT} ({e})") from e

def executor_config(k8s: Any) -> K8sExecutorConfig:
    """The ``k8s`` executor's config made of the worker's Job settings, one step at a time
    (a pool process runs one task at a time)."""
    fields = {f.name: getattr(k8s, f.name) for f in type(k8s).__attrs_attrs__}
    return K8sExecutorConfig(**fields, max_concurrent=1)


def make_task(k8s: Any, instance: Instance, node: str) -> HandlerTask:
    """The celery_k8s task of a worker whose Job settings are ``k8s``."""
    config = executor_config(k8s)

    def make_handler(context: HandlerContext, owner: str) -> StepHandler:
        return K8sStepHandler(config, context, scope={NODE_LABEL: node, PROCESS_LABEL: owner})

    return HandlerTask(executor="celery_k8s", section="k8s", settings=k8s, make_handler=make_handler,
                       instance=instance, node=node)


def attempt_of(payload: Any) -> dict[str, str] | None:
    """Run id and attempt id of a task's step request, unverified: they only choose among
    this worker's own Jobs (the reaper's selector always has the node label)."""
    if not isinstance(payload, Mapping):
        return None
    run_id, attempt_id = payload.get("run_id"), payload.get("attempt_id")
    if not isinstance(run_id, str) or not isinstance(attempt_id, str):
        return None
    return {"run_id": run_id, "attempt_id": attempt_id}


class JobReaper:
    """The worker's reaper process (`k8s_reaper`), started before the pool forks, in a
    session of its own so that whatever kills the worker's process group leaves it running.
    Every process of the worker holds the write end of its stdin (the pool children inherit
    it through fork): it sweeps the node's Jobs when the last of them is gone."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runyard_celery.k8s_reaper", node],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
        )

    def sweep(self, attempt: Mapping[str, str]) -> None:
        """Have the reaper delete this worker's Job of ``attempt`` (its pool process is lost)."""
        line = (json.dumps(dict(attempt)) + "\n").encode()
        with self.lock:
            try:
                assert self.proc.stdin is not None
                # One write of less than PIPE_BUF bytes: atomic, whichever process writes.
                os.write(self.proc.stdin.fileno(), line)
            except (OSError, ValueError):
                pass  # the reaper is gone: the Job's TTL and activeDeadlineSeconds remain

    def watch_lost_tasks(self) -> None:
        """Sweep the Job of every celery_k8s task whose pool process was lost. Celery's
        task_failure signal fires in the main process for a pool process that died
        (WorkerLostError) or hit the hard time limit, and in the pool process for a task
        body that raised: in each case no handler will delete the Job any more."""
        from celery.signals import task_failure

        def on_failure(sender: Any = None, args: Any = None, **_: Any) -> None:
            if getattr(sender, "name", None) != K8S_TASK_NAME:
                return
            attempt = attempt_of(args[0] if args else None)
            if attempt is not None:
                self.sweep(attempt)

        task_failure.connect(on_failure, weak=False)


__all__ = ["NODE_LABEL", "PROCESS_LABEL", "JobReaper", "executor_config", "make_task"]
