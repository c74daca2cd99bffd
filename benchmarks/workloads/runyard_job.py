"""runyard: build a job with N step calls and run it with ``execute_in_process``.

Runs under the project's own venv (``/work/main/.venv/bin/python``), never the
peer venv.
"""

from __future__ import annotations

from typing import Any

from runyard import job, step

from workloads.common import Kind, measure, parse_args


@step
def source() -> int:
    return 1


@step
def inc(x: int) -> int:
    return x + 1


@step
def total(xs: list[int]) -> int:
    return sum(xs)


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
    # Keys of repeated calls are inc, inc_2, ... so the chain's last is inc_{n-1}.
    last = "total" if kind == "fan" else "inc" if n == 2 else f"inc_{n - 1}"
    value: int = result.output_for(last)
    return value


def main() -> None:
    kind, n = parse_args("runyard")
    measure("runyard", kind, n, run)


if __name__ == "__main__":
    main()
