"""``runyard k8s ...`` commands, added through the ``runyard_cli`` hook. Only click is
imported here; ``render`` builds manifests from the settings and never talks to a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

PLACEHOLDER_RUN = "00000000000000000000000000000000"
PLACEHOLDER_ATTEMPT = "0000000000000000"


def render(file: str | None, module: str | None, job_name: str | None, step_key: str | None) -> list[dict[str, Any]]:
    """The Job manifests of ``job_name`` in the file or module: one per step for
    ``executor: {k8s: ...}``, and the run worker's for ``run_launcher: {k8s: ...}``, from the
    instance's runyard.yaml (``$RUNYARD_HOME``). ConfigError when neither is configured."""
    import json

    from runyard import CodePointer, ConfigError, Instance
    from runyard.plugin import StepRequest, preload_job

    from .executor import WHERE as EXECUTOR_WHERE
    from .launcher import RUN_GRACE
    from .launcher import WHERE as LAUNCHER_WHERE
    from .manifest import JobBuilder

    if (file is None) == (module is None):
        raise click.UsageError("give exactly one of -f FILE and -m MODULE")
    pointer = CodePointer(file=str(Path(file).resolve())) if file else CodePointer(module=module)
    job = preload_job(pointer, job_name)  # type: ignore[arg-type]  # None: the location's only job
    instance = Instance.from_env()
    executor = instance.sections["executor"]
    launcher = instance.sections["run_launcher"]
    manifests: list[dict[str, Any]] = []
    if executor is not None and executor.name == "k8s":
        config = instance.plugin_config("executor", executor)
        builder = JobBuilder(config, EXECUTOR_WHERE, str(instance.home) if instance.home else None)
        keys = list(job.nodes)
        if step_key is not None:
            if step_key not in job.nodes:
                raise ConfigError(f"--step: job '{job.name}' has no step '{step_key}'; its steps: {', '.join(keys)}")
            keys = [step_key]
        for key in keys:
            step = job.nodes[key].step
            request = StepRequest(run_id=PLACEHOLDER_RUN, step_key=key, attempt=1, attempt_id=PLACEHOLDER_ATTEMPT,
                                  job_name=job.name, code_pointer=pointer, output_store=instance.outputs_url or "",
                                  inputs={}, timeout=step.timeout, tags=step.tags)
            # What the pod gets at run time in place of the signed request and the run's key Secret.
            payload = json.dumps({**request.to_dict(), "signature": "hmac-sha256:<signed at run time>"})
            manifests.append(builder.step_job(
                run_id=PLACEHOLDER_RUN, step_key=key, attempt=1, attempt_id=PLACEHOLDER_ATTEMPT, payload=payload,
                tags=step.tags, timeout=step.timeout,
                extra_env=[{"name": "RUNYARD_STEP_WORKER", "value": "<the run's allowance>"},
                           {"name": "RUNYARD_SIGNING_KEY",
                            "valueFrom": {"secretKeyRef": {"name": "<the run's key Secret>", "key": "key"}}}],
            ))
    if launcher is not None and launcher.name == "k8s" and step_key is None:
        config = instance.plugin_config("run_launcher", launcher)
        home = str(instance.home)
        builder = JobBuilder(config, LAUNCHER_WHERE, home)
        manifest = builder.run_job(run_id=PLACEHOLDER_RUN, suffix="xxxxxx",
                                   extra_env={"RUNYARD_HOME": home, "PYTHONUNBUFFERED": "1"})
        pod = manifest["spec"]["template"]["spec"]
        if "terminationGracePeriodSeconds" not in config.pod_spec:
            pod["terminationGracePeriodSeconds"] = RUN_GRACE
        manifests.append(manifest)
    if not manifests:
        raise ConfigError(
            f"{instance.config_source}: neither executor: {{k8s: ...}} nor run_launcher: {{k8s: ...}} is configured, "
            "so there is nothing to render; add one (see docs/backends/k8s.md)"
        )
    return manifests


def add_commands(cli: Any) -> None:
    @cli.group("k8s")
    def group() -> None:
        """Kubernetes executor and run launcher: show the Jobs they would create.

        \b
        Example:
          runyard k8s render -f jobs.py -j etl --step extract
        """

    @group.command("render")
    @click.option("-f", "--file", "file", type=click.Path(dir_okay=False, exists=True),
                  help="Python file that defines the job.")
    @click.option("-m", "--module", "module", help="Importable module that defines the job.")
    @click.option("-j", "--job", "job_name", help="The job (default: the only job of the file or module).")
    @click.option("--step", "step_key", help="Only this step's Job (and not the run worker's).")
    def render_command(file: str | None, module: str | None, job_name: str | None, step_key: str | None) -> None:
        """Print the Job manifests the k8s executor and launcher would create, as YAML; no cluster needed.

        Settings come from runyard.yaml in RUNYARD_HOME (executor.k8s, run_launcher.k8s) and
        each step's runyard/k8s/config tag. Run ids, attempt ids and the signature are placeholders.

        \b
        Example:
          runyard k8s render -f jobs.py -j etl --step extract
        """
        import yaml
        from runyard import RunyardError

        try:
            manifests = render(file, module, job_name, step_key)
        except RunyardError as e:  # settings, tags, a job that does not load: exit 2 with the message
            raise click.UsageError(str(e)) from None
        click.echo(yaml.safe_dump_all(manifests, sort_keys=False, width=120), nl=False)
