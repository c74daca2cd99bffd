"""Registers the reference handler (``kit_reference``) and every mutant as executors."""

from __future__ import annotations

from runyard.plugin import API_VERSION, Capabilities, ExecutorSpec, hookimpl

from .mutants import MUTANTS

CAPABILITIES = Capabilities(enforces_timeouts=True, can_terminate=True, needs_shared_outputs=True)


@hookimpl
def runyard_executors() -> list[ExecutorSpec]:
    specs = [ExecutorSpec(name="kit_reference", handler="tests.kit_mutants.reference:ReferenceHandler",
                          capabilities=CAPABILITIES, api_version=API_VERSION)]
    for name, (cls, _) in MUTANTS.items():
        specs.append(ExecutorSpec(name=name, handler=f"tests.kit_mutants.mutants:{cls.__name__}",
                                  capabilities=CAPABILITIES, api_version=API_VERSION))
    return specs
