"""``runyard docker ...`` commands, added through the ``runyard_cli`` hook. Only click is
imported here; each command imports the docker SDK when it runs."""

from __future__ import annotations

from typing import Any

import click


def add_commands(cli: Any) -> None:
    @cli.group("docker")
    def group() -> None:
        """Docker executor and run launcher: build images, remove leftover containers.

        \b
        Example:
          runyard docker build-image --base python:3.11-slim --tag my-jobs:1 --code ./jobs
        """

    @group.command("build-image")
    @click.option("--tag", "-t", required=True, help="Name of the image to build, e.g. my-jobs:1.")
    @click.option("--base", default="python:3.11-slim", show_default=True,
                  help="Base image with python3 and venv; must already be in the engine or pullable.")
    @click.option("--with", "with_", multiple=True, metavar="SPEC",
                  help="Also install this: a project directory, a wheel or a requirement (repeatable).")
    @click.option("--code", multiple=True, type=click.Path(exists=True, file_okay=False),
                  help="Copy this directory of job code to the same path in the image (repeatable).")
    @click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Label the image (repeatable).")
    @click.option("--if-changed", is_flag=True, help="Skip the build when the image was built from the same sources.")
    @click.option("--docker-host", default=None, help="Engine URL (default: DOCKER_HOST or the local socket).")
    def build_image(tag: str, base: str, with_: tuple[str, ...], code: tuple[str, ...], labels: tuple[str, ...],
                    if_changed: bool, docker_host: str | None) -> None:
        """Build an image holding runyard, runyard-docker and your code, with no registry.

        runyard and runyard-docker come from the source checkout runyard runs from, or
        else the same versions from the package index, as wheels built on this machine.

        \b
        Example:
          runyard docker build-image --base python:3.11-slim --tag my-jobs:1 --code ./jobs --with pandas
        """
        from .image import build_image as build

        parsed = {}
        for item in labels:
            key, eq, value = item.partition("=")
            if not eq:
                raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--label")
            parsed[key] = value
        build(tag=tag, base=base, with_=with_, code=code, labels=parsed, if_changed=if_changed,
              docker_host=docker_host, echo=lambda m: click.echo(m, err=True))
        click.echo(tag)

    @group.command("cleanup")
    @click.option("--run", "run_id", help="Only the containers of this run.")
    @click.option("--all", "all_", is_flag=True, help="Every runyard container, whatever its run's state.")
    @click.option("--docker-host", default=None, help="Engine URL (default: DOCKER_HOST or the local socket).")
    def cleanup(run_id: str | None, all_: bool, docker_host: str | None) -> None:
        """Remove containers left by runs of this instance that are no longer running.

        Containers are found by their labels (runyard.run_id, runyard.kind). Without
        --all, only those of runs that have finished (or that this instance does not
        know) are removed: every container of an unfinished run is kept, whatever its state.

        \b
        Example:
          runyard docker cleanup --run 3f2c9a1b
        """
        from runyard import Instance

        from . import _docker as d
        from .settings import LABEL_INSTANCE, LABEL_RUN_ID

        client = d.connect(docker_host, "docker")
        filters: dict[str, Any] = {"label": [f"{LABEL_RUN_ID}={run_id}"] if run_id else [LABEL_RUN_ID]}
        instance = Instance.from_env()
        removed = skipped = 0
        for c in client.containers.list(all=True, filters=filters):
            labels = c.labels or {}
            if not all_:
                if labels.get(LABEL_INSTANCE) not in (None, str(instance.home)):
                    continue
                run = instance.storage.get_run(labels.get(LABEL_RUN_ID, ""))
                if run is not None and not run.status.is_finished:
                    # Whatever its state: a step container just created is about to start.
                    skipped += 1
                    continue
            c.remove(force=True, v=True)
            removed += 1
            click.echo(f"removed {c.name}")
        click.echo(f"{removed} container(s) removed", err=True)
        if skipped:
            click.echo(f"{skipped} container(s) of unfinished runs kept (`runyard run list` marks runs whose worker "
                       "died as failed; --all removes them anyway)", err=True)
