"""The execution plan: deterministic order, step selection, and re-execution from a parent run."""

from __future__ import annotations

from pathlib import Path

import pytest
from runyard import StepSelectionError, job, step
from runyard.instance import Instance
from runyard.plan import ExecutionPlan, resolve_selection
from runyard.storage import RunStatus


@step
def source(value: int) -> int:
    return value


@step
def combine(a: int, b: int) -> int:
    return a + b


@job
def diamond():  # type: ignore[no-untyped-def]
    s = source(1)
    zeta = source.alias("zeta")(s)
    alpha = source.alias("alpha")(s)
    mid = source.alias("mid")(s)
    combine(combine.alias("left")(zeta, alpha), mid)


@job
def etl():  # type: ignore[no-untyped-def]
    a = source.alias("load_a")(1)
    b = source.alias("load_b")(2)
    source.alias("other")(3)
    combine.alias("transform")(a, b)


def test_plan_order_is_deterministic() -> None:
    first = list(ExecutionPlan.build(diamond).steps)
    for _ in range(5):
        assert list(ExecutionPlan.build(diamond).steps) == first


def test_siblings_run_in_body_order() -> None:
    plan = ExecutionPlan.build(diamond)
    # zeta, alpha and mid are ready at once: body order, not alphabetical.
    assert list(plan.steps) == ["source", "zeta", "alpha", "mid", "left", "combine"]
    assert plan.steps["source"].downstream == ("zeta", "alpha", "mid")
    assert plan.steps["combine"].upstream == ("left", "mid")
    assert plan.external == frozenset()


def test_in_process_run_follows_the_plan_order() -> None:
    result = diamond.execute_in_process(raise_on_error=True)
    starts = [e.step_key for e in result.events if e.type.value == "STEP_START"]
    assert starts == ["source", "zeta", "alpha", "mid", "left", "combine"]
    assert result.output_for("combine") == 3


def test_selection_by_keys_and_globs() -> None:
    assert resolve_selection(etl, ["transform"]) == {"transform"}
    assert resolve_selection(etl, ["load_*"]) == {"load_a", "load_b"}
    assert resolve_selection(etl, ["load_?", "other"]) == {"load_a", "load_b", "other"}
    assert resolve_selection(etl, ["*"]) == set(etl.nodes)


def test_selected_plan_keeps_order_and_records_external_upstream() -> None:
    plan = ExecutionPlan.build(etl, ["transform", "load_a"])
    assert list(plan.steps) == ["load_a", "transform"]
    assert plan.steps["transform"].upstream == ("load_a",)
    assert plan.external == frozenset({"load_b"})
    only_loads = ExecutionPlan.build(etl, ["load_*"])
    assert list(only_loads.steps) == ["load_a", "load_b"]
    assert only_loads.external == frozenset()


@pytest.mark.parametrize("pattern", ["nope", "nope_*"])
def test_unknown_selection_names_the_jobs_steps(pattern: str) -> None:
    with pytest.raises(StepSelectionError) as e:
        ExecutionPlan.build(etl, ["load_a", pattern])
    assert str(e.value) == (
        f"job 'etl' has no step matching '{pattern}'; its steps are: load_a, load_b, other, transform"
    )


def test_unknown_selection_raises_from_execute_in_process(runyard_instance: Instance) -> None:
    with pytest.raises(StepSelectionError) as e:
        etl.execute_in_process(instance=runyard_instance, step_selection=["trans"])
    assert "has no step matching 'trans'" in str(e.value)
    assert runyard_instance.storage.list_runs() == []


def test_selection_needing_upstream_output_without_parent_run_is_an_error(runyard_instance: Instance) -> None:
    with pytest.raises(StepSelectionError) as e:
        etl.execute_in_process(instance=runyard_instance, step_selection=["transform"])
    assert str(e.value) == (
        "the selected steps read outputs of unselected step(s) load_a, load_b; "
        "pass the run they come from (parent_run_id / --parent RUN_ID)"
    )
    assert runyard_instance.storage.list_runs() == []


# -- re-execution -------------------------------------------------------------------------


def _count(context, name: str) -> None:  # type: ignore[no-untyped-def]
    counter = Path(context.run_config["scratch"]) / name
    counter.write_text(str(int(counter.read_text()) + 1 if counter.exists() else 1))


@step
def extract(context, value: int) -> int:  # type: ignore[no-untyped-def]
    _count(context, context.step_key)
    return value


@step
def transform(context, x: int) -> int:  # type: ignore[no-untyped-def]
    _count(context, context.step_key)
    return x * 10


@step
def report(context, x: int, y: int) -> str:  # type: ignore[no-untyped-def]
    _count(context, context.step_key)
    return f"{x}/{y}"


@job
def pipeline():  # type: ignore[no-untyped-def]
    e = extract(4)
    t = transform(e)
    report(e, t)


def _counts(scratch: Path) -> dict[str, int]:
    return {p.name: int(p.read_text()) for p in scratch.iterdir()}


def test_re_execution_runs_only_the_selected_steps(runyard_instance: Instance, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    rc = {"scratch": str(scratch)}
    parent = pipeline.execute_in_process(instance=runyard_instance, run_config=rc, raise_on_error=True)
    assert _counts(scratch) == {"extract": 1, "transform": 1, "report": 1}

    child = pipeline.execute_in_process(
        instance=runyard_instance, run_config=rc, step_selection=["transform"], parent_run_id=parent.run_id
    )
    assert child.success, child.events
    assert _counts(scratch) == {"extract": 1, "transform": 2, "report": 1}  # extract did not run again
    assert dict(child.step_states) == {"transform": "success"}
    assert child.output_for("transform") == 40
    assert child.run.parent_run_id == parent.run_id
    assert list(child.run.step_selection or []) == ["transform"]
    started = {e.step_key for e in child.events if e.type.value == "STEP_START"}
    assert started == {"transform"}


def test_re_execution_reads_outputs_through_ancestor_runs(runyard_instance: Instance, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    rc = {"scratch": str(scratch)}
    first = pipeline.execute_in_process(instance=runyard_instance, run_config=rc, raise_on_error=True)
    second = pipeline.execute_in_process(
        instance=runyard_instance, run_config=rc, step_selection=["transform"], parent_run_id=first.run_id
    )
    # `report` reads `transform` from the second run and `extract` from the first, through it.
    third = pipeline.execute_in_process(
        instance=runyard_instance, run_config=rc, step_selection=["report"], parent_run_id=second.run_id
    )
    assert third.success, third.events
    assert third.output_for("report") == "4/40"
    assert _counts(scratch) == {"extract": 1, "transform": 2, "report": 2}


def test_re_execution_with_a_glob_selection(runyard_instance: Instance, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    rc = {"scratch": str(scratch)}
    parent = pipeline.execute_in_process(instance=runyard_instance, run_config=rc, raise_on_error=True)
    child = pipeline.execute_in_process(
        instance=runyard_instance, run_config=rc, step_selection=["trans*", "rep*"], parent_run_id=parent.run_id
    )
    assert child.success
    assert set(child.step_states) == {"transform", "report"}
    assert _counts(scratch) == {"extract": 1, "transform": 2, "report": 2}


def test_re_execution_from_an_unknown_parent_run(runyard_instance: Instance, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(StepSelectionError) as e:
        pipeline.execute_in_process(
            instance=runyard_instance,
            run_config={"scratch": str(scratch)},
            step_selection=["transform"],
            parent_run_id="0" * 32,
        )
    assert str(e.value) == f"parent run {'0' * 32} not found in this instance"
    assert list(scratch.iterdir()) == []  # nothing ran


def test_rejected_re_execution_leaves_no_run_behind(runyard_instance: Instance, tmp_path: Path) -> None:
    # A selection refused before any step runs must not leave a run record stuck in QUEUED.
    with pytest.raises(StepSelectionError):
        pipeline.execute_in_process(
            instance=runyard_instance,
            run_config={"scratch": str(tmp_path)},
            step_selection=["transform"],
            parent_run_id="0" * 32,
        )
    stuck = [r for r in runyard_instance.storage.list_runs() if not r.status.is_finished]
    assert stuck == [], f"runs left unfinished: {[(r.run_id, r.status.value) for r in stuck]}"


@step
def fails(value: int) -> int:
    raise RuntimeError("upstream broke")


@job
def broken_upstream():  # type: ignore[no-untyped-def]
    source.alias("down")(fails(1))


def test_re_execution_needs_the_parent_to_have_the_output(runyard_instance: Instance) -> None:
    parent = broken_upstream.execute_in_process(instance=runyard_instance)
    assert parent.status is RunStatus.FAILURE
    with pytest.raises(StepSelectionError) as e:
        broken_upstream.execute_in_process(
            instance=runyard_instance, step_selection=["down"], parent_run_id=parent.run_id
        )
    assert str(e.value) == (
        f"run {parent.run_id} has no output for step(s) fails that the selected steps need; "
        "add them to the selection"
    )
