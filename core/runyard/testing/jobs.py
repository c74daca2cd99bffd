"""Jobs the conformance kit runs. Importable as ``runyard.testing.jobs`` so that step
workers in other processes, containers or machines load them the way they load user jobs."""

from __future__ import annotations

import time
from pathlib import Path

from runyard import RetryPolicy, job, step


@step
def emit(value: int) -> int:
    return value


@step
def double(x: int) -> int:
    return x * 2


@step
def total(xs: list[int]) -> int:
    return sum(xs)


@step
def boom(x: int) -> int:
    raise ValueError(f"kit boom {x}")


@step(retry=RetryPolicy(max_retries=3))
def flaky(context) -> int:  # type: ignore[no-untyped-def]
    if context.attempt < 3:
        raise RuntimeError(f"failing on purpose, attempt {context.attempt}")
    return context.attempt


@step(timeout=1.0)
def sleepy() -> int:
    time.sleep(30)
    return 0


@step
def nap(i: int) -> int:
    time.sleep(0.4)
    return i


@step(tags={"kit/db": "primary"})
def db_nap(i: int) -> int:
    time.sleep(0.3)
    return i


@step
def block(context) -> int:  # type: ignore[no-untyped-def]
    Path(context.run_config["kit"]["scratch"], "started").write_text(str(time.time()))
    time.sleep(60)
    return 0


@job
def chain_job():  # type: ignore[no-untyped-def]
    double(double(emit(3)))


@job
def fan_job():  # type: ignore[no-untyped-def]
    s = emit(2)
    total([double(s) for _ in range(5)])


@job
def failing_job():  # type: ignore[no-untyped-def]
    e = emit(1)
    double(boom(e))
    double.alias("independent")(e)


@job
def retry_job():  # type: ignore[no-untyped-def]
    flaky()


@job
def timeout_job():  # type: ignore[no-untyped-def]
    double(sleepy())


@job
def wide_job():  # type: ignore[no-untyped-def]
    for i in range(6):
        nap(i)


@job
def tagged_job():  # type: ignore[no-untyped-def]
    for i in range(4):
        db_nap(i)
    for i in range(2):
        nap(i)


@job
def cancel_job():  # type: ignore[no-untyped-def]
    double(block())
