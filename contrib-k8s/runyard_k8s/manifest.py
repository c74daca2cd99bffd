"""The Job manifests the ``k8s`` executor and launcher create, as plain data (no client
import), so ``runyard k8s render`` prints exactly what a run would create without a cluster.

Merge rule of the raw patches (``container``, ``pod_spec``, ``pod_metadata``, ``job_spec``,
``job_metadata``, in the settings and then in a step's ``runyard/k8s/config`` tag): each is
merged into what the backend generated from the other settings. A mapping merges key by
key, recursively; the lists named in `APPENDED_LISTS` (``env``, ``volumes``, ...) are
appended to; any other value, other lists included, replaces the generated one. Fields the
backend must own (the command, ``restartPolicy``, ``backoffLimit``, names) are refused
when the settings are read (`settings.RESERVED`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from runyard.plugin import RESOURCES_TAG, ConfigError, EnvVar, environment_from, parse_resources_tag, resolve

from .settings import (
    ANNOTATION_INSTANCE,
    ANNOTATION_STEP_KEY,
    CONTAINER_NAME,
    LABEL_ATTEMPT,
    LABEL_ATTEMPT_ID,
    LABEL_INSTANCE,
    LABEL_KIND,
    LABEL_RUN_ID,
    LABEL_STEP_KEY,
    LOG_FINALIZER,
    STEP_CONFIG_TAG,
    K8sSettings,
    StepOverride,
    dns_name,
    instance_label,
    label_value,
    parse_step_override,
)

APPENDED_LISTS = frozenset({"env", "envFrom", "volumes", "volumeMounts", "tolerations", "imagePullSecrets"})

# The step worker is core runyard (`runyard api execute-step --stream`: every event a JSON
# line, the step's fds 1 and 2 as events too, since a pod's log merges both streams). A
# shell runs it as a child rather than exec'ing it: PID 1 of a container ignores signals it
# has no handler for, so a step that kills itself (SIGKILL) would not die as PID 1. The
# shell passes SIGTERM on and exits with the worker's status (128+N for signal N).
STEP_SCRIPT = (
    'trap \'kill -TERM "$c" 2>/dev/null\' TERM INT; '
    'python3 -m runyard api execute-step --stream "$1" & c=$!; '
    'while :; do wait "$c"; s=$?; kill -0 "$c" 2>/dev/null || exit "$s"; done'
)
RUN_SCRIPT = STEP_SCRIPT.replace('api execute-step --stream "$1"', 'api execute-run "$1"')


def merge(base: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``patch`` merged into ``base`` (changed in place and returned): see the module docstring."""
    for key, value in patch.items():
        current = base.get(key)
        if isinstance(value, Mapping) and isinstance(current, dict):
            merge(current, value)
        elif key in APPENDED_LISTS and isinstance(value, list) and isinstance(current, list):
            current.extend(copy.deepcopy(value))
        else:
            base[key] = copy.deepcopy(value)
    return base


def _strings(values: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): str(resolve(v) if isinstance(v, EnvVar) else v) for k, v in values.items()}


def memory_quantity(value: Any) -> str:
    """runyard's ``memory`` (512m, 2g: Docker's units, powers of 1024) as a Kubernetes quantity."""
    text = str(value).strip()
    units = {"b": "", "k": "Ki", "m": "Mi", "g": "Gi"}
    if text and text[-1].lower() in units and text[:-1].replace(".", "", 1).isdigit():
        return text[:-1] + units[text[-1].lower()]
    return text


class JobBuilder:
    """Builds Job manifests from one set of settings (``where``: their key path, for errors)."""

    def __init__(self, settings: K8sSettings, where: str, instance_home: str | None) -> None:
        self.settings = settings
        self.where = where
        self.instance_home = instance_home
        self.namespace = str(resolve(settings.namespace))
        self.image = str(resolve(settings.image))
        self.env = environment_from(settings.env_vars, where)
        self.labels = _strings(settings.labels)
        self.annotations = _strings(settings.annotations)

    # -- per step ------------------------------------------------------------------------

    def step_override(self, step_key: str, tags: Mapping[str, str]) -> StepOverride | None:
        raw = tags.get(STEP_CONFIG_TAG)
        return parse_step_override(raw, step_key) if raw is not None else None

    def step_resources(self, step_key: str, tags: Mapping[str, str]) -> dict[str, Any]:
        """``runyard/resources`` (memory, cpus) as limits; requests equal them (Guaranteed)."""
        if RESOURCES_TAG not in tags:
            return {}
        parsed = parse_resources_tag(tags[RESOURCES_TAG], step_key=step_key)
        amounts: dict[str, str] = {}
        for name, value in parsed.items():
            if name == "memory":
                amounts["memory"] = memory_quantity(value)
            elif name == "cpus":
                amounts["cpu"] = str(value)
            else:
                raise ConfigError(
                    f"step '{step_key}': tag '{RESOURCES_TAG}': the k8s executor understands memory and cpus, "
                    f"not {name!r}; ask for other resources (GPUs) with tag '{STEP_CONFIG_TAG}': "
                    "{\"resources\": {\"limits\": {\"nvidia.com/gpu\": 1}}}"
                )
        return {"limits": dict(amounts), "requests": dict(amounts)} if amounts else {}

    # -- manifests -----------------------------------------------------------------------

    def base_labels(self, kind: str, run_id: str) -> dict[str, str]:
        labels = dict(self.labels)
        labels.update({LABEL_KIND: kind, LABEL_RUN_ID: label_value(run_id)})
        inst = instance_label(self.instance_home)
        if inst:
            labels[LABEL_INSTANCE] = inst
        return labels

    def step_labels(self, run_id: str, step_key: str, attempt: int, attempt_id: str) -> dict[str, str]:
        labels = self.base_labels("step", run_id)
        labels.update({LABEL_STEP_KEY: label_value(step_key), LABEL_ATTEMPT: str(attempt),
                       LABEL_ATTEMPT_ID: label_value(attempt_id)})
        return labels

    def step_job(
        self,
        *,
        run_id: str,
        step_key: str,
        attempt: int,
        attempt_id: str,
        payload: str,
        tags: Mapping[str, str],
        timeout: float | None,
        extra_env: Sequence[Mapping[str, Any]] = (),
    ) -> dict[str, Any]:
        """The Job of one step attempt. ``payload``: the signed request's JSON."""
        override = self.step_override(step_key, tags)
        labels = self.step_labels(run_id, step_key, attempt, attempt_id)
        name = dns_name("runyard-step", run_id[:8], step_key[:30], attempt_id[:8])
        deadline = None
        if timeout is not None:
            # A backstop only: the engine stops the step at its timeout (Job deletion); this
            # ends the pod if the run worker died before it could.
            deadline = int(timeout + self.settings.terminate_grace + 60)
        job = self._job(name, "step", labels, {ANNOTATION_STEP_KEY: step_key},
                        ["/bin/sh", "-c", STEP_SCRIPT, "runyard-step", payload],
                        resources=self.step_resources(step_key, tags), override=override,
                        active_deadline=deadline, extra_env=extra_env, automount=False)
        # The pod stays until the executor has read its full log (settings.LOG_FINALIZER).
        pod_meta = job["spec"]["template"]["metadata"]
        finalizers = [f for f in pod_meta.get("finalizers") or [] if f != LOG_FINALIZER]
        pod_meta["finalizers"] = [*finalizers, LOG_FINALIZER]
        return job

    def run_job(self, *, run_id: str, extra_env: Mapping[str, str], suffix: str) -> dict[str, Any]:
        """The Job of a run's worker (`runyard api execute-run RUN_ID`)."""
        labels = self.base_labels("run", run_id)
        name = dns_name("runyard-run", run_id[:16], suffix)
        env = [{"name": k, "value": v} for k, v in extra_env.items()]
        return self._job(name, "run", labels, {}, ["/bin/sh", "-c", RUN_SCRIPT, "runyard-run", run_id],
                         resources={}, override=None, active_deadline=None, extra_env=env, automount=None)

    def _job(
        self,
        name: str,
        kind: str,
        labels: dict[str, str],
        annotations: dict[str, str],
        command: list[str],
        *,
        resources: dict[str, Any],
        override: StepOverride | None,
        active_deadline: int | None,
        extra_env: Sequence[Mapping[str, Any]],
        automount: bool | None,
    ) -> dict[str, Any]:
        s = self.settings
        o = override
        env = dict(self.env)
        if o is not None and o.env_vars:
            env.update(environment_from(o.env_vars, f"{self.where} (tag '{STEP_CONFIG_TAG}')"))
        env.setdefault("PYTHONUNBUFFERED", "1")
        container: dict[str, Any] = {
            "name": CONTAINER_NAME,
            "image": (o.image if o is not None and o.image else self.image),
            "imagePullPolicy": (o.image_pull_policy if o is not None and o.image_pull_policy else s.image_pull_policy),
            "command": command,
            "env": [{"name": k, "value": v} for k, v in env.items()] + [dict(e) for e in extra_env],
        }
        env_from = [{"secretRef": {"name": n}} for n in s.env_secrets]
        env_from += [{"configMapRef": {"name": n}} for n in s.env_config_maps]
        if env_from:
            container["envFrom"] = env_from
        res = merge(copy.deepcopy(s.resources), resources)
        if o is not None and o.resources:
            merge(res, o.resources)
        if res:
            container["resources"] = res
        mounts = [dict(m) for m in s.volume_mounts] + ([dict(m) for m in o.volume_mounts] if o is not None else [])
        if mounts:
            container["volumeMounts"] = mounts
        if s.security_context:
            container["securityContext"] = copy.deepcopy(s.security_context)
        merge(container, s.container)
        if o is not None:
            merge(container, o.container)

        pod: dict[str, Any] = {
            "restartPolicy": "Never",
            "containers": [container],
            # How long a deleted pod's worker has after SIGTERM (cancel, timeout) before SIGKILL.
            "terminationGracePeriodSeconds": int(s.terminate_grace),
        }
        sa = (o.service_account_name if o is not None and o.service_account_name else None) or s.service_account_name
        if sa:
            pod["serviceAccountName"] = sa
        elif automount is False:
            pod["automountServiceAccountToken"] = False  # a step never talks to the API server
        volumes = [dict(v) for v in s.volumes] + ([dict(v) for v in o.volumes] if o is not None else [])
        if volumes:
            pod["volumes"] = volumes
        if s.image_pull_secrets:
            pod["imagePullSecrets"] = [{"name": n} for n in s.image_pull_secrets]
        node_selector = {**s.node_selector, **(o.node_selector if o is not None else {})}
        if node_selector:
            pod["nodeSelector"] = node_selector
        tolerations = [dict(t) for t in s.tolerations] + ([dict(t) for t in o.tolerations] if o is not None else [])
        if tolerations:
            pod["tolerations"] = tolerations
        if s.affinity:
            pod["affinity"] = copy.deepcopy(s.affinity)
        if s.scheduler_name:
            pod["schedulerName"] = s.scheduler_name
        merge(pod, s.pod_spec)
        if o is not None:
            merge(pod, o.pod_spec)

        own_annotations = dict(annotations)
        if self.instance_home:
            own_annotations[ANNOTATION_INSTANCE] = self.instance_home
        extra_labels = o.labels if o is not None else {}
        extra_annotations = o.annotations if o is not None else {}
        # Our labels last: a setting may add labels, never change the ones cleanup selects by.
        pod_meta: dict[str, Any] = {"labels": {**extra_labels, **labels},
                                    "annotations": {**self.annotations, **extra_annotations, **own_annotations}}
        merge(pod_meta, s.pod_metadata)
        if o is not None:
            merge(pod_meta, o.pod_metadata)
        pod_meta["labels"].update(labels)

        spec: dict[str, Any] = {"backoffLimit": 0, "template": {"metadata": pod_meta, "spec": pod}}
        if s.ttl_seconds_after_finished is not None:
            spec["ttlSecondsAfterFinished"] = int(s.ttl_seconds_after_finished)
        if active_deadline is not None:
            spec["activeDeadlineSeconds"] = active_deadline
        merge(spec, s.job_spec)
        if o is not None:
            merge(spec, o.job_spec)
        spec["backoffLimit"] = 0

        job_meta: dict[str, Any] = {
            "name": name,
            "namespace": self.namespace,
            "labels": {**extra_labels, **labels},
            "annotations": {**self.annotations, **extra_annotations, **own_annotations},
        }
        merge(job_meta, s.job_metadata)
        if o is not None:
            merge(job_meta, o.job_metadata)
        job_meta["labels"].update(labels)
        job_meta["name"] = name
        job_meta["namespace"] = self.namespace
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": job_meta, "spec": spec}


def selector(labels: Mapping[str, str]) -> str:
    """A label selector matching all of ``labels``."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def run_selector(run_id: str, kind: str | None = None) -> str:
    labels = {LABEL_RUN_ID: label_value(run_id)}
    if kind is not None:
        labels[LABEL_KIND] = kind
    return selector(labels)


def attempt_selector(run_id: str, attempt_id: str) -> str:
    return selector({LABEL_RUN_ID: label_value(run_id), LABEL_ATTEMPT_ID: label_value(attempt_id)})


def covered(mounts: Sequence[Mapping[str, Any]], path: str) -> bool:
    """Whether ``path`` lies under one of the container's volume mounts (at the same path)."""
    for m in mounts:
        target = str(m.get("mountPath", "")).rstrip("/") or "/"
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return True
    return False
