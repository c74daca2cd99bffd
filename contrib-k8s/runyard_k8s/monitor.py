"""One pod watch per run: the latest state of every pod of the run's step Jobs, for the
attempts' threads to wait on (rather than each polling the API server).

List, then watch from the list's resourceVersion with a label selector; a watch that ends
(the server's timeout, a dropped connection) is resumed from the last version seen, and
one that is too old (410 Gone) is replaced by a fresh list. Neither is ever read as a step
ending: only a pod's own state is. A malformed object is skipped, never stops the watch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ._k8s import ApiError, Cluster, Unreachable
from .settings import LABEL_ATTEMPT_ID


class PodWatcher:
    """Keeps ``pods[attempt label][pod name] -> pod`` current; calls ``changed()`` on news."""

    def __init__(self, cluster: Cluster, namespace: str, selector: str, changed: Callable[[], None]) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.selector = selector
        self.changed = changed
        self.cond = threading.Condition()
        self.pods: dict[str, dict[str, dict[str, Any]]] = {}
        self.gone: dict[str, dict[str, dict[str, Any]]] = {}  # deleted pods' last states
        self.synced = False
        self.restarts = 0  # watches resumed (for tests and diagnostics)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="runyard-k8s-pod-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def of(self, attempt_label: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The attempt's pods (latest state), and the last known state of those deleted."""
        with self.cond:
            return list(self.pods.get(attempt_label, {}).values()), list(self.gone.get(attempt_label, {}).values())

    def wait(self, timeout: float) -> None:
        with self.cond:
            self.cond.wait(timeout)

    def refresh(self) -> None:
        """List now (the watch may lag behind, or be down): used before a verdict."""
        try:
            pods, _ = self.cluster.list_pods(self.namespace, self.selector)
        except (ApiError, Unreachable):
            return
        self._replace(pods)

    def _replace(self, pods: list[dict[str, Any]]) -> None:
        with self.cond:
            seen: dict[str, dict[str, dict[str, Any]]] = {}
            for pod in pods:
                key = _attempt(pod)
                if key is not None:
                    seen.setdefault(key, {})[pod["metadata"]["name"]] = pod
            for key, old in self.pods.items():
                for name, pod in old.items():
                    if name not in seen.get(key, {}):
                        self.gone.setdefault(key, {})[name] = pod
            self.pods = seen
            self.synced = True
            self.cond.notify_all()
        self.changed()

    def _apply(self, kind: str, pod: dict[str, Any]) -> None:
        key = _attempt(pod)
        if key is None:
            return
        name = pod["metadata"]["name"]
        with self.cond:
            if kind == "DELETED":
                self.pods.get(key, {}).pop(name, None)
                self.gone.setdefault(key, {})[name] = pod
            else:
                self.pods.setdefault(key, {})[name] = pod
            self.cond.notify_all()
        self.changed()

    def _run(self) -> None:
        version = ""
        failures = 0
        while not self.stopping.is_set():
            try:
                if not version:
                    pods, version = self.cluster.list_pods(self.namespace, self.selector)
                    self._replace(pods)
                for kind, obj in self.cluster.watch_pods(self.namespace, self.selector, version, timeout_seconds=30):
                    if self.stopping.is_set():
                        return
                    try:
                        version = str(obj["metadata"]["resourceVersion"]) or version
                        if kind != "BOOKMARK":
                            self._apply(kind, obj)
                    except (KeyError, TypeError):
                        continue  # one malformed object must not stop the monitor
                failures = 0
                self.restarts += 1  # the server ended the watch: resume from `version`
            except ApiError as e:
                if e.status == 410:
                    version = ""  # too old: list again
                else:
                    failures += 1
                self.restarts += 1
                self.stopping.wait(min(5.0, 0.2 * (failures + 1)))
            except Unreachable:
                failures += 1
                self.restarts += 1
                if failures > 3:
                    version = ""  # down for a while: what happened meanwhile comes from a list
                self.stopping.wait(min(5.0, 0.2 * (failures + 1)))
            except Exception:  # noqa: BLE001 - the monitor of a run must outlive any one bad answer
                failures += 1
                version = ""
                self.stopping.wait(min(5.0, 0.2 * (failures + 1)))


def _attempt(pod: Any) -> str | None:
    try:
        return pod["metadata"]["labels"][LABEL_ATTEMPT_ID]
    except (KeyError, TypeError):
        return None

