#!/usr/bin/env python3
"""Two commits of runyard side by side in one run: start-up, in-process runs, the CLI path.

    python3 benchmarks/compare.py BASE HEAD [--repeat N] [--only GROUP ...]

BASE and HEAD are git revisions (``main``, ``HEAD~3``, a sha); ``WORKTREE`` means this
checkout as it is on disk, uncommitted changes included, with its own ``.venv``. Each
revision is checked out with ``git worktree add --detach`` under
``benchmarks/.tmp/compare/<sha>`` and gets a venv of its own (``uv sync --locked
--all-packages``, every contrib installed); the worktrees are removed at the end unless
``--keep``.

Every measurement is a fresh process, BASE and HEAD alternating (the order flips every
repetition), so both see the same machine: a drift of the load between them moves both
columns, not their ratio. Both sides run with the same bytecode state (`benv.bytecode_env`:
caching on, one cache, warmed by an untimed round); the floor ``python -c pass`` runs each
side's own venv interpreter. The workload scripts are this checkout's (``benchmarks/
workloads``), run by each side's interpreter, so both sides run the same job code.

Groups (``--only``): ``startup`` (``python -c pass``, ``runyard --help``, ``runyard plugin
list``, ``runyard job execute --help``, each also uncached (``RUNYARD_CLI_CACHE=0``): process
wall and CPU time), ``launch`` (``runyard job launch --wait`` of a one-step job with the
default launcher: to the run's end in storage, and the command's wall and CPU time), ``inprocess`` (chain2, chain100,
fan5000 through ``execute_in_process()``: the workload's own timer, imports excluded, and
peak RSS), ``cli`` (the 5,002-step fan job through ``runyard job execute --executor
in_process`` against the same job through ``execute_in_process()`` in a fresh process:
whole-process wall and CPU time for both), ``scale`` (the fan job at 5k and 50k steps: CPU
time of building it and of running it, the peak RSS it added, and the interpreter's floor:
filling a dict with as many small entries, in the same process), ``multiprocess`` (a
40-wide fan through the multiprocess executor on an instance: whole-process wall and CPU
time, children included). Prints a markdown table of medians with HEAD/BASE and
the load average before and after; saves every sample to ``results/compare*.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benv import PYCACHE, bytecode_env, interpreter, load_average

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TREES = HERE / ".tmp" / "compare"
GROUPS = ("startup", "inprocess", "cli", "launch", "scale", "multiprocess")


@dataclass
class Side:
    label: str  # BASE or HEAD
    rev: str
    sha: str
    root: Path
    made: bool  # a worktree this script created (removed at the end unless --keep)
    home: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="runyard-compare-home-")))

    @property
    def python(self) -> Path:
        return self.root / ".venv" / "bin" / "python"

    @property
    def runyard(self) -> str:
        return str(self.root / ".venv" / "bin" / "runyard")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def _uv() -> list[str]:
    for candidate in (shutil.which("uv"), REPO / ".tools" / "bin" / "uv"):
        if candidate and Path(candidate).exists():
            return [str(candidate)]
    raise SystemExit("uv not found: install it (pip install uv) or create .tools as RULES.md says")


def prepare(label: str, rev: str) -> Side:
    if rev == "WORKTREE":
        if not (REPO / ".venv" / "bin" / "python").exists():
            raise SystemExit(f"{REPO}/.venv missing: run `uv sync --all-packages` first")
        return Side(label, rev, "worktree", REPO, made=False)
    sha = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    root = TREES / sha[:12]
    made = False
    if not (root / ".git").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        _git("worktree", "add", "--detach", "--force", str(root), sha)
        made = True
    print(f"{label}: {rev} = {sha[:12]}: syncing its venv in {root} ...", file=sys.stderr, flush=True)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    subprocess.run([*_uv(), "sync", "--locked", "--all-packages", "--quiet"], cwd=root, check=True, env=env)
    return Side(label, rev, sha, root, made)


def remove(side: Side) -> None:
    if side.made:
        _git("worktree", "remove", "--force", str(side.root))
    shutil.rmtree(side.home, ignore_errors=True)


Measure = Callable[[Side], dict[str, float]]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(cmd: list[str], env: dict[str, str], cwd: Path = HERE) -> tuple[dict[str, float], str]:
    """Wall time and CPU time (user + system, of the child and what it waited for) of one
    command. On a loaded machine CPU time moves far less than wall time; both are reported."""
    c0, t0 = _cpu(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    elapsed, cpu = time.perf_counter() - t0, _cpu() - c0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-1500:]}")
    return {"wall_s": elapsed, "cpu_s": cpu}, proc.stdout


def _env(side: Side) -> dict[str, str]:
    env = bytecode_env()
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "RUNYARD_DISABLE_PLUGINS"):
        env.pop(name, None)
    env["RUNYARD_HOME"] = str(side.home)
    # Each side's own, fresh replay cache (runyard.console): the user's cache of a venv that
    # ran tests holds 16 entries and takes longer to read than one of a new venv.
    env["RUNYARD_CACHE_DIR"] = str(side.home / "cli-cache")
    return env


def command(*args: str, uncached: bool = False) -> Measure:
    """A whole process; ``uncached``: with the console script's replay cache off
    (``RUNYARD_CLI_CACHE=0``), what the first call after an install or an edit costs."""
    def run(side: Side) -> dict[str, float]:
        cmd = [str(side.python), *args[1:]] if args[0] == "python" else [side.runyard, *args]
        env = _env(side)
        if uncached:
            env["RUNYARD_CLI_CACHE"] = "0"
        return _run(cmd, env)[0]

    return run


def launch_wait(side: Side) -> dict[str, float]:
    """`runyard job launch --wait` of a one-step job (default launcher): from the command's
    start to the run's end time in storage (``finished``), and to the command's exit."""
    import sqlite3

    cmd = [side.runyard, "job", "launch", "-f", str(HERE / "launch" / "runyard_one.py"), "--wait", "--json"]
    t0 = time.time()
    result, out = _run(cmd, _env(side))
    run_id = json.loads(out)["run_id"]
    with sqlite3.connect(side.home / "runyard.db") as db:
        status, ended_at = db.execute("SELECT status, ended_at FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if status != "SUCCESS":
        raise RuntimeError(f"launch benchmark run {run_id} ended {status}")
    return {"finished_s": ended_at - t0, **result}


def workload(kind: str, n: int) -> Measure:
    def run(side: Side) -> dict[str, float]:
        _, out = _run([str(side.python), "-m", "workloads.runyard_job", kind, str(n)], _env(side))
        rec = json.loads(out.strip().splitlines()[-1])
        return {"run_s": rec["seconds"], "peak_rss_mb": rec["peak_rss_mb"]}

    return run


def chain2_warm(side: Side) -> dict[str, float]:
    # The fixed cost of a run once everything is imported: the first run in a process also
    # pays the imports runyard defers to it (engine, registry, plugins). The median of 5
    # runs after it, wall and CPU (this process's), since one run's wall time on a loaded
    # machine is mostly the time it waited for a CPU.
    code = ("import statistics, time\nfrom workloads.runyard_job import build\n"
            "build('chain', 2).execute_in_process()\nwall, cpu = [], []\n"
            "for _ in range(5):\n"
            "    t, c = time.perf_counter(), time.process_time()\n"
            "    r = build('chain', 2).execute_in_process()\n"
            "    wall.append(time.perf_counter() - t); cpu.append(time.process_time() - c)\n"
            "    assert r.success\n"
            "print(statistics.median(wall), statistics.median(cpu))\n")
    _, out = _run([str(side.python), "-c", code], _env(side))
    wall, cpu = out.strip().splitlines()[-1].split()
    return {"run_s": float(wall), "run_cpu_s": float(cpu)}


def multiprocess_fan40(side: Side) -> dict[str, float]:
    # The multiprocess executor (a process per step) on an instance: every output goes
    # through the file output store from another process, and `total` reads 40 of them.
    job_file = str(HERE / "workloads" / "fan40_file.py")
    cmd = [side.runyard, "job", "execute", "-f", job_file, "--executor", "multiprocess"]
    return _run(cmd, _env(side))[0]


def scaling(kind: str, n: int) -> Measure:
    # Building (tracing) and running an n-step job in one process, CPU time of each (wall
    # time of a long run on this shared machine measures the load), and the process's peak
    # RSS: issue 18's "linear everywhere" and memory per step.
    code = ("import resource, sys, time\nfrom workloads.runyard_job import build\n"
            "build(sys.argv[1], 3).execute_in_process()\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "c = time.process_time()\nj = build(sys.argv[1], int(sys.argv[2]))\nb = time.process_time() - c\n"
            "c = time.process_time()\nr = j.execute_in_process()\nx = time.process_time() - c\n"
            "assert r.success\n"
            "grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024\n"
            # The interpreter's own floor for the same size: a dict of n keyed entries, each
            # holding a small dict, a tuple and an object, in the same process after the job.
            "c = time.process_time()\nd = {}\n"
            "for i in range(int(sys.argv[2])):\n    d[f'inc_{i}'] = ({'x': ('s',)}, (f'inc_{i}',), object())\n"
            "f = time.process_time() - c\n"
            "print(b, x, grown, f)\n")

    def run(side: Side) -> dict[str, float]:
        _, out = _run([str(side.python), "-c", code, kind, str(n)], _env(side))
        build_s, run_s, grown, floor_s = out.strip().splitlines()[-1].split()
        return {"build_cpu_s": float(build_s), "run_cpu_s": float(run_s), "peak_rss_growth_mb": float(grown),
                "floor_dict_cpu_s": float(floor_s)}

    return run


def api_fan5000(side: Side) -> dict[str, float]:
    code = ("from workloads.fan_file import fan5000\n"
            "r = fan5000.execute_in_process()\n"
            "assert r.success and r.output_for('total') == 10000\n")
    return _run([str(side.python), "-c", code], _env(side))[0]


def cli_fan5000(side: Side) -> dict[str, float]:
    cmd = [side.runyard, "job", "execute", "-f", str(HERE / "workloads" / "fan_file.py"), "--executor", "in_process"]
    return _run(cmd, _env(side))[0]


MEASUREMENTS: dict[str, list[tuple[str, Measure]]] = {
    "startup": [
        ("python -c pass", command("python", "-c", "pass")),
        ("runyard --help", command("--help")),
        ("runyard plugin list", command("plugin", "list")),
        ("runyard job execute --help", command("job", "execute", "--help")),
        ("runyard --help, uncached", command("--help", uncached=True)),
        ("runyard plugin list, uncached", command("plugin", "list", uncached=True)),
        ("runyard job execute --help, uncached", command("job", "execute", "--help", uncached=True)),
    ],
    "inprocess": [
        ("chain2 execute_in_process", workload("chain", 2)),
        ("chain2, second run in one process", chain2_warm),
        ("chain100 execute_in_process", workload("chain", 100)),
        ("fan5000 execute_in_process", workload("fan", 5000)),
    ],
    "cli": [  # whole processes: interpreter start and imports included on both paths
        ("fan5000 API, whole process", api_fan5000),
        ("fan5000 `job execute --executor in_process`", cli_fan5000),
    ],
    "launch": [
        ("`job launch --wait`, 1 step, default launcher", launch_wait),
    ],
    "multiprocess": [("fan40 multiprocess executor, whole process", multiprocess_fan40)],
    "scale": [
        ("fan 5k: build, run, RSS growth", scaling("fan", 5_000)),
        ("fan 50k: build, run, RSS growth", scaling("fan", 50_000)),
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("head")
    ap.add_argument("--repeat", type=int, default=7, help="timed repetitions per side (default 7)")
    ap.add_argument("--only", action="append", choices=GROUPS, help="measurement groups (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the worktrees and their venvs for the next run")
    args = ap.parse_args()
    groups = args.only or list(GROUPS)
    sides = [prepare("BASE", args.base), prepare("HEAD", args.head)]
    items = [(name, fn) for g in groups for name, fn in MEASUREMENTS[g]]
    samples: dict[str, dict[str, dict[str, list[float]]]] = {name: {s.label: {} for s in sides} for name, _ in items}
    load_before = load_average()
    try:
        for rep in range(args.repeat + 1):  # round 0 warms the bytecode cache and page cache: not kept
            for name, fn in items:
                for side in sides if rep % 2 else reversed(sides):
                    result = fn(side)
                    if rep:
                        for key, value in result.items():
                            samples[name][side.label].setdefault(key, []).append(value)
            print(f"repetition {rep}/{args.repeat} done (load {load_average()})", file=sys.stderr, flush=True)
        load_after = load_average()
        interps = {s.label: interpreter(s.python) for s in sides}
    finally:
        if not args.keep:
            for side in sides:
                remove(side)
    base, head = sides
    print(f"\nBASE = {base.rev} ({base.sha[:12]}), HEAD = {head.rev} ({head.sha[:12]}); "
          f"{args.repeat} alternating repetitions; medians")
    print(f"load average before {load_before}, after {load_after}")
    for s in sides:
        print(f"{s.label} interpreter: {interps[s.label]}")
    print(f"bytecode: cached under {PYCACHE} for both sides (PYTHONDONTWRITEBYTECODE unset)\n")
    print("| measurement | metric | BASE median | HEAD median | HEAD/BASE |")
    print("|---|---|---:|---:|---:|")
    for name, _ in items:
        for key in samples[name]["BASE"]:
            b = statistics.median(samples[name]["BASE"][key])
            h = statistics.median(samples[name]["HEAD"][key])
            unit, scale = ("MB", 1.0) if key.endswith("_mb") else ("ms", 1000.0)
            print(f"| {name} | {key.rsplit('_', 1)[0]} {unit} | {b * scale:.1f} | {h * scale:.1f} | {h / b:.2f}x |")
    cli, api = "fan5000 `job execute --executor in_process`", "fan5000 API, whole process"
    if cli in samples and api in samples:
        for s in sides:
            c, a = (statistics.median(samples[n][s.label]["wall_s"]) for n in (cli, api))
            cc, ac = (statistics.median(samples[n][s.label]["cpu_s"]) for n in (cli, api))
            print(f"\n{s.label}: `job execute --executor in_process` / `execute_in_process()` = {c / a:.2f}x wall, "
                  f"{cc / ac:.2f}x CPU (fan5000, whole process; target <= 1.5x)", end="")
        print()
    small, large = "fan 5k: build, run, RSS growth", "fan 50k: build, run, RSS growth"
    if small in samples and large in samples:
        print()
        for s in sides:
            m = {n: {k: statistics.median(v) for k, v in samples[n][s.label].items()} for n in (small, large)}
            grow = {k: m[large][k] / m[small][k] for k in ("build_cpu_s", "run_cpu_s", "floor_dict_cpu_s")}
            print(f"{s.label}: 10x the steps (5k -> 50k) costs {grow['build_cpu_s']:.1f}x to build, "
                  f"{grow['run_cpu_s']:.1f}x to run (target <= 10.5x; the interpreter's own floor, "
                  f"a dict of as many small entries, {grow['floor_dict_cpu_s']:.1f}x); "
                  f"peak RSS {m[large]['peak_rss_growth_mb'] * 1024 / 50_000:.2f} KB per step at 50k")
    if "python -c pass" in samples:
        for s in sides:
            for metric in ("wall_s", "cpu_s"):
                floor = statistics.median(samples["python -c pass"][s.label][metric])
                ratios = ", ".join(
                    f"{n.removeprefix('runyard ')} {statistics.median(samples[n][s.label][metric]) / floor:.1f}x"
                    for n, _ in MEASUREMENTS["startup"][1:] if n in samples
                )
                print(f"{s.label} start-up / its python -c pass, {metric[:-2]}: {ratios} (target <= 3x)")
    # One file per choice of groups, so a partial run does not overwrite the full one.
    out = HERE / "results" / ("compare.json" if groups == list(GROUPS) else f"compare-{'-'.join(groups)}.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_before": load_before, "load_after": load_after,
        "sides": {s.label: {"rev": s.rev, "sha": s.sha, "interpreter": interps[s.label]} for s in sides},
        "samples": samples,
    }, indent=2))


if __name__ == "__main__":
    main()
