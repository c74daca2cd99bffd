"""Dagster: the same workloads as @op / @job, run with ``job.execute_in_process()``.

Runs under the peer venv (``benchmarks/.venv-peers``). Dagster's defaults are
kept (ephemeral in-memory instance, DEBUG console logger); ``--quiet`` lowers the
console logger to ERROR to show how much of the cost is log output.
"""

from __future__ import annotations

import os

import dagster
from dagster import JobDefinition, job, op

from workloads.common import Kind, measure, parse_args

# Set by the runner for its --quiet-peers mode; default is Dagster as shipped.
QUIET = os.environ.get("BENCH_PEERS_QUIET") == "1"


@op
def source() -> int:
    return 1


@op
def inc(x: int) -> int:
    return x + 1


@op
def total(xs: list[int]) -> int:
    return sum(xs)


def key(i: int) -> str:
    """Node name of the i-th inc (1-based): inc, inc_2, inc_3 ... as in runyard."""
    return "inc" if i == 1 else f"inc_{i}"


def build(kind: Kind, n: int) -> JobDefinition:
    # Explicit .alias() names rather than Dagster's automatic de-duplication:
    # a generated job would name its nodes, and the keys then match runyard's.
    # One invocation per node; no DynamicOutput, which would measure Dagster's
    # mapping machinery instead of a static N-node graph.
    if kind == "chain":

        @job(name="chain")
        def chain() -> None:
            x = source()
            for i in range(1, n):
                x = inc.alias(key(i))(x)

        return chain

    @job(name="fan")
    def fan() -> None:
        s = source()
        total([inc.alias(key(i))(s) for i in range(1, n + 1)])

    return fan


def run(kind: Kind, n: int) -> int:
    run_config = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}} if QUIET else None
    result = build(kind, n).execute_in_process(run_config=run_config)
    if not result.success:
        raise RuntimeError(f"dagster {kind} {n}: run failed")
    value: int = result.output_for_node(key(n - 1) if kind == "chain" else "total")
    return value


def main() -> None:
    kind, n = parse_args("dagster")
    measure("dagster", kind, n, run, version=dagster.__version__, quiet=QUIET)


if __name__ == "__main__":
    main()
