#!/usr/bin/env python3
"""Side-by-side Kubernetes benchmark on the test cluster (scripts/services.sh k8s):
runyard's ``k8s`` executor and ``k8s`` run launcher against the floor, bare Jobs of the
same image created and waited for with the same client.

* executor: 20 no-op steps at ``max_concurrent=2``, each a Job of its own (``execute_job``
  in a fresh process, engine there) against the floor: 20 bare Jobs (``python3 -c pass``),
  2 at a time, each created, watched until its pod succeeded, and deleted, through
  ``runyard_k8s._k8s.Cluster`` (the backend's own client calls);
* launcher: ``runyard job launch --wait`` of a 1-step job through the ``k8s`` run launcher
  (PostgreSQL storage, the run pod on the node's network, executor ``in_process``) against
  one bare Job.

Measurements alternate between runyard and the floor, so both see the same load; the
report gives medians and ratios and saves every repetition (and the load average) to
``benchmarks/results/k8s.json``. A script, not a test: it asserts nothing.

With ``--dagster-venv VENV --dagster-wheelhouse DIR`` the same 20 no-op steps also run
through Dagster's ``k8s_job_executor`` (``max_concurrent: 2``), in the same rotation:
Dagster and dagster-k8s installed in a venv of their own (never the project's), and an
image built here from the wheelhouse (``pip download dagster dagster-k8s``) on the test
base image, since no registry is reachable. Its run storage is SQLite in a DAGSTER_HOME
mounted into the step pods at the same path (one node). Both sides are timed inside their
process, around the execution call only (imports and interpreter start excluded).

    python3 benchmarks/bench_k8s.py              # 3 repetitions (~4 min)
    python3 benchmarks/bench_k8s.py --reps 1
    python3 benchmarks/bench_k8s.py --dagster-venv /tmp/d/venv --dagster-wheelhouse /tmp/d/wheelhouse
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
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
RESULTS = HERE / "results" / "k8s.json"
PYTHON = REPO / ".venv" / "bin" / "python"
KUBECONFIG = Path(os.environ.get("RUNYARD_K8S_KUBECONFIG") or REPO / ".ci" / "state" / "k8s.kubeconfig")
PG_URL = os.environ.get("RUNYARD_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/runyard_k8s_test")

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


def sh(cmd: list[str], cwd_: Path = REPO, **kw: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=cwd_, text=True, capture_output=True, **kw)
    if done.returncode != 0:
        said = f"{done.stdout[-3000:]}{done.stderr[-3000:]}"
        raise SystemExit(f"{' '.join(cmd)[:200]} failed ({done.returncode}):\n{said}")
    return done


def cluster() -> Any:
    sys.path.insert(0, str(REPO / "contrib-k8s"))
    from runyard_k8s._k8s import Cluster
    from runyard_k8s.settings import K8sSettings

    return Cluster(K8sSettings(image="unused", kubeconfig_file=str(KUBECONFIG)), "bench")


def make_namespace(c: Any) -> str:
    """A namespace for one benchmark run (delete it at the end), ready for Jobs."""
    ns = f"runyard-bench-{secrets.token_hex(3)}"
    c.create_namespace(ns, {"runyard.bench": "1"})
    while True:  # the namespace's default ServiceAccount, made by the controller-manager
        try:
            c.core.read_namespaced_service_account("default", ns, _preload_content=False)
            return ns
        except Exception:
            time.sleep(0.2)


def bare_job(c: Any, ns: str, image: str, tag: str) -> None:
    """One bare Job: created, its pod watched until it ended, the Job deleted."""
    name = f"bench-floor-{secrets.token_hex(4)}"
    labels = {"runyard.bench": tag, "bench-job": name}
    body = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels},
            "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": {
                "restartPolicy": "Never", "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 2,
                "containers": [{"name": "runyard", "image": image, "imagePullPolicy": "Never",
                                "command": ["python3", "-c", "pass"]}]}}}}
    c.create_job(ns, body)
    sel = f"bench-job={name}"
    pods, version = c.list_pods(ns, sel)
    done = any((p.get("status") or {}).get("phase") in ("Succeeded", "Failed") for p in pods)
    while not done:
        for _, pod in c.watch_pods(ns, sel, version, timeout_seconds=60):
            version = pod["metadata"]["resourceVersion"]
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                done = True
                break
    c.delete_job(ns, name, propagation="Background", grace=0)


def floor_many(c: Any, ns: str, image: str, n: int, concurrency: int) -> float:
    todo = list(range(n))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                todo.pop()
            bare_job(c, ns, image, "floor")

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def settings(image: str, ns: str, tmp: Path) -> dict[str, Any]:
    return {"image": image, "image_pull_policy": "Never", "namespace": ns, "kubeconfig_file": str(KUBECONFIG),
            "labels": {"runyard.bench": "1"}, "terminate_grace": 2,
            "volumes": [{"name": "bench", "hostPath": {"path": str(tmp)}}],
            "volume_mounts": [{"name": "bench", "mountPath": str(tmp)}]}


def runyard_executor(home: Path, jobs: Path, concurrency: int) -> float:
    code = f"""
import time
from runyard import Instance, execute_job
from runyard.definitions import CodePointer
from runyard.loader import load_job
job = load_job(CodePointer(file={str(jobs)!r}), "wide")[0]
instance = Instance({str(home)!r})
start = time.perf_counter()
result = execute_job(job, instance=instance, run_config={{"execution": {{"k8s": {{"max_concurrent": {concurrency}}}}}}})
elapsed = time.perf_counter() - start
assert result.success, [e.message for e in result.events if e.type.value == "STEP_FAILURE"]
print(elapsed)
"""
    out = sh([str(PYTHON), "-c", code], env={**os.environ, "RUNYARD_HOME": str(home)})
    return float(out.stdout.strip().splitlines()[-1])


DAGSTER_JOBS = '''
from dagster import job, op
from dagster_k8s import k8s_job_executor


@op
def noop(context) -> int:
    return 1


@job(executor_def=k8s_job_executor)
def wide():
    for i in range(STEPS):
        noop.alias(f"noop_{i}")()
'''

DAGSTER_RUN = '''
import sys, time
sys.path.insert(0, HERE)
import dagster_bench_jobs
from dagster import DagsterInstance, execute_job, reconstructable
job = reconstructable(dagster_bench_jobs.wide)
with DagsterInstance.get() as instance:
    start = time.perf_counter()
    result = execute_job(job, instance=instance, run_config=RUN_CONFIG)
    elapsed = time.perf_counter() - start
    assert result.success, [e.message for e in result.all_events if e.is_failure]
print(elapsed)
'''


def dagster_image(venv: Path, wheelhouse: Path) -> str:
    """An image with dagster and dagster-k8s from ``wheelhouse``, on the test base image."""
    version = sh([str(venv / "bin" / "python"), "-c", "import dagster; print(dagster.__version__)"]).stdout.strip()
    tag = f"runyard-bench/dagster-k8s:{version}"
    if subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0:
        return tag
    # docker run + commit rather than docker build: the build's container would inherit the
    # base image's runyard.test=1 label, and the test suites sweeping that label (run by other
    # worktrees on this engine) would kill it; here it is relabelled for its short life.
    name = f"runyard-bench-dagster-build-{secrets.token_hex(3)}"
    try:
        sh(["docker", "run", "--name", name, "--label", "runyard.test=0", "-v", f"{wheelhouse}:/wheels:ro",
            "runyard-test/py311-base:bookworm", "sh", "-c",
            "python3 -m venv /opt/dagster && /opt/dagster/bin/pip install -q --no-index --find-links /wheels "
            f"dagster=={version} dagster-k8s"])
        path = "/opt/dagster/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        sh(["docker", "commit", "-c", f"ENV PATH={path}", "-c", "LABEL runyard.test=1", name, tag])
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    return tag


def dagster_executor(venv: Path, tmp: Path, ns: str, image: str, concurrency: int) -> float:
    home = tmp / "dagster-home"
    home.mkdir(exist_ok=True)
    # k8s_job_executor reads defaults from the instance's run launcher, which must be a
    # K8sRunLauncher (it launches nothing here: the run executes in this process).
    import yaml

    (home / "dagster.yaml").write_text(yaml.safe_dump({
        "telemetry": {"enabled": False},
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": {
            "instance_config_map": "unused", "service_account_name": "default", "dagster_home": str(home),
            "load_incluster_config": False,
            "kubeconfig_file": str(KUBECONFIG), "job_namespace": ns, "image_pull_policy": "Never",
            "job_image": image}}}))
    run_config = {"execution": {"config": {
        "job_namespace": ns, "load_incluster_config": False, "kubeconfig_file": str(KUBECONFIG),
        "job_image": image, "image_pull_policy": "Never", "max_concurrent": concurrency,
        "env_vars": [f"DAGSTER_HOME={home}"], "labels": {"runyard.bench": "dagster"},
        "volumes": [{"name": "bench", "host_path": {"path": str(tmp)}}],
        "volume_mounts": [{"name": "bench", "mount_path": str(tmp)}]}}}
    code = DAGSTER_RUN.replace("HERE", repr(str(tmp))).replace("RUN_CONFIG", repr(run_config))
    out = sh([str(venv / "bin" / "python"), "-c", code], env={**os.environ, "DAGSTER_HOME": str(home)}, cwd_=tmp)
    return float(out.stdout.strip().splitlines()[-1])


def runyard_launch(home: Path, jobs: Path) -> float:
    start = time.perf_counter()
    sh([str(PYTHON), "-m", "runyard", "job", "launch", "--wait", "-f", str(jobs), "-j", "one"],
       env={**os.environ, "RUNYARD_HOME": str(home)})
    return time.perf_counter() - start


def main() -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--dagster-venv", type=Path, help="a venv with dagster and dagster-k8s (not the project's)")
    ap.add_argument("--dagster-wheelhouse", type=Path, help="their wheels, for the step image")
    args = ap.parse_args()
    if (args.dagster_venv is None) != (args.dagster_wheelhouse is None):
        ap.error("give both --dagster-venv and --dagster-wheelhouse, or neither")
    sh(["bash", "scripts/services.sh", "docker", "postgres", "k8s"])
    image = sh(["bash", "scripts/build-test-image.sh"]).stdout.strip().splitlines()[-1]
    c = cluster()
    ns = make_namespace(c)
    tmp = Path(tempfile.mkdtemp(prefix="runyard-bench-k8s-"))
    schema = f"runyard_k8sbench_{secrets.token_hex(4)}"
    try:
        jobs = tmp / "jobs.py"
        jobs.write_text(JOBS.replace("STEPS", str(args.steps)))
        s = settings(image, ns, tmp)
        exec_home = tmp / "exec-home"
        exec_home.mkdir()
        (exec_home / "runyard.yaml").write_text(yaml.safe_dump({"executor": {"k8s": s}}))
        launch_home = tmp / "launch-home"
        launch_home.mkdir()
        (launch_home / "runyard.yaml").write_text(yaml.safe_dump({
            "storage": {"postgres": {"url": PG_URL, "schema": schema}},
            "executor": {"in_process": {}},
            "run_launcher": {"k8s": {**s, "pod_spec": {"hostNetwork": True}}}}))
        dagster = dagster_image(args.dagster_venv, args.dagster_wheelhouse) if args.dagster_venv else None
        if dagster is not None:
            (tmp / "dagster_bench_jobs.py").write_text(DAGSTER_JOBS.replace("STEPS", str(args.steps)))
        floor_many(c, ns, image, 2, 2)  # warm-up
        runyard_launch(launch_home, jobs)
        keys = ("executor", "executor_floor", "launch", "launch_floor") + (("dagster",) if dagster else ())
        reps: dict[str, list[float]] = {k: [] for k in keys}
        loads = []
        for i in range(args.reps):
            reps["executor_floor"].append(floor_many(c, ns, image, args.steps, args.concurrency))
            reps["executor"].append(runyard_executor(exec_home, jobs, args.concurrency))
            reps["launch_floor"].append(floor_many(c, ns, image, 1, 1))
            reps["launch"].append(runyard_launch(launch_home, jobs))
            if dagster is not None:
                try:
                    reps["dagster"].append(dagster_executor(args.dagster_venv, tmp, ns, dagster, args.concurrency))
                except SystemExit as e:  # Dagster's failure must not lose runyard's numbers
                    print(f"Dagster's run failed; not measured further:\n{e}", file=sys.stderr)
                    dagster = None
                    del reps["dagster"]
            loads.append(os.getloadavg()[0])
            print(f"rep {i + 1}/{args.reps}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in reps.items())
                  + f" (load {loads[-1]:.1f})", flush=True)
    finally:
        c.delete_namespace(ns)
        c.close()
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            import psycopg
            from psycopg import sql

            with psycopg.connect(PG_URL, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        except Exception as e:  # noqa: BLE001
            print(f"could not drop schema {schema}: {e}", file=sys.stderr)
    m = {k: statistics.median(v) for k, v in reps.items()}
    rows = [
        (f"{args.steps} no-op steps, max_concurrent={args.concurrency}: k8s executor", m["executor"],
         m["executor_floor"]),
        ("job launch --wait, 1 step (launcher k8s, executor in_process)", m["launch"], m["launch_floor"]),
    ]
    print(f"\n{'measurement':<72} {'runyard':>9} {'floor':>9} {'ratio':>6}")
    for name, ours, floor in rows:
        print(f"{name:<72} {ours:>8.2f}s {floor:>8.2f}s {ours / floor:>5.2f}x")
    ratios = {"executor": m["executor"] / m["executor_floor"], "launch": m["launch"] / m["launch_floor"]}
    if "dagster" in m:
        ratios["dagster_per_step_over_runyard"] = m["dagster"] / m["executor"]
        print(f"Dagster k8s_job_executor, same {args.steps} steps: {m['dagster']:.2f}s "
              f"({m['dagster'] / args.steps:.2f}s per step against runyard's {m['executor'] / args.steps:.2f}s: "
              f"{m['dagster'] / m['executor']:.2f}x)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_per_rep": loads},
        "kubernetes": "1.20.2 (Debian src:kubernetes, scripts/services.d/k8s.sh)",
        "image": image,
        "steps": args.steps,
        "concurrency": args.concurrency,
        "repetitions": reps,
        "medians": m,
        "ratios": ratios,
    }, indent=2) + "\n")
    print(f"\nsaved {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
