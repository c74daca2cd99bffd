"""The ``celery`` executor's hook implementations: its spec and CLI commands.

Imports nothing of Celery or kombu: runyard imports every plugin module whenever it
discovers plugins, so Celery is imported only when a run uses the executor
(`runyard_celery.handler`) or a worker starts (`runyard_celery.worker`). Settings and
wire names live in `runyard_celery.settings`.
"""

from __future__ import annotations

from typing import Any

from runyard.plugin import ExecutorSpec, RunLauncherSpec, hookimpl

from .docker_settings import CeleryDockerConfig
from .k8s_settings import CeleryK8sConfig, CeleryK8sLauncherConfig
from .settings import CeleryConfig, executor_spec


@hookimpl
def runyard_executors() -> list[ExecutorSpec]:
    return [
        executor_spec(
            name="celery",
            handler="runyard_celery.handler:CeleryStepHandler",
            config=CeleryConfig,
            supports_resources=False,  # steps go to queues of suitable workers instead (docs/backends/celery.md)
            description="Each step as a Celery task on Celery workers (runyard celery worker), Redis or RabbitMQ.",
            extra="celery",
        ),
        executor_spec(
            name="celery_docker",
            handler="runyard_celery.docker_handler:CeleryDockerStepHandler",
            config=CeleryDockerConfig,
            supports_resources=True,  # runyard/resources: the container's memory and cpus
            description="Each step as a Celery task whose worker runs it in a container of its own "
            "(runyard celery worker --steps-in docker).",
            extra="celery-docker",
        ),
        executor_spec(
            name="celery_k8s",
            handler="runyard_celery.k8s_handler:CeleryK8sStepHandler",
            config=CeleryK8sConfig,
            supports_resources=True,  # runyard/resources: the pod's limits and requests
            description="Each step as a Celery task whose worker runs it as a Kubernetes Job of its own "
            "(runyard celery worker --steps-in k8s).",
            extra="celery-k8s",
        ),
    ]


@hookimpl
def runyard_run_launchers() -> list[RunLauncherSpec]:
    return [
        RunLauncherSpec(
            name="celery_k8s",
            api_version=1,
            launcher="runyard_celery.k8s_launcher:CeleryK8sRunLauncher",
            config=CeleryK8sLauncherConfig,
            description="Each run's worker in a Kubernetes Job of its own, for the celery_k8s executor.",
            extra="celery-k8s",
        )
    ]


@hookimpl
def runyard_cli(cli: Any) -> None:
    import click

    @cli.group("celery")
    def group() -> None:
        """Celery executor: start workers that run runyard steps.

        \b
        Example:
          runyard celery worker -q runyard --concurrency 4
        """

    @group.command("worker")
    @click.option("-q", "--queues", "queues", multiple=True,
                  help="Queue(s) to consume, repeatable or comma-separated (default: default_queue).")
    @click.option("-c", "--concurrency", type=click.IntRange(min=1), default=None,
                  help="Steps run at once: prefork child processes (default: the number of CPUs).")
    @click.option("--broker", default=None, help="Broker URL (default: executor.celery.broker in runyard.yaml).")
    @click.option("--backend", default=None, help="Result backend URL (default: from runyard.yaml).")
    @click.option("-I", "--include", multiple=True, help="Module to import at start (repeatable), e.g. a job module.")
    @click.option("-n", "--hostname", default=None, help="Worker node name (default: runyard@%h plus a suffix).")
    @click.option("-l", "--loglevel", default="WARNING", show_default=True, help="Celery log level.")
    @click.option("--code-location", "code_locations", multiple=True, metavar="DIR_OR_MODULE",
                  help="Directory or module whose jobs this worker may run (repeatable; default: "
                  "step_worker.code_locations in runyard.yaml, else the --include modules).")
    @click.option("--output-store", "output_stores", multiple=True, metavar="URL",
                  help="Output store this worker may read and write (repeatable; default: "
                  "step_worker.output_stores in runyard.yaml, else its outputs: setting).")
    @click.option("--steps-in", "steps_in", type=click.Choice(["process", "docker", "k8s"]), default="process",
                  show_default=True,
                  help="Where steps run: in the worker's pool processes (executor celery), each in a container "
                  "of its own (executor celery_docker; settings from executor.celery_docker in runyard.yaml), or "
                  "each as a Kubernetes Job (executor celery_k8s; settings from executor.celery_k8s).")
    def worker(queues: tuple[str, ...], concurrency: int | None, broker: str | None, backend: str | None,
               include: tuple[str, ...], hostname: str | None, loglevel: str, code_locations: tuple[str, ...],
               output_stores: tuple[str, ...], steps_in: str) -> None:
        """Start a Celery worker that runs the steps of any runyard job it can import.

        Settings come from the celery executor's section of $RUNYARD_HOME/runyard.yaml, and the
        options here override them. A step runs only if its request is signed with the key in
        RUNYARD_SIGNING_KEY (or step_worker.signing_key) and its job and output store are among
        this worker's code locations and output stores; others fail, saying why (docs/security.md).

        With --steps-in docker it serves the celery_docker executor instead: each step runs in a
        container of its own on this machine's Docker engine, with the container settings of
        executor.celery_docker.docker in this worker's runyard.yaml. With --steps-in k8s it
        serves the celery_k8s executor: each step runs as a Kubernetes Job, with the Job
        settings of executor.celery_k8s.k8s (the worker needs the cluster's credentials).

        \b
        Example:
          RUNYARD_SIGNING_KEY=... runyard celery worker -q runyard,gpu --concurrency 4 \\
              --code-location /srv/jobs --output-store s3://bucket/runyard
          RUNYARD_SIGNING_KEY=... runyard celery worker --steps-in docker -c 2 --code-location /srv/jobs
          RUNYARD_SIGNING_KEY=... runyard celery worker --steps-in k8s -c 8 --code-location /srv/jobs
        """
        from .worker import run_worker  # imports Celery: only when a worker starts

        run_worker(
            queues=[q for arg in queues for q in arg.split(",") if q],
            concurrency=concurrency,
            broker=broker,
            backend=backend,
            include=list(include),
            hostname=hostname,
            loglevel=loglevel,
            code_locations=list(code_locations),
            output_stores=list(output_stores),
            steps_in=steps_in,
        )
