"""Jobs of the celery_docker and celery_k8s tests, loaded by file: the Celery workers admit
them by their directory (a code location) and the step containers (pods) import them from
that directory, mounted at the same path. Steps the tests watch write ``<step>.started``
(the container's hostname) under ``run_config["scratch"]``, a folder the containers see at
the same path."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from runyard import RetryPolicy, job, step


def _mark(context: Any, suffix: str) -> None:
    Path(context.run_config["scratch"], f"{context.step_key}.{context.attempt}.{suffix}").write_text(
        os.uname().nodename)


@step
def dies_loudly() -> int:
    print("about to fail: first line", file=sys.stderr)
    print("the last words before exit 3", file=sys.stderr)
    sys.stderr.flush()
    os._exit(3)


@step
def dies_loudly_a_moment_later() -> int:
    """As dies_loudly, with a pause between writing and dying: under the k8s backends the
    step worker reads the step's stderr on a thread of its own process, which os._exit
    ends at once (a line written just before is lost: see docs/backends/celery-containers.md)."""
    print("about to fail: first line", file=sys.stderr)
    print("the last words before exit 3", file=sys.stderr)
    sys.stderr.flush()
    time.sleep(1.0)
    os._exit(3)


@step
def raises() -> int:
    raise ValueError("a step error inside the container")


@step(retry=RetryPolicy(max_retries=1))
def lost_once(context) -> int:  # type: ignore[no-untyped-def]
    if context.attempt == 1:
        _mark(context, "started")
        time.sleep(120)  # the test kills the Celery pool process watching this container
    return context.attempt


@step
def blocker(context) -> int:  # type: ignore[no-untyped-def]
    _mark(context, "started")
    time.sleep(120)
    return 1


@step
def streamed(context) -> int:  # type: ignore[no-untyped-def]
    print("early line", flush=True)
    go = Path(context.run_config["scratch"], "go")
    deadline = time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return 7


@step
def noop() -> int:
    return 0


@step
def plus_one(x: int) -> int:
    return x + 1


@job
def loud_job():  # type: ignore[no-untyped-def]
    plus_one(dies_loudly())


@job
def loud_later_job():  # type: ignore[no-untyped-def]
    plus_one(dies_loudly_a_moment_later())


@job
def raises_job():  # type: ignore[no-untyped-def]
    raises()


@job
def lost_once_job():  # type: ignore[no-untyped-def]
    lost_once()


@job
def block_job():  # type: ignore[no-untyped-def]
    blocker()


@job
def two_blockers_job():  # type: ignore[no-untyped-def]
    blocker()
    blocker.alias("second")()


@job
def streamed_job():  # type: ignore[no-untyped-def]
    streamed()


@job
def noop_job():  # type: ignore[no-untyped-def]
    plus_one(noop())
