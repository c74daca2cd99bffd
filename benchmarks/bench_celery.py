#!/usr/bin/env python3
"""Side-by-side Celery benchmark: 200 no-op steps through runyard's ``celery`` executor, the
same 200 functions as raw Celery tasks, and (where it installs) Dagster's celery executor,
all on the same Redis broker with a worker of 2 prefork processes each.

It is a script, not a test: it measures and prints, and asserts nothing.

    python3 benchmarks/bench_celery.py               # 5 repetitions (Dagster: 2)
    python3 benchmarks/bench_celery.py --quick       # 1 repetition each
    python3 benchmarks/bench_celery.py --no-dagster  # runyard and raw Celery only

What is timed, per repetition (the worker processes are started once, before any timing,
and each system gets one untimed warm-up run, so worker start-up and first imports are
not counted):

- ``runyard``: ``execute_job`` of a job of 200 independent no-op steps, executor ``celery``
  (max_concurrent 32), from the call until it returns: the broker check at setup, sending
  200 JSON task messages, the workers running each step with ``execute_step`` (output
  written to the file output store), reading results, and recording every event in the
  instance's SQLite storage.
- ``celery``: ``group(noop.s(i) for i in range(200)).apply_async().get()`` with Celery's
  defaults (the same function; results through the same Redis backend).
- ``dagster``: ``execute_job`` of a 200-op job with ``dagster_celery.celery_executor``, in
  the peer venv (benchmarks/.venv-peers-celery, made by setup-peers-celery.sh), workers
  started with ``dagster-celery worker start``.

Redis: 127.0.0.1:6379, database 14 (15 for Dagster), queues unique to this run. Results
go to benchmarks/results/celery.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "celery.json"
RUNYARD_BIN = REPO / ".venv" / "bin"
PEER_BIN = HERE / ".venv-peers-celery" / "bin"
N = 200
CONCURRENCY = 2
REDIS = "redis://127.0.0.1:6379/14"
DAGSTER_REDIS = "redis://127.0.0.1:6379/15"

COMMON = '''
def noop(i):
    """The function every system runs, 200 times."""
    return i
'''

RUNYARD_JOBS = '''
from runyard import job, step

from bench_common import noop as _noop


@step
def noop(i: int) -> int:
    return _noop(i)


@job
def noop_{n}():
    for i in range({n}):
        noop(i)
'''

RAW_APP = '''
from celery import Celery

from bench_common import noop as _noop

app = Celery("bench_raw", broker="{broker}", backend="{broker}")
app.conf.update(task_default_queue="{queue}", broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)


@app.task(name="bench.noop")
def noop(i):
    return _noop(i)
'''

DAGSTER_JOBS = '''
from dagster import job, op
from dagster_celery import celery_executor

from bench_common import noop as _noop


@op
def noop() -> int:
    return _noop(1)


@job(executor_def=celery_executor)
def noop_{n}():
    for i in range({n}):
        noop.alias(f"noop_{{i}}")()
'''

DAGSTER_WORKER_CONFIG = '''
execution:
  config:
    broker: "{broker}"
    backend: "{broker}"
'''

DAGSTER_CHILD = '''
import json, sys, time
from dagster import DagsterInstance, execute_job, reconstructable

import bench_dagster_jobs as jobs

instance = DagsterInstance.get()
job = reconstructable(getattr(jobs, "noop_{n}"))
run_config = {{"execution": {{"config": {{"broker": "{broker}", "backend": "{broker}"}}}}}}
times = []
for i in range({reps} + 1):
    started = time.perf_counter()
    result = execute_job(job, instance=instance, run_config=run_config)
    elapsed = time.perf_counter() - started
    assert result.success, "dagster run failed"
    if i:  # the first run is the warm-up
        times.append(elapsed)
    print(json.dumps({{"rep": i, "seconds": elapsed}}), file=sys.stderr, flush=True)
print(json.dumps(times))
'''


class Worker:
    """A worker process group started for the benchmark, killed at the end."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path, ready: str) -> None:
        self.name = name
        self.log = log
        self.ready = ready  # a log line, or "ping:NODE@HOST" to ask the worker itself
        self.proc = subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=str(log.parent))

    def is_ready(self) -> bool:
        if not self.ready.startswith("ping:"):
            return self.ready in self.log.read_text(errors="replace")
        from celery import Celery

        app = Celery("bench-ping", broker=REDIS, set_as_current=False)
        try:
            with app.connection_for_write() as conn:
                return bool(app.control.ping(destination=[self.ready[5:]], timeout=0.5, connection=conn))
        finally:
            app.close()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} worker exited:\n{self.log.read_text(errors='replace')[-3000:]}")
            if self.is_ready():
                return
            time.sleep(0.2)
        raise SystemExit(f"{self.name} worker not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                os.killpg(self.proc.pid, 0)  # children may outlive the main process briefly
                time.sleep(0.5)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass


def write_workdir(work: Path, queue: str) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "bench_common.py").write_text(COMMON)
    (work / "bench_runyard_jobs.py").write_text(RUNYARD_JOBS.format(n=N))
    (work / "bench_raw.py").write_text(RAW_APP.format(broker=REDIS, queue=f"{queue}-raw"))
    (work / "bench_dagster_jobs.py").write_text(DAGSTER_JOBS.format(n=N))
    (work / "dagster-worker.yaml").write_text(DAGSTER_WORKER_CONFIG.format(broker=DAGSTER_REDIS))


def env_with(work: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(work), "PYTHONDONTWRITEBYTECODE": "", **extra}


def measure_runyard_and_raw(work: Path, queue: str, reps: int) -> dict[str, list[float]]:
    sys.path.insert(0, str(work))
    import bench_raw  # type: ignore[import-not-found]
    import bench_runyard_jobs  # type: ignore[import-not-found]
    from celery import group
    from runyard import Instance, execute_job

    home = work / "runyard-home"
    instance = Instance(home)
    run_config = {"execution": {"celery": {"broker": REDIS, "default_queue": f"{queue}-runyard", "max_concurrent": 32}}}
    job = getattr(bench_runyard_jobs, f"noop_{N}")

    def runyard_once() -> float:
        started = time.perf_counter()
        result = execute_job(job, instance=instance, executor="celery", run_config=run_config)
        elapsed = time.perf_counter() - started
        assert result.success and result.output_for(f"noop_{N}") == N - 1, result.status
        return elapsed

    def raw_once() -> float:
        started = time.perf_counter()
        values = group(bench_raw.noop.s(i) for i in range(N)).apply_async().get(timeout=300)
        elapsed = time.perf_counter() - started
        assert values == list(range(N))
        return elapsed

    times: dict[str, list[float]] = {"runyard": [], "celery": []}
    runyard_once(), raw_once()  # warm-up: workers import the job and open their connections
    for rep in range(reps):
        for name, fn in (("runyard", runyard_once), ("celery", raw_once)):
            times[name].append(fn())
            print(f"  rep {rep + 1}/{reps} {name:8s} {times[name][-1]:.3f}s", flush=True)
    instance.storage.close()
    bench_raw.app.close()
    return times


def measure_dagster(work: Path, reps: int) -> tuple[list[float] | None, str]:
    python = PEER_BIN / "python"
    if not python.exists():
        return None, "peer venv missing: run benchmarks/setup-peers-celery.sh"
    probe = subprocess.run([str(python), "-c", "import dagster, dagster_celery; print(dagster.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return None, f"dagster-celery does not import: {probe.stderr.strip().splitlines()[-1:]}"
    dagster_home = work / "dagster-home"
    dagster_home.mkdir(exist_ok=True)
    # dagster-celery runs `celery` from PATH: the peer venv's.
    env = env_with(work, DAGSTER_HOME=str(dagster_home), PATH=f"{PEER_BIN}{os.pathsep}{os.environ['PATH']}")
    worker = Worker("dagster", [str(PEER_BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app", "-y",
                                str(work / "dagster-worker.yaml"), "-i", "bench_dagster_jobs", "-l", "INFO", "--",
                                f"--concurrency={CONCURRENCY}", "--without-gossip"],
                    env, work / "dagster-worker.log", " ready.")
    try:
        worker.wait_ready()
        child = work / "dagster_child.py"
        child.write_text(DAGSTER_CHILD.format(n=N, broker=DAGSTER_REDIS, reps=reps))
        proc = subprocess.run([str(python), str(child)], env=env, capture_output=True, text=True, cwd=str(work),
                              timeout=3600)
        if proc.returncode != 0:
            return None, f"dagster run failed: {proc.stderr.strip()[-1500:]}"
        return json.loads(proc.stdout.strip().splitlines()[-1]), f"dagster {probe.stdout.strip()}"
    finally:
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repetition each")
    parser.add_argument("--no-dagster", action="store_true", help="skip Dagster's celery executor")
    args = parser.parse_args()
    reps = 1 if args.quick else 5
    dagster_reps = 1 if args.quick else 2

    subprocess.run(["bash", str(REPO / "scripts" / "services.sh"), "redis"], check=True)
    run_id = uuid.uuid4().hex[:8]
    queue = f"bench-{run_id}"
    work = HERE / ".tmp" / f"celery-{run_id}"
    write_workdir(work, queue)
    home = work / "runyard-home"
    home.mkdir()
    (home / "runyard.yaml").write_text(
        f"executor:\n  celery:\n    broker: {REDIS}\n    default_queue: {queue}-runyard\n")
    # Requests are signed: this process (the engine) and the runyard worker share the key.
    os.environ.setdefault("RUNYARD_SIGNING_KEY", uuid.uuid4().hex + uuid.uuid4().hex)
    env = env_with(work, RUNYARD_HOME=str(home))
    host = socket.gethostname()
    # Log level WARNING for both, as in production: at INFO a worker logs every task's result.
    workers = [
        Worker("runyard", [str(RUNYARD_BIN / "runyard"), "celery", "worker", "-q", f"{queue}-runyard",
                           "-c", str(CONCURRENCY), "-I", "bench_runyard_jobs", "-n", f"ry-{run_id}@{host}"], env,
               work / "runyard-worker.log", f"ping:ry-{run_id}@{host}"),
        Worker("celery", [str(RUNYARD_BIN / "celery"), "-A", "bench_raw", "worker", "-Q", f"{queue}-raw",
                          "-c", str(CONCURRENCY), "--without-gossip", "-l", "WARNING", "-n", f"raw-{run_id}@{host}"],
               env, work / "celery-worker.log", f"ping:raw-{run_id}@{host}"),
    ]
    results: dict[str, Any] = {}
    try:
        for w in workers:
            w.wait_ready()
        print(f"{N} no-op steps, a worker of {CONCURRENCY} processes per system, Redis broker; {reps} repetitions")
        times = measure_runyard_and_raw(work, queue, reps)
    finally:
        for w in workers:
            w.stop()
    dagster_times, dagster_note = (None, "skipped (--no-dagster)") if args.no_dagster else measure_dagster(
        work, dagster_reps)

    import celery

    rows = {"runyard": times["runyard"], "celery": times["celery"]}
    if dagster_times:
        rows["dagster"] = dagster_times
    med = {k: statistics.median(v) for k, v in rows.items()}
    print()
    print("| system | runs | median s | steps/s | ratio to raw Celery |")
    print("|---|---|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {len(v)} | {med[k]:.3f} | {N / med[k]:.0f} | {med[k] / med['celery']:.2f}x |")
    if not dagster_times:
        print(f"\ndagster: {dagster_note}")
    results = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load": os.getloadavg()},
        "steps": N,
        "worker_processes": CONCURRENCY,
        "broker": "redis",
        "celery": celery.__version__,
        "times": rows,
        "medians": med,
        "ratio_runyard_to_celery": med["runyard"] / med["celery"],
        "ratio_dagster_to_runyard": (med["dagster"] / med["runyard"]) if dagster_times else None,
        "dagster": dagster_note,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nsaved {RESULTS.relative_to(REPO)}")
    if not os.environ.get("BENCH_KEEP"):
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
