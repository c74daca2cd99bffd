"""The ``dask`` executor's cluster and client setup: connecting to a scheduler at an
address or starting a temporary cluster (``cluster_class``) with its client, or, with
``local_scheduler``, the thread or process pools a step computes in; and closing them."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from runyard.plugin import resolve

from . import remote
from .settings import DaskConfig


def load_class(path: str) -> Any:
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


def local_get(name: str | None) -> Any:
    if name == "threads":
        import dask.threaded

        return dask.threaded.get
    if name == "processes":
        import dask.multiprocessing

        return dask.multiprocessing.get
    import dask.local

    return dask.local.get_sync


class DistributedCluster:
    """The client of a distributed scheduler, and the temporary cluster it runs on if this
    run started one. Each is set as soon as it exists, so `close` releases whatever a
    failing `open` had acquired."""

    def __init__(self) -> None:
        self.client: Any = None
        self.cluster: Any = None

    def open(self, cfg: DaskConfig) -> None:
        import dask
        import distributed

        client_kwargs: dict[str, Any] = {"set_as_default": False, **cfg.client_kwargs}
        if cfg.address is not None:
            address = resolve(cfg.address)
            try:
                self.client = distributed.Client(address, timeout=cfg.connect_timeout, **client_kwargs)
            except (OSError, TimeoutError) as e:
                raise ConnectionError(
                    f"executor.dask.address: cannot reach the Dask scheduler at {address} within "
                    f"connect_timeout={cfg.connect_timeout:g}s ({type(e).__name__}: {e}); start the scheduler, "
                    "fix the address, or raise connect_timeout"
                ) from None
            return
        cluster_cls = load_class(cfg.cluster_class)
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
                self.cluster = cluster_cls(**kwargs)
        except TypeError as e:
            raise ValueError(f"executor.dask.cluster_kwargs: {cfg.cluster_class} rejected them: {e}") from None
        if cfg.adapt_kwargs is not None:
            try:
                self.cluster.adapt(**cfg.adapt_kwargs)
            except TypeError as e:
                raise ValueError(f"executor.dask.adapt_kwargs: {cfg.cluster_class}.adapt rejected them: {e}") from None
        self.client = distributed.Client(self.cluster, timeout=cfg.connect_timeout, **client_kwargs)

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close(timeout=10)
            except Exception:  # a lost scheduler must not hide the run's own outcome
                pass
            self.client = None
        if self.cluster is not None:
            try:
                self.cluster.close(timeout=30)
            except Exception:
                pass
            self.cluster = None


class LocalScheduler:
    """Dask's local schedulers (``local_scheduler``): a launcher thread per step in flight,
    waiting in ``dask.compute``, and the pool the scheduler computes in."""

    def __init__(self) -> None:
        self.launcher: ThreadPoolExecutor | None = None
        self.pool: Executor | None = None
        self.stop_dir: str | None = None  # processes scheduler: stop requests as files
        self.live_dir: str | None = None  # running steps' live events, a file per step

    def open(self, cfg: DaskConfig, max_concurrent: int) -> None:
        import dask  # noqa: F401 - fail here, clearly, if dask is missing

        n = max_concurrent
        # One launcher thread per step in flight: each waits in dask.compute for its step.
        self.launcher = ThreadPoolExecutor(max_workers=n, thread_name_prefix="runyard-dask-launch")
        self.live_dir = tempfile.mkdtemp(prefix="runyard-dask-live-")
        if cfg.local_scheduler == "threads":
            self.pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="runyard-dask")
        elif cfg.local_scheduler == "processes":
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            method = dask.config.get("multiprocessing.context", "spawn")
            self.pool = ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context(method))
            # A step in a pool process is out of reach of interrupt(): terminate asks it to
            # stop through a file that its task watches (remote.run_step).
            self.stop_dir = tempfile.mkdtemp(prefix="runyard-dask-stop-")

    def compute(self, scheduler: str | None, granted: Any, payload: dict[str, Any], key: str,
                grace: float) -> dict[str, Any]:
        """Run one step with Dask's local scheduler ``scheduler`` (on a launcher thread)."""
        import dask

        task = dask.delayed(remote.run_local_step, pure=False)(
            granted, payload, key, grace, stop_file=self.stop_file(key), live_file=self.live_file(key),
            dask_key_name=key,
        )
        # The scheduler's function, not its name: given a name, dask imports distributed to
        # look for a default Client, which this mode is meant to do without.
        kwargs: dict[str, Any] = {"scheduler": local_get(scheduler)}
        if self.pool is not None:
            kwargs["pool"] = self.pool
        (result,) = dask.compute(task, **kwargs)
        return result

    def live_file(self, key: str) -> str | None:
        """Where the step of ``key`` appends its live events (see `remote._LiveSender`)."""
        if self.live_dir is None:
            return None
        return os.path.join(self.live_dir, hashlib.sha256(key.encode()).hexdigest()[:32])

    def stop_file(self, key: str) -> str | None:
        if self.stop_dir is None:
            return None
        return os.path.join(self.stop_dir, hashlib.sha256(key.encode()).hexdigest()[:32])

    def close(self) -> None:
        if self.launcher is not None:
            self.launcher.shutdown(wait=False, cancel_futures=True)
            self.launcher = None
        if self.pool is not None:
            pool = self.pool
            self.pool = None
            # A process still running a stopped step would outlive the run: end it. (The
            # executor's own list of processes, taken before shutdown clears it; there is no
            # public way to stop one task.)
            procs = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
        if self.stop_dir is not None:
            shutil.rmtree(self.stop_dir, ignore_errors=True)
            self.stop_dir = None
        if self.live_dir is not None:
            shutil.rmtree(self.live_dir, ignore_errors=True)
            self.live_dir = None
