"""The ``env_vars`` grammar shared by container backends (docker, k8s): what a step's or a
run worker's environment gets, written in runyard.yaml.

Each item is ``NAME`` (this process's value, skipped when unset), ``NAME=VALUE``,
``{NAME: VALUE}``, ``{NAME: {env: OTHER}}`` (another variable of this process, read when
used) or ``{env: NAME}`` (same as ``NAME``, written as a reference).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from .config import EnvVar, resolve
from .errors import ConfigError

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_env_item(index: int, item: Any) -> None:
    """Raise ValueError (naming ``env_vars[index]`` and the accepted forms) for an item that
    is none of the forms above. For attrs validators: the error becomes a ConfigError
    naming the file and key path."""
    where = f"env_vars[{index}]"
    if isinstance(item, str):
        name = item.split("=", 1)[0]
        if not ENV_NAME.match(name):
            raise ValueError(f"{where}: {item!r} is not NAME or NAME=VALUE (NAME: letters, digits, _)")
        return
    if isinstance(item, EnvVar):
        return
    if isinstance(item, dict) and len(item) == 1:
        ((name, value),) = item.items()
        if name == "env" and isinstance(value, str) and ENV_NAME.match(value):
            return
        if isinstance(name, str) and ENV_NAME.match(name):
            if isinstance(value, str | int | float) and not isinstance(value, bool):
                return
            if isinstance(value, dict) and set(value) == {"env"} and isinstance(value["env"], str):
                return
            if isinstance(value, EnvVar):
                return
    raise ValueError(
        f"{where}: expected NAME (pass this process's value through), NAME=VALUE, {{NAME: VALUE}}, "
        f"{{NAME: {{env: OTHER}}}} or {{env: NAME}}, got {item!r}"
    )


def check_env_items(_: Any, __: Any, value: Sequence[Any]) -> None:
    """An attrs validator of a whole ``env_vars`` list (see `check_env_item`)."""
    for i, item in enumerate(value):
        check_env_item(i, item)


def environment_from(items: Sequence[Any], where: str) -> dict[str, str]:
    """``env_vars`` items as a mapping, reading this process's variables now. ``where`` is
    the key path of the list (``executor.docker``) for the error of an unset reference."""
    env: dict[str, str] = {}
    for i, item in enumerate(items):
        if isinstance(item, EnvVar):
            item = {"env": item.name}
        if isinstance(item, str):
            name, eq, value = item.partition("=")
            if eq:
                env[name] = value
            elif name in os.environ:
                env[name] = os.environ[name]
            continue
        ((name, value),) = item.items()
        if name == "env" and isinstance(value, str):
            if value in os.environ:
                env[value] = os.environ[value]
            continue
        if isinstance(value, dict):
            value = EnvVar(value["env"])
        try:
            env[name] = str(resolve(value)) if isinstance(value, EnvVar) else str(value)
        except ConfigError as e:
            raise ConfigError(f"{where}.env_vars[{i}]: {e}") from None
    return env
