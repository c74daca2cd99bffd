"""The engine side of the ``dask`` executor: each step attempt becomes one Dask task.

Imported only when a run uses the executor (it imports dask, and distributed unless the
config picks a local scheduler). The task is `runyard_dask.remote.run_step`, given the
step request as plain JSON data and returning the attempt's events as plain JSON data.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import queue
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from runyard.plugin import (
    FailureInfo,
    FailureKind,
    HandlerContext,
    StepHandler,
    StepRequest,
    StepUpdate,
    grant_for_run,
    missing_key_error,
    new_signing_key,
    resolve,
    sign_request,
    signing_key_at,
)

from . import remote
from .plugin import DaskConfig

RESOURCE_TAGS = ("runyard/resources", "dask/resources")  # the second wins on a shared name
_NO_WORKER_CHECK_EVERY = 1.0  # seconds between scheduler queries while a step waits for a worker
_RESULT_TIMEOUT = 30.0  # seconds to fetch a finished task's result or error
_RUNNING = StepUpdate.running()  # immutable, so one instance serves every poll
_STARTED = StepUpdate.running(started=True)
# Tasks that need it (a step with a timeout, or queue_timeout set) report their start as a
# distributed event on this topic, with their key as the message. One topic for every run,
# so a long-lived scheduler keeps one event log for runyard, not one per run.
START_TOPIC = "runyard-dask-start"


def dask_key(request: StepRequest) -> str:
    """The Dask key of one attempt: unique per run and attempt, so runs sharing a cluster
    (even two runs of one job at once) never share a task."""
    return f"runyard-{request.run_id}-{request.step_key}-{request.attempt_id}"


def parse_resources(step_key: str, tags: Mapping[str, str]) -> dict[str, float]:
    """Dask worker resources a step asks for with its ``dask/resources`` tag.

    runyard keeps tag values as text, so the value is a mapping written as a dict (stored
    as its text), as JSON text (``'{"GPU": 1}'``), or as ``"GPU=1,MEMORY=4e9"``.
    """
    found: dict[str, float] = {}
    for tag in RESOURCE_TAGS:
        raw = tags.get(tag)
        if raw is None:
            continue
        found.update(_parse_resource_text(step_key, tag, raw))
    return found


def _parse_resource_text(step_key: str, tag: str, raw: str) -> dict[str, float]:
    text = raw.strip()
    value: Any = None
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = ast.literal_eval(text)  # str() of a dict given in @step(tags=...)
            except (ValueError, SyntaxError):
                value = None
    elif text:
        value = {}
        for part in text.split(","):
            name, sep, amount = part.partition("=")
            if not sep:
                value = None
                break
            try:
                value[name.strip()] = float(amount)
            except ValueError:
                value = None
                break
    ok = isinstance(value, dict) and value and all(
        isinstance(k, str) and k and isinstance(v, int | float) and not isinstance(v, bool) and v > 0
        for k, v in value.items()
    )
    if not ok:
        raise ValueError(
            f"step '{step_key}': tag '{tag}' = {raw!r} is not a resource mapping; expected resource "
            "names with positive amounts, e.g. tags={'" + tag + "': {'GPU': 1}} or '" + tag + "': 'GPU=1,MEMORY=4e9'"
        )
    return {k: float(v) for k, v in value.items()}


def _load_class(path: str) -> Any:
    import importlib

    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(
            f"executor.dask.cluster_class: cannot import {path!r} ({type(e).__name__}: {e}); give an import "
            "path such as 'distributed.LocalCluster' and install the package that provides it"
        ) from None
    return obj


def _local_get(name: str | None) -> Any:
    if name == "threads":
        import dask.threaded

        return dask.threaded.get
    if name == "processes":
        import dask.multiprocessing

        return dask.multiprocessing.get
    import dask.local

    return dask.local.get_sync


class _Handle:
    __slots__ = (
        "request", "key", "future", "resources", "lock", "stopped", "reported", "result", "launched", "fetch_error",
        "error", "fetched", "payload", "submit_error", "started", "track_start",
    )

    def __init__(self, request: StepRequest, key: str, resources: dict[str, float]) -> None:
        self.request = request
        self.key = key
        self.resources = resources
        self.future: Any = None
        self.lock = threading.Lock()
        self.stopped: FailureKind | None = None  # terminate was called with this kind
        self.reported = False  # a poll said done
        self.result: dict[str, Any] | None = None  # what run_step returned, once fetched
        self.launched = time.monotonic()
        self.fetch_error: str | None = None  # the task finished but its result could not be read
        self.error: BaseException | None = None  # the task raised (status "error")
        self.fetched = False  # the task is over and the fetcher has read what there is to read
        self.payload: dict[str, Any] | None = None  # the request, until it is submitted
        self.submit_error: BaseException | None = None
        self.track_start = False  # the task reports its start (see START_TOPIC)
        self.started = False  # it has: the step left Dask's queue and runs on a worker


class DaskStepHandler(StepHandler):
    """Submits each attempt as a Dask task (`runyard_dask.remote.run_step`), keyed by run
    and attempt, with the step's Dask resources; collects results in batches; stops steps
    by canceling the future and interrupting the step on its worker."""

    config: DaskConfig

    def __init__(self, config: DaskConfig, context: HandlerContext) -> None:
        super().__init__(config, context)
        self._client: Any = None
        self._cluster: Any = None
        self._launcher: ThreadPoolExecutor | None = None
        self._pool: Executor | None = None
        self._stop_dir: str | None = None  # local processes scheduler: stop requests as files
        self._changed = threading.Event()
        self._done_queue: queue.SimpleQueue[_Handle | None] = queue.SimpleQueue()  # tasks over, not yet read
        self._fetcher: threading.Thread | None = None
        self._pending: list[_Handle] = []  # launched, to be submitted at the next poll or wait
        self._last_worker_check = 0.0
        self._worker_resources: list[dict[str, float]] | None = None
        self._awaiting_start: dict[str, _Handle] = {}  # by key, handles whose task reports its start
        # Until a step has waited this long, poll needs no look at the cluster.
        limits = [config.no_worker_timeout]
        if config.queue_timeout is not None:
            limits.append(config.queue_timeout)
        self._quiet_for = min(limits)

    # -- setup / teardown -------------------------------------------------------------

    def setup(self) -> None:
        # Every request is signed. A scheduler at `address` serves workers started by someone
        # else, who must share the key; a cluster (or local scheduler) of this run's own gets a
        # key made for the run, and its allowance, from the engine (see _grant).
        key = signing_key_at(self.context.instance_home)
        if key is None and self.config.address is not None:
            raise missing_key_error("executor.dask.address")
        self._key = key if key is not None else new_signing_key().encode()
        self._granted: tuple[str, str, dict[str, Any]] | None = None
        try:
            if self.config.local_scheduler is not None:
                self._setup_local()
            else:
                self._setup_distributed()
        except BaseException:
            self.teardown()  # leave nothing half-acquired
            raise

    def _setup_distributed(self) -> None:
        import dask
        import distributed

        cfg = self.config
        client_kwargs: dict[str, Any] = {"set_as_default": False, **cfg.client_kwargs}
        if cfg.address is not None:
            address = resolve(cfg.address)
            try:
                self._client = distributed.Client(address, timeout=cfg.connect_timeout, **client_kwargs)
            except (OSError, TimeoutError) as e:
                raise ConnectionError(
                    f"executor.dask.address: cannot reach the Dask scheduler at {address} within "
                    f"connect_timeout={cfg.connect_timeout:g}s ({type(e).__name__}: {e}); start the scheduler, "
                    "fix the address, or raise connect_timeout"
                ) from None
            self._start_fetcher()
            return
        cluster_cls = _load_class(cfg.cluster_class)
        kwargs = dict(cfg.cluster_kwargs)
        if cluster_cls is distributed.LocalCluster:
            # A fixed dashboard port collides with anything else on the machine using 8787.
            kwargs.setdefault("dashboard_address", ":0")
        try:
            # Dask reruns a task whose worker died up to allowed-failures times, unseen by
            # runyard, so a step's side effects could repeat within one attempt. The
            # scheduler of a temporary cluster is this run's own: give up at the first
            # death and let the step's RetryPolicy decide. (scheduler_kwargs in
            # cluster_kwargs still override it.)
            with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                self._cluster = cluster_cls(**kwargs)
        except TypeError as e:
            raise ValueError(f"executor.dask.cluster_kwargs: {cfg.cluster_class} rejected them: {e}") from None
        if cfg.adapt_kwargs is not None:
            try:
                self._cluster.adapt(**cfg.adapt_kwargs)
            except TypeError as e:
                raise ValueError(f"executor.dask.adapt_kwargs: {cfg.cluster_class}.adapt rejected them: {e}") from None
        self._client = distributed.Client(self._cluster, timeout=cfg.connect_timeout, **client_kwargs)
        self._start_fetcher()

    def _start_fetcher(self) -> None:
        self._client.subscribe_topic(START_TOPIC, self._on_start)
        self._fetcher = threading.Thread(target=self._fetch_loop, name="runyard-dask-results", daemon=True)
        self._fetcher.start()

    def _on_start(self, event: tuple[float, Any]) -> None:
        # On the client's event loop thread; every run on the cluster shares the topic.
        h = self._awaiting_start.pop(event[1], None) if isinstance(event[1], str) else None
        if h is not None:
            h.started = True

    def _fetch_loop(self) -> None:
        """Reads the results of finished tasks off the engine's thread, in batches: one
        round trip for every task that finished while the previous batch was read."""
        while True:
            first = self._done_queue.get()
            if first is None:
                return
            batch = [first]
            while True:
                try:
                    h = self._done_queue.get_nowait()
                except queue.Empty:
                    break
                if h is None:
                    self._done_queue.put(None)  # stop after this batch
                    break
                batch.append(h)
            try:
                self._fetch(batch)
            finally:
                for h in batch:
                    h.fetched = True
                self._changed.set()

    def _fetch(self, batch: list[_Handle]) -> None:
        finished = [h for h in batch if h.future.status == "finished"]
        if finished:
            try:
                results = self._client.gather([h.future for h in finished], errors="raise")
            except Exception:
                results = None
            if results is not None:
                for h, r in zip(finished, results, strict=True):
                    h.result = r
            else:
                for h in finished:  # one of them went away between the check and the gather
                    try:
                        h.result = h.future.result(timeout=_RESULT_TIMEOUT)
                    except Exception as e:
                        h.fetch_error = f"{type(e).__name__}: {e}"
        for h in batch:
            if h.future.status == "error" and h.stopped is None:
                try:
                    h.error = h.future.exception(timeout=_RESULT_TIMEOUT)
                except Exception as e:
                    h.error = e

    def _setup_local(self) -> None:
        import dask  # noqa: F401 - fail here, clearly, if dask is missing

        n = self.context.max_concurrent
        # One launcher thread per step in flight: each waits in dask.compute for its step.
        self._launcher = ThreadPoolExecutor(max_workers=n, thread_name_prefix="runyard-dask-launch")
        if self.config.local_scheduler == "threads":
            self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="runyard-dask")
        elif self.config.local_scheduler == "processes":
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            method = dask.config.get("multiprocessing.context", "spawn")
            self._pool = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context(method))
            # A step in a pool process is out of reach of interrupt(): terminate asks it to
            # stop through a file that its task watches (remote.run_step).
            self._stop_dir = tempfile.mkdtemp(prefix="runyard-dask-stop-")

    def teardown(self) -> None:
        remote.drop_grant(self.context.run_id)  # installed in this process by a local scheduler
        if self._fetcher is not None:
            self._done_queue.put(None)
            self._fetcher.join(_RESULT_TIMEOUT)
            self._fetcher = None
        if self._client is not None:
            try:
                self._client.close(timeout=10)
            except Exception:  # a lost scheduler must not hide the run's own outcome
                pass
            self._client = None
        if self._cluster is not None:
            try:
                self._cluster.close(timeout=30)
            except Exception:
                pass
            self._cluster = None
        if self._launcher is not None:
            self._launcher.shutdown(wait=False, cancel_futures=True)
            self._launcher = None
        if self._pool is not None:
            pool = self._pool
            self._pool = None
            # A process still running a stopped step would outlive the run: end it. (The
            # executor's own list of processes, taken before shutdown clears it; there is no
            # public way to stop one task.)
            procs = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
        if self._stop_dir is not None:
            shutil.rmtree(self._stop_dir, ignore_errors=True)
            self._stop_dir = None

    # -- launch / poll / wait / terminate -----------------------------------------------

    def launch(self, request: StepRequest) -> _Handle:
        resources = parse_resources(request.step_key, request.tags)
        key = dask_key(request)
        handle = _Handle(request, key, resources)
        payload = sign_request(request, self._key)
        grace = self.config.interrupt_grace
        if self._granted is None and self.config.address is None:
            self._grant(request)
        if self._client is not None:
            if request.timeout is not None or self.config.queue_timeout is not None:
                handle.track_start = True
                self._awaiting_start[key] = handle
            # Submitted with the other steps launched in this turn of the engine's loop, in
            # one graph (see _submit_pending): one message to the scheduler, not one per step.
            handle.payload = payload
            self._pending.append(handle)
            return handle
        else:
            assert self._launcher is not None
            if resources:
                raise ValueError(
                    f"step '{request.step_key}' asks for Dask resources {resources}, which only distributed "
                    "workers have; remove local_scheduler or the tag"
                )
            # The launcher has a thread for every step in flight: the step starts at once.
            handle.started = True
            handle.future = self._launcher.submit(self._compute_local, payload, key, grace)
        handle.future.add_done_callback(lambda _f, h=handle: self._on_done(h))
        return handle

    def _grant(self, request: StepRequest) -> None:
        """Give the workers this run started itself its key and allowance (its job's code
        location and its output store), before its first step goes out."""
        grant = (request.run_id, self._key.decode(), grant_for_run(request))
        if self._client is not None:
            from .grant import TrustGrant

            self._client.register_plugin(TrustGrant(*grant), name=f"runyard-trust-{request.run_id}")
        self._granted = grant

    def _submit_pending(self) -> None:
        pending, self._pending = self._pending, []
        groups: dict[tuple[tuple[str, float], ...], list[_Handle]] = {}
        for h in pending:
            if h.stopped is None:  # stopped before it was submitted: never submit it
                groups.setdefault(tuple(sorted(h.resources.items())), []).append(h)
        grace = self.config.interrupt_grace
        for resources, handles in groups.items():
            keys = [h.key for h in handles]
            try:
                futures = self._client.map(
                    remote.run_step, [h.payload for h in handles], keys, [grace] * len(handles),
                    [START_TOPIC if h.track_start else None for h in handles],
                    key=keys, resources=dict(resources) or None, pure=False, retries=0,
                )
            except Exception as e:
                for h in handles:
                    h.submit_error = e
                continue
            for h, f in zip(handles, futures, strict=True):
                h.payload = None
                with h.lock:
                    h.future = f
                    stopped = h.stopped
                f.add_done_callback(lambda _f, h=h: self._on_done(h))
                if stopped is not None:  # terminated (from another thread) while being submitted
                    self._stop_remote(h, f, stopped)

    def _compute_local(self, payload: dict[str, Any], key: str, grace: float) -> dict[str, Any]:
        import dask

        task = dask.delayed(remote.run_local_step, pure=False)(
            self._granted, payload, key, grace, stop_file=self._stop_file(key), dask_key_name=key
        )
        # The scheduler's function, not its name: given a name, dask imports distributed to
        # look for a default Client, which this mode is meant to do without.
        kwargs: dict[str, Any] = {"scheduler": _local_get(self.config.local_scheduler)}
        if self._pool is not None:
            kwargs["pool"] = self._pool
        (result,) = dask.compute(task, **kwargs)
        return result

    def _stop_file(self, key: str) -> str | None:
        if self._stop_dir is None:
            return None
        return os.path.join(self._stop_dir, hashlib.sha256(key.encode()).hexdigest()[:32])

    def _on_done(self, handle: _Handle) -> None:
        if self._client is not None:
            self._done_queue.put(handle)  # the fetcher reads it and wakes the engine
        else:
            handle.fetched = True  # a local future holds its result
            self._changed.set()

    def wait(self, timeout: float) -> None:
        if self._pending:
            self._submit_pending()
        # Done callbacks set the flag; the engine polls everything after this returns, so
        # clearing afterwards loses nothing.
        self._changed.wait(timeout)
        self._changed.clear()

    def poll(self, handle: _Handle) -> StepUpdate:
        if self._pending:
            self._submit_pending()
        # The common case, cheaply: the engine polls every running step on every turn of its
        # loop, so with hundreds in flight this path is most of the handler's cost.
        if (
            not handle.fetched
            and handle.stopped is None
            and handle.submit_error is None
            and time.monotonic() - handle.launched < self._quiet_for
        ):
            return _STARTED if handle.started else _RUNNING
        with handle.lock:
            if handle.reported:
                return StepUpdate.finished()
            stopped = handle.stopped
        future = handle.future
        if handle.submit_error is not None and stopped is None:
            e = handle.submit_error
            return self._report(
                handle,
                StepUpdate.crashed(
                    FailureInfo(
                        kind=FailureKind.NOT_STARTED,
                        message=f"step '{handle.request.step_key}' could not be submitted to Dask: "
                        f"{type(e).__name__}: {e}",
                    )
                ),
            )
        if stopped is not None:
            # The engine has recorded the timeout or cancel; the task is canceled and the
            # step interrupted (see terminate). Its slot is free now.
            return self._report(handle, StepUpdate.crashed(self._stopped_info(handle, stopped)))
        if not handle.fetched:
            if self._client is not None and not future.done():
                missing = self._check_queued(handle) or self._check_no_worker(handle)
                if missing is not None:
                    self._client.cancel([future], reason="runyard: the step could not start")
                    return self._report(handle, StepUpdate.crashed(missing))
            return _STARTED if handle.started else _RUNNING
        if self._client is None:
            return self._report(handle, self._local_outcome(handle))
        return self._report(handle, self._distributed_outcome(handle))

    def _report(self, handle: _Handle, update: StepUpdate) -> StepUpdate:
        if update.done:
            with handle.lock:
                handle.reported = True
            if handle.track_start:
                self._awaiting_start.pop(handle.key, None)
        return update

    def _stopped_info(self, handle: _Handle, kind: FailureKind) -> FailureInfo:
        req = handle.request
        if kind is FailureKind.TIMEOUT:
            msg = f"step '{req.step_key}' ran longer than its timeout of {req.timeout:g}s and was stopped"
        else:
            msg = f"step '{req.step_key}' was stopped: the run was canceled"
        return FailureInfo(kind=kind, message=msg)

    def _from_result(self, handle: _Handle, result: Mapping[str, Any]) -> StepUpdate:
        events = remote.events_from(dict(result))
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

    def _local_outcome(self, handle: _Handle) -> StepUpdate:
        future = handle.future
        if future.cancelled():
            return StepUpdate.crashed(
                FailureInfo(kind=FailureKind.NOT_STARTED, message=f"step '{handle.request.step_key}' never started")
            )
        error = future.exception()
        if error is None:
            return self._from_result(handle, future.result())
        return StepUpdate.crashed(self._error_info(handle, error))

    def _distributed_outcome(self, handle: _Handle) -> StepUpdate:
        if handle.result is not None:
            return self._from_result(handle, handle.result)
        if handle.error is not None:
            return StepUpdate.crashed(self._error_info(handle, handle.error))
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

    def _error_info(self, handle: _Handle, error: BaseException) -> FailureInfo:
        step = handle.request.step_key
        name = type(error).__name__
        if name == "KilledWorker":
            return FailureInfo(
                kind=FailureKind.WORKER_LOST,
                message=f"step '{step}': the Dask worker running it died ({name}: {error}); the scheduler gives up "
                "on a task after distributed.scheduler.allowed-failures worker deaths",
                error_class=f"{type(error).__module__}.{type(error).__qualname__}",
            )
        if name in ("CancelledError", "FutureCancelledError"):
            return FailureInfo(
                kind=FailureKind.WORKER_LOST,
                message=f"step '{step}': Dask canceled its task ({name}: {error})",
                error_class=f"{type(error).__module__}.{type(error).__qualname__}",
            )
        if isinstance(error, ImportError) and "runyard" in str(error):
            return FailureInfo(
                kind=FailureKind.NOT_STARTED,
                message=f"step '{step}' could not start on the Dask worker ({name}: {error}); install "
                "runyard-dask (and the job's dependencies) in the workers' environment",
                error_class=f"{type(error).__module__}.{type(error).__qualname__}",
            )
        # run_step reports a failing step as events; what escapes it is a BaseException the
        # step raised (SystemExit is caught by the worker, KeyboardInterrupt is not) or an
        # error unpacking the task on the worker.
        return FailureInfo(
            kind=FailureKind.ERROR,
            message=f"step '{step}' raised {name} out of the Dask task: {error}",
            error_class=f"{type(error).__module__}.{type(error).__qualname__}",
            traceback="".join(traceback.format_exception(error)),
        )

    def _check_queued(self, handle: _Handle) -> FailureInfo | None:
        limit = self.config.queue_timeout
        if limit is None or handle.started or not handle.track_start:
            return None
        waited = time.monotonic() - handle.launched
        if waited < limit:
            return None
        return FailureInfo(
            kind=FailureKind.NOT_STARTED,
            message=f"step '{handle.request.step_key}' waited {waited:.0f}s in Dask's queue without starting "
            f"(executor.dask.queue_timeout={limit:g}s); add workers, lower max_concurrent or raise queue_timeout",
        )

    def _check_no_worker(self, handle: _Handle) -> FailureInfo | None:
        now = time.monotonic()
        timeout = self.config.no_worker_timeout
        if now - handle.launched < timeout:
            return None
        if self._worker_resources is None or now - self._last_worker_check >= _NO_WORKER_CHECK_EVERY:
            self._last_worker_check = now
            try:
                info = self._client.scheduler_info()
            except Exception:
                return None  # the scheduler is unreachable: the client reports that on its futures
            self._worker_resources = [dict(w.get("resources") or {}) for w in info.get("workers", {}).values()]
        workers = self._worker_resources
        if any(all(w.get(r, 0) >= amount for r, amount in handle.resources.items()) for w in workers):
            return None
        step = handle.request.step_key
        if not workers:
            why = "the cluster has no workers"
        else:
            why = f"no worker has the resources {handle.resources} it asks for (dask/resources tag)"
        return FailureInfo(
            kind=FailureKind.NOT_STARTED,
            message=f"step '{step}' waited {now - handle.launched:.0f}s without starting: {why}; "
            "add workers (dask worker --resources 'GPU=1') or raise executor.dask.no_worker_timeout",
        )

    def terminate(self, handle: _Handle, kind: FailureKind) -> None:
        with handle.lock:
            if handle.stopped is not None or handle.reported:
                return
            handle.stopped = kind
            future = handle.future
        if future is None:
            return  # not submitted yet: _submit_pending skips it (or stops it, if it is racing us)
        self._stop_remote(handle, future, kind)
        self._changed.set()

    def _stop_remote(self, handle: _Handle, future: Any, kind: FailureKind) -> None:
        if self._client is not None:
            if future.done():
                return
            # Interrupt the step wherever it runs (each worker checks its own list), then drop
            # the task: queued, it never starts; running, its result is discarded.
            try:
                self._client.run(remote.interrupt_on_worker, handle.key, kind.value, wait=False)
            finally:
                self._client.cancel([future], reason=f"runyard: {kind.value}")
        else:
            future.cancel()
            remote.interrupt(handle.key, kind.value)  # reaches threads, not the processes scheduler's children
            stop_file = self._stop_file(handle.key)
            if stop_file is not None:  # ...which watch for this file instead
                with open(stop_file, "w") as f:
                    f.write(kind.value)

