"""The same one no-op step for Dagster."""

from dagster import job, op


@op
def noop() -> int:
    return 1


@job
def one():
    noop()
