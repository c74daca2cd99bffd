"""attrs validators for plugin config classes, with messages in runyard's form:
``name: expected WHAT, got VALUE``. The config loader adds the file and the key path.

``None`` passes every validator here (an optional field left unset), and so does an
``{env: NAME}`` reference (`EnvVar`): it is read, and checked, when used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from .config import EnvVar

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def one_of(*choices: str) -> Validator:
    """The value is one of ``choices``."""

    def check(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None or isinstance(value, EnvVar):
            return
        if value not in choices:
            raise ValueError(f"{attribute.name}: expected one of {', '.join(choices)}, got {value!r}")

    return check


def above(bound: float, *, what: str = "a number") -> Validator:
    """The value is more than ``bound`` (``what`` names the unit: ``a number of seconds``)."""

    def check(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None or isinstance(value, EnvVar):
            return
        if not value > bound:
            raise ValueError(f"{attribute.name}: expected {what} above {bound:g}, got {value!r}")

    return check


def at_least(bound: float, *, what: str = "a number") -> Validator:
    """The value is ``bound`` or more."""

    def check(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None or isinstance(value, EnvVar):
            return
        if not value >= bound:
            raise ValueError(f"{attribute.name}: expected {what} of at least {bound:g}, got {value!r}")

    return check
