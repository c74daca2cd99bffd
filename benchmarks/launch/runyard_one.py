"""One no-op step: measures what a launch costs, not what a step does."""

from runyard import job, step


@step
def noop() -> int:
    return 1


@job
def one():
    noop()
