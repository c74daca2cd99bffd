#!/usr/bin/env python3
"""Side by side: runyard at a base commit (main) against this working tree, in one run.

Measures the in-process workloads of `bench_inprocess.py` (``workloads.runyard_job``)
and the multiprocess run of `bench_multiprocess.py` (``--child runyard``) with the two
source trees alternated (base, tree, tree, base, ...), so that load drifting over the run
lands on both alike. Each measurement is a fresh interpreter of the project venv with
``PYTHONPATH`` pointing at one tree's ``core`` and ``plugins`` (ahead of the venv's
editable install); the base tree is ``git archive`` of the base commit. Prints medians,
ratios tree/base and the load average before and after. A script, not a test.

    python3 benchmarks/bench_branches.py                      # main vs the working tree
    python3 benchmarks/bench_branches.py --repeat 15 --base origin/main
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PYTHON = REPO / ".venv" / "bin" / "python"
RESULTS = HERE / "results" / "branches.json"
INPROCESS = ("chain:2", "chain:100", "fan:500", "chain:1000", "fan:5000")


def export(ref: str, dest: Path) -> Path:
    """The ``core`` and ``plugins`` trees of ``ref``, unpacked under ``dest``."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref, "core", "plugins"],
                          check=True, capture_output=True).stdout
    tar_path = dest / "base.tar"
    tar_path.write_bytes(data)
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest / "tree", filter="data")
    return dest / "tree"


def env_for(tree: Path, pycache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{tree / 'core'}{os.pathsep}{tree / 'plugins'}"
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_json(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[dict[str, Any], float]:
    """Run one measurement; its JSON line and the CPU seconds the child (and its children) used."""
    before = child_cpu()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    cpu = child_cpu() - before
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line), cpu


def verify_tree(tree: Path, env: dict[str, str]) -> None:
    """The child really imports runyard from ``tree`` (not the venv's editable install)."""
    out = subprocess.run([str(PYTHON), "-c", "import runyard, runyard_local; print(runyard.__file__); "
                          "print(runyard_local.__file__)"], env=env, capture_output=True, text=True, check=True)
    for path in out.stdout.split():
        if not path.startswith(str(tree)):
            raise SystemExit(f"the child imported {path}, not from {tree}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="main", help="the commit to compare with (default: main)")
    parser.add_argument("--repeat", type=int, default=9, help="measurements per tree and workload")
    parser.add_argument("--mp-steps", type=int, default=40)
    parser.add_argument("--skip-mp", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    sys.path.insert(0, str(HERE))
    import bench_multiprocess

    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    load_before = os.getloadavg()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="runyard-bench-branches-") as tmp:
        t = Path(tmp)
        trees = {"base": export(args.base, t), "tree": REPO}
        envs = {name: env_for(tree, t / f"pycache-{name}") for name, tree in trees.items()}
        for name, tree in trees.items():
            verify_tree(tree, envs[name])
        workloads = [("inprocess", w) for w in INPROCESS] + ([] if args.skip_mp else [("multiprocess", "forkserver")])
        # One untimed warm-up per tree and workload (bytecode caches, page cache).
        for rep in range(-1, args.repeat):
            order = ("base", "tree") if rep % 2 == 0 else ("tree", "base")
            for family, w in workloads:
                for name in order:
                    if family == "inprocess":
                        kind, n = w.split(":")
                        rec, cpu = run_json([str(PYTHON), "-m", "workloads.runyard_job", kind, n], HERE, envs[name])
                        sample = {"seconds": rec["seconds"], "process_cpu": cpu}
                        label = f"{kind}{n}"
                    else:
                        workdir = t / f"mp-{name}-{rep}"
                        workdir.mkdir()
                        bench_multiprocess.prepare(workdir, args.mp_steps)
                        env = {**envs[name], "PYTHONPATH": f"{envs[name]['PYTHONPATH']}{os.pathsep}{workdir}",
                               "RUNYARD_HOME": str(workdir / "runyard-home")}
                        rec, cpu = run_json(
                            [str(PYTHON), str(HERE / "bench_multiprocess.py"), "--child", "runyard", "--method", w,
                             "--steps", str(args.mp_steps), "--concurrency", "2", "--workdir", str(workdir)],
                            workdir, env)
                        sample = {"seconds": rec["seconds"], "process_cpu": cpu, "run_cpu": rec["cpu_seconds"]}
                        label = f"multiprocess-{w}-{args.mp_steps}"
                    if rep >= 0:
                        results.setdefault(label, {}).setdefault(name, []).append(sample)
            print(f"repetition {rep + 1}/{args.repeat} done (load {os.getloadavg()[0]:.2f})", file=sys.stderr)
    load_after = os.getloadavg()

    rows = []
    print(f"\nbase={args.base} vs working tree; {args.repeat} alternated repetitions; load average before "
          f"{'/'.join(f'{x:.2f}' for x in load_before)}, after {'/'.join(f'{x:.2f}' for x in load_after)}; "
          f"{time.time() - started:.0f}s in all\n")
    print("| workload | metric | base median | tree median | ratio tree/base |")
    print("|---|---|---|---|---|")
    for label, by_tree in results.items():
        for metric in by_tree["base"][0]:
            base = statistics.median(s[metric] for s in by_tree["base"])
            tree = statistics.median(s[metric] for s in by_tree["tree"])
            rows.append({"workload": label, "metric": metric, "base": base, "tree": tree, "ratio": tree / base})
            print(f"| {label} | {metric} | {base:.4f} | {tree:.4f} | {tree / base:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "base": args.base, "repeat": args.repeat, "load_before": load_before, "load_after": load_after,
        "rows": rows, "samples": results,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
