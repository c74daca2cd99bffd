"""The worker side of an executor that puts Celery in front of another executor's step
handler (``celery_docker`` in front of ``docker``; ``celery_k8s`` in front of ``k8s``): the
Celery task body, which knows nothing of containers or Jobs.

A `HandlerTask` is made by ``runyard celery worker`` before its pool forks, with the
worker's own settings for the fronted backend and a function that makes that backend's
`StepHandler` for a run. In each pool process, per task, it

- admits the request first (signed with the worker's key, inside its code locations and
  output stores: `runyard.plugin.admit_or_refuse`); a refused one never reaches the backend;
- refuses it when the run's settings for the backend (sent as digests) differ from the
  worker's, naming the keys: the worker applies its own;
- keeps a handler per run (set up on the run's first step in this process, kept for its
  later steps, torn down when older runs push it out or the process shuts down) and drives
  it through the public `StepHandler` contract: ``launch``, ``wait``/``poll`` until the
  attempt is over, ``terminate`` when told to stop;
- streams the attempt's events while it runs, in the task's STARTED state (the engine's
  monitor hands them to the engine); all of them, with the failure of an attempt that ended
  without an ending, are the task's result (JSON);
- stops the attempt on SIGTERM (runyard's stop command: timeout, cancel, a lost run worker)
  or when the main worker process died (its pool children are orphans then, and a step whose
  events nobody collects must not run on). The pool process itself dying is the backend's
  to clean up: its handler was given ``scope`` labels naming this process, and its reaper
  removes what carries them.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from runyard import ConfigError, Instance
from runyard.plugin import (
    Event,
    FailureInfo,
    FailureKind,
    HandlerContext,
    StepHandler,
    StepRequest,
    WorkerPolicy,
    admit_or_refuse,
)

from .app import worker_policy
from .settings import differing_keys, fingerprint

_STREAM_EVERY = 0.25  # seconds between updates of the streamed events in the task's state
_POLL = 0.2  # seconds between polls of the container's attempt (and checks for a stop)
_KEEP_RUNS = 4  # set-up handlers kept per pool process: a run's later steps reuse its handler


MakeHandler = Callable[[HandlerContext, str], StepHandler]
"""Makes the fronted backend's handler for a run, not set up: (context, owner) -> handler.
``owner`` (``NODE/PID``) names this pool process: the handler labels what it starts with it
(each backend in its own label syntax), and its sweeps, and its reaper should this process
die, remove only what carries it (other workers run other steps of the same run)."""


class HandlerTask:
    """The settings ``runyard celery worker`` decided before the pool forked, and (per pool
    process, after the fork) the handlers of the runs it serves."""

    def __init__(self, *, executor: str, section: str, settings: Any, make_handler: MakeHandler,
                 instance: Instance, node: str) -> None:
        self.executor = executor  # celery_docker
        self.section = section  # docker: the key of the fronted backend's settings
        self.fingerprint = fingerprint(settings)
        self.make_handler = make_handler
        self.instance_home = str(instance.home) if instance.home is not None else None
        self.source = instance.config_source
        self.node = node
        self.handlers: collections.OrderedDict[tuple[str, str], StepHandler] = collections.OrderedDict()

    def function(self) -> Callable[..., dict[str, Any]]:
        """The task body to register (Celery wants a function); tears the handlers down when
        the pool process shuts down."""
        from celery.signals import worker_process_shutdown

        worker_process_shutdown.connect(lambda **_: self.teardown_all(), weak=False)

        def run_step_with_handler(task: Any, payload: Any, expected: Any = None) -> dict[str, Any]:
            return self.run(task, payload, expected)

        return run_step_with_handler

    def handler_for(self, request: StepRequest) -> StepHandler:
        key = (request.run_id, request.output_store)
        handler = self.handlers.get(key)
        if handler is not None:
            self.handlers.move_to_end(key)
            return handler
        context = HandlerContext(
            run_id=request.run_id,
            instance_home=self.instance_home,
            output_store=request.output_store,  # admitted: one of this worker's output stores
            max_concurrent=1,  # a pool process runs one task at a time
            config_source=self.source,
            config_path=f"executor.{self.executor}.{self.section}",
        )
        handler = self.make_handler(context, f"{self.node}/{os.getpid()}")
        try:
            handler.setup()
        except BaseException:
            handler.teardown()
            raise
        self.handlers[key] = handler
        while len(self.handlers) > _KEEP_RUNS:  # the oldest run's handler: its steps here are over
            _, old = self.handlers.popitem(last=False)
            try:
                old.teardown()
            except Exception:
                pass
        return handler

    def teardown_all(self) -> None:
        while self.handlers:
            _, handler = self.handlers.popitem()
            try:
                handler.teardown()
            except Exception:
                pass

    def run(self, task: Any, payload: Any, expected: Any) -> dict[str, Any]:
        """One admitted step attempt through the handler; the result is its events (and the
        failure of an attempt that ended without an ending), as JSON. ``expected``: the run's
        settings of the fronted backend as digests (`settings.fingerprint`)."""
        policy = worker_policy(payload)
        if isinstance(policy, dict):
            return policy
        assert isinstance(policy, WorkerPolicy)
        admitted = admit_or_refuse(policy, payload)
        if isinstance(admitted, Event):
            return {"events": [admitted.to_dict()]}
        request = admitted
        theirs = expected.get(self.section) if isinstance(expected, dict) else None
        differ = differing_keys(self.fingerprint, theirs) if theirs is not None else []
        if differ:
            return _failure(FailureKind.NOT_STARTED,
                            f"step '{request.step_key}' was not started: Celery worker {self.node} applies its own "
                            f"settings ({self.source}: executor.{self.executor}.{self.section}), and the run's "
                            f"differ at: {', '.join(differ)}. Give the run the workers' settings, or route it to "
                            "workers configured for it (a celery/queue tag or default_queue)")
        _stop_requested.clear()
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return self._attempt(task, request)
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _attempt(self, task: Any, request: StepRequest) -> dict[str, Any]:
        try:
            handler = self.handler_for(request)
            attempt = handler.launch(request)
        except ConfigError as e:  # the image is missing, a tag names an unknown resource...
            return _failure(FailureKind.NOT_STARTED,
                            f"step '{request.step_key}' was not started on Celery worker {self.node}: {e}")
        parent = os.getppid()
        events: list[Event] = []
        streamed_at, streamed = 0.0, 0
        stopping = False
        while True:
            handler.wait(_POLL)
            update = handler.poll(attempt)
            events.extend(update.events)
            if update.done:
                break
            if not stopping and (_stop_requested.is_set() or os.getppid() != parent):
                stopping = True
                kind = FailureKind.CANCELED if _stop_requested.is_set() else FailureKind.WORKER_LOST
                handler.terminate(attempt, kind)
            now = time.monotonic()
            if len(events) > streamed and now - streamed_at >= _STREAM_EVERY:
                _stream(task, events)
                streamed_at, streamed = now, len(events)
        result: dict[str, Any] = {"events": [ev.to_dict() for ev in events]}
        if update.failure is not None:
            result["failure"] = update.failure.to_dict()
        return result


_stop_requested = threading.Event()


def _failure(kind: FailureKind, message: str) -> dict[str, Any]:
    return {"events": [], "failure": FailureInfo(kind=kind, message=message).to_dict()}


def _on_sigterm(signum: int, frame: Any) -> None:
    # Only a flag: the handler's calls take locks the interrupted code may hold.
    _stop_requested.set()


def _stream(task: Any, events: list[Event]) -> None:
    """The events so far, in the task's STARTED state (which also names this worker, as
    Celery's own STARTED state does: the engine pings it there)."""
    try:
        task.update_state(state="STARTED", meta={
            "hostname": task.request.hostname, "pid": os.getpid(),
            "events": [ev.to_dict() for ev in events],
        })
    except Exception:  # the backend is slow: the result carries every event anyway
        pass
