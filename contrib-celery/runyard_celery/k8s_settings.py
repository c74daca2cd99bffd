"""Settings of the ``celery_k8s`` executor and run launcher (docs/backends/celery-containers.md),
the names on the wire (task, labels), and the check that a launcher/executor pair agrees.
Imports neither Celery nor the Kubernetes client.

Built like ``celery_docker``: the executor's section is the ``celery`` executor's plus a
``k8s:`` section holding the ``k8s`` backend's Job settings (`runyard_k8s.settings.K8sSettings`:
image, namespace, service account, env, volumes, resources, ...), applied by the Celery workers
that create the step Jobs (`k8s_worker`); the launcher's section is the same broker settings
plus the ``k8s`` launcher's Job settings for the run worker's Job (`k8s_launcher`). Without
runyard-k8s, a ``k8s:`` section is an error naming the extra to install.
"""

from collections.abc import Mapping
from typing import Any

import attrs

from .settings import CeleryConfig, as_written

try:
    from runyard_k8s.settings import K8sSettings  # attrs only, no Kubernetes client
except ImportError:  # runyard-celery without runyard-k8s (or a runyard-k8s without settings yet)
    K8sSettings = None  # type: ignore[assignment,misc]

INSTALL_HINT = (
    "the celery_k8s executor and run launcher need runyard-k8s as well as runyard-celery: "
    'pip install "runyard[celery-k8s]" (the same as "runyard[celery,k8s]")'
)

K8S_TASK_NAME = "runyard.execute_step_in_job"
"""The celery_k8s task: a worker started with ``runyard celery worker --steps-in k8s`` runs
the step as a Kubernetes Job. A name of its own, as for celery_docker."""

NODE_LABEL = "runyard.io/celery-worker"
"""Label of every step Job a ``--steps-in k8s`` worker starts: its node name (as a label value)."""
PROCESS_LABEL = "runyard.io/celery-process"
"""Label of every step Job a pool process starts: ``NODE/PID`` (as a label value)."""

K8sSection: Any = K8sSettings if K8sSettings is not None else dict[str, Any]


def _k8s_installed(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if K8sSettings is None:
        raise ValueError(f"{attribute.name}: {INSTALL_HINT}")


_K8S_REQUIRED = {"required": "add the Job settings, at least the image: `k8s: {image: my-jobs:1, namespace: jobs}`"}


@attrs.frozen(kw_only=True)
class CeleryK8sConfig(CeleryConfig):
    """``executor: {celery_k8s: {...}}``: each step attempt a Celery task whose worker runs
    the step as a Kubernetes Job. The ``celery`` executor's keys (``default_queue`` defaults
    to ``runyard-k8s``) plus ``k8s``: the Job settings the workers apply."""

    k8s: K8sSection = attrs.field(validator=_k8s_installed, metadata=_K8S_REQUIRED)
    default_queue: str = "runyard-k8s"


@attrs.frozen(kw_only=True)
class CeleryK8sLauncherConfig:
    """``run_launcher: {celery_k8s: {...}}``: the run worker as a Kubernetes Job configured for
    the celery_k8s executor. ``broker``/``backend``: the Celery URLs the run's executor must
    use; ``k8s``: the run worker Job's settings (its image and namespace must be the
    executor's: the run worker loads the same job code and its step Jobs live beside it)."""

    broker: str = attrs.field(metadata={"required": "add the Celery broker URL the celery_k8s executor uses"})
    backend: str | None = None
    k8s: K8sSection = attrs.field(validator=_k8s_installed, metadata=_K8S_REQUIRED)


# (launcher key, executor key): settings a run launched by celery_k8s must agree on.
PAIRED_KEYS = (("broker", "broker"), ("backend", "backend"), ("k8s.namespace", "k8s.namespace"),
               ("k8s.image", "k8s.image"))

_DEFAULTS = {"k8s.namespace": "default"}  # K8sSettings' default, for a section that leaves it out


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return _DEFAULTS.get(dotted) if value is None else value


def pair_problems(launcher: Any, launcher_where: str, executor_name: str | None, executor: Any,
                  executor_where: str) -> list[str]:
    """Why a run launched by the celery_k8s launcher (settings ``launcher``, written at
    ``launcher_where``, e.g. ``runyard.yaml: run_launcher.celery_k8s``) with the executor
    ``executor_name`` (settings ``executor`` at ``executor_where``) must not be launched;
    empty when they agree. Each problem names both keys and both values.

    Settings are compared as written (an ``{env: NAME}`` is the reference, not its value):
    the run worker's Job resolves them in its own environment. A backend left out on both
    sides agrees (both default to the broker when it is Redis).
    """
    if executor_name != "celery_k8s":
        return [
            f"{launcher_where}: the celery_k8s run launcher starts run workers for the celery_k8s executor, but "
            f"this run's executor is {executor_name or 'the default'!r} ({executor_where}); set "
            "executor: {celery_k8s: {...}} (or use the k8s run launcher for other executors)"
        ]
    ours, theirs = as_written(launcher), as_written(executor)
    problems = []
    for lkey, ekey in PAIRED_KEYS:
        a, b = _get(ours, lkey), _get(theirs, ekey)
        if a != b:
            problems.append(
                f"{launcher_where}.{lkey} ({a!r}) and {executor_where}.{ekey} ({b!r}) disagree: the run worker's Job "
                "must use the executor's broker, namespace and image; make them the same"
            )
    return problems
