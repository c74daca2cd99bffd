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

The handler composes the concerns, each in its own module: `preflight` (checks and probes
before any step starts, and the containers' arguments), `lifecycle` (one attempt's
container from creation to removal), `stream` (reading its output as events), `attempt`
(an attempt's state, and why a container that died failed) and `watchdog` (heartbeat and
reaper, so no container outlives the run).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Mapping
from typing import Any

import attrs
from runyard import ConfigError
from runyard.plugin import FailureKind, StepHandler, StepRequest, StepUpdate, new_signing_key, resolve

from . import _docker as d
from .attempt import Attempt, lost
from .lifecycle import ContainerRunner
from .preflight import WHERE, ContainerSetup
from .settings import LABEL_KIND, LABEL_RUN_ID, DockerExecutorConfig
from .watchdog import heartbeat, start_reaper, stop_reaper


class DockerStepHandler(StepHandler):
    """Runs every step attempt in a container of its own (see the module docstring).

    Public API for composition (another executor starting steps in containers, e.g. the
    ``celery_docker`` executor's Celery task): construct it with a `DockerExecutorConfig`
    and a `runyard.plugin.HandlerContext`, then use the `StepHandler` contract (``setup``,
    ``launch``, ``poll``/``wait``, ``terminate``, ``teardown``).

    ``scope``: labels that set this handler's containers apart from those of other handlers
    serving the same run (several Celery workers each run some steps of one run on one
    engine). They are added to every container it creates, and its sweeps (``teardown``,
    and the reaper that removes its containers if this process dies) remove only containers
    carrying them as well as the run id. Without it, the sweeps take every step container
    of the run: right when one handler runs the whole run, as the ``docker`` executor does.
    """

    config: DockerExecutorConfig

    def __init__(self, config: DockerExecutorConfig, context: Any, *, scope: Mapping[str, str] | None = None) -> None:
        self.scope = {str(k): str(v) for k, v in (scope or {}).items()}
        if self.scope:
            config = attrs.evolve(config, labels={**config.labels, **self.scope})
        super().__init__(config, context)
        # Set here, not in setup: the engine calls teardown even when setup raised.
        self.client: Any = None
        self.changed = threading.Event()
        self.lock = threading.Lock()
        self.attempts: list[Attempt] = []
        self.reaper: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        # The containers of this run are started here, so the run needs no configured key.
        self.signing_key = new_signing_key()

    def setup(self) -> None:
        cfg = self.config
        client = d.connect(resolve(cfg.docker_host), WHERE)
        self.containers = ContainerSetup(cfg, self.context, client)
        self.client = client
        self.containers.check()
        self.runner = ContainerRunner(self.containers, self.signing_key, self.changed)
        self.reaper = start_reaper(self.context.run_id, self.containers.cleanup, resolve(cfg.docker_host), self.scope)
        if cfg.heartbeat_timeout > 0:
            threading.Thread(target=heartbeat, args=(cfg.heartbeat_timeout, self.stopping, self._live),
                             name="runyard-docker-heartbeat", daemon=True).start()

    def _live(self) -> list[Any]:
        with self.lock:
            return [a.container for a in self.attempts if not a.done and a.container is not None]

    # -- the handler contract ---------------------------------------------------------

    def launch(self, request: StepRequest) -> Attempt:
        containers = self.containers
        if containers.steps is None:
            containers.check_job(request)
        if containers.job_error is not None:
            raise containers.job_error
        if request.code_pointer.module == "__main__":
            raise ConfigError(
                f"job '{request.job_name}' was defined in __main__ without a file, so a container cannot load "
                "it; define it in a file (-f) or an importable module (-m)"
            )
        assert containers.steps is not None
        settings = containers.steps.get(request.step_key) or containers.default_settings()
        att = Attempt(request, settings)
        att.thread = threading.Thread(target=self.runner.run, args=(att,), name=f"runyard-docker-{request.step_key}",
                                      daemon=True)
        with self.lock:
            self.attempts.append(att)
        att.thread.start()
        return att

    def poll(self, handle: Attempt) -> StepUpdate:
        # Events, then stderr (held until the step's STEP_START: two streams), then the ending.
        return handle.update(lost=lambda: lost(handle, None, False))

    def terminate(self, handle: Attempt, kind: FailureKind) -> None:
        att = handle
        with att.lock:
            if att.stop_kind is not None or att.done:
                return
            att.stop_kind = kind
            container = att.container
        if container is not None:
            # Stopping waits for the grace period: not on the engine's (or a canceller's) thread.
            threading.Thread(target=self.runner.stop, args=(container,), daemon=True).start()

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
            if self.containers.cleanup == "always":
                # Whatever an attempt's thread could not remove (a stop that timed out).
                d.remove_containers(self.client, {**self.scope, LABEL_RUN_ID: self.context.run_id, LABEL_KIND: "step"})
        finally:
            self.stopping.set()
            reaper, self.reaper = self.reaper, None
            if reaper is not None:
                stop_reaper(reaper)


__all__ = ["DockerStepHandler"]
