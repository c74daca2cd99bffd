"""The conformance kit, run against one held-back executor in a pytest subprocess.

`tests/test_kit_heldback.py` runs this file with ``RUNYARD_HELDBACK_VARIANT`` set to a
variant's name (or ``reference``); the plugin is registered in the kit's own throwaway
registry, never in the process-wide one. Not collected by the suite itself (no ``test_``
prefix): it is meant to fail for every variant.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import pytest
from runyard.testing.conformance import ExecutorConformance

from tests.kit_heldback import plugin

VARIANT = os.environ.get("RUNYARD_HELDBACK_VARIANT", "reference")


@pytest.fixture
def runyard_registry(runyard_registry: Any) -> Any:
    runyard_registry.register(plugin, name="kit-heldback", distribution="runyard-kit-heldback")
    return runyard_registry


class TestHeldbackExecutor(ExecutorConformance):
    executor = plugin.executor_name(VARIANT)
    executor_config: ClassVar[dict[str, Any]] = {"max_concurrent": 4}
