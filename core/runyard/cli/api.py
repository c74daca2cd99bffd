"""``runyard api``: the machine interface executors and launchers call."""

from __future__ import annotations

import sys
from typing import Any

import click


@click.group()
def api() -> None:
    """Commands run by executors and launchers, not by people.

    \b
    Example:
      runyard api execute-step < request.json
    """


@api.command("execute-step")
@click.argument("request", required=False)
@click.option("--stream", is_flag=True, help="Print each event as soon as it is emitted, not when the step ends.")
@click.option("--code-location", "code_locations", multiple=True, metavar="DIR_OR_MODULE",
              help="Directory or module whose jobs may run (repeatable; default: RUNYARD_STEP_WORKER, else "
              "step_worker.code_locations in runyard.yaml).")
@click.option("--output-store", "output_stores", multiple=True, metavar="URL",
              help="Output store the step may read and write (repeatable; default: RUNYARD_STEP_WORKER, else "
              "step_worker.output_stores, else the instance's outputs).")
@click.option("--allow-unsigned", is_flag=True,
              help="Run a request without a signature when no signing key is configured (a request you made "
              "yourself, on this host); code locations and output stores still apply.")
def execute_step(request: str | None, stream: bool, code_locations: tuple[str, ...],
                 output_stores: tuple[str, ...], allow_unsigned: bool) -> None:
    """Run one step attempt from a signed JSON StepRequest (argument or stdin); print events as JSON lines.

    The request must carry a valid signature for the key in RUNYARD_SIGNING_KEY (or
    step_worker.signing_key), and name a job in one of this worker's code locations and an
    output store among its output stores; otherwise nothing is loaded and the one event
    printed is a STEP_FAILURE saying why (see docs/security.md).

    Exit status is 0 when the step ran or was refused (the events say which), and 2 when
    the request is malformed or the worker's settings are wrong. With --stream, each event
    line is printed and flushed as the step emits it. Stdout carries events only: what the step
    writes to fds 1 and 2 comes back as STEP_STDOUT/STEP_STDERR events. SIGTERM stops
    the step: its ending is a STEP_FAILURE of kind CANCELED, and the worker exits 0
    within 5 seconds.

    \b
    Example:
      runyard api execute-step --code-location ./jobs '{"run_id": "r1", ..., "signature": "hmac-sha256:..."}'
    """
    import json

    from ..errors import ConfigError
    from ..plugin import Event, StepRequest, admit_or_refuse, load_worker_policy

    raw = request if request is not None else sys.stdin.read()
    try:
        payload = json.loads(raw)
        # Only its shape is checked here (nothing is loaded): trust is decided below.
        StepRequest.from_dict({k: v for k, v in payload.items() if k != "signature"})
    except Exception as e:
        raise click.UsageError(f"malformed step request: {type(e).__name__}: {e}") from e
    try:
        policy = load_worker_policy(code_locations=code_locations, output_stores=output_stores,
                                    require_signature=not allow_unsigned)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    req = admit_or_refuse(policy, payload)
    if isinstance(req, Event):  # refused: nothing was imported or read
        sys.stdout.write(req.to_json() + "\n")
        sys.stdout.flush()
        return
    _serve(req, live=stream)


# How long a step has after SIGTERM to end before the worker reports it CANCELED and exits.
TERM_GRACE = 5.0


def _serve(req: Any, *, live: bool) -> None:
    """Run the step with its output kept off the event stream (`FdEventStream`), and stop it
    cleanly on SIGTERM: the step is interrupted (StepInterrupted raised in it), its ending
    is a STEP_FAILURE of kind CANCELED, and the worker exits 0 within TERM_GRACE seconds
    even if the step ignores the interrupt."""
    import os
    import signal
    import threading

    from ..events import EventType, FailureInfo, FailureKind
    from ..plugin import execute_step as run
    from ..worker import FdEventStream, StepInterrupted

    base = {"run_id": req.run_id, "step_key": req.step_key, "attempt": req.attempt, "attempt_id": req.attempt_id}
    events = FdEventStream(base, live=live)
    state = {"running": False, "writing": False, "pending": False, "termed": False}
    message = f"step '{req.step_key}' was stopped: its step worker received SIGTERM"

    def emit(ev: Any) -> None:
        if ev.type in (EventType.STEP_OUTPUT, EventType.STEP_SUCCESS, EventType.STEP_FAILURE):
            state["running"] = False  # the step is over: a SIGTERM now changes nothing
        state["writing"] = True
        try:
            events.emit(ev)
        finally:
            state["writing"] = False
        if ev.type is EventType.STEP_START:
            state["running"] = True
        if state["pending"] and state["running"]:
            state["pending"] = False
            raise StepInterrupted(FailureKind.CANCELED, message)

    def give_up() -> None:
        # The step did not end within the grace period (blocked in C code, or it caught
        # the interrupt): report it canceled and end the process, threads and all.
        if events.end(FailureInfo(kind=FailureKind.CANCELED, message=f"{message} and did not stop within "
                                  f"{TERM_GRACE:g}s; the worker exited")):
            events.close()
        os._exit(0)

    def on_term(signum: int, frame: Any) -> None:
        if state["termed"]:
            # A second SIGTERM: stop waiting. From a thread, since this handler may have
            # interrupted the main thread while it held the event stream's lock.
            threading.Thread(target=give_up, daemon=True).start()
            return
        state["termed"] = True
        timer = threading.Timer(TERM_GRACE, give_up)
        timer.daemon = True
        timer.start()
        if state["running"] and not state["writing"]:
            raise StepInterrupted(FailureKind.CANCELED, message)
        state["pending"] = True  # delivered once the step starts or the event line is written

    previous = signal.signal(signal.SIGTERM, on_term)
    events.open()
    try:
        try:
            run(req, capture_output=False, on_event=emit)
        except StepInterrupted as e:  # delivered between two statements of execute_step
            state["running"] = False
            events.end(FailureInfo(kind=e.kind, message=str(e)))
        state["running"] = False
    finally:
        signal.signal(signal.SIGTERM, previous)
        events.close()


@api.command("execute-run")
@click.argument("run_id")
def execute_run(run_id: str) -> None:
    """Run worker: execute the stored run RUN_ID here (started by a run launcher).

    SIGTERM cancels the run cleanly. Exit status 0 if the run succeeded, 1 otherwise.

    \b
    Example (what the default run launcher starts):
      python -m runyard api execute-run 3f2c9a1b04de4f6e8d7c6b5a49382716
    """
    from ..cli_worker import run_worker

    sys.exit(run_worker(run_id))
