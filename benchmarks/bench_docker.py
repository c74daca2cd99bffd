#!/usr/bin/env python3
"""Side-by-side Docker benchmark: runyard's ``docker`` executor and ``docker`` run
launcher against the floor, plain ``docker run``, on the same image.

* executor: 20 no-op steps at ``max_concurrent=2``, each in a container of its own
  (``execute_job`` in this process, engine here) against the floor: 20 x
  ``docker run --rm IMAGE python3 -c pass``, 2 at a time.
* launcher: ``runyard job launch --wait`` of a 1-step job through the ``docker`` run
  launcher (the step runs in the run container, executor ``in_process``; and, as a second
  row, each step in a container of its own, executor ``docker``) against one
  ``docker run --rm IMAGE python3 -c pass``.

Measurements alternate between runyard and the floor, so both see the same machine load;
the report gives medians and ratios and saves every repetition to
``benchmarks/results/docker.json``. It is a script, not a test: it asserts nothing.

    python3 benchmarks/bench_docker.py              # 5 repetitions (~3 min)
    python3 benchmarks/bench_docker.py --reps 2     # quicker

Needs the Docker engine (scripts/services.sh docker) and the test image
(scripts/build-test-image.sh); it runs both first. No peer venv: the floor is docker itself.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "docker.json"
PYTHON = REPO / ".venv" / "bin" / "python"
LABEL = "runyard.bench=1"

JOBS = '''
from runyard import job, step


@step
def noop(i: int) -> int:
    return i


@job
def wide():
    for i in range(STEPS):
        noop(i)


@job
def one():
    noop(0)
'''


def sh(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, check=True, **kw)


def floor_many(image: str, n: int, concurrency: int) -> float:
    """n x `docker run --rm IMAGE python3 -c pass`, `concurrency` at a time."""
    todo = list(range(n))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                todo.pop()
            subprocess.run(["docker", "run", "--rm", "--label", LABEL, image, "python3", "-c", "pass"], check=True,
                           stdout=subprocess.DEVNULL)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def runyard_executor(home: Path, jobs: Path, image: str, concurrency: int) -> float:
    """The wide job through the docker executor, in a fresh process (engine in it)."""
    code = f"""
import time
from runyard import Instance, execute_job
from runyard.definitions import CodePointer
from runyard.loader import load_job
job = load_job(CodePointer(file={str(jobs)!r}), "wide")[0]
instance = Instance({str(home)!r})
rc = {{"execution": {{"docker": {{"image": {image!r}, "pull_policy": "never", "max_concurrent": {concurrency},
                                 "labels": {{"runyard.bench": "1"}}}}}}}}
start = time.perf_counter()
result = execute_job(job, instance=instance, run_config=rc)
elapsed = time.perf_counter() - start
assert result.success, result.events
print(elapsed)
"""
    out = sh([str(PYTHON), "-c", code], env={**os.environ, "RUNYARD_HOME": str(home)})
    return float(out.stdout.strip().splitlines()[-1])


def runyard_launch(home: Path, jobs: Path) -> float:
    start = time.perf_counter()
    sh([str(PYTHON), "-m", "runyard", "job", "launch", "--wait", "-f", str(jobs), "-j", "one"],
       env={**os.environ, "RUNYARD_HOME": str(home)})
    return time.perf_counter() - start


def write_home(home: Path, image: str, executor: str) -> None:
    settings = {"image": image, "pull_policy": "never", "labels": {"runyard.bench": "1"}}
    import yaml

    config: dict[str, Any] = {"run_launcher": {"docker": settings}}
    config["executor"] = {"docker": settings} if executor == "docker" else {"in_process": {}}
    home.mkdir(parents=True, exist_ok=True)
    (home / "runyard.yaml").write_text(yaml.safe_dump(config))


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=2)
    args = ap.parse_args()
    sh(["bash", "scripts/services.sh", "docker"])
    image = sh(["bash", "scripts/build-test-image.sh"]).stdout.strip().splitlines()[-1]
    tmp = Path(tempfile.mkdtemp(prefix="runyard-bench-docker-"))
    try:
        jobs = tmp / "jobs.py"
        jobs.write_text(JOBS.replace("STEPS", str(args.steps)))
        exec_home = tmp / "exec-home"
        write_home(exec_home, image, "in_process")
        launch_home = tmp / "launch-home"
        write_home(launch_home, image, "in_process")
        launch_docker_home = tmp / "launch-docker-home"
        write_home(launch_docker_home, image, "docker")
        # Warm-up: image layers, page cache, the engine's first container of each kind.
        floor_many(image, 2, 2)
        runyard_executor(exec_home, jobs, image, args.concurrency)
        runyard_launch(launch_home, jobs)
        reps: dict[str, list[float]] = {k: [] for k in
                                        ("executor", "executor_floor", "launch", "launch_docker", "launch_floor")}
        for i in range(args.reps):
            reps["executor_floor"].append(floor_many(image, args.steps, args.concurrency))
            reps["executor"].append(runyard_executor(exec_home, jobs, image, args.concurrency))
            reps["launch_floor"].append(floor_many(image, 1, 1))
            reps["launch"].append(runyard_launch(launch_home, jobs))
            reps["launch_docker"].append(runyard_launch(launch_docker_home, jobs))
            print(f"rep {i + 1}/{args.reps}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in reps.items()), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        left = sh(["docker", "ps", "-aq", "--filter", f"label={LABEL}"]).stdout.split()
        if left:
            subprocess.run(["docker", "rm", "-f", *left], stdout=subprocess.DEVNULL)
    m = {k: med(v) for k, v in reps.items()}
    rows = [
        (f"{args.steps} no-op steps, max_concurrent={args.concurrency}: docker executor", m["executor"],
         m["executor_floor"]),
        ("job launch --wait, 1 step (launcher docker, executor in_process)", m["launch"], m["launch_floor"]),
        ("job launch --wait, 1 step (launcher docker, executor docker)", m["launch_docker"], m["launch_floor"]),
    ]
    print(f"\n{'measurement':<72} {'runyard':>9} {'floor':>9} {'ratio':>6}")
    for name, ours, floor in rows:
        print(f"{name:<72} {ours:>8.2f}s {floor:>8.2f}s {ours / floor:>5.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    RESULTS.write_text(json.dumps({
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_at_end": load},
        "docker": sh(["docker", "version", "--format", "{{.Server.Version}}"]).stdout.strip(),
        "image": image,
        "steps": args.steps,
        "concurrency": args.concurrency,
        "repetitions": reps,
        "medians": m,
        "ratios": {"executor": m["executor"] / m["executor_floor"], "launch": m["launch"] / m["launch_floor"],
                   "launch_docker": m["launch_docker"] / m["launch_floor"]},
    }, indent=2) + "\n")
    print(f"\nsaved {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    sys.exit(main())
