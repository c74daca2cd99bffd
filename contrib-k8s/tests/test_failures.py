"""One test per failure our peers' Kubernetes backends are known for
(shared/backends-k8s-ecs.md §2), each on the real cluster: the run ends with the right
failure kind and message, nothing of it is left in the namespace, and no run hangs."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from runyard import Cancellation, EventType, FailureKind, RunStatus, execute_job

ROW_TIMEOUT = 120  # seconds any of these runs may take before the test calls it a hang


def run(instance: Any, job: Any, *, config: dict[str, Any] | None = None, run_config: dict[str, Any] | None = None,
        cancellation: Cancellation | None = None) -> Any:
    # Over the instance's executor.k8s settings (runyard.yaml), as a run config would be.
    rc = {**(run_config or {}), "execution": {"k8s": dict(config or {})}}
    watchdog = cancellation or Cancellation()
    timer = threading.Timer(ROW_TIMEOUT, watchdog.cancel)
    timer.daemon = True
    timer.start()
    try:
        return execute_job(job, instance=instance, executor="k8s", run_config=rc, cancellation=watchdog)
    finally:
        timer.cancel()


def left_of(cluster: Any, namespace: str, run_id: str, within: float = 30) -> list[str]:
    """Jobs and pods of the run still in the namespace after ``within`` seconds."""
    from runyard_k8s.manifest import run_selector

    deadline = time.monotonic() + within
    while True:
        jobs = [j["metadata"]["name"] for j in cluster.list_jobs(namespace, run_selector(run_id))]
        pods = [p["metadata"]["name"] for p in cluster.list_pods(namespace, run_selector(run_id))[0]]
        if not (jobs or pods) or time.monotonic() > deadline:
            return jobs + pods
        time.sleep(0.5)


def failure(result: Any, key: str) -> Any:
    f = result.failure_for(key)
    assert f is not None, f"step '{key}' did not fail: {result.step_states}"
    return f


def test_missing_service_account_fails_not_started_with_the_failed_create_message(
    k8s_instance: Any, k8s_job: Callable[[str], Any], k8s_cluster: Any, k8s_namespace: str
) -> None:
    started = time.monotonic()
    result = run(k8s_instance, k8s_job("no_service_account_job"))
    f = failure(result, "no_service_account")
    assert f.kind is FailureKind.NOT_STARTED, f
    assert "does-not-exist" in f.message and "made no pod" in f.message, f.message
    assert time.monotonic() - started < 20 + 40, "the watchdog did not fire at pod_creation_timeout"
    assert not left_of(k8s_cluster, k8s_namespace, result.run_id)


def test_impossible_node_selector_fails_at_the_pending_timeout_and_deletes_the_job(
    k8s_instance: Any, k8s_job: Callable[[str], Any], k8s_cluster: Any, k8s_namespace: str
) -> None:
    result = run(k8s_instance, k8s_job("unschedulable_job"))
    f = failure(result, "unschedulable")
    assert f.kind is FailureKind.NOT_STARTED, f
    assert "pending_timeout" in f.message and "node" in f.message.lower(), f.message
    assert not left_of(k8s_cluster, k8s_namespace, result.run_id)


def test_absent_image_with_pull_policy_never_fails_at_once(
    k8s_instance: Any, k8s_job: Callable[[str], Any], k8s_cluster: Any, k8s_namespace: str
) -> None:
    started = time.monotonic()
    result = run(k8s_instance, k8s_job("absent_image_job"))
    f = failure(result, "absent_image")
    assert f.kind is FailureKind.NOT_STARTED, f
    assert "ErrImageNeverPull" in f.message and "runyard-test/absent:never" in f.message, f.message
    # A terminal image error does not wait for pending_timeout (20 s here).
    assert time.monotonic() - started < 20, f"took {time.monotonic() - started:.1f}s"
    assert not left_of(k8s_cluster, k8s_namespace, result.run_id)


def test_ttl_zero_deleting_the_finished_job_is_not_a_failure(
    k8s_instance: Any, k8s_job: Callable[[str], Any], k8s_cluster: Any, k8s_namespace: str, k8s_image: str
) -> None:
    # The gate is on: a bare Job with ttlSecondsAfterFinished 0 vanishes once finished
    # (without the TTLAfterFinished gate the field is dropped and the Job stays).
    body = {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "runyard-ttl-probe", "labels": {"runyard.io/run-id": "ttl-probe"}},
            "spec": {"ttlSecondsAfterFinished": 0, "backoffLimit": 0, "template": {
                "metadata": {"labels": {"runyard.io/run-id": "ttl-probe"}},
                "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False, "containers": [
                    {"name": "runyard", "image": k8s_image, "imagePullPolicy": "Never", "command": ["true"]}]}}}}
    created = k8s_cluster.create_job(k8s_namespace, body)
    assert created["spec"].get("ttlSecondsAfterFinished") == 0, "the apiserver dropped the field: gate off"
    deadline = time.monotonic() + 60
    while k8s_cluster.read_job(k8s_namespace, "runyard-ttl-probe") is not None and time.monotonic() < deadline:
        time.sleep(0.3)
    assert k8s_cluster.read_job(k8s_namespace, "runyard-ttl-probe") is None, "the TTL controller did not delete it"
    k8s_cluster.delete_pods(k8s_namespace, "runyard.io/run-id=ttl-probe", grace=0)

    result = run(k8s_instance, k8s_job("wide_job"), config={"ttl_seconds_after_finished": 0, "max_concurrent": 4})
    assert result.success, [e.message for e in result.events if e.type is EventType.STEP_FAILURE]
    assert all(result.output_for(k) == 1 for k in result.step_states)
    assert not left_of(k8s_cluster, k8s_namespace, result.run_id)


def test_ten_thousand_lines_then_failure_keep_the_first_and_last_lines(
    k8s_instance: Any, k8s_job: Callable[[str], Any], k8s_cluster: Any, k8s_namespace: str
) -> None:
    result = run(k8s_instance, k8s_job("many_lines_job"))
    f = failure(result, "many_lines")
    assert f.kind is FailureKind.ERROR and "failing after 10000 lines" in f.message, f
    out = "".join(str(e.data.get("text", "")) for e in result.events_for("many_lines")
                  if e.type is EventType.STEP_STDOUT)
    lines = [ln for ln in out.splitlines() if ln.startswith("line ")]
    assert len(lines) == 10_000 and lines[0].startswith("line 00000") and lines[-1].startswith("line 09999"), (
        f"{len(lines)} lines kept; first {lines[:1]}, last {lines[-1:]}"
    )
    assert lines == [f"line {i:05d} of the k8s log test" for i in range(10_000)], "lines lost, repeated or reordered"
    assert not left_of(k8s_cluster, k8s_namespace, result.run_id)


def test_cancel_right_after_create_leaves_nothing(
    k8s_instance: Any, k8s_job: Callable[[str], Any], k8s_cluster: Any, k8s_namespace: str, tmp_path: Path
) -> None:
    cancellation = Cancellation()
    job = k8s_job("go_job")
    found: list[str] = []

    def cancel_when_the_job_exists() -> None:
        from runyard_k8s.manifest import selector

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            jobs = k8s_cluster.list_jobs(k8s_namespace, selector({"runyard.io/kind": "step",
                                                                  "runyard.test": "1"}))
            mine = [j for j in jobs if j["metadata"]["annotations"].get("runyard.io/step-key") == "wait_for_go"
                    and not j["metadata"].get("deletionTimestamp")]
            if mine:
                found.append(mine[0]["metadata"]["name"])
                cancellation.cancel()  # the pod may not exist yet
                return
            time.sleep(0.02)

    t = threading.Thread(target=cancel_when_the_job_exists, daemon=True)
    t.start()
    started = time.monotonic()
    result = run(k8s_instance, job, run_config={"scratch": str(tmp_path)}, cancellation=cancellation)
    t.join(5)
    assert found, "the step's Job was never seen"
    assert result.status is RunStatus.CANCELED, result.status
    assert failure(result, "wait_for_go").kind is FailureKind.CANCELED
    assert time.monotonic() - started < 60
    assert not left_of(k8s_cluster, k8s_namespace, result.run_id, within=20), "cancel left Jobs or pods behind"
    assert not (tmp_path / "go").exists()


def test_pod_deleted_from_outside_is_worker_lost(
    k8s_instance: Any, k8s_job: Callable[[str], Any], k8s_cluster: Any, k8s_namespace: str, tmp_path: Path
) -> None:
    from runyard_k8s.manifest import selector

    def delete_the_pod_when_running() -> None:
        deadline = time.monotonic() + 90
        while not (tmp_path / "wait_for_go.started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        pods, _ = k8s_cluster.list_pods(k8s_namespace, selector({"runyard.io/step-key": "wait_for_go",
                                                                 "runyard.test": "1"}))
        for p in pods:
            k8s_cluster.delete_pod(k8s_namespace, p["metadata"]["name"])  # as kubectl delete pod does

    t = threading.Thread(target=delete_the_pod_when_running, daemon=True)
    t.start()
    result = run(k8s_instance, k8s_job("go_job"), run_config={"scratch": str(tmp_path)})
    t.join(5)
    f = failure(result, "wait_for_go")
    assert f.kind is FailureKind.WORKER_LOST, f
    assert "deleted from outside" in f.message, f.message
    assert not left_of(k8s_cluster, k8s_namespace, result.run_id)


def test_oom_killed_step_is_oom(
    k8s_instance: Any, k8s_job: Callable[[str], Any], k8s_cluster: Any, k8s_namespace: str
) -> None:
    result = run(k8s_instance, k8s_job("oom_job"))
    f = failure(result, "hog")
    assert f.kind is FailureKind.OOM, f
    assert "OOMKilled" in f.message and "64Mi" in f.message, f.message
    assert not left_of(k8s_cluster, k8s_namespace, result.run_id)


class Proxy:
    """A TCP forwarder to the API server that can cut every connection at once, as a network
    blip or a load balancer's idle timeout does (new connections keep working)."""

    def __init__(self, port: int) -> None:
        self.sockets: set[socket.socket] = set()
        self.cuts = 0
        sockets = self.sockets

        def pump(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        class Forward(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                up = socket.create_connection(("127.0.0.1", port))
                sockets.update((up, self.request))
                back = threading.Thread(target=pump, args=(up, self.request), daemon=True)
                back.start()
                pump(self.request, up)
                back.join(30)
                up.close()

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Forward)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]

    def cut(self) -> None:
        self.cuts += 1
        for s in list(self.sockets):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.sockets.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.cut()


@pytest.fixture
def proxy(k8s_kubeconfig: str, tmp_path: Path) -> Iterator[tuple[Proxy, str]]:
    cfg = yaml.safe_load(Path(k8s_kubeconfig).read_text())
    server = cfg["clusters"][0]["cluster"]["server"]
    p = Proxy(int(server.rsplit(":", 1)[1]))
    cfg["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{p.port}"
    path = tmp_path / "kubeconfig-via-proxy"
    path.write_text(yaml.safe_dump(cfg))
    yield p, str(path)
    p.close()


def test_dropped_watch_and_log_connections_are_resumed_not_read_as_a_crash(
    k8s_instance: Any, k8s_job: Callable[[str], Any], k8s_cluster: Any, k8s_namespace: str, tmp_path: Path,
    proxy: tuple[Proxy, str]
) -> None:
    p, kubeconfig = proxy

    def cut_mid_step() -> None:
        deadline = time.monotonic() + 90
        while not (tmp_path / "wait_for_go.started").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the pod watch and the log stream are open by now
        p.cut()
        time.sleep(1.0)
        p.cut()  # again, while they reconnect
        time.sleep(1.0)
        (tmp_path / "go").write_text("go")

    t = threading.Thread(target=cut_mid_step, daemon=True)
    t.start()
    result = run(k8s_instance, k8s_job("go_job"), config={"kubeconfig_file": kubeconfig},
                 run_config={"scratch": str(tmp_path)})
    t.join(5)
    assert p.cuts == 2
    assert result.success, [e.message for e in result.events if e.type is EventType.STEP_FAILURE]
    out = "".join(str(e.data.get("text", "")) for e in result.events_for("wait_for_go")
                  if e.type is EventType.STEP_STDOUT)
    assert out.count("waiting for go") == 1 and out.count("got go") == 1, f"lines lost or repeated: {out!r}"
    assert result.output_for("wait_for_go") == 7
    assert not left_of(k8s_cluster, k8s_namespace, result.run_id)


def test_many_concurrent_steps(
    k8s_instance: Any, k8s_job: Callable[[str], Any], k8s_cluster: Any, k8s_namespace: str, tmp_path: Path
) -> None:
    # Each step waits for its peers (the kit's rendezvous): a no-op pod can end before the
    # next one has started on 2 loaded cores, so only waiting proves 10 Jobs run at once.
    from runyard.testing.conformance import max_overlap

    # Ten pods starting at once on a loaded 2-core node: give them longer than the suite's
    # 20 s pending_timeout (the watchdog is tested on its own above).
    result = run(k8s_instance, k8s_job("rendezvous_wide_job"), config={"max_concurrent": 10, "pending_timeout": 90},
                 run_config={"kit": {"scratch": str(tmp_path), "overlap": 10, "overlap_wait": 90}})
    assert result.success, [e.message for e in result.events if e.type is EventType.STEP_FAILURE]
    assert len(result.step_states) == 20 and all(s == "success" for s in result.step_states.values())
    assert max_overlap(result) == 10  # all ten at once, never more than max_concurrent
    assert not left_of(k8s_cluster, k8s_namespace, result.run_id)
