"""The ``dask`` executor's submission: what one attempt is to Dask (its key, its worker
resources, its handle) and sending the attempts of one turn of the engine's loop to the
scheduler as one batch per set of resources."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from runyard.plugin import ConfigError, Event, FailureKind, StepRequest, parse_resources_tag

from . import remote

RESOURCE_TAGS = ("runyard/resources", "dask/resources")  # the second wins on a shared name
# Tasks that need it (a step with a timeout, or queue_timeout set) report their start as a
# distributed event on this topic, with their key as the message. One topic for every run,
# so a long-lived scheduler keeps one event log for runyard, not one per run.
START_TOPIC = "runyard-dask-start"
# Running steps send their start, log records and output on a topic per run (its client
# alone subscribes), with their key: "runyard-dask-live-<run id>".
LIVE_TOPIC_PREFIX = "runyard-dask-live-"
# Under dask's local schedulers a step's live events go to a file, read by poll this long
# after the launch and then every LIVE_READ_EVERY seconds (short steps cost no reads).
LIVE_FIRST_READ, LIVE_READ_EVERY = 0.15, 0.2


def dask_key(request: StepRequest) -> str:
    """The Dask key of one attempt: unique per run and attempt, so runs sharing a cluster
    (even two runs of one job at once) never share a task."""
    return f"runyard-{request.run_id}-{request.step_key}-{request.attempt_id}"


def parse_resources(step_key: str, tags: Mapping[str, str]) -> dict[str, float]:
    """Dask worker resources a step asks for with its ``runyard/resources`` or
    ``dask/resources`` tag (the second wins on a shared name), in runyard's one grammar
    (`runyard.plugin.parse_resources_tag`: a dict, JSON or ``"GPU=1,MEMORY=4e9"``).
    Dask needs positive amounts."""
    found: dict[str, float] = {}
    for tag in RESOURCE_TAGS:
        raw = tags.get(tag)
        if raw is None:
            continue
        parsed = parse_resources_tag(raw, step_key=step_key, tag=tag)
        if not parsed or any(isinstance(v, str) or v <= 0 for v in parsed.values()):
            raise ConfigError(
                f"step '{step_key}': tag '{tag}' = {raw!r} is not a resource mapping Dask can use; expected "
                "resource names with positive amounts, e.g. tags={'" + tag + "': {'GPU': 1}} or '" + tag
                + "': 'GPU=1,MEMORY=4e9'"
            )
        found.update({k: float(v) for k, v in parsed.items()})
    return found


class DaskHandle:
    """One attempt: its task's future and what the fetcher and terminate learnt of it."""

    __slots__ = (
        "request", "key", "future", "resources", "lock", "stopped", "reported", "result", "launched", "fetch_error",
        "error", "fetched", "payload", "submit_error", "started", "track_start",
        "live", "live_seen", "live_pos", "tail_at",
    )

    def __init__(self, request: StepRequest, key: str, resources: dict[str, float]) -> None:
        self.request = request
        self.key = key
        self.resources = resources
        self.future: Any = None
        self.lock = threading.Lock()
        self.stopped: FailureKind | None = None  # terminate was called with this kind
        self.reported = False  # a poll said done
        self.result: str | dict[str, Any] | None = None  # what the task returned, once fetched (remote.decode_result)
        self.launched = time.monotonic()
        self.fetch_error: str | None = None  # the task finished but its result could not be read
        self.error: BaseException | None = None  # the task raised (status "error")
        self.fetched = False  # the task is over and the fetcher has read what there is to read
        self.payload: dict[str, Any] | None = None  # the request, until it is submitted
        self.submit_error: BaseException | None = None
        self.track_start = False  # the task reports its start (see START_TOPIC)
        self.started = False  # it has: the step left Dask's queue and runs on a worker
        self.live: list[Event] = []  # reported while it runs, for the next poll (no engine to report to)
        self.live_seen: set[tuple[Any, ...]] = set()  # `live_mark` of those: not reported again
        self.live_pos = 0  # local schedulers: bytes of its live file read
        self.tail_at = self.launched + LIVE_FIRST_READ


def live_mark(ev: Event) -> tuple[Any, ...]:
    """What tells a live event apart from the attempt's others: the task's result repeats
    those sent while it ran, and the handler reports each once."""
    return (ev.type, ev.timestamp, ev.message, ev.data.get("text"))


def submit_batch(
    client: Any,
    pending: list[DaskHandle],
    grace: float,
    on_done: Callable[[DaskHandle], None],
    stop: Callable[[DaskHandle, Any, FailureKind], None],
    live_topic: str | None = None,
) -> None:
    """Submit the attempts launched in one turn in one graph per set of resources: one
    message to the scheduler, not one per step. An attempt stopped before it was submitted
    is never submitted; one stopped while being submitted is stopped (``stop``)."""
    groups: dict[tuple[tuple[str, float], ...], list[DaskHandle]] = {}
    for h in pending:
        if h.stopped is None:  # stopped before it was submitted: never submit it
            groups.setdefault(tuple(sorted(h.resources.items())), []).append(h)
    for resources, handles in groups.items():
        keys = [h.key for h in handles]
        try:
            futures = client.map(
                remote.run_step_json, [h.payload for h in handles], keys, [grace] * len(handles),
                [START_TOPIC if h.track_start else None for h in handles],
                [None] * len(handles), [live_topic] * len(handles),
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
            f.add_done_callback(lambda _f, h=h: on_done(h))
            if stopped is not None:  # terminated (from another thread) while being submitted
                stop(h, f, stopped)
