"""Options and helpers shared by CLI commands."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..config import RunConfig
from ..definitions import CodePointer
from ..errors import ConfigError
from ..yamlfile import load_yaml_file


def code_pointer_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    @click.option("-f", "--file", "file", type=click.Path(dir_okay=False), help="Python file that defines the job.")
    @click.option("-m", "--module", "module", help="Importable module that defines the job.")
    @functools.wraps(fn)
    def wrapper(*args: Any, file: str | None, module: str | None, **kwargs: Any) -> Any:
        if (file is None) == (module is None):
            raise click.UsageError("give exactly one of -f FILE and -m MODULE")
        pointer = CodePointer(file=str(Path(file).resolve())) if file else CodePointer(module=module)
        return fn(*args, pointer=pointer, **kwargs)

    return wrapper


def parse_tags(values: tuple[str, ...]) -> dict[str, str]:
    tags = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got '{v}'", param_hint="--tag")
        tags[key] = value
    return tags


def load_run_config(path: str | None) -> dict[str, Any]:
    """The run config file at ``path`` (a `RunConfig`: errors in it name the file)."""
    if not path:
        return {}
    data = load_yaml_file(Path(path), what="run config")
    if data is None:
        return RunConfig({}, source=path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level of the run config")
    return RunConfig(data, source=path)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))
