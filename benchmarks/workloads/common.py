"""Measurement harness shared by every workload module.

This module must import nothing heavier than the stdlib: it is loaded into the
runyard, Dagster and Prefect child processes alike, and the peer venv must not
need runyard (nor runyard's venv the peers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Mapping
from typing import Literal, get_args

Kind = Literal["chain", "fan"]
KINDS: tuple[str, ...] = get_args(Kind)


def step_count(kind: str, n: int) -> int:
    """Number of steps/ops/tasks the workload schedules.

    chain n: source + (n - 1) inc          = n
    fan n:   source + n inc + 1 total      = n + 2
    """
    return n if kind == "chain" else n + 2


def expected_result(kind: str, n: int) -> int:
    """What the final step must return; checked so a broken run can't look fast."""
    # chain: source()=1 then n-1 increments; fan: n copies of inc(1)=2, summed.
    return n if kind == "chain" else 2 * n


def peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB. It is the high-water mark of the whole
    # process, so it includes the interpreter and the imported system.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def startup_seconds() -> float:
    """Seconds since this process was created: interpreter start + imports.

    Read from /proc rather than timed around the imports so that each workload
    module can import its system at the top like normal code (ruff's import
    sorting would move any timer placed between imports). Resolution is one
    clock tick (10 ms), ample for import costs in the 0.1 s-3 s range.
    """
    with open("/proc/self/stat") as f:
        # Field 22 (starttime, in ticks since boot); split after the ")" that
        # ends the command name, which may itself contain spaces.
        start_ticks = int(f.read().rpartition(")")[2].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")


def parse_args(system: str) -> tuple[Kind, int]:
    parser = argparse.ArgumentParser(description=f"Run one {system} workload.")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("n", type=int)
    args = parser.parse_args()
    if args.n < 2:
        parser.error("n must be >= 2")
    return args.kind, args.n


def measure(
    system: str,
    kind: Kind,
    n: int,
    run: Callable[[Kind, int], int],
    after: Callable[[], Mapping[str, object]] | None = None,
    startup: float | None = None,
    **extra: object,
) -> None:
    """Time ``run(kind, n)`` (build + execute), check its result, print one JSON line.

    ``run`` must cover everything from just before the job/flow is built until
    the run is done, and return the final step's value. ``extra`` keys are
    added to the JSON line (system-specific facts such as versions); so is what
    ``after()`` returns, called once the run is timed and checked. Pass
    ``startup`` when the caller did untimed setup of its own after its imports.
    """
    if startup is None:
        startup = startup_seconds()
    t0 = time.perf_counter()
    value = run(kind, n)
    seconds = time.perf_counter() - t0
    want = expected_result(kind, n)
    if value != want:
        # Exit non-zero with no JSON line so the runner records a failure
        # rather than a (misleadingly fast) timing.
        sys.exit(f"{system} {kind} {n}: wrong result {value!r}, expected {want}")
    record = {
        "system": system,
        "workload": kind,
        "n": n,
        "steps": step_count(kind, n),
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "startup_seconds": startup,
        **extra,
        **(after() if after else {}),
    }
    print(json.dumps(record), flush=True)
