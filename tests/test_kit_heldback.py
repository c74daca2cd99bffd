"""Mutation test of the conformance kit with a held-back set of broken executors.

Issue 11: "The kit's own tests include a set of deliberately broken handlers, each of
which must fail the kit. A further set is held back and must fail it as well." This is
that further set, written apart from the kit and its own mutants: a correct reference
executor (a ``runyard api execute-step`` subprocess per step, `kit_heldback.reference`)
and variants of it with one subtle contract violation each (`kit_heldback.variants`,
listed with the clause they break in `kit_heldback.catalog`).

Each case runs the kit (`kit_heldback/kit_suite.py`, a plain `ExecutorConformance`
subclass) against one executor in a pytest subprocess, with the executor registered in
the kit's throwaway registry. The reference must pass the whole kit; every variant must
fail it. To keep the suite quick, a variant is run against the kit tests about the
clause it breaks (its ``focus``, a ``-k`` expression; the whole kit when that selects
nothing); with ``RUNYARD_HELDBACK_FULL=1`` the rest of the kit runs too when those pass,
so the verdict is the whole kit's. A red variant test means the kit MISSES that defect:
it stays red until the kit catches it.

The probes (`kit_heldback/probes.py`) show, without the kit, that each variant really
breaks its clause and that the reference keeps it: a kit that passes a variant misses
a real defect.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kit_heldback import plugin, probes
from tests.kit_heldback.catalog import REFERENCE, VARIANTS, Variant
from tests.kit_heldback.runner import KIT_TIMEOUT, ROOT, TOKEN_VAR, kill_leftovers, kit_verdict, run_kit

pytestmark = pytest.mark.slow


def test_reference_passes_the_kit(tmp_path: Path) -> None:
    run = run_kit(REFERENCE, tmp_path, stop_at_first=False)
    assert run.exit_code == 0 and not run.failed, (
        f"the held-back reference executor fails the kit: {run.failed}\n{run.output[-4000:]}"
    )
    assert run.passed, run.output[-2000:]
    assert run.leftovers == 0, f"the reference left {run.leftovers} processes running after the kit"


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_kit_fails_heldback_variant(variant: Variant, tmp_path: Path) -> None:
    verdict = kit_verdict(variant, tmp_path)
    if verdict.caught is None:
        pytest.fail(f"no verdict: a kit run against '{variant.name}' did not finish within {KIT_TIMEOUT:g}s or "
                    f"broke (a hang is not a verdict)\n{verdict.describe()}", pytrace=False)
    if not verdict.caught:
        pytest.fail(f"MISSED: the conformance kit passes held-back variant '{variant.name}': {variant.defect}. "
                    f"It breaks: {variant.clause}. Shown by probe '{variant.probe}'.\n{verdict.describe()}",
                    pytrace=False)


# -- the probes: each variant really is broken, the reference is not ---------------------------


@pytest.fixture
def runyard_registry(runyard_registry: Any) -> Any:
    runyard_registry.register(plugin, name="kit-heldback", distribution="runyard-kit-heldback")
    return runyard_registry


@pytest.fixture
def probe_env(runyard_instance: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Step workers import the probe jobs from this repository, and carry a token so that
    whatever a broken variant leaves running is killed after the probe."""
    token = uuid.uuid4().hex
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv(TOKEN_VAR, token)
    scratch = tmp_path / "probe-scratch"
    scratch.mkdir()
    yield lambda variant: probes.ProbeEnv(variant, runyard_instance, scratch)
    kill_leftovers(token)


@pytest.mark.parametrize("probe", sorted(probes.PROBES))
def test_reference_keeps_the_contract(probe: str, probe_env: Any) -> None:
    probes.PROBES[probe](probe_env(REFERENCE))


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_variant_really_breaks_its_clause(variant: Variant, probe_env: Any) -> None:
    with pytest.raises(AssertionError) as broken:
        probes.PROBES[variant.probe](probe_env(variant.name))
    print(f"{variant.name}: {variant.probe}: {str(broken.value).splitlines()[0]}")
