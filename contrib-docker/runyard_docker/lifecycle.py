"""The ``docker`` executor's container lifecycle: one attempt's container created (its
signed request, key and allowance, extra networks), attached to, started, waited for,
stopped (SIGTERM, SIGKILL after ``terminate_grace``) and removed per ``cleanup``. Each
attempt runs on a thread of its own."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from typing import Any

import docker
import docker.errors
from runyard.plugin import (
    SIGNING_KEY_ENV,
    STEP_WORKER_ENV,
    EventType,
    FailureInfo,
    FailureKind,
    grant_for_run,
    sign_request,
)

from . import _docker as d
from .attempt import Attempt, lost
from .preflight import ContainerSetup
from .settings import LABEL_ATTEMPT_ID, LABEL_STEP_KEY
from .stream import read_stream

_MAX_ARG = 100_000  # bytes of request passed on the command line; larger ones go in a file


class ContainerRunner:
    """Runs attempts in containers made with ``setup``'s settings; sets ``changed`` when
    an attempt ends."""

    def __init__(self, setup: ContainerSetup, signing_key: str, changed: threading.Event) -> None:
        self.setup = setup
        self.config = setup.config
        self.signing_key = signing_key
        self.changed = changed

    def create(self, att: Attempt) -> Any:
        setup = self.setup
        req = att.request
        payload = json.dumps(sign_request(req, self.signing_key.encode()), separators=(",", ":"))
        in_file = len(payload.encode()) > _MAX_ARG
        arg = "@/tmp/runyard-step-request.json" if in_file else payload
        labels = d.base_labels(self.config, "step", req.run_id, setup.context.instance_home)
        labels.update({LABEL_STEP_KEY: req.step_key, LABEL_ATTEMPT_ID: req.attempt_id})
        kwargs = setup.args(att.settings, labels, ["python3", "-m", "runyard_docker.step_worker", arg])
        # The worker's key and allowance come from here, its starter, never from the request.
        kwargs["environment"].update({SIGNING_KEY_ENV: self.signing_key,
                                      STEP_WORKER_ENV: json.dumps(grant_for_run(req))})
        kwargs["name"] = d.safe_name("runyard-step", req.run_id[:8], req.step_key, str(req.attempt),
                                     req.attempt_id[:6])
        container = setup.client.containers.create(**kwargs)
        try:
            for extra in setup.networks[1:]:
                setup.client.networks.get(extra).connect(container)
            if in_file:
                container.put_archive("/tmp", tar({"runyard-step-request.json": payload.encode()}))
            if self.config.heartbeat_timeout > 0:
                try:
                    container.put_archive("/tmp", tar({"runyard-heartbeat": b"0"}))
                except docker.errors.APIError:
                    pass  # a read-only root filesystem: the step runs without the watchdog
        except BaseException:
            remove(container)
            raise
        return container

    def run(self, att: Attempt) -> None:
        """The whole life of one attempt's container, on the attempt's thread."""
        container = None
        code: int | None = None
        oom = False
        try:
            with att.lock:
                stopped = att.stop_kind is not None
            if stopped:
                self.finish(att, FailureInfo(kind=att.stop_kind or FailureKind.CANCELED,
                                             message=f"step '{att.key}' was stopped before its container started"))
                return
            try:
                container = self.create(att)
            except docker.errors.APIError as e:
                self.finish(att, FailureInfo(kind=FailureKind.NOT_STARTED,
                                             message=f"could not create the container of step '{att.key}': "
                                             f"{d._short(e, 600)}"))
                return
            with att.lock:
                att.container = container
                stopped = att.stop_kind is not None
            if stopped:
                self.finish(att, FailureInfo(kind=att.stop_kind or FailureKind.CANCELED,
                                             message=f"step '{att.key}' was stopped before its container started"))
                return
            stream = container.attach(stdout=True, stderr=True, stream=True, logs=True, demux=True)
            try:
                container.start()
            except docker.errors.APIError as e:
                self.finish(att, FailureInfo(kind=FailureKind.NOT_STARTED,
                                             message=f"could not start the container of step '{att.key}' "
                                             f"(image {att.settings.image}): {d._short(e, 600)}"))
                return
            with att.lock:
                stopped = att.stop_kind is not None
            if stopped:  # terminate came between create and start: it could not stop it then
                self.stop(container)
            read_stream(att, stream, self.changed)
            code = int(container.wait(timeout=60).get("StatusCode", -1))
            if code != 0:
                container.reload()
                oom = bool(container.attrs.get("State", {}).get("OOMKilled"))
            self.finish(att, None if att.ending is not None else lost(att, code, oom))
        except Exception as e:  # the engine connection broke, or the container vanished
            self.finish(att, FailureInfo(
                kind=FailureKind.WORKER_LOST,
                message=f"lost the container of step '{att.key}': {type(e).__name__}: {d._short(e, 600)}",
                exit_code=code,
            ))
        finally:
            if container is not None:
                cleanup = self.setup.cleanup
                keep = cleanup == "never" or (
                    cleanup == "on_success"
                    and not (att.ending is not None and att.ending.type is EventType.STEP_SUCCESS)
                )
                if not keep:
                    remove(container)

    def finish(self, att: Attempt, failure: FailureInfo | None) -> None:
        with att.lock:
            if failure is not None and att.ending is None:
                att.failure = failure
            att.done = True
        self.changed.set()

    def stop(self, container: Any) -> None:
        try:
            container.stop(timeout=max(0, int(round(float(self.config.terminate_grace)))))
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError:
            try:
                container.kill()
            except docker.errors.APIError:
                pass


def tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            # The request may hold secrets; the heartbeat must be readable by any user the image runs as.
            info.mode = 0o600 if name.endswith(".json") else 0o644
            archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def remove(container: Any) -> None:
    try:
        container.remove(force=True, v=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as e:
        if "already in progress" not in str(e):
            raise
