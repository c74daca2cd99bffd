"""Launch-to-finished and CLI start-up, runyard side by side with Dagster, in one run.

* launch: `runyard job launch --wait` of a one-step job, from the command's start to the
  run finished (read from runyard's storage), against `dagster job launch` through
  Dagster's default run launcher (end time read from Dagster's own run storage);
* start-up: `runyard --help`, `runyard plugin list` and `runyard job execute --help` against
  `dagster --help` and a bare `python -c pass` of the *same venv's* interpreter.

Every child runs with bytecode caching on, into one cache (`benv.bytecode_env`), so neither
runyard's editable sources nor the floor are recompiled per process.

Usage: python3 benchmarks/bench_launch.py [--repeat N]. Needs the project venv (.venv)
and the peer venv (benchmarks/setup-peers.sh). Prints a markdown table of medians.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benv import bytecode_env, interpreter, load_average

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNYARD_BIN = ROOT / ".venv" / "bin"
PEER_BIN = HERE / ".venv-peers" / "bin"


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def time_command(cmd: list[str], env: dict[str, str], repeat: int) -> list[float]:
    subprocess.run(cmd, env=env, capture_output=True, check=True)  # warm caches once
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, capture_output=True, check=True)
        out.append(time.perf_counter() - t0)
    return out


def runyard_launch(repeat: int) -> list[float]:
    home = Path(tempfile.mkdtemp(prefix="bench-runyard-home-"))
    env = {**bytecode_env(), "RUNYARD_HOME": str(home)}
    cmd = [
        str(RUNYARD_BIN / "runyard"),
        "job",
        "launch",
        "-f",
        str(HERE / "launch" / "runyard_one.py"),
        "--wait",
        "--json",
    ]
    samples = []
    for i in range(repeat + 1):
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"runyard launch failed: {proc.stdout}{proc.stderr}")
        # Read the end time straight from runyard's SQLite file: no import in this process.
        with sqlite3.connect(home / "runyard.db") as db:
            status, ended_at = db.execute(
                "SELECT status, ended_at FROM runs ORDER BY created_at DESC LIMIT 1"
            ).fetchone()
        assert status == "SUCCESS", status
        if i:  # the first launch warms the page cache and byte-code; not counted
            samples.append(ended_at - t0)
    return samples


def dagster_launch(repeat: int) -> list[float]:
    home = Path(tempfile.mkdtemp(prefix="bench-dagster-home-"))
    # The default run coordinator, as `dagster job launch` would use without a daemon: the
    # queued coordinator (Dagster's default now) needs `dagster-daemon` to dequeue runs.
    (home / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\n"
        "run_coordinator:\n  module: dagster.core.run_coordinator\n  class: DefaultRunCoordinator\n"
    )
    env = {**bytecode_env(), "DAGSTER_HOME": str(home)}
    poller = subprocess.Popen(
        [str(PEER_BIN / "python"), str(HERE / "launch" / "dagster_poll.py")],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert poller.stdout and poller.stdin
    assert poller.stdout.readline().strip() == "ready"
    samples = []
    try:
        for i in range(repeat + 1):
            run_id = str(uuid.uuid4())
            t0 = time.time()
            subprocess.run(
                [
                    str(PEER_BIN / "dagster"),
                    "job",
                    "launch",
                    "-f",
                    str(HERE / "launch" / "dagster_one.py"),
                    "-j",
                    "one",
                    "--run-id",
                    run_id,
                ],
                env=env,
                capture_output=True,
                check=True,
            )
            poller.stdin.write(run_id + "\n")
            poller.stdin.flush()
            end, status = poller.stdout.readline().split()
            assert status == "SUCCESS", status
            if i:
                samples.append(float(end) - t0)
    finally:
        poller.stdin.close()
        poller.wait(30)
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--help-repeat", type=int, default=15)
    args = ap.parse_args()
    env = bytecode_env()
    load_before = load_average()
    # The floor is runyard's own venv interpreter: the base interpreter that started this
    # script may be another build or version, with another site and start-up cost.
    results: dict[str, list[float]] = {
        "python -c pass (runyard's venv)": time_command([str(RUNYARD_BIN / "python"), "-c", "pass"], env,
                                                        args.help_repeat),
        "runyard --help": time_command([str(RUNYARD_BIN / "runyard"), "--help"], env, args.help_repeat),
        "runyard plugin list": time_command([str(RUNYARD_BIN / "runyard"), "plugin", "list"], env, args.help_repeat),
        "runyard job execute --help": time_command([str(RUNYARD_BIN / "runyard"), "job", "execute", "--help"], env,
                                                   args.help_repeat),
    }
    has_peers = (PEER_BIN / "dagster").exists()
    if has_peers:
        results["dagster --help"] = time_command(
            [str(PEER_BIN / "dagster"), "--help"], env, max(3, args.help_repeat // 3)
        )
    results["runyard job launch --wait (1 step)"] = runyard_launch(args.repeat)
    if has_peers:
        results["dagster job launch, default run launcher (1 step)"] = dagster_launch(args.repeat)
    else:
        print("peer venv missing: run benchmarks/setup-peers.sh for the Dagster columns", file=sys.stderr)
    print(f"load average before {load_before}, after {load_average()}")
    print(f"runyard interpreter: {interpreter(RUNYARD_BIN / 'python')}")
    if has_peers:
        print(f"dagster interpreter: {interpreter(PEER_BIN / 'python')}")
    print("| measurement | median ms | runs |")
    print("|---|---|---|")
    for name, samples in results.items():
        print(f"| {name} | {_median_ms(samples):.0f} | {len(samples)} |")
    if has_peers:
        r = statistics.median(results["runyard job launch --wait (1 step)"])
        d = statistics.median(results["dagster job launch, default run launcher (1 step)"])
        print(f"\nlaunch-to-finished: Dagster / runyard = {d / r:.1f}x (target >= 5x, runyard < 500 ms)")
        h = statistics.median(results["runyard --help"])
        floor = statistics.median(results["python -c pass (runyard's venv)"])
        print(f"--help / python -c pass = {h / floor:.1f}x (target <= 3x)")
        dh = statistics.median(results["dagster --help"])
        print(f"--help: Dagster / runyard = {dh / h:.1f}x (target: runyard < 150 ms)")
    out = HERE / "results" / "launch.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_before": load_before,
                               "load_after": load_average(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
