"""``runyard api``: the machine interface executors and launchers call."""

from __future__ import annotations

import sys

import click


@click.group()
def api() -> None:
    """Commands run by executors and launchers, not by people."""


@api.command("execute-step")
@click.argument("request", required=False)
def execute_step(request: str | None) -> None:
    """Run one step attempt from a JSON StepRequest (argument or stdin); print events as JSON lines.

    Exit status is 0 when the step ran (whether it succeeded or failed: the events say
    which) and 2 when the request is malformed.
    """
    from ..plugin import StepRequest
    from ..plugin import execute_step as run

    raw = request if request is not None else sys.stdin.read()
    try:
        req = StepRequest.from_json(raw)
    except Exception as e:
        raise click.UsageError(f"malformed step request: {type(e).__name__}: {e}") from e
    for ev in run(req):
        sys.stdout.write(ev.to_json() + "\n")
    sys.stdout.flush()
