"""The ``docker`` executor's attempt: the state of one step attempt's container (what has
been read from it, how it was stopped), and why a container that ended without its step
reporting an ending failed (OOM, SIGNAL, NOT_STARTED or WORKER_LOST)."""

from __future__ import annotations

import threading
from typing import Any

import attrs
from runyard.plugin import RESOURCES_TAG, FailureInfo, FailureKind, StepRequest, StreamedAttempt

from . import _docker as d

_HINT_WORKER = (
    "the image must hold runyard and runyard-docker (python3 -m runyard_docker.step_worker); "
    "`runyard docker build-image` builds such an image"
)


@attrs.define
class StepSettings:
    """What a step's container runs with: its image and its resource limits."""

    image: str
    limits: dict[str, Any]


class Attempt(StreamedAttempt):
    """One attempt's container and what has been read from it (the events and stderr,
    reported in order by `StreamedAttempt.update`)."""

    def __init__(self, request: StepRequest, settings: StepSettings) -> None:
        super().__init__(request)
        self.settings = settings
        self.container: Any = None
        self.stop_kind: FailureKind | None = None
        self.stderr_total = 0
        self.stdout_total = 0
        self.stderr_tail = ""
        self.thread: threading.Thread | None = None

    @property
    def key(self) -> str:
        return self.request.step_key


def lost(att: Attempt, code: int | None, oom: bool) -> FailureInfo:
    """Why a container ended without the worker reporting an ending."""
    name = att.container.name if att.container is not None else "?"
    tail = att.stderr_tail.strip()
    said = f"; last stderr:\n{tail}" if tail else ""
    if att.stop_kind is not None:
        return FailureInfo(kind=att.stop_kind, message=f"step '{att.key}' was stopped ({att.stop_kind.value})",
                           exit_code=code)
    if oom:
        limit = att.settings.limits.get("mem_limit")
        return FailureInfo(
            kind=FailureKind.OOM,
            message=f"container {name} of step '{att.key}' {d.describe_exit(code, True)}"
            f"{f' of {limit}' if limit else ''}; raise the memory setting or the step's "
            f"'{RESOURCES_TAG}' tag{said}",
            exit_code=code,
            signal=9,
        )
    if code is not None and code > 128:
        return FailureInfo(kind=FailureKind.SIGNAL,
                           message=f"container {name} of step '{att.key}' {d.describe_exit(code, False)}{said}",
                           exit_code=code, signal=code - 128)
    if not att.started_step:
        return FailureInfo(kind=FailureKind.NOT_STARTED,
                           message=f"container {name} of step '{att.key}' {d.describe_exit(code, False)} before "
                           f"the step started; {_HINT_WORKER}{said}",
                           exit_code=code)
    return FailureInfo(kind=FailureKind.WORKER_LOST,
                       message=f"container {name} of step '{att.key}' {d.describe_exit(code, False)} without "
                       f"reporting an ending{said}",
                       exit_code=code)
