"""runyard: build a job with N step calls and run it with ``execute_in_process``.

Runs under the project's own venv (``/work/main/.venv/bin/python``), never the
peer venv.
"""

from __future__ import annotations

from typing import Any

from runyard import job, step

from workloads.common import Kind, measure, parse_args

# The value the most recently executed step returned. Steps run in this process,
# so this lets us check the run's answer without depending on the result API
# (still being written): in a chain the last step to run is the last inc, in a
# fan it is total. One dict store per step is noise next to any per-step cost.
_last: dict[str, int] = {}


@step
def source() -> int:
    _last["value"] = 1
    return 1


@step
def inc(x: int) -> int:
    _last["value"] = x + 1
    return x + 1


@step
def total(xs: list[int]) -> int:
    _last["value"] = sum(xs)
    return _last["value"]


def build(kind: Kind, n: int) -> Any:
    # n is only known at run time, so the job body is a closure built per call;
    # job() is applied to it directly instead of as a decorator on a top-level def.
    if kind == "chain":

        def chain() -> None:
            x = source()
            for _ in range(n - 1):
                x = inc(x)  # keys become inc, inc_2, inc_3 ...

        return job(chain)

    def fan() -> None:
        s = source()
        total([inc(s) for _ in range(n)])  # a list of upstream outputs = fan-in

    return job(fan)


def run(kind: Kind, n: int) -> int:
    result = build(kind, n).execute_in_process()
    if not result.success:
        raise RuntimeError(f"runyard {kind} {n}: run failed: {result!r}")
    return _last["value"]


def main() -> None:
    kind, n = parse_args("runyard")
    measure("runyard", kind, n, run)


if __name__ == "__main__":
    main()
