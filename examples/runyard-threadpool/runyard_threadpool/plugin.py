"""Registers the ``threadpool`` executor with runyard.

runyard imports this module (through the ``runyard`` entry point) whenever it looks for
plugins: to list them, to validate ``runyard.yaml``, to run any job. So it imports only
the public plugin API and attrs, never the handler module.
"""

from __future__ import annotations

import attrs
from runyard.plugin import Capabilities, ExecutorConfig, ExecutorSpec, hookimpl


@attrs.frozen(kw_only=True)
class ThreadPoolConfig(ExecutorConfig):
    """Settings of the ``threadpool`` executor, on top of ``max_concurrent`` and
    ``tag_concurrency_limits``.

    ``thread_name_prefix``: prefix of the worker threads' names (shown by debuggers,
    ``threading.current_thread().name`` and log formats using ``%(threadName)s``). May be
    ``{env: NAME}`` in YAML; the handler reads it with `runyard.plugin.resolve`.
    """

    thread_name_prefix: str = "runyard-step"


@hookimpl
def runyard_executors() -> list[ExecutorSpec]:
    return [
        ExecutorSpec(
            name="threadpool",
            handler="runyard_threadpool.handler:ThreadPoolStepHandler",
            config=ThreadPoolConfig,
            capabilities=Capabilities(
                # A Python thread cannot be stopped from outside, so neither a timeout nor a
                # cancel can end a running step: runyard rejects jobs with step timeouts.
                enforces_timeouts=False,
                can_terminate=False,
                supports_resources=False,
                max_concurrency=None,
                # Steps run in the engine's own process, so the in-memory output store of an
                # ephemeral instance is visible to them.
                needs_shared_outputs=False,
            ),
            description="Steps on a thread pool in the run's own process (I/O-bound steps).",
            # The plugin API this was written against: a runyard with another one refuses to
            # load the spec instead of failing at run time. Required, and written as a literal.
            api_version=1,
        )
    ]
