#!/usr/bin/env python3
"""Side-by-side ECS benchmark on the emulator (ministack: ECS tasks as real containers on
the local Docker engine): runyard's ``ecs`` run launcher and ``ecs`` executor against the
floor, bare RunTask calls of the same image waited to STOPPED.

* launcher: ``runyard job launch --wait`` of a 1-step job through the ``ecs`` run launcher
  (the step runs in the run worker's task, executor ``in_process``), a whole command,
  against the floor: a fresh process of the same interpreter that imports boto3, makes
  a client, calls RunTask of ``python3 -c pass`` (the same image) and polls DescribeTasks
  until STOPPED. Also shown: the same RunTask from a warm process (boto3 imported, client
  made: the floor of earlier runs of this script).
* executor: 20 no-op steps at ``max_concurrent=2``, each an ECS task of its own, timed
  around ``execute_job`` in a fresh process (its boto3 import and clients included),
  against 20 bare tasks, 2 at a time, timed in a fresh process from its boto3 import on;
  and from a warm process.

Both sides poll at the same interval (``--poll``, 0.1 s; runyard's followers poll 0.1 s
after a change, backing off to it). Measurements alternate between runyard and the
floors, so all see the same load; the report gives medians and ratios and saves every
repetition to ``benchmarks/results/ecs.json``. It is a script, not a test.
``benchmarks/bench_ecs_split.py`` says where each step's time goes.

    python3 benchmarks/bench_ecs.py              # 5 repetitions
    python3 benchmarks/bench_ecs.py --reps 2     # quicker

Needs ministack (scripts/services.sh ministack) and the test image
(scripts/build-test-image.sh); it runs both first.
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
RESULTS = HERE / "results" / "ecs.json"
PYTHON = REPO / ".venv" / "bin" / "python"
REGION = "us-east-1"
CLUSTER = "runyard-bench"

JOBS = '''
from runyard import job, step


@step
def noop(i: int) -> int:
    return i


@job
def wide():
    for i in range(STEPS):
        noop.alias(f"noop_{i}")(i)


@job
def one():
    noop(0)
'''


def sh(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, check=True, **kw)


class Floor:
    """Bare RunTask + DescribeTasks until STOPPED, on a task definition of the same image."""

    def __init__(self, endpoint: str, image: str, poll: float) -> None:
        import boto3

        self.ecs = boto3.client("ecs", endpoint_url=endpoint, region_name=REGION)
        self.poll = poll
        self.td = self.ecs.register_task_definition(
            family="runyard-bench-floor", networkMode="host",
            containerDefinitions=[{"name": "main", "image": image, "essential": True, "memoryReservation": 256}],
        )["taskDefinition"]["taskDefinitionArn"]

    def one(self) -> None:
        arn = self.ecs.run_task(cluster=CLUSTER, taskDefinition=self.td, launchType="EC2", overrides={
            "containerOverrides": [{"name": "main", "command": ["python3", "-c", "pass"]}]})["tasks"][0]["taskArn"]
        while True:
            task = self.ecs.describe_tasks(cluster=CLUSTER, tasks=[arn])["tasks"][0]
            if task["lastStatus"] == "STOPPED":
                assert task["containers"][0].get("exitCode") == 0, task
                return
            time.sleep(self.poll)

    def many(self, n: int, concurrency: int) -> float:
        todo = list(range(n))
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if not todo:
                        return
                    todo.pop()
                self.one()

        start = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - start


# A floor in a fresh process: the same interpreter, boto3 imported and a client made inside
# the timing (as runyard's own run does), then N bare tasks, CONCURRENCY at a time.
FRESH_FLOOR = """
import sys, time
start = time.perf_counter()
sys.path.insert(0, sys.argv[1])
from bench_ecs import Floor
floor = Floor(sys.argv[2], sys.argv[3], float(sys.argv[4]))
floor.many(int(sys.argv[5]), int(sys.argv[6]))
print(time.perf_counter() - start)
"""


def fresh_floor(endpoint: str, image: str, poll: float, n: int, concurrency: int) -> tuple[float, float]:
    """(seconds inside the process from its boto3 import, seconds of the whole process)."""
    start = time.perf_counter()
    out = sh([str(PYTHON), "-c", FRESH_FLOOR, str(HERE), endpoint, image, str(poll), str(n), str(concurrency)])
    return float(out.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def signing_key_secret(endpoint: str) -> str:
    """The step workers' signing key in the emulator's Secrets Manager (signing_key_secret)."""
    import secrets

    import boto3

    sm = boto3.client("secretsmanager", endpoint_url=endpoint, region_name=REGION)
    try:
        return sm.describe_secret(SecretId="runyard/bench/signing-key")["ARN"]
    except sm.exceptions.ResourceNotFoundException:
        return sm.create_secret(Name="runyard/bench/signing-key", SecretString=secrets.token_hex(32))["ARN"]


def settings(endpoint: str, image: str, home: Path, jobs: Path, poll: float) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "region": REGION, "cluster": CLUSTER, "image": image, "launch_type": "EC2",
            "network_mode": "host", "volumes": [f"{home.parent}:{home.parent}"], "poll_interval": poll,
            "log_configuration": {"group": "/runyard/bench"}, "signing_key_secret": signing_key_secret(endpoint)}


def write_home(home: Path, config: dict[str, Any]) -> None:
    import yaml

    home.mkdir(parents=True, exist_ok=True)
    (home / "runyard.yaml").write_text(yaml.safe_dump(config))


def runyard_executor(home: Path, jobs: Path, ecs: dict[str, Any], concurrency: int) -> float:
    """The wide job through the ecs executor, in a fresh process (engine in it)."""
    code = f"""
import time
from runyard import Instance, execute_job
from runyard.definitions import CodePointer
from runyard.loader import load_job
job = load_job(CodePointer(file={str(jobs)!r}), "wide")[0]
instance = Instance({str(home)!r})
rc = {{"execution": {{"ecs": {{**{ecs!r}, "max_concurrent": {concurrency}}}}}}}
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--poll", type=float, default=0.1)
    args = ap.parse_args()
    sh(["bash", "scripts/services.sh", "ministack"])
    state = dict(line.split("=", 1) for line in (REPO / ".ci/state/ministack").read_text().splitlines() if "=" in line)
    endpoint = state["endpoint"]
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": REGION})
    image = sh(["bash", "scripts/build-test-image.sh"]).stdout.strip().splitlines()[-1]
    tmp = Path(tempfile.mkdtemp(prefix="runyard-bench-ecs-"))
    try:
        jobs = tmp / "jobs.py"
        jobs.write_text(JOBS.replace("STEPS", str(args.steps)))
        exec_home = tmp / "exec-home"
        launch_home = tmp / "launch-home"
        ecs = settings(endpoint, image, exec_home, jobs, args.poll)
        write_home(exec_home, {})
        write_home(launch_home, {"run_launcher": {"ecs": ecs}, "executor": {"in_process": {}}})
        floor = Floor(endpoint, image, args.poll)
        # Warm-up: the task definitions get registered, page cache, the engine's first containers.
        floor.many(2, 2)
        runyard_executor(exec_home, jobs, ecs, args.concurrency)
        runyard_launch(launch_home, jobs)
        fresh_floor(endpoint, image, args.poll, 1, 1)
        keys = ("executor", "executor_floor", "executor_floor_warm", "launch", "launch_floor", "launch_floor_warm")
        reps: dict[str, list[float]] = {k: [] for k in keys}
        for i in range(args.reps):
            reps["executor_floor"].append(fresh_floor(endpoint, image, args.poll, args.steps, args.concurrency)[0])
            reps["executor"].append(runyard_executor(exec_home, jobs, ecs, args.concurrency))
            reps["executor_floor_warm"].append(floor.many(args.steps, args.concurrency))
            reps["launch_floor"].append(fresh_floor(endpoint, image, args.poll, 1, 1)[1])
            reps["launch"].append(runyard_launch(launch_home, jobs))
            reps["launch_floor_warm"].append(floor.many(1, 1))
            print(f"rep {i + 1}/{args.reps}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in reps.items()), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m = {k: statistics.median(v) for k, v in reps.items()}
    rows = [
        (f"{args.steps} no-op steps, max_concurrent={args.concurrency}: ecs executor", m["executor"],
         m["executor_floor"], m["executor_floor_warm"]),
        ("job launch --wait, 1 step (launcher ecs, executor in_process)", m["launch"], m["launch_floor"],
         m["launch_floor_warm"]),
    ]
    load = os.getloadavg()
    print(f"\n{'measurement':<64} {'runyard':>9} {'floor':>9} {'ratio':>6} {'warm floor':>10} {'ratio':>6}")
    for name, ours, fl, warm in rows:
        print(f"{name:<64} {ours:>8.2f}s {fl:>8.2f}s {ours / fl:>5.2f}x {warm:>9.2f}s {ours / warm:>5.2f}x")
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_at_end": load},
        "image": image,
        "steps": args.steps,
        "concurrency": args.concurrency,
        "poll": args.poll,
        "repetitions": reps,
        "medians": m,
        "ratios": {"executor": m["executor"] / m["executor_floor"], "launch": m["launch"] / m["launch_floor"],
                   "executor_warm": m["executor"] / m["executor_floor_warm"],
                   "launch_warm": m["launch"] / m["launch_floor_warm"]},
    }, indent=2) + "\n")
    print(f"\nsaved {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    sys.exit(main())
