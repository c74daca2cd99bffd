"""Prefect 3: the same workloads as @task / @flow, run by calling the flow.

Runs under the peer venv (``benchmarks/.venv-peers``) with no PREFECT_API_URL,
so Prefect starts its ephemeral API server (a uvicorn subprocess over SQLite in
PREFECT_HOME). The runner gives every run a fresh PREFECT_HOME.

Call style (the natural one for each shape):
- chain: plain ``inc(x)`` calls in the flow body; each runs synchronously as a
  task run, exactly like Prefect's docs for sequential tasks.
- fan: ``inc.submit(s)`` N times (concurrent on the default ThreadPoolTaskRunner)
  and the list of futures passed straight to ``total``, which Prefect resolves
  before running it.
"""

from __future__ import annotations

import os
import time

import prefect
from prefect import flow, task
from prefect.futures import PrefectFuture
from prefect.server.api.server import SubprocessASGIServer

from workloads.common import Kind, measure, parse_args, startup_seconds


@task
def source() -> int:
    return 1


@task
def inc(x: int) -> int:
    return x + 1


@task
def total(xs: list[int]) -> int:
    return sum(xs)


def run(kind: Kind, n: int) -> int:
    # Flows are built per call because n is only known at run time; building is
    # inside the timed region, as for the other systems.
    if kind == "chain":

        @flow(name="chain")
        def chain() -> int:
            x = source()
            for _ in range(n - 1):
                x = inc(x)
            return x

        return chain()

    @flow(name="fan")
    def fan() -> int:
        s = source()
        futures: list[PrefectFuture[int]] = [inc.submit(s) for _ in range(n)]
        # Futures go straight in: Prefect resolves them before running total and
        # records the fan-in edges. Its type hints only admit list[int] here.
        return total(futures)  # type: ignore[arg-type]

    return fan()


def main() -> None:
    kind, n = parse_args("prefect")
    startup = startup_seconds()
    # Start the ephemeral API server before the timed region. It is a fixed,
    # one-off cost per process (seconds, including creating the SQLite schema),
    # not per-step work; get_client() reuses this same instance (a singleton
    # keyed by port), so the flow run below does not start a second one. Its
    # time is reported as server_start_seconds so nothing is hidden.
    t0 = time.perf_counter()
    server = SubprocessASGIServer()
    server.start()
    server_start = time.perf_counter() - t0

    def report_server_rss() -> dict[str, float | None]:
        # The server is a separate process, so RUSAGE_SELF (peak_rss_mb)
        # excludes it. Read its high-water mark (VmHWM) from /proc while it is
        # still up: stopping it here would make Prefect's exit-time log and
        # event flush fail noisily.
        proc = server.server_process
        if proc is None:
            return {"server_peak_rss_mb": None}
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return {"server_peak_rss_mb": int(line.split()[1]) / 1024}
        return {"server_peak_rss_mb": None}

    measure(
        "prefect",
        kind,
        n,
        run,
        version=prefect.__version__,
        server_start_seconds=server_start,
        after=report_server_rss,
        startup=startup,
        quiet=os.environ.get("BENCH_PEERS_QUIET") == "1",
    )


if __name__ == "__main__":
    main()
