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
def execute_step(request: str | None, stream: bool) -> None:
    """Run one step attempt from a JSON StepRequest (argument or stdin); print events as JSON lines.

    Exit status is 0 when the step ran (whether it succeeded or failed: the events say
    which) and 2 when the request is malformed. With --stream, each event line is
    printed and flushed as the step emits it.

    \b
    Example:
      runyard api execute-step '{"run_id": "r1", "step_key": "emit", ...}'
    """
    from ..plugin import Event, StepRequest
    from ..plugin import execute_step as run

    raw = request if request is not None else sys.stdin.read()
    try:
        req = StepRequest.from_json(raw)
    except Exception as e:
        raise click.UsageError(f"malformed step request: {type(e).__name__}: {e}") from e
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
    from .. import cli_worker
    from ..instance import Instance
    from ..runs import execute_run as run

    # As in `job execute`: orphans of the steps' processes are adopted, and none outlives the run.
    cli_worker.become_subreaper()
    try:
        result = run(Instance.from_env(), run_id)
    finally:
        cli_worker.kill_descendants()
    sys.exit(0 if result.status.value == "SUCCESS" else 1)
