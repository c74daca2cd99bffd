"""Where a wide Dask run's time goes: CPU seconds per process, runyard against raw Dask.

On a 2-CPU machine the client, the scheduler and two workers share the CPUs, so what a
system costs each of them decides its wall time as much as any latency. This script starts
`bench_dask.py`'s cluster, then in one process, alternating, times N no-op steps through raw
``client.map`` + ``gather`` and through runyard's ``dask`` executor (default and
``max_concurrent=N``), and reports for each run: wall time, this process's CPU (and of it
the engine's thread), and the scheduler's and each worker's CPU (from /proc). With
``--profile`` it also prints a cProfile of the engine's thread for the last runyard run.

    .venv/bin/python benchmarks/dask_cpu.py [--steps 500] [--reps 4] [--profile]

Run it with the project venv's interpreter (it imports runyard and distributed). Prints
medians per system and writes every sample to results/dask-cpu.json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RUNYARD_SIGNING_KEY", secrets.token_hex(32))

import bench_dask as bd  # noqa: E402
from benv import load_average  # noqa: E402


def _noop(i: int) -> int:  # pickled by value: defined in __main__
    return i


def cpu_of(pid: int) -> float:
    """CPU seconds of ``pid`` and its living descendants: a ``dask worker`` is a nanny whose
    child process runs the tasks, so the nanny's own figure alone misses the work."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        for child in children:
            try:
                total += cpu_of(child)
            except OSError:  # ended between the listing and the read
                pass
    return total


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wide_job(n: int, prefix: str) -> tuple[Any, Any]:
    """``bench_dask``'s job of ``n`` independent no-op steps, written to a scratch folder and
    loaded, and an instance beside it: what every runyard run of these scripts executes."""
    from runyard import CodePointer
    from runyard.instance import Instance
    from runyard.loader import load_job

    work = bd.scratch_dir(prefix)
    jobs_file = work / "bench_jobs.py"
    jobs_file.write_text(bd.RUNYARD_JOBS + f"\nwide = make({n})\n")
    job, _ = load_job(CodePointer(file=str(jobs_file)), f"wide{n}")
    return job, Instance(work / "home")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    n = a.steps
    cluster = bd.Cluster(bd.RUNYARD_PYTHON, bd.scratch_dir("dask-cpu-cluster-"))
    cluster.start()
    load_before = load_average()
    try:
        from distributed import Client
        from runyard import execute_job

        client = Client(cluster.address, set_as_default=False)
        job, instance = wide_job(n, "dask-cpu-runyard-")

        def raw() -> None:
            assert client.gather(client.map(_noop, range(n), pure=False)) == list(range(n))

        def runyard(max_concurrent: int | None) -> None:
            cfg: dict = {"address": cluster.address}
            if max_concurrent is not None:
                cfg["max_concurrent"] = max_concurrent
            r = execute_job(job, instance=instance, executor="dask", run_config={"execution": {"dask": cfg}})
            assert r.success and len(r.step_states) == n

        systems = {"raw dask": raw, "runyard (default max_concurrent)": lambda: runyard(None),
                   f"runyard (max_concurrent={n})": lambda: runyard(n)}
        for fn in systems.values():
            fn()  # warm-up: imports, the workers' job load
        pids = {"scheduler": cluster.procs[0].pid, "worker 1": cluster.procs[1].pid, "worker 2": cluster.procs[2].pid}
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
        profile = cProfile.Profile()
        for rep in range(a.reps):
            order = list(systems) if rep % 2 == 0 else list(reversed(systems))
            for name in order:
                before = {k: cpu_of(p) for k, p in pids.items()}
                c0, t0, m0 = own_cpu(), time.perf_counter(), time.thread_time()
                profiling = a.profile and name.startswith("runyard (default") and rep == a.reps - 1
                if profiling:
                    profile.enable()
                systems[name]()
                if profiling:
                    profile.disable()
                row = {"wall": time.perf_counter() - t0, "client process": own_cpu() - c0,
                       "engine thread": time.thread_time() - m0}
                row.update({k: cpu_of(p) - before[k] for k, p in pids.items()})
                rows[name].append(row)
            print(f"repetition {rep + 1}/{a.reps} (load {load_average()})", file=sys.stderr, flush=True)
        client.close()
    finally:
        cluster.stop()
    print(f"{n} no-op steps, 2 workers x 1 thread; medians of {a.reps}; seconds")
    print(f"load average before {load_before}, after {load_average()}; {bd.RUNYARD_PYTHON}")
    cols = list(next(iter(rows.values()))[0])
    print("| system | " + " | ".join(cols) + " | wall / raw |")
    print("|---|" + "---:|" * (len(cols) + 1))
    raw_wall = statistics.median(r["wall"] for r in rows["raw dask"])
    for name, samples in rows.items():
        med = {c: statistics.median(s[c] for s in samples) for c in cols}
        print(f"| {name} | " + " | ".join(f"{med[c]:.3f}" for c in cols) + f" | {med['wall'] / raw_wall:.2f}x |")
    if a.profile:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("cumtime").print_stats(35)
        print(out.getvalue())
    dest = bd.HERE / "results" / "dask-cpu.json"
    dest.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": n, "load_before": load_before,
                                "load_after": load_average(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
