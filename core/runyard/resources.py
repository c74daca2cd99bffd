"""The ``runyard/resources`` step tag: one grammar for every executor.

Tag values are text (``@step(tags=...)`` stores ``str(value)``), so a resource mapping may
arrive as a dict's text (``"{'GPU': 1}"``), as JSON (``'{"memory": "64m"}'``) or as
``"GPU=1,memory=64m"``. This parser accepts all three and returns names with numbers
(where a value reads as one) or strings; each executor then checks the names and values
it understands.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError

RESOURCES_TAG = "runyard/resources"
"""The step tag through which a step asks for resources (see `parse_resources_tag`)."""

ResourceValue = int | float | str


def _number(text: str) -> ResourceValue:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_resources_tag(
    value: str | Mapping[str, Any], *, step_key: str, tag: str = RESOURCES_TAG
) -> dict[str, ResourceValue]:
    """Read a resources tag: a mapping, its text (Python or JSON) or ``"NAME=VALUE,..."``.

    Returns resource names (non-empty strings) with numbers or strings; ``K=V`` values that
    read as numbers become numbers. An empty value is an empty mapping. Anything else is a
    `ConfigError` naming the step, the tag and the accepted forms.
    """
    parsed: Any
    if isinstance(value, Mapping):
        parsed = dict(value)
    else:
        text = str(value).strip()
        if not text:
            return {}
        if text.startswith("{"):
            try:
                parsed = json.loads(text)
            except ValueError:
                try:
                    parsed = ast.literal_eval(text)  # str() of a dict given in @step(tags=...)
                except (ValueError, SyntaxError):
                    parsed = None
        else:
            parsed = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                name, eq, amount = part.partition("=")
                if not eq or not name.strip() or not amount.strip():
                    parsed = None
                    break
                parsed[name.strip()] = _number(amount.strip())
    ok = isinstance(parsed, dict) and all(
        isinstance(k, str) and k and isinstance(v, int | float | str) and not isinstance(v, bool)
        for k, v in parsed.items()
    )
    if not ok:
        raise ConfigError(
            f"step '{step_key}': tag '{tag}' = {str(value)!r} is not a resource mapping; expected "
            f"names with numbers or strings, as a dict (tags={{'{tag}': {{'GPU': 1}}}}), JSON "
            f"('{{\"memory\": \"64m\"}}') or NAME=VALUE pairs ('GPU=1,memory=64m')"
        )
    return parsed
