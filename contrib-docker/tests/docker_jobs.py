"""Jobs of the runyard-docker tests, loaded by file so containers import them from the
bind-mounted tests directory."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from runyard import job, step


@step
def streams(context) -> str:  # type: ignore[no-untyped-def]
    context.log.warning("step is waiting for the go file")
    go = Path(context.run_config["go"])
    deadline = time.monotonic() + 60
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    print("python print")
    sys.stdout.flush()
    os.system("echo from a subprocess; echo subprocess stderr >&2")
    print("python stderr", file=sys.stderr)
    return os.uname().nodename


@step(tags={"runyard/resources": "memory=64m"})
def hog() -> int:
    block = bytearray(512 * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return len(block)


@step
def killed() -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return 0


@step(tags={"runyard/docker/image": "runyard-test/does-not-exist:1"})
def elsewhere() -> int:
    return 1


@step
def one() -> int:
    return 1


@step
def plus_one(x: int) -> int:
    return x + 1


@step
def slow() -> int:
    time.sleep(120)
    return 0


@job
def stream_job():  # type: ignore[no-untyped-def]
    streams()


@job
def oom_job():  # type: ignore[no-untyped-def]
    hog()


@job
def signal_job():  # type: ignore[no-untyped-def]
    killed()


@job
def missing_image_job():  # type: ignore[no-untyped-def]
    one()
    elsewhere()


@job
def hello_job():  # type: ignore[no-untyped-def]
    plus_one(one())


@job
def slow_job():  # type: ignore[no-untyped-def]
    plus_one(slow())


@step
def look() -> dict:  # type: ignore[type-arg]
    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError as e:
            return f"unreadable: {e}"

    return {
        "env": {k: os.environ.get(k) for k in ("PASSED", "SET", "FROM_OTHER")},
        "data": read("/runyard-data/hello.txt"),
        "data_again": read("/runyard-data-again/hello.txt"),
        # cgroup v1 has a file per controller; v2 one hierarchy (cpu.max: "QUOTA PERIOD").
        "memory_limit": read("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        if Path("/sys/fs/cgroup/memory").is_dir() else read("/sys/fs/cgroup/memory.max"),
        "cpu_quota": read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        if Path("/sys/fs/cgroup/cpu").is_dir() else read("/sys/fs/cgroup/cpu.max").split()[0],
    }


@job
def look_job():  # type: ignore[no-untyped-def]
    look()
