"""runyard: run jobs (DAGs of Python steps) on whatever compute you have.

The public API for job authors. Plugin authors use `runyard.plugin`.
"""

from __future__ import annotations

# `typing` is not imported at run time: it pulls in `re`, and every `runyard` command
# imports this package first (the console script replays cached help without it).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .definitions import (
        CodePointer,
        Definitions,
        JobDefinition,
        RetryPolicy,
        StepDefinition,
        StepOutput,
        graph_job,
        job,
        step,
    )
    from .engine import Cancellation
    from .errors import (
        ConfigError,
        DefinitionError,
        JobLoadError,
        OutputSerializationError,
        PluginError,
        RunyardError,
        StepSelectionError,
    )
    from .events import Event, EventType, FailureInfo, FailureKind
    from .execution import ExecutionResult, execute_job
    from .instance import Instance
    from .storage import RunRecord, RunStatus
    from .worker import StepContext

__version__ = "0.1.0"

# Everything loads on first use: `runyard --help` and plugin discovery import this package
# but need none of the job model, and a job file pays only for what it uses.
_LAZY = {
    **dict.fromkeys(
        ["CodePointer", "Definitions", "JobDefinition", "RetryPolicy", "StepDefinition", "StepOutput",
         "graph_job", "job", "step"],
        "definitions",
    ),
    **dict.fromkeys(
        ["ConfigError", "DefinitionError", "JobLoadError", "OutputSerializationError", "PluginError",
         "RunyardError", "StepSelectionError"],
        "errors",
    ),
    **dict.fromkeys(["Event", "EventType", "FailureInfo", "FailureKind"], "events"),
    "Cancellation": "engine",
    "ExecutionResult": "execution",
    "execute_job": "execution",
    "Instance": "instance",
    "RunRecord": "storage",
    "RunStatus": "storage",
    "StepContext": "worker",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'runyard' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


__all__ = [
    "Cancellation",
    "CodePointer",
    "ConfigError",
    "DefinitionError",
    "Definitions",
    "Event",
    "EventType",
    "ExecutionResult",
    "FailureInfo",
    "FailureKind",
    "Instance",
    "JobDefinition",
    "JobLoadError",
    "OutputSerializationError",
    "PluginError",
    "RetryPolicy",
    "RunRecord",
    "RunStatus",
    "RunyardError",
    "StepContext",
    "StepDefinition",
    "StepOutput",
    "StepSelectionError",
    "execute_job",
    "graph_job",
    "job",
    "step",
]
