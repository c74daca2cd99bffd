"""Step worker of the kit's reference handler: ``python worker.py EVENTS_FILE`` runs the
StepRequest read from stdin and appends its events to EVENTS_FILE, one JSON line each."""

from __future__ import annotations

import sys

from runyard.plugin import Event, StepRequest, execute_step


def main() -> int:
    request = StepRequest.from_json(sys.stdin.read())
    with open(sys.argv[1], "a") as out:

        def emit(event: Event) -> None:
            out.write(event.to_json() + "\n")
            out.flush()

        execute_step(request, on_event=emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
