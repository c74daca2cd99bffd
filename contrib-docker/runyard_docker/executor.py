"""The ``docker`` executor: each step attempt in a fresh container.

Per attempt, a thread of the run worker creates the container (labelled with the run id,
step key and attempt id), attaches to its output, starts it and reads its two streams as
they come: stdout carries the step worker's events, one JSON line each
(`runyard_docker.step_worker`), stderr is the step's stderr. `poll` hands over what has
arrived; the attempt ends when the container exits, and a container that exits without
reporting an ending becomes a failure of the right kind (OOM when Docker reports an
OOM kill, SIGNAL for an exit code of 128+N, NOT_STARTED when the worker never started
the step, WORKER_LOST otherwise). `terminate` stops the container (SIGTERM, SIGKILL after
``terminate_grace``). Finished containers are removed according to ``cleanup``.

Each request is signed with a key made for the run, and each container is told (in its
environment) that key and its allowance: the run's code location and output store; the
step worker refuses anything else (see docs/security.md).

Outputs travel through the run's output store: a file store's directory is bind-mounted
at the same path in every step container, so references resolve identically; an fsspec
store is reached by URL. A job loaded from a file has that file's directory bind-mounted
(read-only) at the same path too, unless ``mount_code: false`` (the image holds the code).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from typing import Any

import attrs
import docker
import docker.errors
from runyard import ConfigError
from runyard.plugin import (
    SIGNING_KEY_ENV,
    STEP_WORKER_ENV,
    Event,
    EventType,
    FailureInfo,
    FailureKind,
    StepHandler,
    StepRequest,
    StepUpdate,
    grant_for_run,
    new_signing_key,
    preload_job,
    resolve,
    sign_request,
)

from . import _docker as d
from .plugin import (
    IMAGE_TAG,
    LABEL_ATTEMPT_ID,
    LABEL_KIND,
    LABEL_RUN_ID,
    LABEL_STEP_KEY,
    RESOURCES_TAG,
    DockerExecutorConfig,
)

WHERE = "executor.docker"
_ENDINGS = (EventType.STEP_SUCCESS, EventType.STEP_FAILURE)
_MAX_ARG = 100_000  # bytes of request passed on the command line; larger ones go in a file
_TAIL = 1500  # characters of stderr quoted in the failure of a container that died
_MAX_STDERR = 8 << 20  # characters of stderr kept per attempt
_MAX_STDOUT = 8 << 20  # characters of stdout kept per attempt
_HEARTBEAT = "/tmp/runyard-heartbeat"  # rewritten by the run worker; see step_worker
_HINT_WORKER = (
    "the image must hold runyard and runyard-docker (python3 -m runyard_docker.step_worker); "
    "`runyard docker build-image` builds such an image"
)


@attrs.define
class _StepSettings:
    image: str
    limits: dict[str, Any]


class _Attempt:
    """One attempt's container and what has been read from it."""

    def __init__(self, request: StepRequest, settings: _StepSettings) -> None:
        self.request = request
        self.settings = settings
        self.lock = threading.Lock()
        self.container: Any = None
        self.stop_kind: FailureKind | None = None
        self.pending: list[Event] = []
        self.stderr: list[str] = []
        self.stderr_total = 0
        self.stdout_total = 0
        self.stderr_tail = ""
        self.ending: Event | None = None
        self.started_step = False
        self.done = False
        self.failure: FailureInfo | None = None
        self.reported = False
        self.thread: threading.Thread | None = None

    @property
    def key(self) -> str:
        return self.request.step_key


class DockerStepHandler(StepHandler):
    """Runs every step attempt in a container of its own (see the module docstring)."""

    config: DockerExecutorConfig

    def __init__(self, config: DockerExecutorConfig, context: Any) -> None:
        super().__init__(config, context)
        # Set here, not in setup: the engine calls teardown even when setup raised.
        self.client: Any = None
        self.changed = threading.Event()
        self.lock = threading.Lock()
        self.attempts: list[_Attempt] = []
        self.steps: dict[str, _StepSettings] | None = None
        self.job_error: ConfigError | None = None
        self.reaper: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        # The containers of this run are started here, so the run needs no configured key.
        self.signing_key = new_signing_key()

    def setup(self) -> None:
        cfg = self.config
        client = d.connect(resolve(cfg.docker_host), WHERE)
        self.container_kwargs = d.check_container_kwargs(cfg, WHERE)
        self.cleanup = d.cleanup_policy(cfg, WHERE)
        self.client = client
        self.image = str(resolve(cfg.image))
        self.pull_policy = str(resolve(cfg.pull_policy))
        d.ensure_image(self.client, self.image, self.pull_policy, WHERE, f"{WHERE}.image")
        self.networks = d.network_names(cfg)
        d.check_networks(self.client, self.networks, f"{WHERE}.networks" if cfg.networks else f"{WHERE}.network")
        self.binds = d.volume_binds(self.client, cfg, WHERE)
        self.env = d.environment(cfg, WHERE)
        self.base_limits = d.limits(resolve(cfg.memory), cfg.cpus)
        d.bind_outputs(self.client, cfg, self.binds, self.context.output_store, WHERE)
        self._probe(_StepSettings(self.image, dict(self.base_limits)), WHERE)
        self._start_reaper(resolve(cfg.docker_host))
        if cfg.heartbeat_timeout > 0:
            threading.Thread(target=self._heartbeat, name="runyard-docker-heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        """Rewrite the heartbeat file in every live step container (see `step_worker`): if
        this process dies, they stop themselves within ``heartbeat_timeout``."""
        interval = max(0.5, min(5.0, float(self.config.heartbeat_timeout) / 4))
        beat = 0
        while not self.stopping.wait(interval):
            beat += 1
            with self.lock:
                live = [a.container for a in self.attempts if not a.done and a.container is not None]
            for container in live:
                try:
                    container.put_archive("/tmp", _tar({"runyard-heartbeat": str(beat).encode()}))
                except Exception:  # exited meanwhile, or the engine is slow: the next beat tries again
                    pass

    def _start_reaper(self, docker_host: str | None) -> None:
        """A process that removes this run's step containers if this one dies (see `reaper`)."""
        env = {**os.environ, "RUNYARD_DOCKER_CLEANUP": self.cleanup}
        if docker_host:
            env["RUNYARD_DOCKER_REAPER_HOST"] = docker_host
        # Its own session: killing the run worker's process group must not take it along.
        self.reaper = subprocess.Popen(
            [sys.executable, "-m", "runyard_docker.reaper", self.context.run_id],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, start_new_session=True, close_fds=True,
        )

    def _stop_reaper(self) -> None:
        reaper, self.reaper = self.reaper, None
        if reaper is None:
            return
        try:
            assert reaper.stdin is not None
            reaper.stdin.close()  # end of file: it sweeps (nothing left by now) and exits
        except OSError:
            pass
        # Reap it without holding up the end of the run.
        threading.Thread(target=reaper.wait, args=(30,), daemon=True).start()

    # -- checks made before the first container starts ------------------------------

    def _check_job(self, request: StepRequest) -> None:
        """Check every step's image and resources tags once, before any step starts."""
        steps: dict[str, _StepSettings] = {}
        try:
            job = preload_job(request.code_pointer, request.job_name)
            nodes = job.nodes
        except Exception:  # the step container reports a job that does not load
            nodes = {}
        try:
            for key, node in nodes.items():
                tags = node.step.tags
                image = tags.get(IMAGE_TAG) or self.image
                if image != self.image:
                    d.ensure_image(
                        self.client, image, self.pull_policy, WHERE, f"step '{key}': tag '{IMAGE_TAG}'"
                    )
                lim = dict(self.base_limits)
                if RESOURCES_TAG in tags:
                    where = f"step '{key}': tag '{RESOURCES_TAG}'"
                    res = d.parse_resources(tags[RESOURCES_TAG], where)
                    lim.update(d.limits(res.get("memory"), res.get("cpus")))
                    if lim != self.base_limits:
                        self._probe(_StepSettings(image, lim), where)
                steps[key] = _StepSettings(image, lim)
        except ConfigError as e:
            self.job_error = e
        self.steps = steps
        if request.code_pointer.file and self.config.mount_code and self.job_error is None:
            try:
                d.bind_code(self.client, self.binds, d.code_dir(request.code_pointer.to_dict()) or "/", WHERE)
            except ConfigError as e:
                self.job_error = e

    # -- the handler contract ---------------------------------------------------------

    def launch(self, request: StepRequest) -> _Attempt:
        if self.steps is None:
            self._check_job(request)
        if self.job_error is not None:
            raise self.job_error
        if request.code_pointer.module == "__main__":
            raise ConfigError(
                f"job '{request.job_name}' was defined in __main__ without a file, so a container cannot load "
                "it; define it in a file (-f) or an importable module (-m)"
            )
        assert self.steps is not None
        settings = self.steps.get(request.step_key) or _StepSettings(self.image, dict(self.base_limits))
        att = _Attempt(request, settings)
        att.thread = threading.Thread(target=self._run, args=(att,), name=f"runyard-docker-{request.step_key}",
                                      daemon=True)
        with self.lock:
            self.attempts.append(att)
        att.thread.start()
        return att

    def poll(self, handle: _Attempt) -> StepUpdate:
        att = handle
        with att.lock:
            if att.reported:
                return StepUpdate.finished()
            events, att.pending = att.pending, []
            if att.stderr:
                events.append(self._stderr_event(att))
            if not att.done:
                return StepUpdate.running(events)
            att.reported = True
            if att.ending is not None:
                events.append(att.ending)
                return StepUpdate.finished(events)
            return StepUpdate.crashed(att.failure or self._lost(att, None, False), events)

    def terminate(self, handle: _Attempt, kind: FailureKind) -> None:
        att = handle
        with att.lock:
            if att.stop_kind is not None or att.done:
                return
            att.stop_kind = kind
            container = att.container
        if container is not None:
            # Stopping waits for the grace period: not on the engine's (or a canceller's) thread.
            threading.Thread(target=self._stop, args=(container,), daemon=True).start()

    def wait(self, timeout: float) -> None:
        self.changed.wait(timeout)
        self.changed.clear()

    def teardown(self) -> None:
        if self.client is None:
            return
        try:
            with self.lock:
                attempts = list(self.attempts)
            deadline = time.monotonic() + float(self.config.terminate_grace) + 15
            for att in attempts:
                if att.thread is not None:
                    att.thread.join(max(0.0, deadline - time.monotonic()))
            if self.cleanup == "always":
                # Whatever an attempt's thread could not remove (a stop that timed out).
                d.remove_containers(self.client, {LABEL_RUN_ID: self.context.run_id, LABEL_KIND: "step"})
        finally:
            self.stopping.set()
            self._stop_reaper()

    # -- one attempt, on its own thread -------------------------------------------------

    def _create(self, att: _Attempt) -> Any:
        req = att.request
        payload = json.dumps(sign_request(req, self.signing_key.encode()), separators=(",", ":"))
        in_file = len(payload.encode()) > _MAX_ARG
        arg = "@/tmp/runyard-step-request.json" if in_file else payload
        labels = d.base_labels(self.config, "step", req.run_id, self.context.instance_home)
        labels.update({LABEL_STEP_KEY: req.step_key, LABEL_ATTEMPT_ID: req.attempt_id})
        kwargs = self._args(att.settings, labels, ["python3", "-m", "runyard_docker.step_worker", arg])
        # The worker's key and allowance come from here, its starter, never from the request.
        kwargs["environment"].update({SIGNING_KEY_ENV: self.signing_key,
                                      STEP_WORKER_ENV: json.dumps(grant_for_run(req))})
        kwargs["name"] = d.safe_name("runyard-step", req.run_id[:8], req.step_key, str(req.attempt),
                                     req.attempt_id[:6])
        container = self.client.containers.create(**kwargs)
        try:
            for extra in self.networks[1:]:
                self.client.networks.get(extra).connect(container)
            if in_file:
                container.put_archive("/tmp", _tar({"runyard-step-request.json": payload.encode()}))
            if self.config.heartbeat_timeout > 0:
                try:
                    container.put_archive("/tmp", _tar({"runyard-heartbeat": b"0"}))
                except docker.errors.APIError:
                    pass  # a read-only root filesystem: the step runs without the watchdog
        except BaseException:
            _remove(container)
            raise
        return container

    def _args(self, settings: _StepSettings, labels: dict[str, str], command: list[str]) -> dict[str, Any]:
        """The arguments of containers.create for a step container, but its name."""
        kwargs: dict[str, Any] = {
            "image": settings.image,
            "command": command,
            "labels": labels,
            "environment": {**self.env, "PYTHONUNBUFFERED": "1", **self._heartbeat_env()},
            "volumes": d.sdk_volumes(self.binds),
            "init": True,  # docker-init as PID 1 passes SIGTERM on to the worker
            "detach": True,
            **settings.limits,
            **self.container_kwargs,
        }
        if self.networks:
            first = self.networks[0]
            if first in ("host", "none") or first.startswith("container:"):
                kwargs["network_mode"] = first
            else:
                kwargs["network"] = first
        return kwargs

    def _probe(self, settings: _StepSettings, where: str) -> None:
        """Let the engine check the settings on a container it creates but never starts, so
        that values only it can judge fail before any step starts, naming the key."""
        labels = d.base_labels(self.config, "step", self.context.run_id, self.context.instance_home)
        found = d.probe(self.client, self._args(settings, labels, ["true"]), self.container_kwargs)
        if found is not None:
            raise d.probe_error(where, found, "." if where == WHERE else ": ")

    def _heartbeat_env(self) -> dict[str, str]:
        timeout = float(self.config.heartbeat_timeout)
        if timeout <= 0:
            return {}
        return {"RUNYARD_DOCKER_HEARTBEAT": _HEARTBEAT, "RUNYARD_DOCKER_HEARTBEAT_TIMEOUT": f"{timeout:g}"}

    def _run(self, att: _Attempt) -> None:
        container = None
        code: int | None = None
        oom = False
        try:
            with att.lock:
                stopped = att.stop_kind is not None
            if stopped:
                self._finish(att, FailureInfo(kind=att.stop_kind or FailureKind.CANCELED,
                                              message=f"step '{att.key}' was stopped before its container started"))
                return
            try:
                container = self._create(att)
            except docker.errors.APIError as e:
                self._finish(att, FailureInfo(kind=FailureKind.NOT_STARTED,
                                              message=f"could not create the container of step '{att.key}': "
                                              f"{d._short(e, 600)}"))
                return
            with att.lock:
                att.container = container
                stopped = att.stop_kind is not None
            if stopped:
                self._finish(att, FailureInfo(kind=att.stop_kind or FailureKind.CANCELED,
                                              message=f"step '{att.key}' was stopped before its container started"))
                return
            stream = container.attach(stdout=True, stderr=True, stream=True, logs=True, demux=True)
            try:
                container.start()
            except docker.errors.APIError as e:
                self._finish(att, FailureInfo(kind=FailureKind.NOT_STARTED,
                                              message=f"could not start the container of step '{att.key}' "
                                              f"(image {att.settings.image}): {d._short(e, 600)}"))
                return
            with att.lock:
                stopped = att.stop_kind is not None
            if stopped:  # terminate came between create and start: it could not stop it then
                self._stop(container)
            self._read(att, stream)
            code = int(container.wait(timeout=60).get("StatusCode", -1))
            if code != 0:
                container.reload()
                oom = bool(container.attrs.get("State", {}).get("OOMKilled"))
            self._finish(att, None if att.ending is not None else self._lost(att, code, oom))
        except Exception as e:  # the engine connection broke, or the container vanished
            self._finish(att, FailureInfo(
                kind=FailureKind.WORKER_LOST,
                message=f"lost the container of step '{att.key}': {type(e).__name__}: {d._short(e, 600)}",
                exit_code=code,
            ))
        finally:
            if container is not None:
                keep = self.cleanup == "never" or (
                    self.cleanup == "on_success"
                    and not (att.ending is not None and att.ending.type is EventType.STEP_SUCCESS)
                )
                if not keep:
                    _remove(container)

    def _read(self, att: _Attempt, stream: Any) -> None:
        partial = b""
        decoder_err = _Utf8()
        for out, err in stream:
            new: list[Event] = []
            if out:
                partial += out
                *lines, partial = partial.split(b"\n")
                for line in lines:
                    ev = self._parse(att, line)
                    if ev is not None:
                        new.append(ev)
            text = decoder_err.decode(err) if err else ""
            with att.lock:
                for ev in new:
                    if ev.type is EventType.STEP_STDOUT:
                        size = len(ev.data.get("text", ""))
                        att.stdout_total += size
                        if att.stdout_total > _MAX_STDOUT:
                            if att.stdout_total - size <= _MAX_STDOUT:
                                att.pending.append(self._event(att, EventType.STEP_STDOUT, {
                                    "text": f"[runyard: stdout beyond {_MAX_STDOUT} characters is not kept]\n"}))
                            continue
                    if ev.type in _ENDINGS:
                        att.ending = ev  # held back until the container exits: stderr comes first
                    else:
                        if ev.type is EventType.STEP_START:
                            att.started_step = True
                        att.pending.append(ev)
                if text:
                    att.stderr_tail = (att.stderr_tail + text)[-_TAIL:]
                    if att.stderr_total < _MAX_STDERR:
                        att.stderr.append(text)
                        att.stderr_total += len(text)
            if new or text:
                self.changed.set()
        if partial.strip():
            ev = self._parse(att, partial)
            if ev is not None:
                with att.lock:
                    if ev.type in _ENDINGS:
                        att.ending = ev
                    else:
                        att.pending.append(ev)

    def _parse(self, att: _Attempt, line: bytes) -> Event | None:
        text = line.decode("utf-8", errors="replace")
        if not text.strip():
            return None
        try:
            ev = Event.from_json(text)
        except (ValueError, KeyError, TypeError):
            # Not an event (something wrote to the container's stdout before the worker
            # took it over): keep it as the step's stdout rather than lose it.
            return self._event(att, EventType.STEP_STDOUT, {"text": text + "\n"})
        if ev.attempt_id != att.request.attempt_id:
            return None
        return ev

    def _event(self, att: _Attempt, type: EventType, data: dict[str, Any]) -> Event:
        r = att.request
        return Event(type=type, run_id=r.run_id, step_key=r.step_key, attempt=r.attempt, attempt_id=r.attempt_id,
                     data=data)

    def _stderr_event(self, att: _Attempt) -> Event:
        text = "".join(att.stderr)
        att.stderr = []
        return self._event(att, EventType.STEP_STDERR, {"text": text})

    def _lost(self, att: _Attempt, code: int | None, oom: bool) -> FailureInfo:
        """Why a container ended without the worker reporting an ending."""
        name = att.container.name if att.container is not None else "?"
        tail = att.stderr_tail.strip()
        said = f"; last stderr:\n{tail}" if tail else ""
        if att.stop_kind is not None:
            return FailureInfo(kind=att.stop_kind, message=f"step '{att.key}' was stopped ({att.stop_kind.value})",
                               exit_code=code)
        if oom:
            limit = att.settings.limits.get("mem_limit")
            return FailureInfo(
                kind=FailureKind.OOM,
                message=f"container {name} of step '{att.key}' {d.describe_exit(code, True)}"
                f"{f' of {limit}' if limit else ''}; raise the memory setting or the step's "
                f"'{RESOURCES_TAG}' tag{said}",
                exit_code=code,
                signal=9,
            )
        if code is not None and code > 128:
            return FailureInfo(kind=FailureKind.SIGNAL,
                               message=f"container {name} of step '{att.key}' {d.describe_exit(code, False)}{said}",
                               exit_code=code, signal=code - 128)
        if not att.started_step:
            return FailureInfo(kind=FailureKind.NOT_STARTED,
                               message=f"container {name} of step '{att.key}' {d.describe_exit(code, False)} before "
                               f"the step started; {_HINT_WORKER}{said}",
                               exit_code=code)
        return FailureInfo(kind=FailureKind.WORKER_LOST,
                           message=f"container {name} of step '{att.key}' {d.describe_exit(code, False)} without "
                           f"reporting an ending{said}",
                           exit_code=code)

    def _finish(self, att: _Attempt, failure: FailureInfo | None) -> None:
        with att.lock:
            if failure is not None and att.ending is None:
                att.failure = failure
            att.done = True
        self.changed.set()

    def _stop(self, container: Any) -> None:
        try:
            container.stop(timeout=max(0, int(round(float(self.config.terminate_grace)))))
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError:
            try:
                container.kill()
            except docker.errors.APIError:
                pass


class _Utf8:
    def __init__(self) -> None:
        import codecs

        self._d = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def decode(self, data: bytes) -> str:
        return self._d.decode(data)


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            # The request may hold secrets; the heartbeat must be readable by any user the image runs as.
            info.mode = 0o600 if name.endswith(".json") else 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _remove(container: Any) -> None:
    try:
        container.remove(force=True, v=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as e:
        if "already in progress" not in str(e):
            raise


__all__ = ["DockerStepHandler"]
