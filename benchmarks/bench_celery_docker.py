#!/usr/bin/env python3
"""Side-by-side benchmark of Celery in front of containers: 20 no-op steps at
``max_concurrent=2``, each in a container (pod) of its own, through

* ``celery_docker``: Celery tasks on one Redis, run by one ``runyard celery worker
  --steps-in docker -c 2`` that starts each step's container (started once, warm);
* ``docker``: the same job through the ``docker`` executor (the engine starts the containers);
* the docker floor: 20 x ``docker run --rm IMAGE python3 -c pass``, 2 at a time;
* Dagster's ``celery_docker_executor`` on the same workload: 20 independent no-op ops, one
  ``dagster-celery worker start -A dagster_celery_docker.app -- --concurrency=2`` (a prefork pool
  of 2, started once, warm) that runs each step's container (``dagster api execute_step``) from
  an image built locally by setup-peers-celery-docker.sh, a Dagster instance on PostgreSQL (a
  database made for the run, dropped at the end) that the step containers reach over
  ``network: host``; the engine in the peer venv ``benchmarks/.venv-peers-celery-docker``. If the
  venv or the image is missing, or ``--no-dagster``, the report says so and why;

and with ``--backends k8s`` (the default runs both), on the test cluster:

* ``celery_k8s``: the same, with one ``runyard celery worker --steps-in k8s -c 2`` that runs
  each step as a Job;
* ``k8s``: the same job through the ``k8s`` executor (the engine creates the Jobs);
* the k8s floor: 20 bare Jobs (``python3 -c pass``), 2 at a time, created, watched and
  deleted with the backend's client (`bench_k8s.floor_many`).

Targets (issue 16): each Celery executor within 1.2x of its non-Celery executor, and
``celery_docker`` ahead of Dagster's ``celery_docker_executor`` (Dagster's
``celery_k8s_job_executor`` is not measured). Measurements alternate, so all of a backend see
the same machine load; the report gives medians and ratios and saves every repetition, with
the load average, to ``benchmarks/results/celery-docker.json`` and ``celery-k8s.json``. A
script, not a test: it asserts nothing.

    benchmarks/setup-peers-celery-docker.sh                        # once: Dagster's venv and image
    python3 benchmarks/bench_celery_docker.py                      # 5 repetitions of each (~20 min)
    python3 benchmarks/bench_celery_docker.py --backends docker --no-dagster
    python3 benchmarks/bench_celery_docker.py --backends k8s --reps 3

Needs the Docker engine, Redis, the test image (scripts/build-test-image.sh), for Dagster
PostgreSQL and benchmarks/setup-peers-celery-docker.sh (run once by hand: it makes the peer venv;
this script re-runs it, which is quick when nothing changed, to keep the image current), and for
k8s the test cluster (scripts/services.sh k8s); it starts the services first. Results go to
Redis database 11 (Dagster's: 12, expiring after 10 minutes).
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
import yaml
from bench_docker import JOBS, floor_many, runyard_executor, sh

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = {"docker": HERE / "results" / "celery-docker.json", "k8s": HERE / "results" / "celery-k8s.json"}
PYTHON = REPO / ".venv" / "bin" / "python"
RUNYARD = REPO / ".venv" / "bin" / "runyard"
LABEL = "runyard.bench=1"
REDIS = os.environ.get("RUNYARD_BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
DAGSTER = "dagster_celery_docker"
PEER_VENV = HERE / ".venv-peers-celery-docker"
PEER_BIN = PEER_VENV / "bin"
DAGSTER_IMAGE = os.environ.get("RUNYARD_BENCH_DAGSTER_IMAGE", "runyard-test/dagster-celery-docker:latest")
DAGSTER_REDIS = os.environ.get("RUNYARD_BENCH_DAGSTER_REDIS_URL", "redis://127.0.0.1:6379/12")
# Trust auth on the test server; the database is made (and dropped) per run.
DAGSTER_PG = os.environ.get("RUNYARD_BENCH_DAGSTER_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432")
JOB_DIR = HERE / "workloads"  # dagster_celery_docker_job.py; the image has it at the same path


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


class DagsterPeer:
    """Dagster's celery_docker_executor: a PostgreSQL-backed DAGSTER_HOME, one
    ``dagster-celery worker`` (prefork pool of ``concurrency``) and a fresh engine process per run."""

    def __init__(self, tmp: Path, steps: int, concurrency: int) -> None:
        self.home = tmp / "dagster-home"
        self.home.mkdir()
        self.db = f"dagster_bench_{secrets.token_hex(4)}"
        self.steps = steps
        self.concurrency = concurrency
        self.worker: subprocess.Popen[bytes] | None = None
        self.task_seconds: list[list[float]] = []  # per timed run, from the worker's log
        self.env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.env.update(DAGSTER_HOME=str(self.home), RUNYARD_BENCH_STEPS=str(steps),
                        PATH=f"{PEER_BIN}{os.pathsep}{os.environ['PATH']}")
        # config_source: results expire, so nothing of the runs' is left in Redis for long.
        celery = {"broker": DAGSTER_REDIS, "backend": DAGSTER_REDIS, "config_source": {"result_expires": 600}}
        self.run_config = {"execution": {"config": {**celery, "docker": {
            "image": DAGSTER_IMAGE, "network": "host",
            # Forwarded from the worker's environment into each step container.
            "env_vars": ["DAGSTER_HOME", "RUNYARD_BENCH_STEPS"],
            "container_kwargs": {"labels": {"runyard.bench": "1", "runyard.test": "1"}}}}}}
        (self.home / "worker.yaml").write_text(yaml.safe_dump({"execution": {"config": celery}}))

    def _sql(self, statement: str) -> None:
        code = ("import sys, psycopg2\n"
                "c = psycopg2.connect(sys.argv[1]); c.autocommit = True\n"
                "c.cursor().execute(sys.argv[2]); c.close()\n")
        url = DAGSTER_PG.replace("postgresql+psycopg2://", "postgresql://") + "/postgres"
        subprocess.run([str(PEER_BIN / "python"), "-c", code, url, statement], check=True, capture_output=True,
                       text=True)

    def start(self) -> None:
        self._sql(f"CREATE DATABASE {self.db}")
        (self.home / "dagster.yaml").write_text(yaml.safe_dump({
            "storage": {"postgres": {"postgres_url": f"{DAGSTER_PG}/{self.db}"}},
            "telemetry": {"enabled": False}}))
        log = self.home / "worker.log"
        self.worker = subprocess.Popen(
            ["setpriv", "--pdeathsig", "TERM",
             str(PEER_BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery_docker.app",
             "-y", str(self.home / "worker.yaml"), "-l", "INFO", "--",
             f"--concurrency={self.concurrency}", "--without-gossip"],
            env=self.env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True, cwd=self.home)
        deadline = time.monotonic() + 120
        while b" ready." not in log.read_bytes():
            if self.worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the dagster-celery worker did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)

    def run(self, timed: bool = True) -> float:
        """The wide job with execute_job in a fresh engine process (cwd: the job module's
        directory, so the reconstructable pointer the steps get names it); the time of the call."""
        code = """
import sys, time
sys.path.insert(0, ".")
import json
from dagster import DagsterInstance, execute_job, reconstructable
import dagster_celery_docker_job as jobs
instance = DagsterInstance.get()
job = reconstructable(jobs.wide)
run_config = json.loads(sys.argv[1])
start = time.perf_counter()
with execute_job(job, instance=instance, run_config=run_config) as result:
    elapsed = time.perf_counter() - start
    assert result.success, "the dagster run failed"
print(elapsed)
"""
        log = self.home / "worker.log"
        before = log.stat().st_size
        proc = subprocess.run([str(PEER_BIN / "python"), "-c", code, json.dumps(self.run_config)], env=self.env,
                              cwd=JOB_DIR, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"the dagster run failed:\n{proc.stderr[-3000:]}")
        if timed:
            with log.open("rb") as f:
                f.seek(before)
                lines = f.read().decode(errors="replace").splitlines()
            self.task_seconds.append([float(line.split(" succeeded in ")[1].split("s:")[0])
                                      for line in lines if "execute_step_docker[" in line and " succeeded in " in line])
        return float(proc.stdout.strip().splitlines()[-1])

    def probe(self, n: int = 3) -> dict[str, float]:
        """Medians of n sequential ``docker run --rm`` of the step image: ``python -c pass``, and
        the imports a step's ``dagster api execute_step`` begins with (no run, no database)."""
        out = {}
        for name, code in (("python_pass", "pass"),
                           ("import_dagster", "import dagster, dagster_postgres, dagster_celery_docker_job")):
            times = []
            for _ in range(n):
                start = time.perf_counter()
                subprocess.run(["docker", "run", "--rm", "--label", "runyard.test=1", "--label", "runyard.bench=1",
                                "--network", "none", DAGSTER_IMAGE, "python", "-c", code], check=True,
                               capture_output=True)
                times.append(time.perf_counter() - start)
            out[name] = statistics.median(times)
        return out

    def stop(self) -> None:
        if self.worker is not None:
            stop_worker(self.worker)
        try:
            self._sql(f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)")
        except subprocess.CalledProcessError as e:
            print(f"dagster: could not drop database {self.db}: {e.stderr.strip()[-300:]}", flush=True)


def dagster_versions() -> str:
    out = subprocess.run([str(PEER_BIN / "python"), "-c",
                          "from importlib.metadata import version as v; print(', '.join(f'{p} {v(p)}' for p in "
                          "('dagster', 'dagster-celery', 'dagster-celery-docker', 'dagster-postgres', 'celery')))"],
                         capture_output=True, text=True)
    return out.stdout.strip()


def dagster_available(args: argparse.Namespace) -> str | None:
    """None when Dagster's row can run, else why not (printed, and saved in the results)."""
    if args.no_dagster:
        return "skipped (--no-dagster)"
    if not (PEER_BIN / "python").exists():
        return f"peer venv missing ({PEER_VENV.relative_to(REPO)}): run benchmarks/setup-peers-celery-docker.sh"
    # Keeps the image current (quick when it is); it fails with its reason if it cannot.
    proc = subprocess.run(["bash", str(HERE / "setup-peers-celery-docker.sh")], cwd=REPO, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        return f"setup-peers-celery-docker.sh failed: {proc.stderr.strip()[-1500:]}"
    return None


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
    dagster: DagsterPeer | None = None
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
            if args.dagster_unavailable is None:
                dagster = DagsterPeer(tmp, args.steps, args.concurrency)
                try:
                    dagster.start()
                except (RuntimeError, subprocess.CalledProcessError) as e:
                    err = e.stderr if isinstance(e, subprocess.CalledProcessError) else str(e)
                    args.dagster_unavailable = f"could not start: {err.strip()[-1500:]}"
                    print(f"dagster: {args.dagster_unavailable}", flush=True)
                    dagster.stop()
                    dagster = None
        else:
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
        reps: dict[str, list[float]] = {"floor": [], backend: [], executor: [],
                                        **({DAGSTER: []} if dagster is not None else {}), "load": []}

        def dagster_failed(e: Exception) -> None:
            """A failed Dagster run ends its row (recorded with the error); the others go on."""
            args.dagster_unavailable = str(e).strip()[-2000:]
            print(f"{DAGSTER}: {args.dagster_unavailable}", flush=True)
            reps.pop(DAGSTER, None)

        if dagster is not None:
            try:
                dagster.run(timed=False)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                dagster_failed(e)
        for i in range(args.reps):
            reps["floor"].append(floor(args.steps, args.concurrency))
            reps[backend].append(own())
            reps[executor].append(celery_run(executor, home, jobs, args.concurrency, env))
            if DAGSTER in reps and dagster is not None:
                try:
                    reps[DAGSTER].append(dagster.run())
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    dagster_failed(e)
            reps["load"].append(os.getloadavg()[0])
            print(f"{backend} rep {i + 1}/{args.reps}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in reps.items()),
                  flush=True)
        if DAGSTER in reps and dagster is not None:
            args.dagster_task_seconds = dagster.task_seconds
            args.dagster_probe = dagster.probe()
            print(f"{DAGSTER} step image, docker run --rm (median of 3): " +
                  ", ".join(f"{k} {v:.2f}s" for k, v in args.dagster_probe.items()), flush=True)
        return reps
    finally:
        if dagster is not None:
            dagster.stop()
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
    print(f"\n{'measurement':<68} {'median':>8} {f'vs {backend}':>10} {'vs floor':>9}")
    names = (executor, backend, "floor", *((DAGSTER,) if DAGSTER in m else ()))
    for name in names:
        label = f"{title}: {name}" + (f" (worker -c {args.concurrency})" if name == DAGSTER else "")
        print(f"{label:<68} {m[name]:>7.2f}s {m[name] / m[backend]:>9.2f}x {m[name] / m['floor']:>8.2f}x")
    dagster: dict[str, Any] | str
    if backend != "docker":
        dagster = "not measured (Dagster's celery_k8s_job_executor: see benchmarks/README.md)"
    elif DAGSTER in m:
        tasks = [t for run in args.dagster_task_seconds for t in run]
        dagster = {"versions": dagster_versions(), "image": DAGSTER_IMAGE,
                   "worker": f"dagster-celery worker start -A dagster_celery_docker.app -- "
                             f"--concurrency={args.concurrency} (prefetch multiplier 1)",
                   "task_seconds_per_rep": args.dagster_task_seconds,
                   "step_image_docker_run_seconds": args.dagster_probe,
                   "task_seconds_median": statistics.median(tasks) if tasks else None}
        print(f"{executor} vs {DAGSTER}: {m[executor] / m[DAGSTER]:.2f}x; Dagster: {dagster['versions']}; "
              f"median Celery task (one step's container, worker log) {dagster['task_seconds_median']:.2f}s "
              f"over {len(tasks)} tasks")
    else:
        dagster = f"unavailable: {args.dagster_unavailable}"
        print(f"{DAGSTER}: {dagster}")
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
                   f"{backend}_vs_floor": m[backend] / m["floor"],
                   **({f"{DAGSTER}_vs_{backend}": m[DAGSTER] / m[backend],
                       f"{DAGSTER}_vs_floor": m[DAGSTER] / m["floor"],
                       f"{executor}_vs_{DAGSTER}": m[executor] / m[DAGSTER]} if DAGSTER in m else {})},
        "dagster_celery_docker" if backend == "docker" else "dagster_celery_k8s": dagster,
    }, indent=2) + "\n")
    print(f"saved {out.relative_to(REPO)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--backends", default="docker,k8s", help="comma-separated: docker, k8s (default: both)")
    ap.add_argument("--no-dagster", action="store_true",
                    help="skip Dagster's celery_docker_executor (the docker part runs it when its peer venv exists)")
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - {"docker", "k8s"})
    if unknown:
        ap.error(f"--backends: unknown {', '.join(unknown)} (use docker and/or k8s)")
    sh(["bash", "scripts/services.sh", "docker", "redis"])
    args.dagster_unavailable = dagster_available(args) if "docker" in backends else "docker not among --backends"
    if "docker" in backends and args.dagster_unavailable:
        print(f"{DAGSTER}: unavailable: {args.dagster_unavailable}", flush=True)
    if "k8s" in backends or args.dagster_unavailable is None:
        sh(["bash", "scripts/services.sh", "postgres", *(["k8s"] if "k8s" in backends else [])])
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
