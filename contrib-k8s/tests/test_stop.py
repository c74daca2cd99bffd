"""A stopped step does not wait on the kubelet: one second past ``terminate_grace`` its
container's processes are killed through exec and the attempt is over.

A stand-in cluster and pod watch drive `JobRunner._stop` here, because what is under test is
the kubelet being slow to act on a deletion and to report a container's end, which a real
cluster does only some of the time (the kit's cancel test failed 3 of 4 runs on a quiet test
cluster before the fix, passing 4 of 4 after; `test_conformance.py` keeps it). The stand-ins
answer as the API server did in those runs: the deleted pod still "running" long after its
grace, its log with the step's STEP_START and no ending."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

from runyard.plugin import FailureKind, StepRequest
from runyard_k8s.attempt import Attempt, JobRunner

START = ('{"v":1,"type":"STEP_START","run_id":"r1","timestamp":1.0,"step_key":"s","attempt":1,'
         '"attempt_id":"a1","message":null,"data":{}}')


class _Watch:
    def __init__(self, pod: dict[str, Any]) -> None:
        self.pod = pod

    def refresh(self) -> None:
        pass

    def of(self, label: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return [self.pod], []

    def wait(self, timeout: float) -> None:
        time.sleep(min(timeout, 0.05))


class _Cluster:
    """The API server as the slow kubelet left it: the pod deleted but reported running."""

    def __init__(self, exec_works: bool) -> None:
        self.exec_works = exec_works
        self.killed: list[tuple[float, str]] = []
        self.deleted: list[str] = []

    def delete_job(self, namespace: str, name: str, **kw: Any) -> None:
        self.deleted.append(name)

    def delete_pods(self, namespace: str, selector: str, **kw: Any) -> list[str]:
        return []

    def remove_finalizer(self, *a: Any, **kw: Any) -> None:
        pass

    def pod_log(self, namespace: str, name: str, **kw: Any) -> str:
        return START + "\n"

    def kill_in_pod(self, namespace: str, name: str, attempts: int = 3) -> bool:
        self.killed.append((time.monotonic(), name))
        return self.exec_works


def _attempt() -> Attempt:
    req = StepRequest.from_dict({"run_id": "r1", "step_key": "s", "attempt": 1, "attempt_id": "a1", "job_name": "j",
                                 "code_pointer": {"module": "m"}, "output_store": "/tmp/o", "inputs": {}})
    att = Attempt(req, {"metadata": {"name": "runyard-step-a1"}})
    att.stop_kind = FailureKind.CANCELED
    return att


def _runner(cluster: _Cluster, grace: float) -> JobRunner:
    pod = {"metadata": {"name": "runyard-step-a1-x", "deletionTimestamp": "now"},
           "status": {"phase": "Running", "containerStatuses": [{"name": "runyard", "state": {"running": {}}}]}}
    return JobRunner(cluster, _Watch(pod), "ns", SimpleNamespace(terminate_grace=grace),  # type: ignore[arg-type]
                     threading.Event())


def test_a_step_the_kubelet_does_not_stop_is_killed_through_exec_just_after_the_grace() -> None:
    cluster = _Cluster(exec_works=True)
    att = _attempt()
    began = time.monotonic()
    failure = _runner(cluster, grace=1)._stop(att, None)
    took = time.monotonic() - began
    assert cluster.deleted == ["runyard-step-a1"]  # the graceful way first
    assert [name for _, name in cluster.killed] == ["runyard-step-a1-x"]
    assert cluster.killed[0][0] - began >= 1.9, "killed before the grace (1 s) and its second were over"
    assert att.over and took < 4, took
    assert failure.kind is FailureKind.CANCELED
    assert att.lines_read == 1  # the log up to the kill is kept


def test_without_exec_the_stop_still_waits_for_the_pod_to_end() -> None:
    cluster = _Cluster(exec_works=False)
    att = _attempt()
    runner = _runner(cluster, grace=0)
    done = threading.Event()
    threading.Thread(target=lambda: (runner._stop(att, None), done.set()), daemon=True).start()
    time.sleep(2.5)
    assert len(cluster.killed) == 1, "exec is tried once"
    assert not done.is_set() and not att.over, "a failed exec must not be taken for the step's end"
    runner.watcher.pod["status"] = {"phase": "Failed",  # type: ignore[attr-defined]
                                    "containerStatuses": [{"name": "runyard", "state": {"terminated": {}}}]}
    assert done.wait(5) and att.over
