"""Every call runyard-k8s makes to the Kubernetes API, through the official ``kubernetes``
client, in one place: loading a kubeconfig or the in-cluster config, Jobs (create, read,
delete with propagation, sweep by label), pods (list by label, delete, full and tail logs,
a followed log stream, finalizers), Events of an object, Secrets, namespaces, and a pod watch that
resumes from its resourceVersion.

Imported only when a run uses the backend (the executor, the launcher, the ``render``
command never). Objects cross this boundary as plain JSON data, as the API server sends
them (camelCase fields): no client model leaves this module, so a new client major changes
this file only. The client is pinned to the majors in `TESTED_MAJORS`; another one is
refused with the fix (`check_client_version`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import kubernetes
import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.rest import ApiException
from runyard.plugin import ConfigError, PluginError, resolve

from .settings import K8sSettings

TESTED_MAJORS = (35,)
"""Majors of the ``kubernetes`` client this backend was tested with (pyproject pins the same)."""


def check_client_version(version: str | None = None) -> None:
    """Refuse an untested client major: its API breaks (36 and 37 did) would show as odd
    failures mid-run rather than one clear error."""
    version = version or kubernetes.__version__
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = -1
    if major not in TESTED_MAJORS:
        raise PluginError(
            f"runyard-k8s was tested with the kubernetes client {', '.join(f'{m}.x' for m in TESTED_MAJORS)}, "
            f"but {version} is installed; install a tested one: pip install 'kubernetes>={TESTED_MAJORS[0]},"
            f"<{TESTED_MAJORS[-1] + 1}'"
        )


class ApiError(Exception):
    """The API server refused a call (``status``: its HTTP status, ``message``: its words)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class Unreachable(Exception):
    """The API server could not be reached (connection refused, reset, timed out)."""


def _wrap(e: BaseException) -> Exception:
    if isinstance(e, ApiException):
        message = e.reason or ""
        try:
            body = json.loads(e.body or "{}")
            message = body.get("message") or message
        except (ValueError, TypeError, AttributeError):
            pass
        return ApiError(int(e.status or 0), str(e.reason or ""), str(message))
    return Unreachable(f"{type(e).__name__}: {e}")


_NETWORK = (urllib3.exceptions.HTTPError, OSError, ApiException)


def _data(resp: Any) -> Any:
    return json.loads(resp.data)


class Cluster:
    """A connection to one cluster, from ``settings`` (``where``: their key path, for errors)."""

    def __init__(self, settings: K8sSettings, where: str) -> None:
        check_client_version()
        cfg = k8s_client.Configuration()
        try:
            if settings.load_incluster_config:
                k8s_config.load_incluster_config(client_configuration=cfg)
            else:
                k8s_config.load_kube_config(config_file=resolve(settings.kubeconfig_file), context=settings.context,
                                            client_configuration=cfg)
        except Exception as e:
            key = "load_incluster_config" if settings.load_incluster_config else (
                "context" if settings.context else "kubeconfig_file")
            raise ConfigError(
                f"{where}.{key}: cannot load the cluster's configuration ({type(e).__name__}: {e}); give "
                "kubeconfig_file (default: $KUBECONFIG or ~/.kube/config) and context, or load_incluster_config: "
                "true in a pod"
            ) from None
        # One pool per cluster, shared by every attempt's thread: room for all of them.
        cfg.connection_pool_maxsize = 64
        if not cfg.verify_ssl:
            # The kubeconfig asked for it (insecure-skip-tls-verify): one warning per request
            # would bury the run's own output.
            import warnings

            warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
        self.host = cfg.host
        self.where = where
        self.api = k8s_client.ApiClient(cfg)
        self.core = k8s_client.CoreV1Api(self.api)
        self.batch = k8s_client.BatchV1Api(self.api)

    def close(self) -> None:
        try:
            self.api.close()
        except Exception:  # the pool of a cluster that went away: nothing to release
            pass

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _NETWORK as e:
            raise _wrap(e) from None

    # -- checks -------------------------------------------------------------------------

    def check_namespace(self, namespace: str) -> None:
        """ConfigError naming the key when the cluster is unreachable or the namespace missing."""
        try:
            self._call(self.core.read_namespace, namespace, _preload_content=False, _request_timeout=20)
        except Unreachable as e:
            raise ConfigError(f"{self.where}: the Kubernetes API server at {self.host} is not reachable ({e}); "
                              "check kubeconfig_file and context") from None
        except ApiError as e:
            if e.status == 404:
                raise ConfigError(f"{self.where}.namespace: namespace {namespace!r} does not exist on "
                                  f"{self.host}; create it (kubectl create namespace {namespace})") from None
            if e.status in (401, 403):
                return  # may not read namespaces, yet may create Jobs in it: the first Job will tell
            raise

    # -- Jobs ---------------------------------------------------------------------------

    def create_job(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return _data(self._call(self.batch.create_namespaced_job, namespace, body, _preload_content=False,
                                _request_timeout=60))

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _data(self._call(self.batch.read_namespaced_job, name, namespace, _preload_content=False,
                                    _request_timeout=30))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def list_jobs(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        data = _data(self._call(self.batch.list_namespaced_job, namespace, label_selector=selector,
                                _preload_content=False, _request_timeout=30))
        return list(data.get("items") or [])

    def delete_job(self, namespace: str, name: str, *, propagation: str = "Foreground",
                   grace: int | None = None) -> bool:
        """Delete one Job (and its pods, per ``propagation``); False when it was gone already."""
        body = k8s_client.V1DeleteOptions(propagation_policy=propagation, grace_period_seconds=grace)
        try:
            self._call(self.batch.delete_namespaced_job, name, namespace, body=body, _preload_content=False,
                       _request_timeout=30)
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    def delete_jobs(self, namespace: str, selector: str, *, propagation: str = "Foreground",
                    grace: int | None = None) -> list[str]:
        """Delete every Job matching ``selector``; the names deleted."""
        names = [j["metadata"]["name"] for j in self.list_jobs(namespace, selector)]
        for name in names:
            self.delete_job(namespace, name, propagation=propagation, grace=grace)
        return names

    # -- pods ---------------------------------------------------------------------------

    def list_pods(self, namespace: str, selector: str) -> tuple[list[dict[str, Any]], str]:
        """Pods matching ``selector`` and the list's resourceVersion (to watch from)."""
        data = _data(self._call(self.core.list_namespaced_pod, namespace, label_selector=selector,
                                _preload_content=False, _request_timeout=30))
        return list(data.get("items") or []), str((data.get("metadata") or {}).get("resourceVersion") or "")

    def delete_pod(self, namespace: str, name: str, *, grace: int | None = None) -> bool:
        try:
            self._call(self.core.delete_namespaced_pod, name, namespace, grace_period_seconds=grace,
                       _preload_content=False, _request_timeout=30)
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    def kill_in_pod(self, namespace: str, name: str, attempts: int = 3) -> bool:
        """SIGKILL every process of the pod's container but its PID 1 (through exec): what
        "kill it now" means, since a deletion gives even a grace of 0 a SIGTERM first (the
        kubelet's minimum grace), which a worker may use to end its run cleanly. True once
        the container's shell said the kill was sent; an exec that broke (a loaded
        kubelet, a dropped stream) is tried again, up to ``attempts`` times. False when
        exec is not possible (no permission, the pod is gone) or never answered."""
        import time

        from kubernetes.stream import stream

        for attempt in range(attempts):
            try:
                out = stream(self.core.connect_get_namespaced_pod_exec, name, namespace, container="runyard",
                             command=["/bin/sh", "-c", "kill -9 -1; echo runyard-killed"], stderr=True,
                             stdin=False, stdout=True, tty=False, _request_timeout=20)
                if "runyard-killed" in str(out):
                    return True
            except ApiException as e:
                if e.status in (401, 403, 404):
                    return False  # not allowed, or nothing to kill: the deletion that follows stops it
            except Exception:  # noqa: BLE001 - a broken stream: try again
                pass
            if attempt + 1 < attempts:
                time.sleep(0.5)
        return False

    def delete_pods(self, namespace: str, selector: str, *, grace: int | None = None) -> list[str]:
        pods, _ = self.list_pods(namespace, selector)
        names = [p["metadata"]["name"] for p in pods]
        for name in names:
            self.delete_pod(namespace, name, grace=grace)
        return names

    def remove_finalizer(self, namespace: str, name: str, finalizer: str,
                         known: Mapping[str, Any] | None = None) -> bool:
        """Take ``finalizer`` off the pod (other finalizers stay): a JSON patch that tests
        the entry's position first, so a list changed meanwhile is read again, never
        patched blindly. ``known``: the pod as last seen (saves a read). False when the pod
        is gone or does not hold it."""
        pod = known
        for _ in range(5):
            if pod is None:
                try:
                    pod = _data(self._call(self.core.read_namespaced_pod, name, namespace, _preload_content=False,
                                           _request_timeout=30))
                except ApiError as e:
                    if e.status == 404:
                        return False
                    raise
            finalizers = list((pod.get("metadata") or {}).get("finalizers") or [])
            if finalizer not in finalizers:
                return False
            at = f"/metadata/finalizers/{finalizers.index(finalizer)}"
            patch = [{"op": "test", "path": at, "value": finalizer}, {"op": "remove", "path": at}]
            try:
                self._call(self.core.patch_namespaced_pod, name, namespace, patch, _preload_content=False,
                           _request_timeout=30)
                return True
            except ApiError as e:
                if e.status == 404:
                    return False
                if e.status not in (409, 422):  # 422: the test failed (the list changed): read again
                    raise
            pod = None
        return False

    def release_pods(self, namespace: str, selector: str, finalizer: str,
                     only: Callable[[dict[str, Any]], bool] | None = None) -> list[str]:
        """Take ``finalizer`` off every pod matching ``selector`` that holds it (and, when
        ``only`` is given, for which ``only(pod)`` is true); the names released."""
        pods, _ = self.list_pods(namespace, selector)
        names = []
        for pod in pods:
            if finalizer in ((pod.get("metadata") or {}).get("finalizers") or []) and (only is None or only(pod)):
                if self.remove_finalizer(namespace, pod["metadata"]["name"], finalizer, known=pod):
                    names.append(pod["metadata"]["name"])
        return names

    def pod_log(self, namespace: str, name: str, *, tail_lines: int | None = None,
                limit_bytes: int | None = None) -> str:
        """The pod's log now (all of it, or its last ``tail_lines``), at most ``limit_bytes``."""
        kwargs: dict[str, Any] = {"container": "runyard", "_preload_content": False, "_request_timeout": 60}
        if tail_lines is not None:
            kwargs["tail_lines"] = tail_lines
        if limit_bytes is not None:
            kwargs["limit_bytes"] = limit_bytes
        resp = self._call(self.core.read_namespaced_pod_log, name, namespace, **kwargs)
        return resp.data.decode("utf-8", errors="replace")

    def follow_log(self, namespace: str, name: str) -> LogStream:
        """The pod's log from its start, followed while the container runs."""
        # Through call_api for one header the generated method cannot send: "Connection: close".
        # A followed log that ends cleanly hands its connection back to the pool shared by every
        # attempt's thread; a later `close` (from the attempt's stop) would then cut whatever
        # request had picked that connection up. With the header, the socket is this stream's
        # alone and is never reused.
        resp = self._call(
            self.api.call_api, "/api/v1/namespaces/{namespace}/pods/{name}/log", "GET",
            path_params={"namespace": namespace, "name": name},
            query_params=[("container", "runyard"), ("follow", True)],
            header_params={"Accept": "application/json", "Connection": "close"},  # as the generated method asks
            auth_settings=["BearerToken"], _preload_content=False, _request_timeout=(30, None),
            _return_http_data_only=True,
        )
        return LogStream(resp)

    def watch_pods(self, namespace: str, selector: str, resource_version: str,
                   timeout_seconds: int = 60) -> Iterator[tuple[str, dict[str, Any]]]:
        """(type, pod) changes after ``resource_version``; ends when the server ends the watch.
        Raises ApiError 410 when that version is too old (list again), Unreachable when the
        connection broke."""
        w = k8s_watch.Watch()
        try:
            for event in w.stream(self.core.list_namespaced_pod, namespace, label_selector=selector,
                                  resource_version=resource_version, timeout_seconds=timeout_seconds,
                                  allow_watch_bookmarks=True, deserialize=False,
                                  _request_timeout=(30, timeout_seconds + 30)):
                kind = event.get("type")
                obj = event.get("object") or event.get("raw_object") or {}
                if kind == "ERROR":
                    raise ApiError(int(obj.get("code") or 0), str(obj.get("reason") or ""),
                                   str(obj.get("message") or ""))
                yield str(kind), obj
        except _NETWORK as e:
            raise _wrap(e) from None
        finally:
            w.stop()

    # -- Events, Secrets, namespaces --------------------------------------------------------

    def events_for(self, namespace: str, kind: str, name: str) -> list[dict[str, Any]]:
        """Events about one object, oldest first."""
        data = _data(self._call(self.core.list_namespaced_event, namespace,
                                field_selector=f"involvedObject.kind={kind},involvedObject.name={name}",
                                _preload_content=False, _request_timeout=30))
        items = list(data.get("items") or [])
        items.sort(key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
        return items

    def create_secret(self, namespace: str, name: str, labels: Mapping[str, str], data: Mapping[str, str]) -> None:
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "labels": dict(labels)}, "stringData": dict(data)}
        self._call(self.core.create_namespaced_secret, namespace, body, _preload_content=False, _request_timeout=30)

    def delete_secrets(self, namespace: str, selector: str) -> list[str]:
        data = _data(self._call(self.core.list_namespaced_secret, namespace, label_selector=selector,
                                _preload_content=False, _request_timeout=30))
        names = [s["metadata"]["name"] for s in data.get("items") or []]
        for name in names:
            try:
                self._call(self.core.delete_namespaced_secret, name, namespace, _preload_content=False,
                           _request_timeout=30)
            except ApiError as e:
                if e.status != 404:
                    raise
        return names

    def list_secrets(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        data = _data(self._call(self.core.list_namespaced_secret, namespace, label_selector=selector,
                                _preload_content=False, _request_timeout=30))
        return list(data.get("items") or [])

    def create_namespace(self, name: str, labels: Mapping[str, str]) -> None:
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": dict(labels)}}
        self._call(self.core.create_namespace, body, _preload_content=False, _request_timeout=30)

    def delete_namespace(self, name: str) -> bool:
        try:
            self._call(self.core.delete_namespace, name, _preload_content=False, _request_timeout=30)
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    def read_namespace(self, name: str) -> dict[str, Any] | None:
        try:
            return _data(self._call(self.core.read_namespace, name, _preload_content=False, _request_timeout=30))
        except ApiError as e:
            if e.status == 404:
                return None
            raise


class LogStream:
    """A followed pod log: `lines` yields complete lines (bytes, without the newline) and
    ends when the container ends or the connection breaks; `close` cuts it from another thread."""

    def __init__(self, resp: Any) -> None:
        self.resp = resp
        self.closed = threading.Event()

    def lines(self) -> Iterator[bytes]:
        partial = b""
        try:
            for chunk in self.resp.stream(65536, decode_content=False):
                if self.closed.is_set():
                    return
                partial += chunk
                *complete, partial = partial.split(b"\n")
                yield from complete
        except _NETWORK:
            return  # the caller checks the pod and reads the log again
        except (AttributeError, ValueError):  # closed from another thread mid-read
            return

    def close(self) -> None:
        self.closed.set()
        # Closing a response does not wake a thread blocked reading it (the kubelet may keep a
        # finished container's stream open for seconds): shutting its socket down does. The
        # socket is this stream's own (see follow_log), so the shutdown reaches nobody else.
        try:
            self.resp.shutdown()
        except (OSError, ValueError, RuntimeError):  # already ended and released, or closed
            pass
        try:
            self.resp.close()
            self.resp.release_conn()
        except Exception:  # already closed
            pass
