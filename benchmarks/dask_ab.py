"""Side by side on one Dask cluster: the ``dask`` executor's result reading as it is (batched
gathers, results as JSON strings) against each part turned back off, and raw Dask.

Issue 18 item 6: where the extra time over raw Dask goes. The fetcher's batching
(`runyard_dask.fetcher.COALESCE`) and the JSON result (`runyard_dask.remote.run_step_json`
instead of `run_step`'s dict) are switched in this process between runs, so every variant
runs the same code otherwise, on the same cluster (`bench_dask.Cluster`: a scheduler and two
``dask worker --nthreads 1``), alternating within each repetition. Reports for each variant
the median wall time and the median CPU time of every process (this one, the scheduler, the
workers with their task processes) and both as ratios to raw ``client.map`` + ``gather``.

    .venv/bin/python benchmarks/dask_ab.py [--steps 500] [--reps 8]

A script, not a test. Writes every sample to results/dask-ab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RUNYARD_SIGNING_KEY", secrets.token_hex(32))

import bench_dask as bd  # noqa: E402
import dask_cpu as dc  # noqa: E402
from benv import load_average  # noqa: E402


def _noop(i: int) -> int:  # pickled by value: defined in __main__
    return i


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--reps", type=int, default=8)
    a = ap.parse_args()
    n = a.steps
    cluster = bd.Cluster(bd.RUNYARD_PYTHON, bd.scratch_dir("dask-ab-cluster-"))
    cluster.start()
    load_before = load_average()
    try:
        from distributed import Client
        from runyard import execute_job
        from runyard_dask import fetcher, remote, submission

        client = Client(cluster.address, set_as_default=False)
        job, instance = dc.wide_job(n, "dask-ab-runyard-")
        as_dict = types.SimpleNamespace(run_step_json=remote.run_step)  # the task returns run_step's dict
        batching = fetcher.COALESCE
        pids = [p.pid for p in cluster.procs]

        def runyard(max_concurrent: int | None, coalesce: float, json_result: bool) -> Callable[[], None]:
            def run() -> None:
                fetcher.COALESCE = coalesce
                submission.remote = remote if json_result else as_dict  # type: ignore[assignment]
                cfg: dict = {"address": cluster.address}
                if max_concurrent is not None:
                    cfg["max_concurrent"] = max_concurrent
                r = execute_job(job, instance=instance, executor="dask", run_config={"execution": {"dask": cfg}})
                assert r.success and len(r.step_states) == n

            return run

        systems: dict[str, Callable[[], None]] = {
            "raw dask": lambda: client.gather(client.map(_noop, range(n), pure=False))}
        for mc in (None, n):
            label = "default max_concurrent" if mc is None else f"max_concurrent={mc}"
            systems[f"runyard, {label}"] = runyard(mc, batching, True)
            systems[f"runyard, {label}, no batching"] = runyard(mc, 0.0, True)
            systems[f"runyard, {label}, dict result"] = runyard(mc, batching, False)
            systems[f"runyard, {label}, neither"] = runyard(mc, 0.0, False)
        for fn in systems.values():
            fn()  # warm-up: imports, the workers' job load
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
        for rep in range(a.reps):
            for name in (list(systems) if rep % 2 == 0 else list(reversed(systems))):
                before = [dc.cpu_of(p) for p in pids]
                c0, t0 = dc.own_cpu(), time.perf_counter()
                systems[name]()
                wall = time.perf_counter() - t0
                cpu = dc.own_cpu() - c0 + sum(dc.cpu_of(p) - b for p, b in zip(pids, before, strict=True))
                rows[name].append({"wall": wall, "cpu": cpu})
            print(f"repetition {rep + 1}/{a.reps} (load {load_average()})", file=sys.stderr, flush=True)
        fetcher.COALESCE, submission.remote = batching, remote  # type: ignore[assignment]
        client.close()
    finally:
        cluster.stop()
    load_after = load_average()
    print(f"{n} no-op steps, 2 workers x 1 thread; medians of {a.reps}, alternating; seconds")
    print(f"load average before {load_before}, after {load_after}; {bd.RUNYARD_PYTHON}")
    print("| system | wall | wall / raw | CPU, all processes | CPU / raw |")
    print("|---|---:|---:|---:|---:|")
    med = {name: {k: statistics.median(s[k] for s in v) for k in ("wall", "cpu")} for name, v in rows.items()}
    raw = med["raw dask"]
    for name, m in med.items():
        print(f"| {name} | {m['wall']:.3f} | {m['wall'] / raw['wall']:.2f}x | {m['cpu']:.3f} | "
              f"{m['cpu'] / raw['cpu']:.2f}x |")
    dest = bd.HERE / "results" / "dask-ab.json"
    dest.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": n, "load_before": load_before,
                                "load_after": load_after, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
