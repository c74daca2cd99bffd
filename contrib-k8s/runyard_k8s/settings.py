"""Settings of the ``k8s`` executor and run launcher, the per-step override tag, and the
names on the wire (labels, annotations) shared by the plugin module, the manifests, the
executor, the launcher and the CLI. Imports only attrs, json, re and `runyard.plugin`: no
``kubernetes`` client.

Kubernetes objects given in the settings (``volumes``, ``tolerations``, ``affinity``, the raw
``container``/``pod_spec``/``job_spec``/... patches) are written as in a manifest: the API's
camelCase field names. They are passed to the API server as they are; it judges them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import attrs
from runyard.plugin import (
    ConfigError,
    EnvVar,
    ExecutorConfig,
    check_env_items,
    one_of,
    structure_config,
)

PULL_POLICIES = ("Never", "IfNotPresent", "Always")

# The per-step override tag (docs/backends/k8s.md): JSON (or a dict's text) with keys of
# `StepOverride`. runyard's own ``runyard/resources`` tag (memory, cpus) is honoured too.
STEP_CONFIG_TAG = "runyard/k8s/config"

# Labels on every Job and Pod this package creates; every list, watch and sweep selects by
# them. Values are label-safe forms (see `label_value`); the exact step key is an annotation.
LABEL_KIND = "runyard.io/kind"  # "step" or "run"
LABEL_RUN_ID = "runyard.io/run-id"
LABEL_STEP_KEY = "runyard.io/step-key"
LABEL_ATTEMPT = "runyard.io/attempt"  # the attempt number
LABEL_ATTEMPT_ID = "runyard.io/attempt-id"
LABEL_INSTANCE = "runyard.io/instance"  # a hash of the instance's RUNYARD_HOME
ANNOTATION_STEP_KEY = "runyard.io/step-key"
ANNOTATION_INSTANCE = "runyard.io/instance-home"
# On every step pod: the executor removes it once it has read the ended pod's full log, so
# nothing (ttlSecondsAfterFinished, a Job deleted from outside) can delete the pod, and its
# log with it, before then. Left by an executor that died, it is removed by the run's
# teardown, the launcher's sweep, or the next executor's set-up in the namespace once the
# pod has been deleting for `ORPHAN_FINALIZER_AFTER` seconds (docs/backends/k8s.md).
LOG_FINALIZER = "runyard.io/log-reader"
ORPHAN_FINALIZER_AFTER = 600
OWN_LABELS = (LABEL_KIND, LABEL_RUN_ID, LABEL_STEP_KEY, LABEL_ATTEMPT, LABEL_ATTEMPT_ID, LABEL_INSTANCE)

CONTAINER_NAME = "runyard"

# Fields the backend sets and a raw patch may not replace: a patch changing them would
# silently break the executor (retries are runyard's, the command is the step worker).
RESERVED = {
    "job_spec": {"template": "pod_spec / container (the pod template is built from them)",
                 "backoffLimit": "(always 0: retries are runyard's, per its RetryPolicy)",
                 "selector": "(set by Kubernetes)", "manualSelector": "(set by Kubernetes)"},
    "pod_spec": {"containers": "container (the one container runs the worker)",
                 "restartPolicy": "(always Never: a failed attempt is retried by runyard)"},
    "container": {"command": "(the executor runs the step worker)", "args": "(the executor runs the step worker)",
                  "name": f"(always {CONTAINER_NAME!r})"},
    "job_metadata": {"name": "(each Job gets a name of its own; find them by label)",
                     "namespace": "namespace", "generateName": "(each Job gets a name of its own)"},
    "pod_metadata": {"name": "(pods are named by their Job)", "namespace": "namespace"},
}

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i?|[mkunEP])?$")


def _check_quantity(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, str | int | float) or not _QUANTITY.match(str(value)):
        raise ValueError(f"{where}: expected a Kubernetes quantity such as 500m, 2, 256Mi or 1Gi, got {value!r}")


def check_resources(where: str, value: Any) -> None:
    """``{requests: {cpu: .., memory: ..}, limits: {...}}`` with quantities."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping with requests and/or limits, got {value!r}")
    for part, amounts in value.items():
        if part not in ("requests", "limits"):
            raise ValueError(f"{where}.{part}: unknown key (use requests or limits)")
        if not isinstance(amounts, Mapping):
            raise ValueError(f"{where}.{part}: expected a mapping of resource names to quantities, got {amounts!r}")
        for name, amount in amounts.items():
            _check_quantity(f"{where}.{part}.{name}", amount)


def _resources_validator(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value:
        check_resources(attribute.name, value)


def _mapping_of_str(_: Any, attribute: attrs.Attribute, value: Mapping[str, Any]) -> None:
    for k, v in value.items():
        if not isinstance(k, str) or not (isinstance(v, str | EnvVar)):
            raise ValueError(f"{attribute.name}.{k}: expected a string, got {v!r}")


def _list_of_mappings(_: Any, attribute: attrs.Attribute, value: list[Any]) -> None:
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise ValueError(f"{attribute.name}[{i}]: expected a mapping (as in a manifest), got {item!r}")


def _names(_: Any, attribute: attrs.Attribute, value: list[Any]) -> None:
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise ValueError(f"{attribute.name}[{i}]: expected the name of an object in the namespace, got {item!r}")


def _patch(_: Any, attribute: attrs.Attribute, value: Mapping[str, Any]) -> None:
    for key in value:
        hint = RESERVED.get(attribute.name, {}).get(key)
        if hint is not None:
            raise ValueError(f"{attribute.name}.{key}: set by the plugin; use {hint} instead"
                             if not hint.startswith("(") else f"{attribute.name}.{key}: set by the plugin {hint}")


def _namespace(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, str) and not _DNS_LABEL.match(value):
        raise ValueError(f"{attribute.name}: {value!r} is not a namespace name (lower-case letters, digits, '-')")


def _positive(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name}: expected a number of seconds above 0, got {value}")


@attrs.frozen(kw_only=True, slots=False)  # no slots: the executor's config also inherits ExecutorConfig
class K8sSettings:
    """Settings shared by the ``k8s`` executor and the ``k8s`` run launcher.

    See docs/backends/k8s.md for each key, the merge rule of the raw patches and examples.
    """

    image: str
    namespace: str = attrs.field(default="default", validator=_namespace)
    image_pull_policy: str = attrs.field(default="IfNotPresent", validator=one_of(*PULL_POLICIES))
    image_pull_secrets: list[str] = attrs.field(factory=list, validator=_names)
    service_account_name: str | None = None
    env_vars: list[Any] = attrs.field(factory=list, validator=check_env_items)
    env_secrets: list[str] = attrs.field(factory=list, validator=_names)
    env_config_maps: list[str] = attrs.field(factory=list, validator=_names)
    volumes: list[dict[str, Any]] = attrs.field(factory=list, validator=_list_of_mappings)
    volume_mounts: list[dict[str, Any]] = attrs.field(factory=list, validator=_list_of_mappings)
    labels: dict[str, Any] = attrs.field(factory=dict, validator=_mapping_of_str)
    annotations: dict[str, Any] = attrs.field(factory=dict, validator=_mapping_of_str)
    resources: dict[str, Any] = attrs.field(factory=dict, validator=_resources_validator)
    node_selector: dict[str, str] = attrs.field(factory=dict)
    tolerations: list[dict[str, Any]] = attrs.field(factory=list, validator=_list_of_mappings)
    affinity: dict[str, Any] = attrs.field(factory=dict)
    security_context: dict[str, Any] = attrs.field(factory=dict)
    scheduler_name: str | None = None
    ttl_seconds_after_finished: int | None = attrs.field(default=600)
    kubeconfig_file: str | None = None
    context: str | None = None
    load_incluster_config: bool = False
    pod_creation_timeout: float = attrs.field(default=60.0, validator=_positive)
    pending_timeout: float = attrs.field(default=300.0, validator=_positive)
    image_pull_timeout: float = attrs.field(default=120.0, validator=_positive)
    terminate_grace: int = attrs.field(default=5, validator=attrs.validators.ge(0))
    container: dict[str, Any] = attrs.field(factory=dict, validator=_patch)
    pod_spec: dict[str, Any] = attrs.field(factory=dict, validator=_patch)
    pod_metadata: dict[str, Any] = attrs.field(factory=dict, validator=_patch)
    job_spec: dict[str, Any] = attrs.field(factory=dict, validator=_patch)
    job_metadata: dict[str, Any] = attrs.field(factory=dict, validator=_patch)

    def __attrs_post_init__(self) -> None:
        if self.ttl_seconds_after_finished is not None and self.ttl_seconds_after_finished < 0:
            raise ValueError(f"ttl_seconds_after_finished: expected 0 or more seconds (or null for none), "
                             f"got {self.ttl_seconds_after_finished}")
        if self.load_incluster_config and (self.kubeconfig_file is not None or self.context is not None):
            raise ValueError("load_incluster_config: true uses the pod's service account; "
                             "do not give kubeconfig_file or context with it")


@attrs.frozen(kw_only=True, slots=False)
class K8sExecutorConfig(ExecutorConfig, K8sSettings):
    """``executor: {k8s: {...}}``: each step attempt in a Kubernetes Job of its own."""


@attrs.frozen(kw_only=True)
class K8sLauncherConfig(K8sSettings):
    """``run_launcher: {k8s: {...}}``: each run's worker in a Kubernetes Job of its own."""


@attrs.frozen(kw_only=True)
class StepOverride:
    """What the ``runyard/k8s/config`` tag of a step may change (each key as in the settings)."""

    image: str | None = None
    image_pull_policy: str | None = attrs.field(default=None, validator=attrs.validators.optional(
        one_of(*PULL_POLICIES)))
    service_account_name: str | None = None
    env_vars: list[Any] = attrs.field(factory=list, validator=check_env_items)
    labels: dict[str, str] = attrs.field(factory=dict)
    annotations: dict[str, str] = attrs.field(factory=dict)
    resources: dict[str, Any] = attrs.field(factory=dict, validator=_resources_validator)
    node_selector: dict[str, str] = attrs.field(factory=dict)
    tolerations: list[dict[str, Any]] = attrs.field(factory=list, validator=_list_of_mappings)
    volumes: list[dict[str, Any]] = attrs.field(factory=list, validator=_list_of_mappings)
    volume_mounts: list[dict[str, Any]] = attrs.field(factory=list, validator=_list_of_mappings)
    container: dict[str, Any] = attrs.field(factory=dict, validator=_patch)
    pod_spec: dict[str, Any] = attrs.field(factory=dict, validator=_patch)
    pod_metadata: dict[str, Any] = attrs.field(factory=dict, validator=_patch)
    job_spec: dict[str, Any] = attrs.field(factory=dict, validator=_patch)
    job_metadata: dict[str, Any] = attrs.field(factory=dict, validator=_patch)


def parse_step_override(raw: str | Mapping[str, Any], step_key: str) -> StepOverride:
    """The ``runyard/k8s/config`` tag of step ``step_key``, validated like the settings:
    a ConfigError names the step, the tag and the key path."""
    source = f"step '{step_key}': tag '{STEP_CONFIG_TAG}'"
    data: Any = raw
    if not isinstance(raw, Mapping):
        text = str(raw).strip()
        try:
            data = json.loads(text)
        except ValueError:
            import ast

            try:
                data = ast.literal_eval(text)  # str() of a dict given in @step(tags=...)
            except (ValueError, SyntaxError):
                raise ConfigError(
                    f"{source}: {text[:200]!r} is neither JSON nor a dict's text; give a mapping, e.g. "
                    f"tags={{'{STEP_CONFIG_TAG}': {{'image': 'my-image:2', 'resources': {{'limits': "
                    "{'memory': '1Gi'}}}}}}"
                ) from None
    return structure_config(data, StepOverride, source=source, path=STEP_CONFIG_TAG)


def label_value(text: str) -> str:
    """``text`` as a label value (at most 63 of [A-Za-z0-9_.-], alphanumeric at both ends);
    when it had to change, a hash of the original keeps different texts apart."""
    if re.fullmatch(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?", text):
        return text
    import hashlib

    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    body = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:50].strip("-_.")
    return f"{body}-{digest}" if body else digest


def instance_label(instance_home: str | None) -> str | None:
    if not instance_home:
        return None
    import hashlib

    return hashlib.sha256(instance_home.encode()).hexdigest()[:16]


def dns_name(*parts: str, limit: int = 63) -> str:
    """A DNS-1123 label (a Job's name) from ``parts``."""
    text = "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts if p)
    text = re.sub(r"-+", "-", text)[:limit].strip("-")
    return text or "runyard"
