"""Failure info from an exception, the one way every worker and handler names an error class."""

from __future__ import annotations

from .events import FailureInfo, FailureKind


def error_class_name(error: BaseException | type[BaseException]) -> str:
    """The dotted name of an exception's class (``builtins.ValueError``, ``pkg.mod.Error``):
    what `FailureInfo.error_class` holds, so retry policies and users match one spelling."""
    cls = error if isinstance(error, type) else type(error)
    return f"{cls.__module__}.{cls.__qualname__}"


def failure_from_exception(
    error: BaseException,
    *,
    kind: FailureKind = FailureKind.ERROR,
    message: str | None = None,
    with_traceback: bool = True,
) -> FailureInfo:
    """A `FailureInfo` describing ``error``: its class name, its formatted traceback (unless
    ``with_traceback=False``) and ``message`` (default ``"ValueError: the text"``)."""
    import traceback  # only when something failed: not a start-up cost

    tb = "".join(traceback.format_exception(error)) if with_traceback else None
    return FailureInfo(
        kind=kind,
        message=message if message is not None else f"{type(error).__name__}: {error}",
        error_class=error_class_name(error),
        traceback=tb,
    )
