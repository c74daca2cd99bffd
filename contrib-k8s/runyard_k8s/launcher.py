"""The ``k8s`` run launcher: each run's worker in a Kubernetes Job of its own.

The pod runs ``python3 -m runyard api execute-run RUN_ID`` (under a shell that passes
SIGTERM on, so the worker is not PID 1) with ``RUNYARD_HOME`` set to the instance's home,
which must be mounted at the same path (``volumes`` + ``volume_mounts``): the worker reads
runyard.yaml there. Storage the pod could not reach is refused before anything is created:
SQLite always (pods may run on any node, and SQLite over a network volume is not safe for
several writers), PostgreSQL at a loopback address unless the pod shares the node's network
(``pod_spec: {hostNetwork: true}``).

``terminate`` deletes the run's Job (its pod gets SIGTERM and the worker cancels the run
within the pod's grace period); with ``force``, every Job and pod of the run (its step
Jobs included) is deleted at once, and its Secrets. ``check_health`` maps the Job's and the
pod's state to a `WorkerHealth`, with the exit code, the reason (OOMKilled, a signal) and
the last log lines; once the run has ended, what is left of it is deleted.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runyard import ConfigError, Instance
from runyard.plugin import RunLauncher, RunRecord, WorkerHealth, locate_storage

from .manifest import JobBuilder, covered, run_selector
from .settings import K8sLauncherConfig

WHERE = "run_launcher.k8s"
_LOOPBACK = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}
_TAIL_LINES = 20
RUN_GRACE = 30  # seconds a run worker has after SIGTERM to cancel its run (unless pod_spec says)


class K8sRunLauncher(RunLauncher):
    config: K8sLauncherConfig

    def _builder(self) -> JobBuilder:
        return JobBuilder(self.config, WHERE, self.instance_home)

    def _cluster(self) -> Any:
        from ._k8s import Cluster

        return Cluster(self.config, WHERE)

    # -- launch -------------------------------------------------------------------------

    def launch(self, run: RunRecord) -> dict[str, Any]:
        if self.instance_home is None:
            raise ConfigError(f"{WHERE}: an instance without a RUNYARD_HOME cannot launch runs in pods")
        builder = self._builder()
        home = str(Path(self.instance_home).resolve())
        mounts = list(self.config.volume_mounts)
        if not covered(mounts, home):
            raise ConfigError(
                f"{WHERE}.volume_mounts: the run worker reads runyard.yaml in RUNYARD_HOME ({home}), which the pod "
                "cannot see; mount it at the same path (volumes + volume_mounts)"
            )
        instance = Instance(self.instance_home)
        self._check_storage(instance)
        outputs = instance.outputs_url
        if outputs and outputs.startswith("/") and not covered(mounts, outputs):
            raise ConfigError(f"{WHERE}.volume_mounts: the instance's outputs ({outputs}) are not mounted in the "
                              "pod; mount them at the same path or use an fsspec URL")
        code = (run.code_pointer or {}).get("file")
        if code and not covered(mounts, str(code)):
            raise ConfigError(f"{WHERE}.volume_mounts: the run's job is loaded from {code}, which the pod cannot "
                              "see; mount its directory at the same path, or put it in the image (-m MODULE)")
        job = builder.run_job(run_id=run.run_id, suffix=secrets.token_hex(3),
                              extra_env={"RUNYARD_HOME": home, "PYTHONUNBUFFERED": "1"})
        pod = job["spec"]["template"]["spec"]
        if "terminationGracePeriodSeconds" not in self.config.pod_spec:
            pod["terminationGracePeriodSeconds"] = RUN_GRACE
        cluster = self._cluster()
        try:
            cluster.check_namespace(builder.namespace)
            from ._k8s import ApiError

            try:
                created = cluster.create_job(builder.namespace, job)
            except ApiError as e:
                raise ConfigError(f"{WHERE}: the API server refused the run's Job: {e.message or e}") from None
        finally:
            cluster.close()
        meta = created.get("metadata") or {}
        return {"namespace": builder.namespace, "job_name": meta.get("name", job["metadata"]["name"]),
                "job_uid": meta.get("uid"), "image": job["spec"]["template"]["spec"]["containers"][0]["image"]}

    def _check_storage(self, instance: Instance) -> None:
        where = locate_storage(instance)
        if where.path is not None:
            raise ConfigError(
                f"{WHERE}: the run's storage is {where.label} ({where.path}); a run worker in a pod needs storage it "
                "can reach over the network, and SQLite is not safe for several writers on a network volume. Use "
                "storage: {postgres: {url: ...}} at an address the pods can reach"
            )
        host = where.host
        shares_node_net = bool(self.config.pod_spec.get("hostNetwork"))
        if host is not None and (host in _LOOPBACK or where.is_local_socket) and not shares_node_net:
            shown = "a unix socket" if where.is_local_socket else host
            raise ConfigError(
                f"{WHERE}: the run's storage is {where.label} at {shown}, which a pod cannot reach (there, 127.0.0.1 "
                f"is the pod itself); give storage.{where.name} an address the pods can reach (a Service, the "
                "node's IP with the server listening there), or run the worker on the node's network with "
                "pod_spec: {hostNetwork: true}"
            )

    # -- terminate and health -------------------------------------------------------------

    def terminate(self, run: RunRecord, worker: Mapping[str, Any], *, force: bool = False) -> None:
        from ._k8s import Unreachable
        from .attempt import container_state

        ns = str(worker.get("namespace") or self._builder().namespace)
        cluster = self._cluster()
        try:
            if not force:
                # The pod gets SIGTERM and its grace period; the worker cancels the run. The
                # Job goes first (so nothing recreates the pod), then its pods are deleted
                # here too, so the SIGTERM does not wait on the garbage collector (with
                # the Job's deletion alone, CI once saw the run not canceled 30 s later).
                cluster.delete_job(ns, str(worker["job_name"]), propagation="Background")
                cluster.delete_pods(ns, run_selector(run.run_id, "run"))
                return
            # Killed first: a deletion alone would give the worker a SIGTERM and 2 s to end its run.
            # Every pod of the run, its steps' too: a deletion gives a step's child that
            # ignores SIGTERM the kubelet's grace and lag, and it beat on after terminate
            # returned (celery_k8s launcher kit, CI, stop 21).
            pods, _ = cluster.list_pods(ns, run_selector(run.run_id))
            for pod in pods:
                state, _ = container_state(pod)
                # Not only pods whose status says running: the kubelet reports a started
                # container seconds late (the kit's force test found it still "waiting" while
                # the worker ran, so no kill was sent and the deletion's SIGTERM let it cancel).
                if "terminated" not in state:
                    cluster.kill_in_pod(ns, pod["metadata"]["name"])
            self._sweep(cluster, ns, run.run_id, grace=0)
        except Unreachable as e:
            raise ConfigError(f"{WHERE}: the Kubernetes API server at {cluster.host} is not reachable ({e}); "
                              f"the run's Job {worker.get('job_name')} in namespace {ns} was not deleted") from None
        finally:
            cluster.close()

    @staticmethod
    def _sweep(cluster: Any, ns: str, run_id: str, *, grace: int | None) -> None:
        """Delete every Job, pod and Secret of the run (the run worker's and its steps'),
        and take the step pods' log finalizer off: no executor of the run reads them now."""
        from .settings import LOG_FINALIZER

        sel = run_selector(run_id)
        cluster.delete_jobs(ns, sel, propagation="Background", grace=grace)
        cluster.delete_pods(ns, sel, grace=grace)
        cluster.release_pods(ns, sel, LOG_FINALIZER)
        cluster.delete_secrets(ns, sel)

    def check_health(self, run: RunRecord, worker: Mapping[str, Any]) -> WorkerHealth:
        from ._k8s import ApiError, Unreachable

        ns = str(worker.get("namespace") or "default")
        name = str(worker.get("job_name", "?"))
        try:
            cluster = self._cluster()
        except ConfigError as e:
            return WorkerHealth.unknown(str(e))
        try:
            return self._health(cluster, run, ns, name)
        except (ApiError, Unreachable) as e:
            return WorkerHealth.unknown(f"cannot read the run's Job {name} in namespace {ns}: {e}")
        finally:
            cluster.close()

    def _health(self, cluster: Any, run: RunRecord, ns: str, name: str) -> WorkerHealth:
        from .attempt import TERMINAL_WAITING, container_state, describe_exit

        job = cluster.read_job(ns, name)
        pods, _ = cluster.list_pods(ns, run_selector(run.run_id, "run"))
        pods = [p for p in pods if (p.get("metadata") or {}).get("labels", {}).get("job-name") == name] or pods
        recorded = self.remembered_end(run, tag="k8s")
        if recorded is not None and job is None:
            return recorded
        if run.status.is_finished and (job is None or (job.get("metadata") or {}).get("deletionTimestamp")):
            # terminate deleted the Job and the worker ended the run: its pod is only being removed.
            return self._end(cluster, run, ns, WorkerHealth.finished(
                f"the run is {run.status.value}; its Job {name} was deleted and its pod is being removed"))
        if job is None and not pods:
            if run.status.is_finished:
                return WorkerHealth.finished(f"the run's Job {name} is gone; the run is {run.status.value}")
            return WorkerHealth.dead(f"the run's Job {name} and its pod are gone (deleted from outside runyard, or "
                                     "by ttlSecondsAfterFinished) and the run did not end")
        ended = []
        for pod in pods:
            state, _ = container_state(pod)
            if "terminated" in state:
                ended.append((pod, state["terminated"]))
                continue
            waiting = state.get("waiting") or {}
            if waiting.get("reason") in TERMINAL_WAITING:
                return self._end(cluster, run, ns, WorkerHealth.dead(
                    f"the pod of the run's Job {name} cannot start: {waiting.get('reason')}: "
                    f"{waiting.get('message', '')}"))
            return WorkerHealth.running()  # pending, running, or stopping after SIGTERM
        if not ended:
            status = (job or {}).get("status") or {}
            for cond in status.get("conditions") or []:
                if cond.get("type") == "Failed" and cond.get("status") == "True":
                    return WorkerHealth.dead(f"the run's Job {name} failed: {cond.get('reason')}: "
                                             f"{cond.get('message', '')}")
            created = _age((job or {}).get("metadata", {}).get("creationTimestamp"))
            if created is not None and created > self.config.pod_creation_timeout:
                events = cluster.events_for(ns, "Job", name)
                why = "; ".join(f"{e.get('reason')}: {e.get('message')}" for e in events[-3:])
                return WorkerHealth.dead(f"the run's Job {name} made no pod within "
                                         f"{self.config.pod_creation_timeout:g}s (pod_creation_timeout)"
                                         + (f": {why}" if why else ""))
            return WorkerHealth.running()  # the pod is being created
        pod, term = ended[0]
        code = term.get("exitCode")
        reason = term.get("reason")
        try:
            logs = cluster.pod_log(ns, pod["metadata"]["name"], tail_lines=_TAIL_LINES).strip()
        except Exception:  # noqa: BLE001 - the log is a courtesy; the exit status is the answer
            logs = ""
        message = f"the run worker's pod {pod['metadata']['name']} {describe_exit(code, reason)}"
        if logs:
            message += f"; last log lines:\n{logs}"
        killed = reason == "OOMKilled" or not isinstance(code, int) or code > 128
        return self._end(cluster, run, ns, WorkerHealth.dead(message) if killed else WorkerHealth.finished(message))

    def _end(self, cluster: Any, run: RunRecord, ns: str, health: WorkerHealth) -> WorkerHealth:
        """Nobody will report to a run whose worker is gone: delete every Job and pod of the
        run, once the answer is kept for those who ask later (from any process: a run not
        yet marked failed would otherwise only see its Job vanished)."""
        self.remember_end(run, health, tag="k8s")
        try:
            self._sweep(cluster, ns, run.run_id, grace=0)
        except Exception:  # noqa: BLE001 - the TTL is the backstop
            pass
        return health


def _age(timestamp: str | None) -> float | None:
    if not timestamp:
        return None
    from datetime import datetime

    try:
        when = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return time.time() - when.timestamp()
