"""Jobs of the runyard-k8s tests, loaded by file: pods import them from the tests directory,
mounted at the same path (hostPath on the one-node test cluster)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from runyard import job, step
from runyard.testing.jobs import rendezvous


@step
def noop() -> int:
    return 1


@step
def many_lines() -> int:
    """10,000 numbered lines on stdout, then a failure: every line must reach the events."""
    for i in range(10_000):
        print(f"line {i:05d} of the k8s log test")
    sys.stdout.flush()
    raise RuntimeError("failing after 10000 lines")


@step(tags={"runyard/resources": "memory=64m"})
def hog() -> int:
    block = bytearray(512 * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return len(block)


@step
def wait_for_go(context) -> int:  # type: ignore[no-untyped-def]
    """Writes `started` in the scratch dir, then waits for `go` (at most 120 s)."""
    scratch = Path(context.run_config["scratch"])
    (scratch / f"{context.step_key}.started").write_text("1")
    print("waiting for go", flush=True)
    deadline = time.monotonic() + 120
    while not (scratch / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    print("got go", flush=True)
    return 7


@step(tags={"runyard/k8s/config": '{"pod_spec": {"nodeSelector": {"runyard.test/no-such-node": "1"}}}'})
def unschedulable() -> int:
    return 1


@step(tags={"runyard/k8s/config": '{"service_account_name": "does-not-exist"}'})
def no_service_account() -> int:
    return 1


@step(tags={"runyard/k8s/config": '{"image": "runyard-test/absent:never", "image_pull_policy": "Never"}'})
def absent_image() -> int:
    return 1


@job
def noop_job():  # type: ignore[no-untyped-def]
    noop()


@job
def many_lines_job():  # type: ignore[no-untyped-def]
    many_lines()


@job
def oom_job():  # type: ignore[no-untyped-def]
    hog()


@job
def go_job():  # type: ignore[no-untyped-def]
    wait_for_go()


@job
def unschedulable_job():  # type: ignore[no-untyped-def]
    unschedulable()


@job
def no_service_account_job():  # type: ignore[no-untyped-def]
    no_service_account()


@job
def absent_image_job():  # type: ignore[no-untyped-def]
    absent_image()


@job
def wide_job():  # type: ignore[no-untyped-def]
    """Twenty independent no-op steps (noop, noop_2, ... noop_20): concurrency and the benchmark."""
    for _ in range(20):
        noop()


@job
def rendezvous_wide_job():  # type: ignore[no-untyped-def]
    """Twenty steps (meet_0 ... meet_19), each waiting until run_config kit.overlap steps have
    arrived (the conformance kit's rendezvous): they succeed only if that many ran at once."""
    for i in range(20):
        rendezvous.alias(f"meet_{i}")(i)
