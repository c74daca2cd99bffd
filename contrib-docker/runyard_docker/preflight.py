"""The ``docker`` executor's pre-run checks: the daemon, images, networks, volumes,
environment and limits are checked once, before any step container starts, and probed on a
container the engine creates but never starts, so a bad value fails the run naming its
key. Also the arguments every step container is created with."""

from __future__ import annotations

from typing import Any

from runyard import ConfigError
from runyard.plugin import RESOURCES_TAG, StepRequest, preload_job, resolve

from . import _docker as d
from .attempt import StepSettings
from .settings import IMAGE_TAG, DockerExecutorConfig

WHERE = "executor.docker"
HEARTBEAT = "/tmp/runyard-heartbeat"  # rewritten by the run worker; see step_worker


class ContainerSetup:
    """The checked settings of the run's step containers.

    Made in two stages, as the handler's setup was: the constructor checks what needs no
    daemon call, `check` what does."""

    def __init__(self, config: DockerExecutorConfig, context: Any, client: Any) -> None:
        self.config = config
        self.context = context
        self.client = client
        self.container_kwargs = d.check_container_kwargs(config, WHERE)
        self.cleanup = d.cleanup_policy(config, WHERE)
        self.steps: dict[str, StepSettings] | None = None  # per step, once the job is checked
        self.job_error: ConfigError | None = None

    def check(self) -> None:
        cfg = self.config
        self.image = str(resolve(cfg.image))
        self.pull_policy = str(resolve(cfg.pull_policy))
        d.ensure_image(self.client, self.image, self.pull_policy, WHERE, f"{WHERE}.image")
        self.networks = d.network_names(cfg)
        d.check_networks(self.client, self.networks, f"{WHERE}.networks" if cfg.networks else f"{WHERE}.network")
        self.binds = d.volume_binds(self.client, cfg, WHERE)
        self.env = d.environment(cfg, WHERE)
        self.base_limits = d.limits(resolve(cfg.memory), cfg.cpus)
        d.bind_outputs(self.client, cfg, self.binds, self.context.output_store, WHERE)
        self.probe(self.default_settings(), WHERE)

    def default_settings(self) -> StepSettings:
        return StepSettings(self.image, dict(self.base_limits))

    def check_job(self, request: StepRequest) -> None:
        """Check every step's image and resources tags once, before any step starts."""
        steps: dict[str, StepSettings] = {}
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
                    res = d.parse_resources(tags[RESOURCES_TAG], key)
                    lim.update(d.limits(res.get("memory"), res.get("cpus")))
                    if lim != self.base_limits:
                        self.probe(StepSettings(image, lim), where)
                steps[key] = StepSettings(image, lim)
        except ConfigError as e:
            self.job_error = e
        self.steps = steps
        if request.code_pointer.file and self.config.mount_code and self.job_error is None:
            try:
                d.bind_code(self.client, self.binds, d.code_dir(request.code_pointer.to_dict()) or "/", WHERE)
            except ConfigError as e:
                self.job_error = e

    def args(self, settings: StepSettings, labels: dict[str, str], command: list[str]) -> dict[str, Any]:
        """The arguments of containers.create for a step container, but its name."""
        kwargs: dict[str, Any] = {
            "image": settings.image,
            "command": command,
            "labels": labels,
            "environment": {**self.env, "PYTHONUNBUFFERED": "1", **self.heartbeat_env()},
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

    def probe(self, settings: StepSettings, where: str) -> None:
        """Let the engine check the settings on a container it creates but never starts, so
        that values only it can judge fail before any step starts, naming the key."""
        labels = d.base_labels(self.config, "step", self.context.run_id, self.context.instance_home)
        found = d.probe(self.client, self.args(settings, labels, ["true"]), self.container_kwargs)
        if found is not None:
            raise d.probe_error(where, found, "." if where == WHERE else ": ")

    def heartbeat_env(self) -> dict[str, str]:
        timeout = float(self.config.heartbeat_timeout)
        if timeout <= 0:
            return {}
        return {"RUNYARD_DOCKER_HEARTBEAT": HEARTBEAT, "RUNYARD_DOCKER_HEARTBEAT_TIMEOUT": f"{timeout:g}"}
