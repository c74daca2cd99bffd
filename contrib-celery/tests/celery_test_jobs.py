"""Jobs of the Celery tests, imported by name (``celery_test_jobs``) by the tests and by the
workers they start. Steps that the tests watch write marker files under
``run_config["scratch"]``: ``<step>.pid`` when they start (the pid of the pool process
running them), ``<step>.done`` if they ever get to the end."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from runyard import RetryPolicy, job, step

# The queue no worker consumes (unless a test starts one): unique per test session, set by
# conftest in the environment the workers inherit.
OTHER_QUEUE = os.environ.get("RYT_CELERY_OTHER_QUEUE", "ryt-other")


def _mark(context: Any, suffix: str) -> None:
    Path(context.run_config["scratch"], f"{context.step_key}.{suffix}").write_text(str(os.getpid()))


def _sleep_marked(context: Any, seconds: float) -> int:
    _mark(context, "pid")
    time.sleep(seconds)
    _mark(context, "done")
    return os.getpid()


@step
def emit() -> int:
    return 3


@step(tags={"celery/queue": OTHER_QUEUE}, timeout=60)
def elsewhere(context) -> int:  # type: ignore[no-untyped-def]
    _mark(context, "pid")
    return 1


@step(tags={"celery/queue": OTHER_QUEUE, "celery/priority": "12"})
def bad_priority() -> int:
    return 1


@step
def blocker(context) -> int:  # type: ignore[no-untyped-def]
    return _sleep_marked(context, 60)


@step(timeout=1.0)
def overrun(context) -> int:  # type: ignore[no-untyped-def]
    return _sleep_marked(context, 30)


@step(timeout=1.0)
def stubborn(context) -> int:  # type: ignore[no-untyped-def]
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # survives SIGTERM: only SIGKILL stops it
    return _sleep_marked(context, 30)


@step(retry=RetryPolicy(max_retries=1))
def killed_once(context) -> int:  # type: ignore[no-untyped-def]
    if context.attempt == 1:
        return _sleep_marked(context, 60)  # the test SIGKILLs this attempt's process
    return context.attempt


@step
def killed(context) -> int:  # type: ignore[no-untyped-def]
    return _sleep_marked(context, 60)


@step
def slow_start(context) -> int:  # type: ignore[no-untyped-def]
    return _sleep_marked(context, 3)


@step
def add_one(x: int) -> int:
    return x + 1


@job
def timeout_job():  # type: ignore[no-untyped-def]
    add_one(overrun())


@job
def kill_retry_job():  # type: ignore[no-untyped-def]
    killed_once()


@job
def kill_job():  # type: ignore[no-untyped-def]
    add_one(killed())


@job
def block_job():  # type: ignore[no-untyped-def]
    add_one(blocker())


@step
def outlast(context) -> int:  # type: ignore[no-untyped-def]
    """Records every start (a line per start), then outlasts the broker's consumer timeout."""
    with Path(context.run_config["scratch"], "outlast.starts").open("a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(float(context.run_config.get("outlast_seconds", 12)))
    return os.getpid()


@job
def outlast_job():  # type: ignore[no-untyped-def]
    outlast()


@job
def slow_job():  # type: ignore[no-untyped-def]
    add_one(slow_start())


@job
def chain_job():  # type: ignore[no-untyped-def]
    add_one(add_one(emit()))


@job
def elsewhere_job():  # type: ignore[no-untyped-def]
    add_one(elsewhere())


@job
def cancel_mixed_job():  # type: ignore[no-untyped-def]
    """One step running on a worker, one queued where nobody consumes."""
    blocker()
    elsewhere()


@job
def bad_priority_job():  # type: ignore[no-untyped-def]
    bad_priority()


@job
def stubborn_job():  # type: ignore[no-untyped-def]
    stubborn()


@job
def two_slow_job():  # type: ignore[no-untyped-def]
    """Two 3 s steps at once: on a worker of one process, the second waits ~3 s in the queue."""
    slow_start()
    slow_start.alias("slow_start_2")()


@step(timeout=3.0)
def quick(context) -> int:  # type: ignore[no-untyped-def]
    return _sleep_marked(context, 1)


@job
def quick_job():  # type: ignore[no-untyped-def]
    """A 1 s step with a 3 s timeout: the tests make it wait in the queue longer than that."""
    quick()


@job
def slow_only_job():  # type: ignore[no-untyped-def]
    slow_start()
