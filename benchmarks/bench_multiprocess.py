#!/usr/bin/env python3
"""Side-by-side multiprocess benchmark: runyard's ``multiprocess`` executor, Dagster's
``multiprocess_executor`` and the floor (bare ``multiprocessing`` processes).

Every system runs N no-op steps (default 40) at most C at a time (default 2), each step
in a process of its own. Every measurement is a fresh child process running this file
with ``--child SYSTEM``; it does one untimed warm-up run (so the per-process imports a run
worker pays once are not counted), then times a 2-step run and an N-step run and prints
one JSON line. This script only schedules the children, round-robin, and reports medians.
It is a script, not a test: it measures and prints, and asserts nothing.

    python3 benchmarks/bench_multiprocess.py                   # everything (~10 min: Dagster is slow)
    python3 benchmarks/bench_multiprocess.py --quick           # 1 repetition each
    python3 benchmarks/bench_multiprocess.py --only runyard    # runyard and the floors, seconds

runyard runs in /work/main/.venv; Dagster in benchmarks/.venv-peers (setup-peers.sh). A
system whose interpreter is missing is skipped with a message.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "multiprocess.json"
PEER_PYTHON = HERE / ".venv-peers" / "bin" / "python"
RUNYARD_PYTHON = REPO / ".venv" / "bin" / "python"
PYCACHE = HERE / ".tmp" / "pycache"

# (system, start method): what one table row measures. The first runyard row is the
# default start method, the one the targets are about.
CONFIGS: tuple[tuple[str, str], ...] = (
    ("floor", "fork"),
    ("floor", "spawn"),
    ("runyard", "forkserver"),
    ("runyard", "fork"),
    ("runyard", "spawn"),
    ("dagster", "forkserver"),
    ("dagster", "spawn"),
)

RUNYARD_JOBS = '''
from runyard import job, step


@step
def noop(i: int) -> int:
    return i


@job
def noop_{n}():
    for i in range({n}):
        noop.alias(f"noop_{{i}}")(i)


@job
def noop_2():
    for i in range(2):
        noop.alias(f"noop_{{i}}")(i)
'''

# Module scope, as Dagster's reconstructable() requires; imported by module name
# (PYTHONPATH=workdir) in Dagster's step processes.
DAGSTER_JOBS = '''
from dagster import job, multiprocess_executor, op


@op
def noop() -> int:
    return 1


@job(executor_def=multiprocess_executor)
def noop_{n}():
    for i in range({n}):
        noop.alias(f"noop_{{i}}")()


@job(executor_def=multiprocess_executor)
def noop_2():
    for i in range(2):
        noop.alias(f"noop_{{i}}")()
'''


# -- children: one measurement each --------------------------------------------------------


def _cpu() -> float:
    """CPU seconds used by this process and every descendant it (or they) waited for."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _noop() -> None:
    """The floor's process body (module level: spawn imports this file to find it)."""


def _floor(method: str, n: int, concurrency: int) -> float:
    import multiprocessing
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context(method)
    started = time.perf_counter()
    running: list[Any] = []
    launched = 0
    while launched < n or running:
        while launched < n and len(running) < concurrency:
            p = ctx.Process(target=_noop)
            p.start()
            running.append(p)
            launched += 1
        ready = wait([p.sentinel for p in running])
        for p in [p for p in running if p.sentinel in ready]:
            p.join()
            if p.exitcode != 0:
                raise SystemExit(f"floor process exited {p.exitcode}")
            running.remove(p)
    return time.perf_counter() - started


def child_floor(args: argparse.Namespace) -> dict[str, Any]:
    _floor(args.method, 2, args.concurrency)  # warm-up, as the systems get
    fixed = _floor(args.method, 2, args.concurrency)
    cpu = _cpu()
    seconds = _floor(args.method, args.steps, args.concurrency)
    return {"seconds": seconds, "fixed_seconds": fixed, "cpu_seconds": _cpu() - cpu}


def child_runyard(args: argparse.Namespace) -> dict[str, Any]:
    import runyard
    from runyard.definitions import CodePointer
    from runyard.execution import execute_job
    from runyard.instance import Instance
    from runyard.loader import load_job

    instance = Instance.from_env()  # RUNYARD_HOME: a persistent instance, like Dagster's
    pointer = CodePointer(file=str(Path(args.workdir) / "runyard_noop.py"))
    small, _ = load_job(pointer, "noop_2")
    big, _ = load_job(pointer, f"noop_{args.steps}")
    run_config = {"execution": {"multiprocess": {"start_method": args.method, "max_concurrent": args.concurrency}}}

    def timed(job: Any) -> float:
        started = time.perf_counter()
        result = execute_job(job, instance=instance, executor="multiprocess", run_config=run_config)
        seconds = time.perf_counter() - started
        last = len(job.nodes) - 1
        if not result.success or result.output_for(f"noop_{last}") != last:
            raise SystemExit(f"runyard run {result.run_id} did not succeed: {result.status}")
        return seconds

    timed(small)  # warm-up: the engine's lazy imports, the storage's schema
    fixed = timed(small)
    cpu = _cpu()
    seconds = timed(big)
    return {"seconds": seconds, "fixed_seconds": fixed, "cpu_seconds": _cpu() - cpu, "version": runyard.__version__}


def child_dagster(args: argparse.Namespace) -> dict[str, Any]:
    import dagster
    from dagster import DagsterInstance, execute_job, reconstructable

    sys.path.insert(0, args.workdir)
    import dagster_noop  # type: ignore[import-not-found]

    instance = DagsterInstance.get()  # DAGSTER_HOME: the multiprocess executor needs a persistent one
    run_config = {
        "execution": {"config": {"max_concurrent": args.concurrency, "start_method": {args.method: {}}}}
    }

    def timed(job: Any) -> float:
        started = time.perf_counter()
        result = execute_job(reconstructable(job), instance=instance, run_config=run_config)
        seconds = time.perf_counter() - started
        if not result.success:
            raise SystemExit(f"dagster run {result.run_id} did not succeed")
        return seconds

    timed(dagster_noop.noop_2)
    fixed = timed(dagster_noop.noop_2)
    cpu = _cpu()
    seconds = timed(getattr(dagster_noop, f"noop_{args.steps}"))
    return {"seconds": seconds, "fixed_seconds": fixed, "cpu_seconds": _cpu() - cpu, "version": dagster.__version__}


def child_main(args: argparse.Namespace) -> None:
    record = {"floor": child_floor, "runyard": child_runyard, "dagster": child_dagster}[args.child](args)
    print(json.dumps({"system": args.child, "method": args.method, **record}), flush=True)


# -- the driver ----------------------------------------------------------------------------


def python_for(system: str, args: argparse.Namespace) -> Path:
    return Path(args.peer_python if system == "dagster" else args.runyard_python)


def check_available(system: str, python: Path) -> str | None:
    if not python.exists():
        return f"{python} not found" + (" (run benchmarks/setup-peers.sh)" if system == "dagster" else "")
    probe = {"floor": "import multiprocessing", "runyard": "import runyard_local.multiprocess",
             "dagster": "import dagster"}[system]
    proc = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"`{probe}` fails under {python}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def child_env(system: str, workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    # Bytecode caching on and warm for every system alike (see bench_inprocess.py: this
    # machine sets PYTHONDONTWRITEBYTECODE=1, and runyard's own sources are not in the
    # venv, so nothing precompiled them).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    env["PYTHONPATH"] = str(workdir)  # Dagster's step processes import dagster_noop by name
    env["RUNYARD_HOME"] = str(workdir / "runyard-home")
    env["DAGSTER_HOME"] = str(workdir / "dagster-home")
    return env


def run_once(system: str, method: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any] | str:
    cmd = [
        str(python_for(system, args)), str(Path(__file__).resolve()), "--child", system, "--method", method,
        "--steps", str(args.steps), "--concurrency", str(args.concurrency), "--workdir", str(workdir),
    ]
    err_path = workdir / f"{system}-{method}.stderr.log"
    with err_path.open("w") as err:  # Dagster logs every step: a file, not a pipe to drain
        try:
            proc = subprocess.run(cmd, cwd=workdir, env=child_env(system, workdir), stdout=subprocess.PIPE,
                                  stderr=err, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return f"timed out after {args.timeout} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = err_path.read_text(errors="replace").strip().splitlines()[-15:]
        return f"exit {proc.returncode}:\n    " + "\n    ".join(tail)
    return dict(json.loads(lines[-1]))


def prepare(workdir: Path, steps: int) -> None:
    (workdir / "runyard_noop.py").write_text(textwrap.dedent(RUNYARD_JOBS.format(n=steps)))
    (workdir / "dagster_noop.py").write_text(textwrap.dedent(DAGSTER_JOBS.format(n=steps)))
    (workdir / "runyard-home").mkdir()
    (workdir / "dagster-home").mkdir()
    (workdir / "dagster-home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def report(results: dict[tuple[str, str], list[dict[str, Any]]], args: argparse.Namespace) -> list[str]:
    n = args.steps
    floor_fork = median(results.get(("floor", "fork"), []), "seconds")
    rows = [
        f"| system | start method | runs | median s ({n} steps) | wall ms/step | overhead ms/step "
        "| marginal ms/step | fixed s (2-step run) | CPU ms/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    per_step: dict[tuple[str, str], float] = {}
    overhead: dict[tuple[str, str], float] = {}
    marginal: dict[tuple[str, str], float] = {}
    for key in CONFIGS:
        runs = results.get(key)
        if runs is None:
            continue
        total, fixed = median(runs, "seconds"), median(runs, "fixed_seconds")
        if total is None:
            rows.append(f"| {key[0]} | {key[1]} | 0 | failed | | | | | |")
            continue
        per_step[key] = total / n * 1000
        over = "-"
        if key[0] != "floor" and floor_fork is not None:
            overhead[key] = (total - floor_fork) / n * 1000
            over = f"{overhead[key]:.1f}"
        if fixed is not None:
            marginal[key] = (total - fixed) / (n - 2) * 1000
        marginal_s = "-" if fixed is None else f"{marginal[key]:.1f}"
        fixed_s = "-" if fixed is None else f"{fixed:.3f}"
        cpu = median(runs, "cpu_seconds")
        cpu_s = "-" if cpu is None else f"{cpu / n * 1000:.1f}"
        rows.append(
            f"| {key[0]} | {key[1]} | {len(runs)} | {total:.3f} | {per_step[key]:.1f} | {over} | {marginal_s} "
            f"| {fixed_s} | {cpu_s} |"
        )
    rows += ["", "Targets (runyard = its default start method, forkserver):", ""]
    ours = ("runyard", "forkserver")
    for peer in (("dagster", "forkserver"), ("dagster", "spawn")):
        if ours in overhead and peer in overhead and overhead[ours] > 0:
            r = overhead[peer] / overhead[ours]
            rows.append(
                f"- overhead/step >= 20x lower than Dagster ({peer[1]}): {overhead[peer]:.0f} ms vs "
                f"{overhead[ours]:.1f} ms = {r:.0f}x -> {'PASS' if r >= 20 else 'FAIL'}"
            )
    if ours in per_step and ("floor", "fork") in per_step:
        r = per_step[ours] / per_step[("floor", "fork")]
        rows.append(
            f"- wall/step within 3x of the fork floor: {per_step[ours]:.1f} ms vs "
            f"{per_step[('floor', 'fork')]:.1f} ms = {r:.1f}x -> {'PASS' if r <= 3 else 'FAIL'}"
        )
    if ours in marginal and ("floor", "fork") in marginal and marginal[("floor", "fork")] > 0:
        r = marginal[ours] / marginal[("floor", "fork")]
        rows.append(
            f"- marginal/step (the per-run fixed cost removed) within 3x of the fork floor's: "
            f"{marginal[ours]:.1f} ms vs {marginal[('floor', 'fork')]:.1f} ms = {r:.1f}x "
            f"-> {'PASS' if r <= 3 else 'FAIL'}"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--child", choices=("floor", "runyard", "dagster"), help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--only", action="append", choices=("runyard", "dagster"),
                        help="run only this system (repeatable); the floors always run")
    parser.add_argument("--repeat", type=int, default=7, help="repetitions for runyard and the floors")
    parser.add_argument("--peer-repeat", type=int, default=3, help="repetitions for Dagster")
    parser.add_argument("--quick", action="store_true", help="one repetition each")
    parser.add_argument("--timeout", type=float, default=900, help="per child, seconds")
    parser.add_argument("--runyard-python", default=str(RUNYARD_PYTHON))
    parser.add_argument("--peer-python", default=str(PEER_PYTHON))
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return 0

    wanted = {"floor", *(args.only or ("runyard", "dagster"))}
    configs = []
    for system, method in CONFIGS:
        if system not in wanted:
            continue
        why = check_available(system, python_for(system, args))
        if why:
            print(f"skipping {system}: {why}", file=sys.stderr)
            continue
        configs.append((system, method))
    results: dict[tuple[str, str], list[dict[str, Any]]] = {key: [] for key in configs}
    failures: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-mp-") as tmp:
        workdir = Path(tmp)
        prepare(workdir, args.steps)
        for system, method in configs:  # fills the bytecode cache; not timed
            print(f"[warm-up] {system} {method}", file=sys.stderr, flush=True)
            rec = run_once(system, method, workdir, args)
            if isinstance(rec, str):
                print(f"  warm-up failed: {rec}", file=sys.stderr)
        repeats = {key: 1 if args.quick else args.peer_repeat if key[0] == "dagster" else args.repeat
                   for key in configs}
        # Round-robin, so that a noisy spell on the machine hits every system alike.
        for rep in range(max(repeats.values(), default=0)):
            for key in configs:
                if rep >= repeats[key]:
                    continue
                rec = run_once(*key, workdir, args)
                label = f"{key[0]} {key[1]} #{rep + 1}"
                if isinstance(rec, str):
                    failures.setdefault(f"{key[0]} {key[1]}", []).append(rec)
                    print(f"[{label}] FAILED: {rec}", file=sys.stderr, flush=True)
                else:
                    results[key].append(rec)
                    print(f"[{label}] {rec['seconds']:.3f} s", file=sys.stderr, flush=True)
    rows = report(results, args)
    print("\n".join(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "method", "workdir")},
        "results": [{"system": s, "method": m, "runs": runs} for (s, m), runs in results.items()],
        "failures": failures,
        "report_markdown": rows,
    }, indent=2) + "\n")
    print(f"\nresults: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
