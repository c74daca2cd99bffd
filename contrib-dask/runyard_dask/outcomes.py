"""The ``dask`` executor's outcomes: what a finished, failed, dropped or stopped task
means for its step, as the `StepUpdate` or `FailureInfo` the engine records."""

from __future__ import annotations

from typing import Any

from runyard.plugin import FailureInfo, FailureKind, StepUpdate, error_class_name, failure_from_exception

from . import remote
from .submission import DaskHandle


def stopped_info(handle: DaskHandle, kind: FailureKind) -> FailureInfo:
    req = handle.request
    if kind is FailureKind.TIMEOUT:
        msg = f"step '{req.step_key}' ran longer than its timeout of {req.timeout:g}s and was stopped"
    else:
        msg = f"step '{req.step_key}' was stopped: the run was canceled"
    return FailureInfo(kind=kind, message=msg)


def from_result(handle: DaskHandle, raw: Any) -> StepUpdate:
    result = remote.decode_result(raw)
    events = remote.events_from(result)
    if remote.is_terminal(events):
        return StepUpdate.finished(events)
    interrupted = result.get("interrupted")
    if interrupted:
        return StepUpdate.crashed(
            FailureInfo(kind=FailureKind(interrupted), message=f"step '{handle.request.step_key}' was stopped"),
            events,
        )
    return StepUpdate.crashed(
        FailureInfo(
            kind=FailureKind.WORKER_LOST,
            message=f"step '{handle.request.step_key}': the Dask task ended without the step's events",
        ),
        events,
    )


def local_outcome(handle: DaskHandle) -> StepUpdate:
    future = handle.future
    if future.cancelled():
        return StepUpdate.crashed(
            FailureInfo(kind=FailureKind.NOT_STARTED, message=f"step '{handle.request.step_key}' never started")
        )
    error = future.exception()
    if error is None:
        return from_result(handle, future.result())
    return StepUpdate.crashed(error_info(handle, error))


def distributed_outcome(handle: DaskHandle) -> StepUpdate:
    if handle.result is not None:
        return from_result(handle, handle.result)
    if handle.error is not None:
        return StepUpdate.crashed(error_info(handle, handle.error))
    if handle.fetch_error is not None:
        return StepUpdate.crashed(
            FailureInfo(
                kind=FailureKind.WORKER_LOST,
                message=f"step '{handle.request.step_key}': its Dask task finished but its result could not be "
                f"fetched ({handle.fetch_error})",
            )
        )
    # cancelled or lost without our terminate: someone else canceled the key, or the
    # client lost its scheduler (then every task of the run is gone).
    return StepUpdate.crashed(
        FailureInfo(
            kind=FailureKind.WORKER_LOST,
            message=f"step '{handle.request.step_key}': Dask dropped its task (status {handle.future.status}); "
            "the connection to the scheduler was lost or another client canceled the key",
        )
    )


def error_info(handle: DaskHandle, error: BaseException) -> FailureInfo:
    step = handle.request.step_key
    name = type(error).__name__
    if name == "KilledWorker":
        return FailureInfo(
            kind=FailureKind.WORKER_LOST,
            message=f"step '{step}': the Dask worker running it died ({name}: {error}); the scheduler gives up "
            "on a task after distributed.scheduler.allowed-failures worker deaths",
            error_class=error_class_name(error),
        )
    if name in ("CancelledError", "FutureCancelledError"):
        return FailureInfo(
            kind=FailureKind.WORKER_LOST,
            message=f"step '{step}': Dask canceled its task ({name}: {error})",
            error_class=error_class_name(error),
        )
    if isinstance(error, ImportError) and "runyard" in str(error):
        return FailureInfo(
            kind=FailureKind.NOT_STARTED,
            message=f"step '{step}' could not start on the Dask worker ({name}: {error}); install "
            "runyard-dask (and the job's dependencies) in the workers' environment",
            error_class=error_class_name(error),
        )
    # run_step reports a failing step as events; what escapes it is a BaseException the
    # step raised (SystemExit is caught by the worker, KeyboardInterrupt is not) or an
    # error unpacking the task on the worker.
    return failure_from_exception(error, message=f"step '{step}' raised {name} out of the Dask task: {error}")
