#!/usr/bin/env python3
"""`runyard ui` benchmark: an instance holding 10,000 runs and one 5,000-step run.

Measures, against one `runyard ui` process (SQLite storage unless --postgres):

* runs page: server time to the first byte and to the whole page (plain HTTP, no browser),
  and the full load in headless Chromium (navigation start to the load event);
* run page of the 5,000-step run: navigation start to the timeline drawn with every step
  (headless Chromium; the page sets ``data-drawn-at`` when its first full view is drawn);
* live log latency, two ways: (a) from an output event stored (as a streaming executor
  stores it) to its text in the open page, (b) from a real step's ``print`` (the line
  carries the time it was printed) to the text in the page.

The 10,000 runs are written through the storage API (each with its five lifecycle events);
the 5,000-step run is a real in-process run of a real job, so the run page draws real data.
A script, not a test: it prints medians and saves them to results/ui.json.

    .venv/bin/python benchmarks/bench_ui.py             # ~3-5 min
    .venv/bin/python benchmarks/bench_ui.py --runs 2000 --steps 1000 --repeat 3   # quick
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "ui.json"
RUNYARD = Path(sys.executable).parent / "runyard"

# A fan: source -> (n - 2) x work -> total; repeated calls get keys work, work_2, ...
BIG_JOB = '''
from runyard import job, step

@step
def source() -> int:
    return 1

@step
def work(x: int) -> int:
    return x + 1

@step
def total(xs: list[int]) -> int:
    return sum(xs)

@job
def wide():
    s = source()
    total([work(s) for _ in range({n})])
'''

LIVE_JOB = '''
import sys, time
from pathlib import Path
from runyard import job, step

HERE = Path(__file__).parent

@step
def talk() -> int:
    for i in range({lines}):
        print(f"printed-at {{time.time():.6f}} line {nonce}-{{i}}", flush=True)
        time.sleep(1.5)
    return 1

@job
def live():
    talk()
'''


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def populate_runs(home: Path, n: int) -> None:
    from runyard.events import Event, EventType
    from runyard.instance import Instance
    from runyard.storage import RunRecord, RunStatus

    storage = Instance(home).storage
    now = time.time() - n * 10
    statuses = [RunStatus.SUCCESS] * 7 + [RunStatus.FAILURE, RunStatus.CANCELED, RunStatus.SUCCESS]
    for i in range(n):
        st = statuses[i % len(statuses)]
        created = now + i * 10
        run = RunRecord(job_name=f"job_{i % 25}", tags={"team": f"t{i % 7}", "env": "prod" if i % 2 else "dev"},
                        status=st, created_at=created, started_at=created + 0.5, ended_at=created + 3 + i % 50)
        storage.add_run(run)
        storage.store_events([
            Event(type=t, run_id=run.run_id, timestamp=created + k)
            for k, t in enumerate((EventType.RUN_QUEUED, EventType.RUN_STARTING, EventType.RUN_LAUNCHED,
                                   EventType.RUN_START,
                                   EventType.RUN_SUCCESS if st is RunStatus.SUCCESS else EventType.RUN_FAILURE))
        ])


def big_run(home: Path, work: Path, steps: int) -> str:
    job_file = work / "wide.py"
    job_file.write_text(BIG_JOB.format(n=steps - 2))
    env = {**os.environ, "RUNYARD_HOME": str(home)}
    proc = subprocess.run([str(RUNYARD), "job", "execute", "-f", str(job_file), "--executor", "in_process", "--json"],
                          env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"the {steps}-step run failed:\n{proc.stderr[-3000:]}")
    from runyard.instance import Instance

    run = Instance(home).storage.list_runs(limit=1)[0]
    return run.run_id


def start_ui(home: Path) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "RUNYARD_HOME": str(home)}
    env.pop("RUNYARD_UI_TOKEN", None)
    proc = subprocess.Popen([str(RUNYARD), "ui", "--port", "0"], env=env, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if "http://" not in line:
        raise SystemExit(f"runyard ui did not start: {line!r}")
    return proc, line.split(" at ", 1)[1].split()[0].rstrip("/")


def http_times(url: str, path: str, repeat: int) -> tuple[list[float], list[float]]:
    host, port = url.removeprefix("http://").split(":")
    first, full = [], []
    for _ in range(repeat):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        t0 = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read(1)
        t1 = time.perf_counter()
        resp.read()
        t2 = time.perf_counter()
        conn.close()
        assert resp.status == 200, resp.status
        first.append((t1 - t0) * 1000)
        full.append((t2 - t0) * 1000)
    return first, full


def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)


def wait(check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise SystemExit("timed out waiting in the browser")


def page_loads(driver: Any, url: str, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        driver.get(url)  # returns after the load event
        out.append(driver.execute_script(
            "const n = performance.getEntriesByType('navigation')[0]; return n.loadEventEnd - n.startTime"))
    return out


def run_page_draws(driver: Any, url: str, steps: int, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        driver.get(url)
        drawn = wait(lambda: driver.execute_script(
            "return document.body.dataset.drawnAt && Number(document.body.dataset.steps) >= arguments[0] "
            "? Number(document.body.dataset.drawnAt) : null", steps))
        out.append(drawn)
    return out


# Records when each line of this session (its nonce) first shows in the page's logs.
OBSERVE = """
window.__seen = window.__seen || {};
const logs = document.getElementById('logs'), nonce = arguments[0];
new MutationObserver(() => {
  for (const m of logs.textContent.matchAll(/(printed-at|stored-at) ([0-9.]+) line (\\S+)/g)) {
    if (!m[3].startsWith(nonce)) continue;
    const k = m[1] + ' ' + m[3];
    if (!(k in window.__seen)) window.__seen[k] = [Number(m[2]), Date.now() / 1000];
  }
}).observe(logs, {childList: true, subtree: true, characterData: true});
"""


def stored_latency(driver: Any, home: Path, ui: str, run_id: str, step: str, n: int) -> list[float]:
    from runyard.events import Event, EventType
    from runyard.instance import Instance

    storage = Instance(home).storage
    driver.get(f"{ui}/runs/{run_id}?step={step}")
    wait(lambda: driver.execute_script("return document.body.dataset.drawnAt"))
    nonce = uuid.uuid4().hex[:8]
    driver.execute_script(OBSERVE, nonce)
    for i in range(n):
        storage.store_events([Event(type=EventType.STEP_STDOUT, run_id=run_id, step_key=step, attempt=1,
                                    data={"text": f"stored-at {time.time():.6f} line {nonce}-{i}\n"})])
        time.sleep(0.7)
    wait(lambda: driver.execute_script(f"return Object.keys(window.__seen).length >= {n}"), 30)
    seen = driver.execute_script("return window.__seen")
    return [(b - a) * 1000 for k, (a, b) in seen.items() if k.startswith("stored-at")]


def print_latency(driver: Any, home: Path, work: Path, ui: str, lines: int, executor: str) -> list[float]:
    job_file = work / "live.py"
    nonce = uuid.uuid4().hex[:8]
    job_file.write_text(LIVE_JOB.format(lines=lines, nonce=nonce))
    env = {**os.environ, "RUNYARD_HOME": str(home)}
    out = subprocess.run([str(RUNYARD), "job", "launch", "-f", str(job_file), "--executor", executor],
                         env=env, capture_output=True, text=True, timeout=120)
    run_id = out.stdout.strip().split()[0]
    driver.get(f"{ui}/runs/{run_id}?step=talk")
    wait(lambda: driver.execute_script("return document.body.dataset.timeline"))
    driver.execute_script(OBSERVE, nonce)
    from runyard.instance import Instance

    storage = Instance(home).storage
    wait(lambda: storage.get_run(run_id).status.is_finished, lines * 1.5 + 60)
    time.sleep(1.0)
    seen = driver.execute_script("return window.__seen")
    return [(b - a) * 1000 for k, (a, b) in seen.items() if k.startswith("printed-at")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=5_000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--executor", default="multiprocess", help="executor of the print-latency run")
    ap.add_argument("--keep", type=Path, help="build the instance here and keep it; reuse it when it exists")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="runyard-bench-ui-"))
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    reuse = (work / "big-run").exists()
    results: dict[str, Any] = {"runs": args.runs, "steps": args.steps, "repeat": args.repeat,
                               "machine": platform.platform(), "load_before": os.getloadavg()}
    ui_proc = None
    try:
        t = time.perf_counter()
        if reuse:
            big = (work / "big-run").read_text().strip()
        else:
            populate_runs(home, args.runs)
            big = big_run(home, work, args.steps)
            (work / "big-run").write_text(big)
        results["setup_seconds"] = round(time.perf_counter() - t, 1)
        ui_proc, ui = start_ui(home)
        http_times(ui, "/", 3)  # warm: templates compiled, connections open
        first, full = http_times(ui, "/", args.repeat * 3)
        results["runs_page_first_byte_ms"] = median(first)
        results["runs_page_server_ms"] = median(full)
        f2, full2 = http_times(ui, "/?job=job_3&status=FAILURE&page=2", args.repeat * 3)
        results["runs_page_filtered_server_ms"] = median(full2)
        _, api = http_times(ui, f"/api/runs/{big}/events?after=0", args.repeat)
        results["run_events_api_ms"] = median(api)
        driver = browser()
        try:
            page_loads(driver, ui + "/", 2)
            results["runs_page_browser_load_ms"] = median(page_loads(driver, ui + "/", args.repeat))
            run_page_draws(driver, f"{ui}/runs/{big}", args.steps, 1)
            results["run_page_timeline_drawn_ms"] = median(run_page_draws(driver, f"{ui}/runs/{big}", args.steps,
                                                                          args.repeat))
            results["live_stored_to_page_ms"] = median(stored_latency(driver, home, ui, big, "source", args.repeat))
            lat = print_latency(driver, home, work, ui, args.repeat, args.executor)
            results["live_print_to_page_ms"] = median(lat) if lat else None
            results["live_print_executor"] = args.executor
        finally:
            driver.quit()
    finally:
        if ui_proc is not None:
            ui_proc.terminate()
            ui_proc.wait(timeout=20)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    results["load_after"] = os.getloadavg()
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    targets = {"runs_page_server_ms": 300, "run_page_timeline_drawn_ms": 2000, "live_stored_to_page_ms": 1000,
               "live_print_to_page_ms": 1000}
    print(f"{'measure':34} {'median':>10} {'target':>8}")
    for k, v in results.items():
        if k.endswith("_ms"):
            tgt = targets.get(k)
            shown = f"{v:10.0f}" if isinstance(v, float | int) else f"{'n/a':>10}"
            print(f"{k:34} {shown} {('≤ ' + str(tgt)) if tgt else '':>8}")
    print(f"load average before {results['load_before']}, after {results['load_after']}")


if __name__ == "__main__":
    main()
