#!/usr/bin/env python3
"""Side-by-side in-process benchmark: runyard vs Dagster vs Prefect 3.

Every measurement is one fresh subprocess running ``python -m workloads.<system>
<kind> <n>``, which times its own build+run and reports its own peak RSS (see
workloads/common.py). This script only schedules those runs, takes medians and
prints/saves the comparison. It is a script, not a test: numbers are noisy and
nothing here asserts.

    python3 benchmarks/bench_inprocess.py                 # everything
    python3 benchmarks/bench_inprocess.py --quick         # smoke run, ~1 min
    python3 benchmarks/bench_inprocess.py --only dagster --repeat 1

runyard runs in the project venv (/work/main/.venv, made by ``uv sync``); Dagster
and Prefect in benchmarks/.venv-peers (made by setup-peers.sh). A system whose
interpreter is missing is skipped with a message, not an error.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "inprocess.json"
PEER_PYTHON = HERE / ".venv-peers" / "bin" / "python"
RUNYARD_PYTHON = REPO / ".venv" / "bin" / "python"
PYCACHE = HERE / ".tmp" / "pycache"

PEERS = ("dagster", "prefect")
SYSTEMS = ("runyard", *PEERS)
MODULES = {
    "floor": "workloads.floor",
    "runyard": "workloads.runyard_job",
    "dagster": "workloads.dagster_job",
    "prefect": "workloads.prefect_flow",
}


@dataclass(frozen=True)
class Workload:
    kind: str
    n: int
    systems: tuple[str, ...]  # which systems run it (the floor always does)

    @property
    def name(self) -> str:
        return f"{self.kind}{self.n}"

    @property
    def steps(self) -> int:
        # Keep in step with workloads.common.step_count (not imported: that
        # package is meant to be run as children, with cwd=benchmarks).
        return self.n if self.kind == "chain" else self.n + 2


WORKLOADS = (
    # The smallest job (source -> inc): its time is each system's fixed per-run
    # cost, subtracted to get the marginal per-step cost of the bigger jobs.
    Workload("chain", 2, SYSTEMS),
    Workload("chain", 100, SYSTEMS),
    Workload("fan", 500, SYSTEMS),
    Workload("fan", 5000, SYSTEMS),
    # With chain100, the chain's 10x scaling point (fan has fan500 -> fan5000).
    # Also the chain's marginal per-step cost: at 100 steps it is smaller than
    # run-to-run noise for every system here (the fixed per-run cost dominates).
    Workload("chain", 1000, SYSTEMS),
)
BASELINE = "chain2"
# (peer, workload) pairs that take minutes per repetition (Dagster fan5000 is
# ~100 s); they default to --slow-repeat repetitions and are skipped by --quick.
SLOW = {("dagster", "fan5000"), ("prefect", "fan5000")}


@dataclass
class Series:
    """All repetitions of one (system, workload)."""

    system: str
    workload: Workload
    runs: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def median(self, key: str) -> float | None:
        values = [r[key] for r in self.runs if r.get(key) is not None]
        return statistics.median(values) if values else None


Table = dict[tuple[str, str], Series]


def python_for(system: str, args: argparse.Namespace) -> Path:
    if system == "floor":
        return Path(sys.executable)
    if system == "runyard":
        return Path(args.runyard_python)
    return Path(args.peer_python)


def check_available(system: str, python: Path) -> str | None:
    """None if the system can run, else why not (printed, and the system is skipped)."""
    if not python.exists():
        if system == "runyard":
            return f"{python} not found; create it with `uv sync` at the repo root"
        return f"{python} not found; run benchmarks/setup-peers.sh"
    probe = {
        "runyard": "from runyard import job, step",
        "dagster": "import dagster",
        "prefect": "import prefect",
    }[system]
    proc = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"`{probe}` fails under {python}: {last}"
    return None


def child_env(system: str, prefect_home: str | None, quiet_peers: bool) -> dict[str, str]:
    env = dict(os.environ)
    # Children must not pick up this script's (or the user's) venv/site by accident.
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    # Bytecode caching must be ON and warm for every system alike. This
    # machine's environment sets PYTHONDONTWRITEBYTECODE=1 and uv (unlike pip)
    # does not precompile on install, so runyard's venv would otherwise
    # recompile every module from source in every child (~0.1 s per run), a cost
    # no real user pays twice. The cache goes to a prefix under benchmarks/.tmp
    # so nothing is written into the source tree or either venv; warm_up()
    # fills it before anything is timed.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    if system == "prefect":
        # Offline, in-process Prefect 3: no API URL, so Prefect runs its own
        # temporary server (it refuses to unless ephemeral mode is allowed), with
        # its SQLite DB in a throwaway PREFECT_HOME so runs never share state.
        # Same settings as documented in setup-peers.sh.
        env.pop("PREFECT_API_URL", None)
        env.pop("PREFECT_PROFILE", None)
        env["PREFECT_HOME"] = prefect_home or ""
        env["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "true"
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        if quiet_peers:
            env["PREFECT_LOGGING_LEVEL"] = "WARNING"
    if system == "dagster":
        # execute_in_process uses an ephemeral instance regardless; unsetting
        # DAGSTER_HOME just keeps a user's instance config out of the picture.
        env.pop("DAGSTER_HOME", None)
    if quiet_peers:
        env["BENCH_PEERS_QUIET"] = "1"
    return env


def run_once(system: str, wl: Workload, python: Path, args: argparse.Namespace) -> dict[str, Any] | str:
    """One fresh child process; its JSON record, or an error message."""
    cmd = [str(python), "-m", MODULES[system], wl.kind, str(wl.n)]
    with tempfile.TemporaryDirectory(prefix=f"bench-{system}-") as tmp:
        # Peers log every step (Dagster at DEBUG to stderr): send it to a file
        # rather than a pipe we would have to drain, and keep only its tail.
        err_path = Path(tmp) / "stderr.log"
        prefect_home = str(Path(tmp) / "prefect-home") if system == "prefect" else None
        with err_path.open("w") as err:
            try:
                proc = subprocess.run(
                    cmd,
                    cwd=HERE,
                    env=child_env(system, prefect_home, args.quiet_peers),
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    timeout=args.timeout,
                )
            except subprocess.TimeoutExpired:
                return f"timed out after {args.timeout} s"
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = err_path.read_text(errors="replace").strip().splitlines()[-15:]
            return f"exit {proc.returncode}:\n    " + "\n    ".join(tail)
        record: dict[str, Any] = json.loads(lines[-1])
        return record


def warm_up(systems: list[str], args: argparse.Namespace) -> None:
    """One untimed run of each workload kind per system, results discarded.

    Fills the bytecode cache (see child_env), including modules the systems
    import lazily on first run, so no timed run pays for compiling them.
    """
    for system in ("floor", *systems):
        for kind in ("chain", "fan"):
            print(f"[warm-up] {system} {kind}", file=sys.stderr, flush=True)
            rec = run_once(system, Workload(kind, 2, SYSTEMS), python_for(system, args), args)
            if isinstance(rec, str):
                print(f"  warm-up failed (the timed runs will say more): {rec}", file=sys.stderr)


def repeats_for(system: str, wl: Workload, args: argparse.Namespace) -> int:
    if args.quick:
        return 1
    if (system, wl.name) in SLOW:
        return int(args.slow_repeat)
    if args.repeat is not None:
        return int(args.repeat)
    return int(args.runyard_repeat if system in ("runyard", "floor") else args.peer_repeat)


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def per_step_ms(series: Table, system: str, wl: Workload) -> float | None:
    """(median - floor median) / steps: all overhead, fixed costs included.

    None for the chain2 baseline, whose time is all fixed cost (its median s is
    the number to read there).
    """
    if wl.name == BASELINE or system == "floor":
        return None
    s, floor = series.get((system, wl.name)), series.get(("floor", wl.name))
    med = s.median("seconds") if s else None
    base = floor.median("seconds") if floor else None
    if med is None or base is None:
        return None
    return (med - base) / wl.steps * 1000


def marginal_ms(series: Table, system: str, wl: Workload) -> float | None:
    """(median - chain2 median) / (steps - 2): per-step cost with the fixed
    per-run cost (imports done lazily at run time, instance/run setup)
    removed. The floor is ~0 next to either, so it is not subtracted again."""
    if wl.name == BASELINE or system == "floor":
        return None
    s, base = series.get((system, wl.name)), series.get((system, BASELINE))
    med = s.median("seconds") if s else None
    fixed = base.median("seconds") if base else None
    if med is None or fixed is None:
        return None
    return (med - fixed) / (wl.steps - 2) * 1000


def ratio(peer: float | None, ours: float | None) -> str:
    if peer is None or ours is None:
        return ""
    if peer <= 0 or ours <= 0:
        # A marginal cost at or below zero means the workload's extra steps
        # cost less than the run-to-run noise; a ratio of that is meaningless.
        return "noise"
    return f"{peer / ours:.0f}x"


def report(series: Table, systems: list[str]) -> list[str]:
    """Markdown lines: main table, scaling, targets, notes."""
    out = [
        "| workload | system | runs | median s | per-step ms | marginal ms/step | peak MB "
        "| import s | ratio peer/runyard (per-step) | ratio peer/runyard (marginal) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for wl in WORKLOADS:
        ry_step = per_step_ms(series, "runyard", wl)
        ry_marg = marginal_ms(series, "runyard", wl)
        for system in ("floor", *systems):
            s = series.get((system, wl.name))
            if s is None:
                continue
            if not s.runs:
                out.append(f"| {wl.name} | {system} | 0 | failed | | | | | | |")
                continue
            is_peer = system in PEERS
            step = per_step_ms(series, system, wl)
            marg = marginal_ms(series, system, wl)
            out.append(
                f"| {wl.name} | {system} | {len(s.runs)} | {fmt(s.median('seconds'), '.3f')} "
                f"| {'-' if step is None else fmt(step, '.3f')} "
                f"| {'-' if marg is None else fmt(marg, '.3f')} "
                f"| {fmt(s.median('peak_rss_mb'), '.0f')} "
                f"| {fmt(s.median('startup_seconds'), '.2f')} "
                f"| {ratio(step, ry_step) if is_peer else ''} "
                f"| {ratio(marg, ry_marg) if is_peer else ''} |"
            )

    out += [
        "",
        "Scaling, 10x the steps (~10x is linear; 'minus fixed' subtracts the chain2 time):",
        "",
    ]
    for system in systems:
        base = series.get((system, BASELINE))
        fixed = base.median("seconds") if base else None
        for small, big in (("chain100", "chain1000"), ("fan500", "fan5000")):
            a, b = series.get((system, small)), series.get((system, big))
            ma = a.median("seconds") if a else None
            mb = b.median("seconds") if b else None
            if ma and mb:
                line = f"- {system} {small} -> {big}: {mb / ma:.1f}x"
                if fixed is not None and ma > fixed:
                    line += f" (minus fixed: {(mb - fixed) / (ma - fixed):.1f}x)"
                out.append(line)

    ry5k = series.get(("runyard", "fan5000"))
    if ry5k and ry5k.runs:
        sec, mb = ry5k.median("seconds"), ry5k.median("peak_rss_mb")
        out += ["", "Targets:", ""]
        if sec is not None and mb is not None:
            out.append(f"- runyard fan5000 < 3 s: {sec:.2f} s -> {'PASS' if sec < 3 else 'FAIL'}")
            out.append(f"- runyard fan5000 < 150 MB: {mb:.0f} MB -> {'PASS' if mb < 150 else 'FAIL'}")
    for wl in WORKLOADS:
        for how, fn in (("per-step", per_step_ms), ("marginal", marginal_ms)):
            d, r = fn(series, "dagster", wl), fn(series, "runyard", wl)
            if d is not None and r is not None and d > 0 and r > 0:
                verdict = "PASS" if d / r >= 20 else "FAIL"
                out.append(f"- {how} overhead >= 20x lower than Dagster ({wl.name}): {d / r:.0f}x -> {verdict}")

    notes = []
    for wl in WORKLOADS:
        p = series.get(("prefect", wl.name))
        if p and p.runs:
            notes.append(
                f"- prefect {wl.name}: ephemeral API server start "
                f"{fmt(p.median('server_start_seconds'), '.1f')} s (not in median s), "
                f"server process peak {fmt(p.median('server_peak_rss_mb'), '.0f')} MB "
                "(not in peak MB)"
            )
    if notes:
        out += ["", "Notes:", "", *notes]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        choices=SYSTEMS,
        action="append",
        help="run only this system (repeatable); the floor always runs",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="repetitions for every non-slow run (overrides the two below)",
    )
    parser.add_argument("--runyard-repeat", type=int, default=5)
    parser.add_argument("--peer-repeat", type=int, default=3)
    parser.add_argument(
        "--slow-repeat",
        type=int,
        default=1,
        help="repetitions for the minutes-long peer fan5000 runs",
    )
    parser.add_argument("--quick", action="store_true", help="1 repetition each and skip the slow peer fan5000 runs")
    parser.add_argument(
        "--quiet-peers",
        action="store_true",
        help="turn peer per-step console logging down (Dagster ERROR, "
        "Prefect WARNING) to see how much of their cost is logging",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="per run, seconds")
    parser.add_argument("--runyard-python", default=str(RUNYARD_PYTHON))
    parser.add_argument("--peer-python", default=str(PEER_PYTHON))
    parser.add_argument("--out", default=str(RESULTS), help="JSON results file")
    args = parser.parse_args()

    systems: list[str] = []
    skipped: dict[str, str] = {}
    for system in args.only or SYSTEMS:
        why = check_available(system, python_for(system, args))
        if why:
            skipped[system] = why
            print(f"skipping {system}: {why}", file=sys.stderr)
        else:
            systems.append(system)
    if not systems:
        print("nothing to run", file=sys.stderr)
        return 1

    warm_up(systems, args)
    series: Table = {}
    for wl in WORKLOADS:
        plan = {s: repeats_for(s, wl, args) for s in ("floor", *systems) if s == "floor" or s in wl.systems}
        if args.quick:
            plan = {s: r for s, r in plan.items() if (s, wl.name) not in SLOW}
        plan = {s: r for s, r in plan.items() if r > 0}
        if set(plan) <= {"floor"}:  # the floor alone compares nothing
            continue
        # Round-robin over systems within each repetition so a noisy spell on
        # the machine hits every system rather than all repetitions of one.
        for rep in range(max(plan.values())):
            for system, count in plan.items():
                if rep >= count:
                    continue
                s = series.setdefault((system, wl.name), Series(system, wl))
                print(
                    f"[{wl.name}] {system} run {rep + 1}/{count} ...",
                    file=sys.stderr,
                    end=" ",
                    flush=True,
                )
                rec = run_once(system, wl, python_for(system, args), args)
                if isinstance(rec, str):
                    s.failures.append(rec)
                    print(f"FAILED {rec}", file=sys.stderr)
                else:
                    s.runs.append(rec)
                    print(f"{rec['seconds']:.3f} s, {rec['peak_rss_mb']:.0f} MB", file=sys.stderr)

    lines = report(series, systems)
    print("\n".join(lines))

    versions = {}
    for s in series.values():
        for r in s.runs:
            if "version" in r:
                versions[s.system] = r["version"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                },
                "versions": versions,
                "args": {k: v for k, v in vars(args).items()},
                "skipped": skipped,
                "series": [
                    {
                        "system": s.system,
                        "workload": s.workload.name,
                        "kind": s.workload.kind,
                        "n": s.workload.n,
                        "steps": s.workload.steps,
                        "median_seconds": s.median("seconds"),
                        "per_step_ms": per_step_ms(series, s.system, s.workload),
                        "marginal_ms": None if s.system == "floor" else marginal_ms(series, s.system, s.workload),
                        "median_peak_rss_mb": s.median("peak_rss_mb"),
                        "runs": s.runs,
                        "failures": s.failures,
                    }
                    for s in series.values()
                ],
                "report_markdown": lines,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out}", file=sys.stderr)
    return 1 if any(s.failures for s in series.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
