"""`runyard daemon` on SQLite and PostgreSQL, side by side in one run (issue 13 targets):

1. death -> FAILURE: a run worker (default launcher, a real process) is killed with SIGKILL
   while the daemon runs; seconds from the kill to the RUN_FAILURE event in storage (its
   timestamp: when the daemon wrote it), median and max over N kills. Target <= 10 s.
2. queue latency, idle daemon: a run is recorded QUEUED (what `job launch` does with a
   run_coordinator); seconds until the daemon has launched it (RUN_LAUNCHED written) and
   until its worker marked it STARTED. Target <= 0.5 s for the daemon's part.
3. watching 1,000 unfinished runs: 1,000 STARTED runs whose recorded worker is one live
   process (so every check is a real `check_health` of the default launcher, reading
   /proc); the daemon's CPU (% of one core, from /proc/PID/stat over a window) and RSS.
   Targets <= 2 % of a core, <= 100 MB.

Usage: python benchmarks/bench_daemon.py [--kills 20] [--queue 10] [--watch 1000] [--window 30]
PostgreSQL: RUNYARD_BENCH_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/postgres);
the script creates and drops a database of its own. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import attrs
import yaml

RUNYARD = Path(sys.executable).parent / "runyard"
PG = os.environ.get("RUNYARD_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
JOB = """
import time
from runyard import job, step

@step
def nap() -> int:
    time.sleep(600)
    return 1

@job
def sleepy():
    nap()

@step
def quick() -> int:
    return 1

@job
def brief():
    quick()
"""
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Bench:
    def __init__(self, root: Path, storage: dict[str, Any]) -> None:
        self.root = root
        self.home = root / "home"
        self.home.mkdir(parents=True)
        self.jobs = root / "jobs.py"
        self.jobs.write_text(JOB)
        self.storage = storage
        self.daemon: subprocess.Popen[bytes] | None = None

    def configure(self, extra: dict[str, Any]) -> Any:
        from runyard.instance import Instance

        (self.home / "runyard.yaml").write_text(yaml.safe_dump({"storage": self.storage, **extra}))
        return Instance(self.home)

    def start_daemon(self) -> int:
        env = {**os.environ, "RUNYARD_HOME": str(self.home)}
        self.daemon = subprocess.Popen([str(RUNYARD), "daemon", "run"], env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while subprocess.run([str(RUNYARD), "daemon", "status", "--json"], env=env,
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit("the daemon did not start within 60 s")
            time.sleep(0.2)
        return self.daemon.pid

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.send_signal(signal.SIGTERM)
            self.daemon.wait(timeout=30)
            self.daemon = None

    def create(self, instance: Any, job: str) -> Any:
        from runyard.definitions import CodePointer
        from runyard.loader import load_job
        from runyard.runs import create_run

        pointer = CodePointer(file=str(self.jobs))
        job_def, loc = load_job(pointer, job)
        return create_run(instance, job_def, pointer=pointer, definitions=loc.definitions, executor="in_process")


def wait(check: Any, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = check()
        if v:
            return v
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.01)


def bench_deaths(b: Bench, kills: int) -> list[float]:
    from runyard.events import EventType
    from runyard.runs import launch_run
    from runyard.storage import RunStatus

    os.environ["RUNYARD_HOME"] = str(b.home)  # the workers this process launches use it
    instance = b.configure({})
    b.start_daemon()
    out = []
    try:
        for _ in range(kills):
            run = launch_run(instance, b.create(instance, "sleepy"))
            s = instance.storage
            rid = run.run_id
            wait(lambda s=s, rid=rid: s.get_run(rid).status is RunStatus.STARTED)
            time.sleep(1.2)  # seen alive by the daemon at least once, as a real run would be
            pid = s.get_events(run.run_id, types=[EventType.RUN_LAUNCHED])[-1].event.data["worker"]["pid"]
            killed = time.time()
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # our child (launched from here): reap it, as its launcher would
            ev = wait(lambda s=s, rid=rid: s.get_events(rid, types=[EventType.RUN_FAILURE]), timeout=60)
            out.append(ev[-1].event.timestamp - killed)
    finally:
        b.stop_daemon()
    return out


def bench_queue(b: Bench, n: int) -> tuple[list[float], list[float]]:
    from runyard.events import EventType
    from runyard.storage import RunStatus

    instance = b.configure({"run_coordinator": {"queued": {"max_concurrent_runs": 10}}})
    b.start_daemon()
    launched, started = [], []
    try:
        for _ in range(n):
            time.sleep(1.0)  # idle: the previous run is done, the daemon is between passes
            run = b.create(instance, "brief")  # recorded QUEUED: what `job launch` does
            t0 = run.created_at
            s = instance.storage
            rid = run.run_id
            ev = wait(lambda s=s, rid=rid: s.get_events(rid, types=[EventType.RUN_LAUNCHED]))
            launched.append(ev[-1].event.timestamp - t0)
            r = wait(lambda s=s, rid=rid: (x := s.get_run(rid)).started_at and x)
            started.append(r.started_at - t0)
            wait(lambda s=s, rid=rid: s.get_run(rid).status is RunStatus.SUCCESS)
    finally:
        b.stop_daemon()
    return launched, started


def bench_watch(b: Bench, count: int, window: float) -> tuple[float, float]:
    from runyard.events import Event, EventType
    from runyard.storage import RunStatus

    instance = b.configure({})
    live = subprocess.Popen(["sleep", "3600"], start_new_session=True)
    start_time = Path(f"/proc/{live.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    worker = {"pid": live.pid, "pgid": live.pid, "start_time": start_time, "host": os.uname().nodename, "log": None}
    template = b.create(instance, "sleepy")
    s = instance.storage
    s.delete_run(template.run_id)
    for _ in range(count):
        run = attrs.evolve(template, run_id=uuid.uuid4().hex, status=RunStatus.STARTED, started_at=time.time())
        s.add_run(run)
        s.store_events([Event(type=EventType.RUN_LAUNCHED, run_id=run.run_id, data={"launcher": "default",
                                                                                     "worker": worker})])
    try:
        pid = b.start_daemon()
        time.sleep(5)  # the first passes build each run's launcher: steady state after
        c0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(window)
        cpu = (cpu_seconds(pid) - c0) / (time.monotonic() - t0) * 100
        rss = rss_mb(pid)
        left = len(s.run_states([RunStatus.STARTED]))
        if left != count:
            raise SystemExit(f"the daemon ended {count - left} of the watched runs: the benchmark is wrong")
    finally:
        b.stop_daemon()
        live.kill()
        live.wait()
    return cpu, rss


def pg_database() -> tuple[str, Any]:
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    admin = psycopg.connect(PG, autocommit=True)
    name = f"runyard_daemon_bench_{uuid.uuid4().hex[:8]}"
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop() -> None:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()

    return make_conninfo(PG, dbname=name), drop


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--queue", type=int, default=10)
    p.add_argument("--watch", type=int, default=1000)
    p.add_argument("--window", type=float, default=30.0)
    p.add_argument("--backends", default="sqlite,postgres")
    args = p.parse_args()
    results: dict[str, dict[str, Any]] = {}
    load = os.getloadavg()
    for backend in args.backends.split(","):
        drop = None
        with tempfile.TemporaryDirectory(prefix="runyard-bench-daemon-") as tmp:
            if backend == "postgres":
                url, drop = pg_database()
                storage: dict[str, Any] = {"postgres": {"url": url}}
            else:
                storage = {"sqlite": {}}
            try:
                deaths = bench_deaths(Bench(Path(tmp) / "deaths", storage), args.kills)
                launched, started = bench_queue(Bench(Path(tmp) / "queue", storage), args.queue)
                cpu, rss = bench_watch(Bench(Path(tmp) / "watch", storage), args.watch, args.window)
            finally:
                if drop is not None:
                    drop()
        results[backend] = {
            "death_to_failure_median_s": statistics.median(deaths), "death_to_failure_max_s": max(deaths),
            "queue_to_launched_median_s": statistics.median(launched), "queue_to_launched_max_s": max(launched),
            "queue_to_started_median_s": statistics.median(started),
            "watch_cpu_pct_of_core": cpu, "watch_rss_mb": rss, "watched_runs": args.watch,
        }
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; after: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    rows = [
        ("death -> FAILURE median s (target <= 10)", "death_to_failure_median_s"),
        (f"death -> FAILURE max s over {args.kills} kills", "death_to_failure_max_s"),
        ("QUEUED -> launched median s, idle (target <= 0.5)", "queue_to_launched_median_s"),
        ("QUEUED -> launched max s", "queue_to_launched_max_s"),
        ("QUEUED -> STARTED median s (worker start incl.)", "queue_to_started_median_s"),
        (f"CPU % of a core watching {args.watch} runs (<= 2)", "watch_cpu_pct_of_core"),
        (f"RSS MB watching {args.watch} runs (<= 100)", "watch_rss_mb"),
    ]
    names = list(results)
    print("| measure | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, key in rows:
        print(f"| {label} | " + " | ".join(f"{results[n][key]:.3g}" for n in names) + " |")
    print(json.dumps({"load_before": load, "results": results}))


if __name__ == "__main__":
    main()
