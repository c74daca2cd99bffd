"""The adapter's followed pod logs (runyard_k8s._k8s.LogStream) on the real test cluster."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest


def _pod(name: str, image: str, script: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"runyard.test": "1"}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "runyard", "image": image, "imagePullPolicy": "Never",
                            "command": ["python3", "-u", "-c", script]}],
        },
    }


def _wait_phase(cluster: Any, namespace: str, name: str, phases: set[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    phase = None
    while time.monotonic() < deadline:
        pod = cluster.core.read_namespaced_pod(name, namespace)
        phase = pod.status.phase
        if phase in phases:
            return
        time.sleep(0.2)
    raise AssertionError(f"pod {name} still {phase} after {timeout}s (wanted {sorted(phases)})")


@pytest.fixture
def pods(k8s_cluster: Any, k8s_namespace: str) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        k8s_cluster.delete_pod(k8s_namespace, name, grace=0)


def test_closing_an_ended_followed_log_cuts_no_other_request(
    k8s_cluster: Any, k8s_namespace: str, k8s_image: str, pods: list[str]
) -> None:
    """A followed log that ended hands its connection back to the pool every attempt's
    thread shares. Closing that stream afterwards (an attempt's stop does) must not reach
    the request that picked the connection up next: in CI it cut a concurrent step's log
    read ('Bad file descriptor') and failed the fan-in kit test."""
    short, steady = f"log-short-{secrets.token_hex(3)}", f"log-steady-{secrets.token_hex(3)}"
    pods += [short, steady]
    k8s_cluster.core.create_namespaced_pod(k8s_namespace, _pod(short, k8s_image, "print('only line')"))
    k8s_cluster.core.create_namespaced_pod(k8s_namespace, _pod(
        steady, k8s_image, "import time\nfor i in range(600):\n    print(i)\n    time.sleep(0.05)"))
    _wait_phase(k8s_cluster, k8s_namespace, short, {"Succeeded"})
    _wait_phase(k8s_cluster, k8s_namespace, steady, {"Running"})

    ended = k8s_cluster.follow_log(k8s_namespace, short)
    assert list(ended.lines()) == [b"only line"]
    # The next request on the pool: the connection the ended stream gave back, if it gave one.
    following = k8s_cluster.follow_log(k8s_namespace, steady)
    lines = following.lines()
    first = int(next(lines))
    ended.close()
    got = [next(lines, None) for _ in range(20)]
    assert None not in got, f"closing the ended stream cut the other one after {got.index(None)} more lines"
    assert [int(x) for x in got if x is not None] == list(range(first + 1, first + 21))

    # And close still wakes a thread blocked reading a stream that is running.
    done = threading.Event()

    def drain() -> None:
        for _ in lines:
            pass
        done.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    time.sleep(0.3)
    started = time.monotonic()
    following.close()
    assert done.wait(5), "close did not wake the thread reading the followed log"
    assert time.monotonic() - started < 5
