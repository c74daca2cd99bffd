"""The ``celery_k8s`` run launcher: each run's worker in a Kubernetes Job of its own,
configured for the ``celery_k8s`` executor: its steps go to Celery workers (``runyard celery
worker --steps-in k8s``), which run each as a Job beside it.

Before anything is created, the run's executor is checked against this launcher's
settings (`k8s_settings.pair_problems`): a run whose executor is not ``celery_k8s``, or
uses another broker, result backend, namespace or image than the launcher's, is refused
naming both keys. Everything about the run worker's Job (the pod, ``terminate``,
``check_health``, cleanup) is the ``k8s`` run launcher's (`runyard_k8s.launcher.K8sRunLauncher`),
made from this section's ``k8s:`` settings: no second copy of Job code. Because the
namespace is the executor's, the k8s launcher's sweeps of a run (a forced terminate, a
worker reported dead) find the run's step Jobs too, by its run-id label.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from runyard import ConfigError, Instance
from runyard.plugin import RunLauncher, RunRecord, WorkerHealth

from .k8s_settings import INSTALL_HINT, CeleryK8sLauncherConfig, pair_problems

try:
    from runyard_k8s.launcher import WHERE as K8S_WHERE
    from runyard_k8s.launcher import K8sRunLauncher
    from runyard_k8s.settings import K8sLauncherConfig
except ImportError as e:  # runyard-celery without runyard-k8s
    raise ImportError(f"{INSTALL_HINT} ({e})") from e

WHERE = "run_launcher.celery_k8s"


class CeleryK8sRunLauncher(RunLauncher):
    config: CeleryK8sLauncherConfig

    def _jobs(self) -> K8sRunLauncher:
        """The k8s launcher that runs the run worker's Job, with this section's ``k8s:`` settings."""
        k8s = self.config.k8s
        fields = {f.name: getattr(k8s, f.name) for f in attrs.fields(type(k8s))}
        return K8sRunLauncher(K8sLauncherConfig(**fields), self.instance_home)

    def launch(self, run: RunRecord) -> dict[str, Any]:
        problems = self.pair_problems(run)
        if problems:
            raise ConfigError("\n".join(problems))
        try:
            return self._jobs().launch(run)
        except ConfigError as e:
            # The k8s launcher names its own section; here its settings are under ours.
            raise ConfigError(str(e).replace(K8S_WHERE, f"{WHERE}.k8s")) from None

    def pair_problems(self, run: RunRecord) -> list[str]:
        """Why this run must not be launched by this launcher (empty when it may)."""
        resolution = run.resolution or {}
        executor = resolution.get("executor") or {}
        name = executor.get("name") or run.executor
        config: Mapping[str, Any] = executor.get("config") or {}
        executor_where = (f"{executor.get('config_source')}: {executor.get('path')}" if executor
                          else f"the run's executor ({name})")
        launcher = resolution.get("run_launcher") or {}
        source = launcher.get("config_source") or (
            Instance(self.instance_home).config_source if self.instance_home else "runyard.yaml")
        return pair_problems(self.config, f"{source}: {launcher.get('path') or WHERE}", name, config,
                             executor_where)

    def terminate(self, run: RunRecord, worker: Mapping[str, Any], *, force: bool = False) -> None:
        self._jobs().terminate(run, worker, force=force)

    def check_health(self, run: RunRecord, worker: Mapping[str, Any]) -> WorkerHealth:
        return self._jobs().check_health(run, worker)


__all__ = ["CeleryK8sRunLauncher"]
