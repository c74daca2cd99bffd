"""The entry-point module: the ``supervised`` run launcher's spec and config class.

runyard imports this module whenever it looks for plugins (``runyard plugin list``,
validating ``runyard.yaml``), so it imports only attrs and `runyard.plugin`; the launcher
itself (`runyard_supervised.launcher`) is imported only when a run is launched, canceled
or checked with it.
"""

from __future__ import annotations

from typing import Any

import attrs
from runyard.plugin import RunLauncherConfig, RunLauncherSpec, hookimpl


def _optional_positive(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{attribute.name}: expected a number above 0 (or leave it out), got {value}")


def _niceness(_: Any, attribute: attrs.Attribute, value: int) -> None:
    if not 0 <= value <= 19:
        raise ValueError(f"{attribute.name}: expected 0 (normal) to 19 (lowest priority), got {value}")


@attrs.frozen(kw_only=True)
class SupervisedConfig(RunLauncherConfig):
    """``run_launcher: {supervised: {...}}``; every key is optional.

    ``nice``: the worker's and its steps' scheduling niceness, 0 (normal) to 19 (lowest).
    ``memory_mb``: the most address space, in MiB, each process of the run may map
    (RLIMIT_AS); a step that asks for more gets a MemoryError.
    ``max_runtime``: seconds a run may take; then the supervisor asks the worker to stop
    (the run ends CANCELED) and kills it ``terminate_grace`` seconds later if it has not.
    ``terminate_grace``: seconds between that request and the kill.
    """

    nice: int = attrs.field(default=0, validator=_niceness)
    memory_mb: int | None = attrs.field(default=None, validator=_optional_positive)
    max_runtime: float | None = attrs.field(default=None, validator=_optional_positive)
    terminate_grace: float = attrs.field(default=10.0, validator=_optional_positive)


@hookimpl
def runyard_run_launchers() -> list[RunLauncherSpec]:
    return [
        RunLauncherSpec(
            name="supervised",
            api_version=1,  # the plugin API this was written against: a literal, not API_VERSION
            launcher="runyard_supervised.launcher:SupervisedRunLauncher",
            config=SupervisedConfig,
            description="Each run worker under a supervisor process that records how it ended; nice and limits.",
        )
    ]
