#!/usr/bin/env python3
"""Where an ECS step's time goes, against a bare task's, on the emulator (ministack).

Runs the 20-step no-op job of ``bench_ecs.py`` through the ``ecs`` executor (one warm-up
run first) with its calls timed, then 20 bare tasks of ``python3 -c pass`` the same way,
and prints, per task, the medians of:

* RunTask: the call itself;
* container created -> started: the Docker engine (``docker inspect``: nanosecond times);
* started -> STEP_START: inside the task, the interpreter, the step worker's imports, the
  request's check and the job's loading (the bare task: started -> exited, the whole
  ``python3 -c pass``);
* the step (STEP_START -> its ending, both stamped in the task);
* ending -> container exited: the worker's exit (output thread, interpreter shutdown, sh);
* exited -> the follower done: the emulator noticing the exit, then runyard's poll.

It is a script, not a test (``python3 benchmarks/bench_ecs_split.py [STEPS]``); it needs
what ``bench_ecs.py`` needs and starts nothing but its own tasks.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_ecs as B  # noqa: E402


def containers() -> dict[str, tuple[float, float, float]]:
    """(created, started, finished) of the emulator's task containers, by task ARN."""
    ids = subprocess.run(["docker", "ps", "-aq", "--filter", "label=ministack=ecs"], capture_output=True,
                         text=True).stdout.split()
    if not ids:
        return {}

    def stamp(s: str) -> float:
        base, _, frac = s.rstrip("Z").partition(".")
        return dt.datetime.fromisoformat(base).replace(tzinfo=dt.UTC).timestamp() + float("0." + (frac or "0")[:6])

    out = {}
    for c in json.loads(subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True).stdout):
        arn = c["Config"]["Labels"].get("com.amazonaws.ecs.task-arn")
        out[arn] = (stamp(c["Created"]), stamp(c["State"]["StartedAt"]), stamp(c["State"]["FinishedAt"]))
    return out


def show(title: str, columns: dict[str, list[float]]) -> None:
    print(title)
    for name, values in columns.items():
        if values:
            print(f"  {name:<36} median {statistics.median(values):6.3f} s  (n={len(values)})")


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    poll = 0.1
    B.sh(["bash", "scripts/services.sh", "ministack"])
    state = dict(line.split("=", 1) for line in (B.REPO / ".ci/state/ministack").read_text().splitlines()
                 if "=" in line)
    endpoint = state["endpoint"]
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": B.REGION})
    image = B.sh(["bash", "scripts/build-test-image.sh"]).stdout.strip().splitlines()[-1]
    tmp = Path(tempfile.mkdtemp(prefix="runyard-bench-ecs-split-"))
    jobs = tmp / "jobs.py"
    jobs.write_text(B.JOBS.replace("STEPS", str(steps)))
    home = tmp / "home"
    ecs = B.settings(endpoint, image, home, jobs, poll)
    B.write_home(home, {})

    from runyard import Instance, execute_job
    from runyard.definitions import CodePointer
    from runyard.loader import load_job
    from runyard_ecs import executor as X

    marks: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def mark(key: str, what: str, value: Any) -> None:
        with lock:
            marks.setdefault(key, {})[what] = value

    start, take, finish = X.EcsStepHandler._start, X.Attempt.take_line, X.EcsStepHandler._finish

    def timed_start(self: Any, att: Any) -> Any:
        mark(att.request.step_key, "launch", time.time())
        return start(self, att)

    def timed_take(self: Any, line: str) -> None:
        take(self, line)
        for kind in ("STEP_START", "STEP_SUCCESS"):
            if f'"{kind}"' in line:
                mark(self.request.step_key, kind, json.loads(line)["timestamp"])

    def timed_finish(self: Any, att: Any, failure: Any) -> None:
        mark(att.request.step_key, "done", time.time())
        mark(att.request.step_key, "arn", att.task_arn)
        finish(self, att, failure)

    X.EcsStepHandler._start, X.Attempt.take_line, X.EcsStepHandler._finish = timed_start, timed_take, timed_finish
    job = load_job(CodePointer(file=str(jobs)), "wide")[0]
    instance = Instance(str(home))
    rc = {"execution": {"ecs": {**ecs, "max_concurrent": 2}}}
    execute_job(job, instance=instance, run_config=rc)  # warm-up
    marks.clear()
    began = time.perf_counter()
    assert execute_job(job, instance=instance, run_config=rc).success
    took = time.perf_counter() - began
    seen = containers()
    cols: dict[str, list[float]] = {k: [] for k in (
        "RunTask call", "container created -> started", "started -> STEP_START (in task)",
        "STEP_START -> ending (the step)", "ending -> container exited", "exited -> follower done",
        "RunTask -> follower done")}
    for m in marks.values():
        if m.get("arn") not in seen:
            continue
        created, started, finished = seen[m["arn"]]
        cols["RunTask call"].append(created - m["launch"])
        cols["container created -> started"].append(started - created)
        cols["started -> STEP_START (in task)"].append(m["STEP_START"] - started)
        cols["STEP_START -> ending (the step)"].append(m["STEP_SUCCESS"] - m["STEP_START"])
        cols["ending -> container exited"].append(finished - m["STEP_SUCCESS"])
        cols["exited -> follower done"].append(m["done"] - finished)
        cols["RunTask -> follower done"].append(m["done"] - m["launch"])
    show(f"ecs executor: {steps} no-op steps, max_concurrent 2: {took:.2f} s, load {os.getloadavg()[0]:.1f}", cols)

    floor = B.Floor(endpoint, image, poll)
    ends: list[tuple[str, float, float]] = []
    one = floor.one

    def timed_one() -> None:
        t0 = time.time()
        arns: list[str] = []
        run_task = floor.ecs.run_task

        def keep(**kw: Any) -> Any:
            out = run_task(**kw)
            arns.append(out["tasks"][0]["taskArn"])
            return out

        floor.ecs.run_task = keep  # type: ignore[method-assign]
        try:
            one()
        finally:
            floor.ecs.run_task = run_task  # type: ignore[method-assign]
        ends.append((arns[0], t0, time.time()))

    floor.one = timed_one  # type: ignore[method-assign]
    took = floor.many(steps, 2)
    seen = containers()
    cols = {k: [] for k in ("RunTask call", "container created -> started", "started -> exited (python3 -c pass)",
                            "exited -> STOPPED seen", "RunTask -> STOPPED seen")}
    for arn, t0, t1 in ends:
        if arn not in seen:
            continue
        created, started, finished = seen[arn]
        cols["RunTask call"].append(created - t0)
        cols["container created -> started"].append(started - created)
        cols["started -> exited (python3 -c pass)"].append(finished - started)
        cols["exited -> STOPPED seen"].append(t1 - finished)
        cols["RunTask -> STOPPED seen"].append(t1 - t0)
    show(f"floor: {steps} bare tasks, 2 at a time: {took:.2f} s, load {os.getloadavg()[0]:.1f}", cols)


if __name__ == "__main__":
    main()
