"""The ``k8s`` executor: each step attempt in a Kubernetes Job of its own.

Public entry points (for executors composed from this one, e.g. a Celery task that runs
its step as a Job): `K8sStepHandler` is a complete `runyard.plugin.StepHandler` usable on
its own, outside the engine:

    handler = K8sStepHandler(K8sExecutorConfig(image=..., namespace=...), HandlerContext(...))
    handler.setup()                 # cluster, namespace check, run key Secret, pod watch
    handle = handler.launch(request)         # a signed copy of the request runs in a Job
    update = handler.poll(handle)            # events so far; .done, .failure when over
    handler.terminate(handle, FailureKind.CANCELED)   # Job deleted (foreground), swept
    handler.teardown()              # every Job of the run swept by label

and `run_step_job(handler, request, ...)` does launch-poll-wait to the end in one call,
returning the attempt's events and its failure. ``K8sStepHandler(..., scope={label: value})``
sets one handler's Jobs apart from those of other handlers of the same run (several
processes sharing a run, as Celery pool processes do): its Jobs, pods and Secret carry the
``scope`` labels too, and its watch and sweeps select them. `delete_step_jobs` removes
the step Jobs (and their pods and key Secrets) carrying given labels, for a process that
cleans up after handlers that died (a reaper). Everything the handler does to the
cluster goes through `runyard_k8s._k8s.Cluster`; one attempt's life is in `attempt`.

The step worker in the pod is core runyard (``runyard api execute-step --stream``): its
request is signed with a key made for the run (kept in a Secret of the run, labelled,
deleted at teardown) and it runs only within the allowance (code location, output store)
the handler gives it in its environment (see docs/security.md).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from runyard import ConfigError
from runyard.plugin import (
    SIGNING_KEY_ENV,
    STEP_WORKER_ENV,
    Event,
    FailureInfo,
    FailureKind,
    HandlerContext,
    StepHandler,
    StepRequest,
    StepUpdate,
    grant_for_run,
    new_signing_key,
    preload_job,
    sign_request,
)

from .attempt import Attempt, JobRunner
from .manifest import JobBuilder, covered, selector
from .settings import (
    LABEL_KIND,
    LABEL_RUN_ID,
    LOG_FINALIZER,
    ORPHAN_FINALIZER_AFTER,
    K8sExecutorConfig,
    K8sSettings,
    dns_name,
    label_value,
)

WHERE = "executor.k8s"


def _local_path(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://"):]
    return url if url.startswith("/") else None


class K8sStepHandler(StepHandler):
    """Runs every step attempt as a Job (see the module docstring)."""

    config: K8sExecutorConfig

    def __init__(self, config: K8sExecutorConfig, context: HandlerContext, *,
                 scope: Mapping[str, str] | None = None) -> None:
        self.scope = {str(k): label_value(str(v)) for k, v in (scope or {}).items()}
        if self.scope:
            config = attrs.evolve(config, labels={**config.labels, **self.scope})
        super().__init__(config, context)
        # Set here, not in setup: the engine calls teardown even when setup raised.
        self.cluster: Any = None
        self.watcher: Any = None
        self.secret_name: str | None = None
        self.changed = threading.Event()
        self.lock = threading.Lock()
        self.attempts: list[Attempt] = []
        self.signing_key = new_signing_key()
        self.checked_jobs: dict[tuple[str, str], ConfigError | None] = {}

    # -- setup ----------------------------------------------------------------------------

    def setup(self) -> None:
        from ._k8s import ApiError, Cluster, Unreachable
        from .monitor import PodWatcher

        self.builder = JobBuilder(self.config, WHERE, self.context.instance_home)
        ns = self.builder.namespace
        self._check_outputs()
        self.cluster = Cluster(self.config, WHERE)
        self.cluster.check_namespace(ns)
        secret = dns_name("runyard-key", self.context.run_id[:16], secrets.token_hex(3))
        labels = self.builder.base_labels("key", self.context.run_id)
        try:
            self.cluster.create_secret(ns, secret, labels, {"key": self.signing_key})
        except (ApiError, Unreachable) as e:
            raise ConfigError(f"{WHERE}: cannot create the run's signing-key Secret in namespace {ns!r}: {e}; "
                              "the executor needs create/delete on secrets, jobs and pods there") from None
        self.secret_name = secret
        threading.Thread(target=release_orphans, args=(self.cluster, ns), name="runyard-k8s-orphans",
                         daemon=True).start()
        self.watcher = PodWatcher(self.cluster, ns, self._selector("step"), self.changed.set)
        self.watcher.start()
        self.runner = JobRunner(self.cluster, self.watcher, ns, self.config, self.changed)

    def _selector(self, kind: str) -> str:
        """This handler's objects of the run: its scope's only, when it has one."""
        return selector({LABEL_RUN_ID: label_value(self.context.run_id), LABEL_KIND: kind, **self.scope})

    def _check_outputs(self) -> None:
        """A file output store must be at the same path in the pods (a volume mount)."""
        path = _local_path(self.context.output_store)
        if path is not None and not covered(self.config.volume_mounts, path):
            raise ConfigError(
                f"{self.context.where('volume_mounts')}: the run's output store is the directory {path}, which "
                "pods cannot see; mount it at the same path (volumes + volume_mounts: a hostPath on a one-node "
                "cluster, an NFS or ReadWriteMany volume elsewhere), or set outputs: to an fsspec URL "
                "(s3://...) in runyard.yaml"
            )

    def _check_job(self, request: StepRequest) -> None:
        """Every step's override tag of the job, checked once before its first step starts."""
        key = (str(request.code_pointer.to_dict()), request.job_name)
        if key not in self.checked_jobs:
            error: ConfigError | None = None
            try:
                job = preload_job(request.code_pointer, request.job_name)
                nodes = job.nodes
            except Exception:  # the pod's worker reports a job that does not load
                nodes = {}
            try:
                for step_key, node in nodes.items():
                    self.builder.step_override(step_key, node.step.tags)
                    self.builder.step_resources(step_key, node.step.tags)
            except ConfigError as e:
                error = e
            if request.code_pointer.file is not None and error is None:
                if not covered(self.config.volume_mounts, request.code_pointer.file):
                    error = ConfigError(
                        f"{WHERE}.volume_mounts: job '{request.job_name}' is loaded from "
                        f"{request.code_pointer.file}, which pods cannot see; mount its directory at the same "
                        "path, or put the code in the image and load it as a module (-m)"
                    )
            self.checked_jobs[key] = error
        error = self.checked_jobs[key]
        if error is not None:
            raise error

    # -- the handler contract ---------------------------------------------------------------

    def job_manifest(self, request: StepRequest) -> dict[str, Any]:
        """The Job this handler creates for ``request`` (signed with the run's key)."""
        payload = json.dumps(sign_request(request, self.signing_key.encode()), separators=(",", ":"))
        env: list[dict[str, Any]] = [{"name": STEP_WORKER_ENV, "value": json.dumps(grant_for_run(request))}]
        if self.secret_name is not None:
            env.append({"name": SIGNING_KEY_ENV,
                        "valueFrom": {"secretKeyRef": {"name": self.secret_name, "key": "key"}}})
        return self.builder.step_job(run_id=request.run_id, step_key=request.step_key, attempt=request.attempt,
                                     attempt_id=request.attempt_id, payload=payload, tags=request.tags,
                                     timeout=request.timeout, extra_env=env)

    def launch(self, request: StepRequest) -> Attempt:
        if request.code_pointer.module == "__main__":
            raise ConfigError(
                f"job '{request.job_name}' was defined in __main__ without a file, so a pod cannot load it; "
                "define it in a file (-f) or an importable module (-m)"
            )
        self._check_job(request)
        att = Attempt(request, self.job_manifest(request))
        att.thread = threading.Thread(target=self.runner.run, args=(att,), name=f"runyard-k8s-{request.step_key}",
                                      daemon=True)
        with self.lock:
            self.attempts.append(att)
        att.thread.start()
        return att

    def poll(self, handle: Attempt) -> StepUpdate:
        # Events, then the worker's own stderr (held until its STEP_START), then the ending.
        return handle.update(started=handle.started)

    def terminate(self, handle: Attempt, kind: FailureKind) -> None:
        att = handle
        with att.lock:
            if att.stop_kind is not None or att.done:
                return
            att.stop_kind = kind  # the attempt's thread deletes the Job (and waits for its pods)
        self.changed.set()
        if self.watcher is not None:
            with self.watcher.cond:
                self.watcher.cond.notify_all()

    def wait(self, timeout: float) -> None:
        self.changed.wait(timeout)
        self.changed.clear()

    def teardown(self) -> None:
        cluster = self.cluster
        if cluster is None:
            return
        ns = self.builder.namespace
        try:
            with self.lock:
                attempts = list(self.attempts)
            deadline = time.monotonic() + float(self.config.terminate_grace) + 30
            for att in attempts:
                if att.thread is not None:
                    att.thread.join(max(0.0, deadline - time.monotonic()))
            # Whatever an attempt's thread could not delete: every step Job of the run, by label.
            try:
                cluster.delete_jobs(ns, self._selector("step"), propagation="Foreground",
                                    grace=int(self.config.terminate_grace))
            except Exception:  # noqa: BLE001 - the TTL is the backstop; teardown must not mask the run's error
                pass
            # No attempt of the run reads a log any more: no pod of it may stay for one. Again
            # while a Job of the run is still being deleted: its controller can make a pod
            # after the first release (a pod deleted from outside gets a replacement), and
            # that pod, held by the finalizer, kept its Job's foreground deletion from ever
            # finishing (CI, stop 21).
            until = time.monotonic() + float(self.config.terminate_grace) + 15
            try:
                while True:
                    cluster.release_pods(ns, self._selector("step"), LOG_FINALIZER)
                    if time.monotonic() > until or not cluster.list_jobs(ns, self._selector("step")):
                        break
                    time.sleep(0.5)
            except Exception:  # noqa: BLE001 - the next run's set-up releases orphans
                pass
        finally:
            if self.watcher is not None:
                self.watcher.stop()
            try:
                cluster.delete_secrets(ns, self._selector("key"))
            except Exception:  # noqa: BLE001
                pass
            cluster.close()


def release_orphans(cluster: Any, namespace: str, older_than: float = ORPHAN_FINALIZER_AFTER) -> list[str]:
    """Take the log finalizer off step pods of any run in ``namespace`` that have been
    deleting for more than ``older_than`` seconds: an executor reads an ended pod's log
    within seconds, so one still held that long belongs to an executor that died (killed
    before its teardown). Errors are swallowed: this is housekeeping, never the run's fault."""
    from datetime import UTC, datetime

    def stale(pod: dict[str, Any]) -> bool:
        since = (pod.get("metadata") or {}).get("deletionTimestamp")
        if not since:
            return False
        try:
            when = datetime.fromisoformat(str(since).replace("Z", "+00:00"))
        except ValueError:
            return False
        return (datetime.now(UTC) - when).total_seconds() > older_than

    try:
        return cluster.release_pods(namespace, f"{LABEL_KIND}=step", LOG_FINALIZER, only=stale)
    except Exception:  # noqa: BLE001
        return []


def run_step_job(
    handler: K8sStepHandler,
    request: StepRequest,
    *,
    should_stop: Callable[[], FailureKind | None] | None = None,
    on_event: Callable[[Event], None] | None = None,
    within: float | None = None,
) -> tuple[list[Event], FailureInfo | None]:
    """Run one attempt as a Job with a set-up ``handler`` until it ends; return its events
    and, when it ended without its worker's ending, the failure. ``should_stop()`` returning
    a kind (CANCELED, TIMEOUT) terminates it; ``within`` seconds does too (TIMEOUT)."""
    handle = handler.launch(request)
    started = time.monotonic()
    events: list[Event] = []
    stopping = False
    while True:
        update = handler.poll(handle)
        for ev in update.events:
            events.append(ev)
            if on_event is not None:
                on_event(ev)
        if update.done:
            return events, update.failure
        if not stopping:
            kind = should_stop() if should_stop is not None else None
            if kind is None and within is not None and time.monotonic() - started > within:
                kind = FailureKind.TIMEOUT
            if kind is not None:
                handler.terminate(handle, kind)
                stopping = True
        handler.wait(0.5)


def delete_step_jobs(settings: K8sSettings, labels: Mapping[str, str], *, where: str = WHERE,
                     with_secrets: bool = True) -> list[str]:
    """Delete every step Job carrying ``labels`` (values as given to ``scope``) in the
    settings' namespace, with its pods (foreground, ``terminate_grace``), and with
    ``with_secrets`` the run-key Secrets carrying them; return the Jobs' names. For cleaning up
    after handlers whose process died: a live handler's own sweeps are `terminate` and
    `teardown`. Raises ConfigError when the cluster's configuration cannot be loaded."""
    from ._k8s import Cluster

    wanted = {str(k): label_value(str(v)) for k, v in labels.items()}
    ns = str(JobBuilder(settings, where, None).namespace)
    cluster = Cluster(settings, where)
    try:
        grace = int(settings.terminate_grace)
        names = cluster.delete_jobs(ns, selector({**wanted, LABEL_KIND: "step"}), propagation="Foreground",
                                    grace=grace)
        # Their pods' log finalizer first: nobody is left to read those logs.
        cluster.release_pods(ns, selector({**wanted, LABEL_KIND: "step"}), LOG_FINALIZER)
        cluster.delete_pods(ns, selector({**wanted, LABEL_KIND: "step"}), grace=grace)
        if with_secrets:
            cluster.delete_secrets(ns, selector({**wanted, LABEL_KIND: "key"}))
        return names
    finally:
        cluster.close()


__all__ = ["K8sStepHandler", "delete_step_jobs", "release_orphans", "run_step_job"]
