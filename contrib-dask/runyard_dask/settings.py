"""Settings of the ``dask`` executor, shared by the plugin module and the engine side
(`runyard_dask.handler`). Imports only the public plugin API and attrs."""

from __future__ import annotations

from typing import Any

import attrs
from runyard.plugin import Capabilities, ExecutorConfig, above

LOCAL_SCHEDULERS = ("threads", "processes", "synchronous")
DEFAULT_CLUSTER_CLASS = "distributed.LocalCluster"


def _local_scheduler(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and value not in LOCAL_SCHEDULERS:
        raise ValueError(
            f"local_scheduler: expected one of {', '.join(LOCAL_SCHEDULERS)} (or leave it unset to use "
            f"distributed), got {value!r}"
        )


_positive = above(0, what="a number of seconds")


def _import_path(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, str) and (not value or value.startswith(".") or " " in value):
        raise ValueError(
            f"{attribute.name}: expected an import path such as 'distributed.LocalCluster' or "
            f"'dask_jobqueue:SLURMCluster', got {value!r}"
        )


@attrs.frozen(kw_only=True)
class DaskConfig(ExecutorConfig):
    """Settings of the ``dask`` executor, besides ``max_concurrent`` and ``tag_concurrency_limits``.

    Where steps run, in this order:

    - ``address``: a running scheduler (``tcp://10.0.0.5:8786``; may be ``{env: NAME}``);
      ``connect_timeout`` seconds to reach it, then the run fails.
    - otherwise ``local_scheduler`` (``threads``, ``processes`` or ``synchronous``): dask's
      local schedulers in the run's own process, without distributed.
    - otherwise a temporary cluster for this run: ``cluster_class`` (an import path, default
      ``distributed.LocalCluster``) built with ``cluster_kwargs``, scaled adaptively with
      ``adapt_kwargs`` when given, and closed when the run ends.

    ``client_kwargs`` go to ``distributed.Client``. ``no_worker_timeout``: seconds a step may
    wait while no worker could run it (no workers at all, or none with its resources) before
    it fails NOT_STARTED. ``queue_timeout``: seconds a step may wait in Dask's queue before
    it starts on a worker (unset: no limit), then it fails NOT_STARTED; a step's own
    ``timeout`` counts from its start. ``interrupt_grace``: seconds a stopped step's Dask task waits for
    the step to end before it gives its worker thread back (see docs/backends/dask.md).
    """

    address: str | None = None
    connect_timeout: float = attrs.field(default=30.0, validator=_positive)
    cluster_class: str = attrs.field(default=DEFAULT_CLUSTER_CLASS, validator=_import_path)
    cluster_kwargs: dict[str, Any] = attrs.field(factory=dict)
    adapt_kwargs: dict[str, Any] | None = None
    client_kwargs: dict[str, Any] = attrs.field(factory=dict)
    local_scheduler: str | None = attrs.field(default=None, validator=_local_scheduler)
    no_worker_timeout: float = attrs.field(default=60.0, validator=_positive)
    queue_timeout: float | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    interrupt_grace: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))

    def __attrs_post_init__(self) -> None:
        cluster_keys = [
            k
            for k, given in (
                ("cluster_class", self.cluster_class != DEFAULT_CLUSTER_CLASS),
                ("cluster_kwargs", bool(self.cluster_kwargs)),
                ("adapt_kwargs", self.adapt_kwargs is not None),
            )
            if given
        ]
        if self.address is not None and self.local_scheduler is not None:
            raise ValueError(
                "address and local_scheduler: give one; address runs steps on that scheduler's "
                "cluster, local_scheduler runs them in this process without distributed"
            )
        if cluster_keys and (self.address is not None or self.local_scheduler is not None):
            which = "address" if self.address is not None else "local_scheduler"
            raise ValueError(
                f"{', '.join(cluster_keys)}: these configure a temporary cluster, which is not used "
                f"when {which} is given; remove one or the other"
            )
        if self.local_scheduler is not None and self.client_kwargs:
            raise ValueError("client_kwargs: there is no distributed client with local_scheduler; remove it")
        # The synchronous scheduler runs one task at a time in the calling thread (its
        # capabilities, below, lower an unset max_concurrent to 1).
        if self.local_scheduler == "synchronous" and self.max_concurrent not in (None, 1):
            raise ValueError(
                f"max_concurrent: local_scheduler 'synchronous' runs one step at a time, got "
                f"max_concurrent={self.max_concurrent}; remove max_concurrent or use local_scheduler 'threads'"
            )


CAPABILITIES = Capabilities(
    # The engine records the timeout or cancel at once and the Dask future is
    # canceled; the step itself is interrupted where Python allows (see the docs).
    enforces_timeouts=True,
    can_terminate=True,
    # dask/resources (and runyard/resources) become Dask worker resources.
    supports_resources=True,
    max_concurrency=None,
    needs_shared_outputs=True,
    # A step's task tells the run when it starts on a worker (a distributed event),
    # so its timeout does not count the time it waited in Dask's queue.
    reports_start=True,
)


def capabilities_for(config: DaskConfig) -> Capabilities:
    """The synchronous local scheduler runs one step at a time."""
    if config.local_scheduler == "synchronous":
        return attrs.evolve(CAPABILITIES, max_concurrency=1)
    return CAPABILITIES
