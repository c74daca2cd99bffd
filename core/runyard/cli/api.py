"""``runyard api``: the machine interface executors and launchers call."""

from __future__ import annotations

import sys

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
    the request is not JSON or the worker's settings are wrong. With --stream, each event
    line is printed and flushed as the step emits it.

    \b
    Example:
      runyard api execute-step --code-location ./jobs '{"run_id": "r1", ..., "signature": "hmac-sha256:..."}'
    """
    import json

    from ..errors import ConfigError
    from ..plugin import Event, StepRequest, admit_or_refuse, load_worker_policy
    from ..plugin import execute_step as run

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
    if stream:
        # The real stream: while the step runs, sys.stdout is the step's capture buffer.
        out = sys.__stdout__ or sys.stdout

        def emit(ev: Event) -> None:
            out.write(ev.to_json() + "\n")
            out.flush()

        run(req, on_event=emit)
        return
    for ev in run(req):
        sys.stdout.write(ev.to_json() + "\n")
    sys.stdout.flush()


@api.command("execute-run")
@click.argument("run_id")
def execute_run(run_id: str) -> None:
    """Run worker: execute the stored run RUN_ID here (started by a run launcher).

    SIGTERM cancels the run cleanly. Exit status 0 if the run succeeded, 1 otherwise.

    \b
    Example (what the default run launcher starts):
      python -m runyard api execute-run 3f2c9a1b04de4f6e8d7c6b5a49382716
    """
    from ..instance import Instance
    from ..runs import execute_run as run

    result = run(Instance.from_env(), run_id)
    sys.exit(0 if result.status.value == "SUCCESS" else 1)
