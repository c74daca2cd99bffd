#!/usr/bin/env python3
"""Side-by-side Dask benchmark: N no-op steps (default 500) on one 2-worker Dask cluster
through runyard's ``dask`` executor, through raw ``client.map`` + ``gather`` of the same
function, and through Dagster's dask executor and Prefect's Dask task runner where they
are installed (benchmarks/setup-peers-dask.sh).

One cluster serves every system, started once by this script with the ``dask`` command
(``dask scheduler`` and two ``dask worker --nthreads 1`` on 127.0.0.1); its start-up time
is reported on its own. Every system is measured in a fresh child process (this file
with ``--child SYSTEM``) that connects, does one untimed warm-up run, then times
``--reps`` runs and prints one JSON line. Times run from just before the run is started
until every step's result is back; connecting a client and importing are excluded for
raw Dask (reported as ``connect_s``) and included in a run for runyard and the peers,
which connect per run.

It is a script, not a test: it measures and prints, and asserts nothing, except that each
run's results are complete (a broken run cannot pass as a fast one).

    python3 benchmarks/bench_dask.py              # ~5 min with the peers
    python3 benchmarks/bench_dask.py --quick      # 2 repetitions, peers once
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from benv import bytecode_env

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "dask.json"
NO_PEER_RESULTS = HERE / "results" / "dask-no-peers.json"
RUNYARD_PYTHON = REPO / ".venv" / "bin" / "python"
PEER_PYTHON = HERE / ".venv-peers-dask" / "bin" / "python"
PEER_REPORT = HERE / ".venv-peers-dask" / "install-report.txt"
# Instance homes, Dagster and Prefect homes: on the project's disk (benchmarks/.tmp, ignored
# by git), the same for every system. (/tmp on this machine was up to 15x slower per file.)
SCRATCH = HERE / ".tmp"


def scratch_dir(prefix: str) -> Path:
    SCRATCH.mkdir(exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=SCRATCH))

RUNYARD_JOBS = '''
from runyard import job, step


@step
def noop(i: int) -> int:
    return i


def make(n: int):
    @job(name=f"wide{n}")
    def wide():
        for i in range(n):
            noop(i)

    return wide
'''

DAGSTER_JOBS = '''
from dagster import In, Int, job, op
from dagster_dask import dask_executor


@op(config_schema={"i": Int})
def noop(context) -> int:
    return context.op_config["i"]


@job(executor_def=dask_executor)
def wide():
    for i in range(N):
        noop.alias(f"noop_{i}")()
'''


# -- children -------------------------------------------------------------------------


def _noop(i: int) -> int:
    return i


def child_raw(address: str, n: int, reps: int) -> dict[str, Any]:
    from distributed import Client

    t0 = time.perf_counter()
    client = Client(address, set_as_default=False)
    connect = time.perf_counter() - t0
    times = []
    for rep in range(reps + 1):
        start = time.perf_counter()
        futures = client.map(_noop, range(n), pure=False)
        results = client.gather(futures)
        elapsed = time.perf_counter() - start
        assert results == list(range(n))
        del futures
        if rep:
            times.append(elapsed)
    client.close()
    return {"seconds": times, "connect_s": connect}


def child_runyard(
    address: str, n: int, reps: int, max_concurrent: int | None, queue_timeout: float | None = None
) -> dict[str, Any]:
    work = scratch_dir("bench-dask-runyard-")
    jobs_file = work / "bench_jobs.py"
    jobs_file.write_text(RUNYARD_JOBS + f"\nwide = make({n})\n")
    from runyard import CodePointer, execute_job
    from runyard.instance import Instance
    from runyard.loader import load_job

    job, _ = load_job(CodePointer(file=str(jobs_file)), f"wide{n}")
    instance = Instance(work / "home")
    cfg: dict[str, Any] = {"address": address}
    if max_concurrent is not None:
        cfg["max_concurrent"] = max_concurrent
    if queue_timeout is not None:
        cfg["queue_timeout"] = queue_timeout  # every step then reports its start (a distributed event)
    times = []
    for rep in range(reps + 1):
        start = time.perf_counter()
        result = execute_job(job, instance=instance, executor="dask", run_config={"execution": {"dask": cfg}})
        elapsed = time.perf_counter() - start
        if not (result.success and len(result.step_states) == n):
            why = next((f.message for k in result.step_states if (f := result.failure_for(k)) is not None), "?")
            raise SystemExit(f"runyard run failed: {result!r}; first step failure: {why}")
        if rep:
            times.append(elapsed)
    return {"seconds": times}


def child_dagster(address: str, n: int, reps: int, jobs_dir: str) -> dict[str, Any]:
    work = scratch_dir("bench-dask-dagster-")
    os.environ["DAGSTER_HOME"] = str(work)
    (work / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    # The workers import the job by module name: the module is in their working directory.
    sys.path.insert(0, jobs_dir)
    import dagster_bench_jobs  # type: ignore[import-not-found]
    from dagster import DagsterInstance, execute_job, reconstructable

    run_config = {
        "execution": {"config": {"cluster": {"existing": {"address": address}}}},
        "ops": {f"noop_{i}": {"config": {"i": i}} for i in range(n)},
    }
    instance = DagsterInstance.get()
    times = []
    for rep in range(reps + 1):
        start = time.perf_counter()
        result = execute_job(reconstructable(dagster_bench_jobs.wide), instance=instance, run_config=run_config)
        elapsed = time.perf_counter() - start
        assert result.success
        if rep:
            times.append(elapsed)
    return {"seconds": times}


def child_prefect(address: str, n: int, reps: int) -> dict[str, Any]:
    from prefect import flow, task
    from prefect_dask import DaskTaskRunner

    @task
    def noop(i: int) -> int:
        return i

    @flow(task_runner=DaskTaskRunner(address=address), log_prints=False)
    def wide(n: int) -> list[int]:
        futures = [noop.submit(i) for i in range(n)]
        return [f.result() for f in futures]

    times = []
    for rep in range(reps + 1):
        start = time.perf_counter()
        results = wide(n)
        elapsed = time.perf_counter() - start
        assert results == list(range(n))
        if rep:
            times.append(elapsed)
    return {"seconds": times}


def run_child(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", required=True)
    p.add_argument("--address", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--reps", type=int, required=True)
    p.add_argument("--max-concurrent", type=int)
    p.add_argument("--jobs-dir")
    p.add_argument("--queue-timeout", type=float)
    a = p.parse_args(argv)
    if a.child == "raw":
        out = child_raw(a.address, a.steps, a.reps)
    elif a.child == "runyard":
        out = child_runyard(a.address, a.steps, a.reps, a.max_concurrent, a.queue_timeout)
    elif a.child == "dagster":
        out = child_dagster(a.address, a.steps, a.reps, a.jobs_dir)
    elif a.child == "prefect":
        out = child_prefect(a.address, a.steps, a.reps)
    else:
        raise SystemExit(f"unknown child {a.child}")
    print("RESULT " + json.dumps(out))


# -- the cluster ---------------------------------------------------------------------------


class Cluster:
    def __init__(self, python: Path, workdir: Path) -> None:
        self.python = python
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.address = ""

    def _spawn(self, name: str, args: list[str]) -> None:
        # Workers run this checkout's runyard and runyard-dask, whichever venv they run in.
        src = os.pathsep.join(str(REPO / d) for d in ("core", "plugins", "contrib-dask"))
        env = {**bytecode_env(), "PYTHONPATH": src}  # same bytecode state as every child
        # A runyard step worker runs only jobs and writes only output stores it was granted:
        # the benchmark's job files and instances are all under SCRATCH.
        scratch = str(SCRATCH.resolve())
        env["RUNYARD_STEP_WORKER"] = json.dumps({"code_locations": [scratch], "output_stores": [scratch]})
        with open(self.workdir / f"{name}.log", "wb") as log:
            self.procs.append(
                subprocess.Popen([str(self.python), "-m", "distributed.cli.dask_" + args[0], *args[1:]],
                                 stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True,
                                 env=env)
            )

    def start(self) -> float:
        sched = self.workdir / "scheduler.json"
        start = time.perf_counter()
        self._spawn("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0",
                                  "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(sched)])
        for i in (1, 2):
            self._spawn(f"w{i}", ["worker", "--scheduler-file", str(sched), "--host", "127.0.0.1", "--nthreads", "1",
                                  "--dashboard-address", "127.0.0.1:0", "--name", f"w{i}"])
        code = textwrap.dedent(f"""
            import json, time
            from pathlib import Path
            from distributed import Client
            p = Path({str(sched)!r})
            deadline = time.monotonic() + 120
            while not p.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            with Client(scheduler_file=str(p), timeout=120, set_as_default=False) as c:
                c.wait_for_workers(2, timeout=120)
                print(c.scheduler.address)
        """)
        out = subprocess.run([str(self.python), "-c", code], capture_output=True, text=True, timeout=180)
        if out.returncode:
            raise RuntimeError(f"cluster did not start: {out.stderr}")
        self.address = out.stdout.strip().splitlines()[-1]
        return time.perf_counter() - start

    def stop(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


# -- the parent ------------------------------------------------------------------------------


def measure(python: Path, system: str, address: str, steps: int, reps: int, extra: list[str] | None = None,
            timeout: float = 1800) -> dict[str, Any]:
    env = {**bytecode_env(), "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_HOME": str(scratch_dir("bench-dask-prefect-"))}
    env.pop("PREFECT_API_URL", None)
    cmd = [str(python), str(Path(__file__).resolve()), "--child", system, "--address", address,
           "--steps", str(steps), "--reps", str(reps), *(extra or [])]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (out.stderr or out.stdout).strip().splitlines()[-6:]
    return {"error": f"exit {out.returncode}: " + " | ".join(tail)}


def main() -> None:
    if "--child" in sys.argv:
        run_child(sys.argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--peer-reps", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-peers", action="store_true", help="runyard and raw Dask only")
    a = p.parse_args()
    if a.quick:
        a.reps, a.peer_reps = 2, 1
    # runyard signs step requests that cross a cluster scheduler and its workers refuse
    # unsigned ones: one throwaway key for the run process and the workers alike (both
    # inherit this environment).
    os.environ.setdefault("RUNYARD_SIGNING_KEY", secrets.token_hex(32))
    have_peers = PEER_PYTHON.exists()
    peer_versions: dict[str, str] = {}
    if have_peers:
        code = ("import importlib.metadata as m, json\nd={}\n"
                "for k in ('dask','distributed','dagster','dagster-dask','prefect','prefect-dask','runyard'):\n"
                "    try: d[k]=m.version(k)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(d))")
        peer_versions = json.loads(subprocess.check_output([str(PEER_PYTHON), "-c", code], text=True))
    # The workers must import what every system sends them: the peer venv has the peers and
    # runyard (setup-peers-dask.sh installs the workspace there too); without it, runyard's.
    worker_python = PEER_PYTHON if have_peers and "runyard" in peer_versions else RUNYARD_PYTHON
    workdir = scratch_dir("bench-dask-cluster-")
    (workdir / "dagster_bench_jobs.py").write_text(DAGSTER_JOBS.replace("range(N)", f"range({a.steps})"))
    cluster = Cluster(worker_python, workdir)
    rows: dict[str, Any] = {}
    load_at_start = os.getloadavg()
    try:
        startup = cluster.start()
        print(f"cluster up in {startup:.2f}s at {cluster.address} (workers: {worker_python})", flush=True)
        plan: list[tuple[str, Path, str, list[str], int]] = [
            ("raw dask (client.map + gather)", RUNYARD_PYTHON, "raw", [], a.reps),
            ("runyard dask executor (default max_concurrent=32)", RUNYARD_PYTHON, "runyard", [], a.reps),
            (f"runyard dask executor (max_concurrent={a.steps})", RUNYARD_PYTHON, "runyard",
             ["--max-concurrent", str(a.steps)], a.reps),
            ("runyard dask executor (queue_timeout set: every step reports its start)", RUNYARD_PYTHON, "runyard",
             ["--queue-timeout", "600"], a.reps),
        ]
        if have_peers and not a.no_peers:
            if "dagster-dask" in peer_versions:
                dagster_args = ["--jobs-dir", str(workdir)]
                plan.append(("dagster dask_executor", PEER_PYTHON, "dagster", dagster_args, a.peer_reps))
            if "prefect-dask" in peer_versions:
                plan.append(("prefect DaskTaskRunner", PEER_PYTHON, "prefect", [], a.peer_reps))
        for label, python, system, extra, reps in plan:
            print(f"measuring {label} ...", flush=True)
            res = measure(python, system, cluster.address, a.steps, reps, extra)
            if "seconds" in res:
                res["median_s"] = statistics.median(res["seconds"])
                res["per_step_ms"] = res["median_s"] / a.steps * 1000
            rows[label] = res
            print(f"  {json.dumps(res)}", flush=True)
    finally:
        cluster.stop()
    raw = rows.get("raw dask (client.map + gather)", {}).get("median_s")
    for res in rows.values():
        if raw and "median_s" in res:
            res["ratio_to_raw"] = res["median_s"] / raw
    not_installed = PEER_REPORT.read_text() if PEER_REPORT.exists() else "peer venv not set up"
    doc = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg_at_start": load_at_start, "load_avg": os.getloadavg()},
        "steps": a.steps,
        "cluster": {"workers": 2, "threads_per_worker": 1, "startup_s": startup, "worker_python": str(worker_python)},
        "peer_versions": peer_versions,
        "peer_install_report": not_installed,
        "rows": rows,
    }
    # A run without the peers must not overwrite the last full comparison.
    results = RESULTS if any(label.startswith(("dagster", "prefect")) for label in rows) else NO_PEER_RESULTS
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps(doc, indent=2) + "\n")
    print()
    print(f"| system | runs | median s ({a.steps} steps) | per-step ms | ratio to raw dask |")
    print("|---|---|---|---|---|")
    for label, res in rows.items():
        if "median_s" in res:
            print(f"| {label} | {len(res['seconds'])} | {res['median_s']:.3f} | {res['per_step_ms']:.2f} | "
                  f"{res.get('ratio_to_raw', float('nan')):.2f}x |")
        else:
            print(f"| {label} | 0 | failed: {res.get('error', '?')[:200]} | | |")
    print(f"\ncluster start-up (scheduler + 2 workers registered): {startup:.2f}s; "
          f"load average {load_at_start[0]:.2f} -> {doc['machine']['load_avg'][0]:.2f} (1 min); results in {results}")


if __name__ == "__main__":
    main()
