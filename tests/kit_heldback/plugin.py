"""Registers the held-back reference executor and its broken variants, one executor each.

Registered only in a throwaway registry (the ``runyard_registry`` fixture of `kit_suite`),
never through an entry point. Light, as a plugin module should be: the handlers are named
by import strings and imported only when a run uses them.
"""

from __future__ import annotations

from runyard.plugin import Capabilities, ExecutorSpec, hookimpl

from .catalog import REFERENCE, VARIANTS

# What the reference can honour: it stops steps (a timeout, a cancel) by their process group.
HONEST = Capabilities(enforces_timeouts=True, can_terminate=True, needs_shared_outputs=True)


def executor_name(variant: str) -> str:
    return f"heldback_{variant}"


@hookimpl
def runyard_executors() -> list[ExecutorSpec]:
    specs = [
        ExecutorSpec(
            name=executor_name(REFERENCE),
            handler="tests.kit_heldback.reference:ReferenceStepHandler",
            capabilities=HONEST,
            description="Held-back reference: a step per `runyard api execute-step` subprocess.",
            api_version=1,
        )
    ]
    for v in VARIANTS:
        specs.append(
            ExecutorSpec(
                name=executor_name(v.name),
                handler=f"tests.kit_heldback.variants:{v.handler}",
                capabilities=HONEST,
                description=v.defect,
                api_version=1,
            )
        )
    return specs
