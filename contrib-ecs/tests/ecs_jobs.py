"""Jobs of the runyard-ecs tests, loaded by file so tasks import them from the tests
directory mounted at the same path."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from runyard import job, step


@step
def hello() -> int:
    print("hello from an ECS task")
    print("to stderr", file=sys.stderr)
    return 41


@step
def plus_one(hello: int) -> int:
    return hello + 1


@job
def hello_job():  # type: ignore[no-untyped-def]
    plus_one(hello())


@step
def exits_three() -> int:
    sys.stdout.flush()
    import os

    os._exit(3)


@job
def exit_job():  # type: ignore[no-untyped-def]
    exits_three()


@step
def sleeper(context) -> int:  # type: ignore[no-untyped-def]
    Path(context.run_config["started"]).write_text("started")
    time.sleep(120)
    return 0


@job
def sleep_job():  # type: ignore[no-untyped-def]
    sleeper()


@step
def noop() -> int:
    return 0


@job
def noop_job():  # type: ignore[no-untyped-def]
    for i in range(20):
        noop.alias(f"noop_{i}")()


@step
def crash() -> int:
    # The run worker itself dies (in_process executor): its run is left unfinished.
    print("CRASH-MARKER the worker is about to exit 3", flush=True)
    import os

    os._exit(3)


@job
def crash_job():  # type: ignore[no-untyped-def]
    crash()
