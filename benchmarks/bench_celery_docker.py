#!/usr/bin/env python3
"""Side-by-side benchmark of Celery in front of containers: 20 no-op steps at
``max_concurrent=2``, each in a container (pod) of its own, through

* ``celery_docker``: Celery tasks on one Redis, run by one ``runyard celery worker
  --steps-in docker -c 2`` that starts each step's container (started once, warm);
* ``docker``: the same job through the ``docker`` executor (the engine starts the containers);
* the docker floor: 20 x ``docker run --rm IMAGE python3 -c pass``, 2 at a time;

and with ``--backends k8s`` (the default runs both), on the test cluster:

* ``celery_k8s``: the same, with one ``runyard celery worker --steps-in k8s -c 2`` that runs
  each step as a Job;
* ``k8s``: the same job through the ``k8s`` executor (the engine creates the Jobs);
* the k8s floor: 20 bare Jobs (``python3 -c pass``), 2 at a time, created, watched and
  deleted with the backend's client (`bench_k8s.floor_many`).

Target (issue 16): each Celery executor within 1.2x of its non-Celery executor. Dagster's
``celery_docker_executor`` is not measured (see benchmarks/README.md, "Celery in front of
containers", for why). Measurements alternate, so all three of a backend see the same machine
load; the report gives medians and ratios and saves every repetition, with the load average,
to ``benchmarks/results/celery-docker.json`` and ``celery-k8s.json``. A script, not a test:
it asserts nothing.

    python3 benchmarks/bench_celery_docker.py                      # 5 repetitions of each (~8 min)
    python3 benchmarks/bench_celery_docker.py --backends k8s --reps 3

Needs the Docker engine, Redis, the test image (scripts/build-test-image.sh) and for k8s the
test cluster (scripts/services.sh k8s); it runs those first. Results go to Redis database 11.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_k8s
from bench_docker import JOBS, floor_many, runyard_executor, sh

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = {"docker": HERE / "results" / "celery-docker.json", "k8s": HERE / "results" / "celery-k8s.json"}
PYTHON = REPO / ".venv" / "bin" / "python"
RUNYARD = REPO / ".venv" / "bin" / "runyard"
LABEL = "runyard.bench=1"
REDIS = os.environ.get("RUNYARD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")


def celery_run(executor: str, home: Path, jobs: Path, concurrency: int, env: dict[str, str]) -> float:
    """The wide job through ``executor`` (celery_docker, celery_k8s), in a fresh process
    (engine in it); settings from home."""
    code = f"""
import time
from runyard import Instance, execute_job
from runyard.plugin import CodePointer, preload_job
job = preload_job(CodePointer(file={str(jobs)!r}), "wide")
instance = Instance({str(home)!r})
start = time.perf_counter()
result = execute_job(job, instance=instance, executor={executor!r},
                     run_config={{"execution": {{{executor!r}: {{"max_concurrent": {concurrency}}}}}}})
elapsed = time.perf_counter() - start
assert result.success, result.events
print(elapsed)
"""
    out = sh([str(PYTHON), "-c", code], env=env)
    return float(out.stdout.strip().splitlines()[-1])


def write_home(home: Path, executor: str, queue: str, section: dict[str, object]) -> None:
    """``executor: {celery_docker: {..., docker: section}}`` (or celery_k8s with ``k8s:``)."""
    import yaml

    key = executor.removeprefix("celery_")
    config = {"executor": {executor: {"broker": REDIS, "default_queue": queue, key: section}}}
    home.mkdir(parents=True, exist_ok=True)
    (home / "runyard.yaml").write_text(yaml.safe_dump(config))


def start_worker(home: Path, jobs_dir: Path, concurrency: int, env: dict[str, str],
                 steps_in: str) -> subprocess.Popen[bytes]:
    log = (home / "worker.log").open("wb")
    proc = subprocess.Popen(
        # setpriv: the worker gets SIGTERM if this script is killed before its `finally` runs
        # (it is in a session of its own, so nothing else would stop it).
        ["setpriv", "--pdeathsig", "TERM",
         str(RUNYARD), "celery", "worker", "--steps-in", steps_in, "-c", str(concurrency), "-l", "INFO",
         "--code-location", str(jobs_dir), "--output-store", str(home / "outputs")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=home)
    deadline = time.monotonic() + 60
    while b" ready." not in (home / "worker.log").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the celery worker did not start:\n{(home / 'worker.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return proc


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cleanup_redis(queue: str, home: Path) -> None:
    """The benchmark's queue and the results of its runs' tasks (ids RUN_ID.ATTEMPT_ID), no more."""
    import redis
    from runyard import Instance

    instance = Instance(home)
    try:
        runs = [r.run_id for r in instance.storage.list_runs(limit=10_000)]
    finally:
        instance.storage.close()
    client = redis.Redis.from_url(REDIS)
    keys = list(client.scan_iter(match=f"*{queue}*"))
    for run_id in runs:
        keys += list(client.scan_iter(match=f"celery-task-meta-{run_id}.*"))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start:start + 500])


def measure(backend: str, args: argparse.Namespace, image: str, tmp: Path, queue: str) -> dict[str, list[float]]:
    """Alternating repetitions of the Celery executor in front of ``backend``, the backend's
    own executor and its floor; the load average after each."""
    executor = f"celery_{backend}"
    jobs = tmp / "jobs.py"
    jobs.write_text(JOBS.replace("STEPS", str(args.steps)))
    home = tmp / f"{executor}-home"
    env = {**os.environ, "RUNYARD_HOME": str(home), "RUNYARD_SIGNING_KEY": secrets.token_hex(32)}
    worker = None
    c: Any = None
    ns = ""
    try:
        if backend == "docker":
            write_home(home, executor, queue, {"image": image, "pull_policy": "never",
                                               "labels": {"runyard.bench": "1"}})
            own_home = tmp / "docker-home"
            own_home.mkdir()

            def own() -> float:
                return runyard_executor(own_home, jobs, image, args.concurrency)

            def floor(n: int, concurrency: int) -> float:
                return floor_many(image, n, concurrency)
        else:
            import yaml

            c = bench_k8s.cluster()
            ns = bench_k8s.make_namespace(c)
            section = bench_k8s.settings(image, ns, tmp)
            write_home(home, executor, queue, section)
            own_home = tmp / "k8s-home"
            own_home.mkdir()
            (own_home / "runyard.yaml").write_text(yaml.safe_dump({"executor": {"k8s": section}}))

            def own() -> float:
                return bench_k8s.runyard_executor(own_home, jobs, args.concurrency)

            def floor(n: int, concurrency: int) -> float:
                return bench_k8s.floor_many(c, ns, image, n, concurrency)
        worker = start_worker(home, tmp, args.concurrency, env, backend)
        # Warm-up: image layers, page cache, the worker's pool processes' first run.
        floor(2, 2)
        own()
        celery_run(executor, home, jobs, args.concurrency, env)
        reps: dict[str, list[float]] = {"floor": [], backend: [], executor: [], "load": []}
        for i in range(args.reps):
            reps["floor"].append(floor(args.steps, args.concurrency))
            reps[backend].append(own())
            reps[executor].append(celery_run(executor, home, jobs, args.concurrency, env))
            reps["load"].append(os.getloadavg()[0])
            print(f"{backend} rep {i + 1}/{args.reps}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in reps.items()),
                  flush=True)
        return reps
    finally:
        if worker is not None:
            stop_worker(worker)
        if (home / "runyard.yaml").exists():
            cleanup_redis(queue, home)
        if c is not None:
            if ns:
                c.delete_namespace(ns)
            c.close()


def report(backend: str, args: argparse.Namespace, image: str, reps: dict[str, list[float]]) -> None:
    executor = f"celery_{backend}"
    m = {k: statistics.median(v) for k, v in reps.items() if k != "load"}
    title = f"{args.steps} no-op steps, max_concurrent={args.concurrency}"
    print(f"\n{'measurement':<52} {'median':>8} {f'vs {backend}':>10} {'vs floor':>9}")
    for name in (executor, backend, "floor"):
        label = f"{title}: {name}"
        print(f"{label:<52} {m[name]:>7.2f}s {m[name] / m[backend]:>9.2f}x {m[name] / m['floor']:>8.2f}x")
    load = os.getloadavg()
    print(f"load average: {min(reps['load']):.2f}-{max(reps['load']):.2f} during the repetitions; "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end")
    out = RESULTS[backend]
    out.parent.mkdir(parents=True, exist_ok=True)
    engine = (sh(["docker", "version", "--format", "{{.Server.Version}}"]).stdout.strip() if backend == "docker"
              else "Kubernetes 1.20.2 (Debian src:kubernetes, scripts/services.d/k8s.sh)")
    out.write_text(json.dumps({
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_at_end": load,
                    "loadavg_per_rep": reps["load"]},
        backend: engine,
        "image": image,
        "steps": args.steps,
        "concurrency": args.concurrency,
        "repetitions": {k: v for k, v in reps.items() if k != "load"},
        "medians": m,
        "ratios": {f"{executor}_vs_{backend}": m[executor] / m[backend],
                   f"{executor}_vs_floor": m[executor] / m["floor"],
                   f"{backend}_vs_floor": m[backend] / m["floor"]},
        "dagster_celery_docker": "not measured (see benchmarks/README.md)",
    }, indent=2) + "\n")
    print(f"saved {out.relative_to(REPO)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--backends", default="docker,k8s", help="comma-separated: docker, k8s (default: both)")
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - {"docker", "k8s"})
    if unknown:
        ap.error(f"--backends: unknown {', '.join(unknown)} (use docker and/or k8s)")
    sh(["bash", "scripts/services.sh", "docker", "redis", *(["postgres", "k8s"] if "k8s" in backends else [])])
    image = sh(["bash", "scripts/build-test-image.sh"]).stdout.strip().splitlines()[-1]
    results = {}
    for backend in backends:
        tmp = Path(tempfile.mkdtemp(prefix=f"runyard-bench-celery-{backend}-"))
        try:
            results[backend] = measure(backend, args, image, tmp, f"runyard-bench-{secrets.token_hex(4)}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            left = sh(["docker", "ps", "-aq", "--filter", f"label={LABEL}"]).stdout.split()
            if left:
                subprocess.run(["docker", "rm", "-f", *left], stdout=subprocess.DEVNULL)
    for backend, reps in results.items():
        report(backend, args, image, reps)


if __name__ == "__main__":
    main()
