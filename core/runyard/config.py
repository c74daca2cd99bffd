"""Configuration: one cattrs converter, ``{env: NAME}`` strings, and readable errors.

Every plugin's config is an attrs class. `structure` turns a YAML mapping into it and
re-raises whatever goes wrong as one `ConfigError` naming the file, the key path, what
was expected and what was found.
"""

from __future__ import annotations

import functools
import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

from .errors import ConfigError

if typing.TYPE_CHECKING:
    import cattrs

T = TypeVar("T")


@attrs.frozen
class EnvVar:
    """A string taken from an environment variable when it is used: ``{env: NAME}`` in YAML.

    The value is never stored: storage and logs keep ``{env: NAME}``.
    """

    name: str
    # Where the reference was written ("FILE: executor.dask.address"), for the message when
    # the variable is unset. Filled in by `structure`; not part of the value.
    where: str = attrs.field(default="", eq=False, repr=False)

    def resolve(self) -> str:
        try:
            return os.environ[self.name]
        except KeyError:
            prefix = f"{self.where}: " if self.where else ""
            raise ConfigError(
                f"{prefix}environment variable '{self.name}' is not set (referenced as {{env: {self.name}}}); "
                "set it in the environment of the process that reads this setting"
            ) from None

    def __str__(self) -> str:  # never leak the value through str()
        return f"{{env: {self.name}}}"


def resolve(value: str | EnvVar | None) -> str | None:
    """The string a config value stands for, reading ``{env: NAME}`` references now."""
    return value.resolve() if isinstance(value, EnvVar) else value


def did_you_mean(name: str, choices: Any) -> str:
    """``"did you mean 'docker'?"`` when ``name`` is a near miss of one of ``choices``, else ""."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else ""


def unknown_key(key: str, allowed: Any) -> str:
    """The message for a key that is not one of ``allowed``, with a suggestion for a near miss."""
    allowed = list(allowed)
    hint = did_you_mean(key, allowed)
    return f"unknown key '{key}'{f'; {hint}' if hint else ''} (allowed keys: {', '.join(allowed) or 'none'})"


class _Mismatch(Exception):
    def __init__(self, expected: str, found: Any) -> None:
        self.expected = expected
        self.found = found
        super().__init__(f"expected {expected}, got {_describe(found)}")


def _describe(value: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
             list: "a list", dict: "a mapping", type(None): "nothing (null)"}
    kind = names.get(type(value), type(value).__name__)
    shown = repr(value)
    return kind if len(shown) > 40 or isinstance(value, dict | list) else f"{shown} ({kind})"


def _str(value: Any, _: Any) -> str | EnvVar:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and set(value) == {"env"} and isinstance(value["env"], str):
        return EnvVar(value["env"])
    raise _Mismatch("a string or {env: NAME}", value)


def _int(value: Any, _: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Mismatch("an integer", value)
    return value


def _float(value: Any, _: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Mismatch("a number", value)
    return float(value)


def _bool(value: Any, _: Any) -> bool:
    if not isinstance(value, bool):
        raise _Mismatch("true or false", value)
    return value


def _any_mapping(value: Any, _: Any) -> dict:
    if not isinstance(value, Mapping):
        raise _Mismatch("a mapping", value)
    return dict(value)


@functools.cache
def converter() -> cattrs.Converter:
    """The one converter for every config class (built on first use: cattrs is not cheap
    to import, and a run whose settings are all defaults never needs it)."""
    import cattrs

    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(str, _str)
    conv.register_structure_hook(int, _int)
    conv.register_structure_hook(float, _float)
    conv.register_structure_hook(bool, _bool)
    conv.register_structure_hook_func(lambda t: t == dict[str, typing.Any], _any_mapping)
    conv.register_structure_hook(typing.Any, lambda v, _: v)
    conv.register_unstructure_hook(EnvVar, lambda e: {"env": e.name})
    return conv


def _field_hint(exc: BaseException, name: str | None) -> str:
    """A config field's ``metadata={"required": "..."}``: what to write when it is missing."""
    cls = getattr(exc, "cl", None)
    if name is None or cls is None or not attrs.has(cls):
        return ""
    field = attrs.fields_dict(cls).get(name)
    hint = field.metadata.get("required") if field is not None else None
    return f"; {hint}" if hint else ""


def _problems(exc: BaseException, path: str) -> list[str]:
    """Flatten cattrs' exception tree into ``path: message`` lines."""
    from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

    if isinstance(exc, ForbiddenExtraKeysError):
        allowed = [a.name for a in attrs.fields(exc.cl)]
        return [f"{path or '(top level)'}: {unknown_key(k, allowed)}" for k in sorted(exc.extra_fields)]
    if isinstance(exc, ClassValidationError | IterableValidationError):
        out: list[str] = []
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            name = getattr(note, "name", None)
            index = getattr(note, "index", None)
            sub_path = f"{path}.{name}" if name is not None else f"{path}[{index}]"
            sub_path = sub_path.lstrip(".")
            hint = _field_hint(exc, name) if isinstance(sub, KeyError) else ""
            out.extend(p + hint for p in _problems(sub, sub_path))
        for sub in without:
            out.extend(_problems(sub, path))
        return out
    if isinstance(exc, ExceptionGroup):
        return [p for e in exc.exceptions for p in _problems(e, path)]
    if isinstance(exc, KeyError):
        return [f"{path}: required key '{exc.args[0]}' is missing"]
    if isinstance(exc, _Mismatch):
        return [f"{path}: {exc}"]
    if isinstance(exc, TypeError) and "required" in str(exc) and "argument" in str(exc):
        return [f"{path}: {exc}"]
    return [f"{path}: {exc}"]


def structure(data: Any, cls: type[T], *, source: str, path: str) -> T:
    """Structure ``data`` into ``cls``; errors name ``source`` (a file) and key ``path``."""
    if data is None:
        data = {}
    if attrs.has(cls) and not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {path}: expected a mapping of settings, got {_describe(data)}")
    if not data and attrs.has(cls):
        try:
            return cls()  # every setting defaulted: no converter needed
        except TypeError:
            pass  # a required setting is missing: let the converter say which
    from cattrs.errors import BaseValidationError, ForbiddenExtraKeysError

    try:
        return locate_env_refs(converter().structure(data, cls), source=source, path=path)
    except (BaseValidationError, ForbiddenExtraKeysError, _Mismatch) as e:
        problems = _problems(e, path)
    except (TypeError, ValueError) as e:  # attrs validators
        problems = [f"{path}: {e}"]
    raise ConfigError("\n".join(f"{source}: {p}" for p in _without_implied(problems)))


_SUGGESTED = re.compile(r"^(?P<path>.*): unknown key '[^']*'; did you mean '(?P<key>[^']*)'\?")


def _without_implied(problems: list[str]) -> list[str]:
    """Drop "required key 'image' is missing" when the same mapping has a near miss of it
    ('imgae'): the suggestion says it all, in one line."""
    implied = set()
    for p in problems:
        m = _SUGGESTED.match(p)
        if m:
            key = m["key"]
            implied.add(f"{m['path']}.{key}: required key '{key}' is missing")
    return [p for p in problems if p not in implied]


def locate_env_refs(obj: T, *, source: str, path: str) -> T:
    """``obj`` with every `EnvVar` in it told where it was written (``source: key.path``),
    so that an unset variable, read long after the file was parsed, still names both."""
    if isinstance(obj, EnvVar):
        return EnvVar(obj.name, where=f"{source}: {path}")  # type: ignore[return-value]
    if isinstance(obj, list | tuple):
        items = [locate_env_refs(v, source=source, path=f"{path}[{i}]") for i, v in enumerate(obj)]
        changed = any(a is not b for a, b in zip(items, obj, strict=True))
        return (type(obj)(items) if changed else obj)  # type: ignore[return-value]
    if isinstance(obj, dict):
        located = {k: locate_env_refs(v, source=source, path=f"{path}.{k}") for k, v in obj.items()}
        return (located if any(located[k] is not obj[k] for k in obj) else obj)  # type: ignore[return-value]
    if attrs.has(type(obj)):
        changes = {}
        for f in attrs.fields(type(obj)):
            if not f.init:
                continue
            value = getattr(obj, f.name)
            new = locate_env_refs(value, source=source, path=f"{path}.{f.name}")
            if new is not value:
                changes[f.alias or f.name] = new
        # A new instance rather than a rewrite: config classes are frozen.
        return attrs.evolve(obj, **changes) if changes else obj  # type: ignore[misc]
    return obj


def unstructure(obj: Any) -> Any:
    """Plain data for storage: ``{env: NAME}`` references stay references, never values."""
    if isinstance(obj, EnvVar):
        return {"env": obj.name}
    if isinstance(obj, Mapping):
        return {k: unstructure(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [unstructure(v) for v in obj]
    if attrs.has(type(obj)):
        return converter().unstructure(obj)
    return obj


def load_yaml(path: Path, *, what: str = "configuration file") -> Any:
    """Read a YAML file within bounds; any problem is a ConfigError naming the file."""
    from .yamlfile import load_yaml_file

    return load_yaml_file(path, what=what)


@attrs.frozen
class Selection:
    """A plugin chosen by name with its raw config: ``name: {config}`` in YAML."""

    name: str
    config: dict[str, Any]
    source: str  # the layer it came from (a file, "job 'etl'", "--executor"), for messages and `config explain`
    path: str = ""  # the key path of its settings in that layer ("executor.dask", "execution.dask")
    name_path: str | None = None  # where the name itself is written, when not the parent of `path`

    def name_where(self) -> str:
        """``source: key.path`` of the place that names the plugin, for unknown-name errors."""
        path = self.name_path if self.name_path is not None else self.path.rpartition(".")[0]
        return f"{self.source}: {path}" if path else self.source

    def where(self, key: str | None = None) -> str:
        """``source: key.path`` of this section, or of one setting of it."""
        path = self.path if key is None else f"{self.path}.{key}" if self.path else key
        return f"{self.source}: {path}" if path else self.source


class RunConfig(dict):  # type: ignore[type-arg]
    """A run config mapping that remembers the file it was read from, for messages."""

    def __init__(self, data: Mapping[str, Any] | None = None, *, source: str = "run config") -> None:
        super().__init__(data or {})
        self.source = source


def run_config_source(run_config: Mapping[str, Any] | None) -> str:
    """The file a run config came from (`RunConfig`), else ``"run config"``."""
    return getattr(run_config, "source", None) or "run config"


def parse_selection(raw: Any, *, source: str, path: str) -> Selection | None:
    """Parse ``name: {config}`` (or a bare ``name``) into a `Selection`."""
    if raw is None:
        return None
    if isinstance(raw, str):
        return Selection(raw, {}, source, f"{path}.{raw}")
    if isinstance(raw, Mapping) and len(raw) == 1:
        ((name, cfg),) = raw.items()
        if isinstance(name, str) and (cfg is None or isinstance(cfg, Mapping)):
            return Selection(name, dict(cfg or {}), source, f"{path}.{name}")
        if isinstance(name, str):
            raise ConfigError(
                f"{source}: {path}.{name}: expected a mapping of settings, got {_describe(cfg)}"
            )
    raise ConfigError(
        f"{source}: {path}: expected a single-key mapping naming the plugin, "
        f"like `{path}: {{in_process: {{}}}}`, got {_describe(raw)}"
    )
