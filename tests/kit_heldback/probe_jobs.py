"""Jobs the probes run: each exposes one clause of the executor contract, so a probe shows
that a held-back variant really breaks it (and the reference does not). Imported by step
workers as ``tests.kit_heldback.probe_jobs`` (the repository root is on PYTHONPATH).

Steps that need a scratch directory read it from ``run_config["probe"]["scratch"]``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from runyard import FailureKind, RetryPolicy, job, step

BEAT_EVERY = 0.05
BIG_OUTPUT = 200_000  # characters: several times what a pipe holds


def _scratch(context) -> Path:  # type: ignore[no-untyped-def]
    return Path(context.run_config["probe"]["scratch"])


def _beat_forever(context, name: str, seconds: float = 60) -> int:  # type: ignore[no-untyped-def]
    scratch = _scratch(context)
    (scratch / f"{name}.pid").write_text(str(os.getpid()))
    end = time.monotonic() + seconds
    with (scratch / f"{name}.beat").open("a") as f:
        while time.monotonic() < end:
            f.write(f"{time.time()}\n")
            f.flush()
            time.sleep(BEAT_EVERY)
    return 0


# -- events: each reported once, in order, with level and logger; all the output ---------------


@step
def talk(context) -> int:  # type: ignore[no-untyped-def]
    context.log.setLevel(logging.INFO)  # the step wants its INFO records heard
    context.log.info("probe info record")
    context.log.warning("probe warning record")
    context.log.error("probe error record")
    print("probe stdout line")
    print("probe stderr line", file=sys.stderr)
    sys.stdout.write("probe unterminated tail")  # no newline: a prompt, a progress bar
    sys.stdout.flush()
    return 7


@step
def after_talk(x: int) -> int:
    return x + 1


@job
def talk_job():  # type: ignore[no-untyped-def]
    after_talk(talk())


# -- crashes: a failure, with what the step said before it died -------------------------------


@step
def last_words(context) -> int:  # type: ignore[no-untyped-def]
    context.log.warning("probe last words")
    time.sleep(0.5)
    os._exit(0)  # a library calling exit: status 0, yet the step never returned


@step
def killed(context) -> int:  # type: ignore[no-untyped-def]
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)
    return 0


@job
def crash_job():  # type: ignore[no-untyped-def]
    last_words()
    killed()


# -- retries: each attempt's events carry its own attempt and attempt_id ------------------------


@step(retry=RetryPolicy(max_retries=1))
def second_time_lucky(context) -> int:  # type: ignore[no-untyped-def]
    context.log.warning(f"probe attempt {context.attempt}")
    if context.attempt == 1:
        raise ValueError("probe: the first attempt fails")
    return context.attempt


@job
def retry_job():  # type: ignore[no-untyped-def]
    second_time_lucky()


# -- processes: nothing the step started outlives it --------------------------------------------


STUBBORN = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "open(sys.argv[1], 'w').write('ready')\n"
    "time.sleep(60)\n"
)


@step
def spawn_stubborn(context) -> int:  # type: ignore[no-untyped-def]
    """Starts a child that ignores SIGTERM (a daemon, a tool with its own signal handling)
    and returns without waiting for it."""
    scratch = _scratch(context)
    ready = scratch / "stubborn.ready"
    child = subprocess.Popen([sys.executable, "-c", STUBBORN, str(ready)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    (scratch / "stubborn.json").write_text(json.dumps({"pid": child.pid, "worker": os.getpid()}))
    return child.pid


@job
def stubborn_job():  # type: ignore[no-untyped-def]
    spawn_stubborn()


# -- stopping: a retry that times out is stopped; a step stopped at once never runs ---------------


@step(timeout=4.0, retry=RetryPolicy(max_retries=1, retry_on=[FailureKind.ERROR]))
def beat_on_retry(context) -> int:  # type: ignore[no-untyped-def]
    if context.attempt == 1:
        raise RuntimeError("probe: the first attempt fails at once")
    return _beat_forever(context, "retry")


@job
def retry_timeout_job():  # type: ignore[no-untyped-def]
    beat_on_retry()


@step
def beat(context) -> int:  # type: ignore[no-untyped-def]
    return _beat_forever(context, "beat")


@job
def beat_job():  # type: ignore[no-untyped-def]
    beat()


@step
def quick() -> int:
    return 1


@job
def quick_job():  # type: ignore[no-untyped-def]
    quick()


# -- a step that writes a lot -----------------------------------------------------------------


@step(timeout=10.0)  # bounds the run when an executor hangs on it
def shout() -> int:
    sys.stdout.write("x" * BIG_OUTPUT + "\n")
    sys.stdout.flush()
    return 1


@job
def shout_job():  # type: ignore[no-untyped-def]
    shout()


# -- concurrency: three steps meet while running --------------------------------------------------


@step
def meet(context, i: int) -> int:  # type: ignore[no-untyped-def]
    kit = context.run_config["probe"]
    scratch = _scratch(context)
    (scratch / f"arrived-{i}").write_text(str(time.time()))
    deadline = time.monotonic() + float(kit["meet_wait"])
    while time.monotonic() < deadline and not (scratch / "gave-up").exists():
        if len(list(scratch.glob("arrived-*"))) >= int(kit["meet"]):
            return i
        time.sleep(0.02)
    (scratch / "gave-up").touch()
    raise RuntimeError(f"only {len(list(scratch.glob('arrived-*')))} of {kit['meet']} steps ran at once")


@job
def meet_job():  # type: ignore[no-untyped-def]
    for i in range(3):
        meet.alias(f"meet_{i}")(i)
