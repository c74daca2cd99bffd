"""runyard: run jobs (DAGs of Python steps) on whatever compute you have.

The public API for job authors. Plugin authors use `runyard.plugin`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from .engine import Cancellation
    from .execution import ExecutionResult, execute_job
    from .instance import Instance
    from .storage import RunRecord, RunStatus
    from .worker import StepContext

__version__ = "0.1.0"

# Heavier pieces load on first use, so `import runyard` in a job file stays cheap.
_LAZY = {
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

    return getattr(importlib.import_module(f".{mod}", __name__), name)


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
