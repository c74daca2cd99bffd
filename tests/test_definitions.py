"""The job model: @step, @job, graph_job, Definitions and RetryPolicy."""

from __future__ import annotations

from pathlib import Path

import pytest
from runyard import (
    DefinitionError,
    Definitions,
    FailureKind,
    JobDefinition,
    RetryPolicy,
    StepDefinition,
    StepOutput,
    graph_job,
    job,
    step,
)
from runyard.definitions import Constant, FromStep, FromSteps


@step
def add(a: int, b: int = 0) -> int:
    """Add two numbers."""
    return a + b


@step
def emit(value: int) -> int:
    return value


@step
def total(xs: list[int]) -> int:
    return sum(xs)


@step
def with_context(context, x: int) -> int:  # type: ignore[no-untyped-def]
    return x + context.attempt


# -- @step ------------------------------------------------------------------------------


def test_bare_step_takes_name_and_description_from_the_function() -> None:
    assert isinstance(add, StepDefinition)
    assert add.name == "add"
    assert add.description == "Add two numbers."
    assert add.retry is None
    assert add.tags == {}
    assert add.timeout is None
    assert add.takes_context is False


def test_step_with_options() -> None:
    policy = RetryPolicy(max_retries=3, delay=0.5, backoff=2.0, jitter=0.1)

    @step(name="custom", description="my step", retry=policy, tags={"team": "data", "tier": 1}, timeout=2.5)
    def fn(x: int) -> int:
        """Docstring loses to description=."""
        return x

    assert fn.name == "custom"
    assert fn.description == "my step"
    assert fn.retry is policy
    assert (policy.max_retries, policy.delay, policy.backoff, policy.jitter) == (3, 0.5, 2.0, 0.1)
    assert fn.tags == {"team": "data", "tier": "1"}  # tag values are strings
    assert fn.timeout == 2.5


def test_step_timeout_must_be_positive() -> None:
    with pytest.raises(DefinitionError) as e:

        @step(timeout=0)
        def fn() -> None: ...

    assert str(e.value) == "step 'fn': timeout must be > 0 seconds, got 0"


def test_step_called_outside_a_job_body_is_a_plain_function_call() -> None:
    assert add(2, 3) == 5
    assert add(a=4) == 4
    assert total([1, 2, 3]) == 6


def test_context_parameter_is_not_an_input() -> None:
    assert with_context.takes_context

    @job
    def ctx_job():  # type: ignore[no-untyped-def]
        with_context(emit(1))

    assert set(ctx_job.nodes["with_context"].inputs) == {"x"}


# -- @job -------------------------------------------------------------------------------


def test_bare_job() -> None:
    @job
    def plain():  # type: ignore[no-untyped-def]
        """Plain job."""
        add(emit(1), 2)

    assert isinstance(plain, JobDefinition)
    assert plain.name == "plain"
    assert plain.description == "Plain job."
    assert plain.executor is None and plain.executor_config is None
    assert plain.tags == {}
    assert list(plain.nodes) == ["emit", "add"]
    assert plain.nodes["add"].inputs == {"a": FromStep("emit"), "b": Constant(2)}
    assert plain.nodes["add"].upstream == ("emit",)


def test_job_with_options() -> None:
    @job(name="nightly", description="runs at night", executor="threadpool",
         executor_config={"max_concurrent": 4}, tags={"team": "data"})
    def body():  # type: ignore[no-untyped-def]
        emit(1)

    assert body.name == "nightly"
    assert body.description == "runs at night"
    assert body.executor == "threadpool"
    assert body.executor_config == {"max_concurrent": 4}
    assert body.tags == {"team": "data"}


def test_executor_config_without_executor_is_rejected() -> None:
    with pytest.raises(DefinitionError) as e:

        @job(executor_config={"max_concurrent": 4})
        def orphan():  # type: ignore[no-untyped-def]
            emit(1)

    assert str(e.value) == "job 'orphan': executor_config needs executor= to say which executor it configures"


def test_a_step_called_several_times_gets_numbered_keys() -> None:
    @job
    def thrice():  # type: ignore[no-untyped-def]
        x = add(1, 1)
        y = add(x, 1)
        add(y, 1)

    assert list(thrice.nodes) == ["add", "add_2", "add_3"]
    assert thrice.nodes["add_2"].inputs["a"] == FromStep("add")
    assert thrice.nodes["add_3"].inputs["a"] == FromStep("add_2")


def test_alias_names_a_call() -> None:
    @job
    def aliased():  # type: ignore[no-untyped-def]
        first = add.alias("first")(1, 2)
        add.alias("second")(first, 3)
        add(first)

    assert list(aliased.nodes) == ["first", "second", "add"]
    assert aliased.nodes["second"].step is add
    assert aliased.nodes["second"].upstream == ("first",)


def test_two_calls_with_the_same_alias_are_rejected() -> None:
    with pytest.raises(DefinitionError) as e:

        @job
        def twice():  # type: ignore[no-untyped-def]
            add.alias("same")(1)
            add.alias("same")(2)

    assert str(e.value) == "job 'twice': two step calls are named 'same'; give each .alias() a distinct name"


def test_alias_outside_a_job_body_is_rejected() -> None:
    with pytest.raises(DefinitionError) as e:
        add.alias("x")(1)
    assert str(e.value) == "step 'add'.alias('x') is only usable inside a job body"


def test_fan_in_list_input() -> None:
    @job
    def fan():  # type: ignore[no-untyped-def]
        total([emit(i) for i in range(3)])

    assert fan.nodes["total"].inputs == {"xs": FromSteps(("emit", "emit_2", "emit_3"))}
    assert fan.nodes["total"].upstream == ("emit", "emit_2", "emit_3")
    assert fan.execute_in_process(raise_on_error=True).output_for("total") == 3


def test_a_list_of_constants_is_a_constant_input() -> None:
    @job
    def consts():  # type: ignore[no-untyped-def]
        total([1, 2, 3])

    assert consts.nodes["total"].inputs == {"xs": Constant([1, 2, 3])}
    assert consts.execute_in_process(raise_on_error=True).output_for("total") == 6


def test_mixed_fan_in_of_outputs_and_constants_is_rejected() -> None:
    with pytest.raises(DefinitionError) as e:

        @job
        def mixed():  # type: ignore[no-untyped-def]
            total([emit(1), 5])

    assert str(e.value) == (
        "job 'mixed', step 'total', input 'xs': a fan-in list must hold only step outputs, "
        "not a mix of outputs and constants"
    )


def test_unknown_input_names_job_and_step() -> None:
    with pytest.raises(DefinitionError) as e:

        @job
        def bad_input():  # type: ignore[no-untyped-def]
            add(1, 2, c=3)

    msg = str(e.value)
    assert msg.startswith("job 'bad_input', step 'add': ")
    assert "'c'" in msg
    assert "the step's inputs are: a, b" in msg


def test_misspelt_input_names_the_unknown_input() -> None:
    # A typo (`bb` for `b`, with `a` required) is the usual way to pass an unknown input.
    # The user must learn which name is wrong, not only that something is missing.
    @step
    def pair(a: int, b: int) -> int:
        return a + b

    with pytest.raises(DefinitionError) as e:

        @job
        def typo():  # type: ignore[no-untyped-def]
            pair(a=1, bb=2)

    msg = str(e.value)
    assert msg.startswith("job 'typo', step 'pair': ")
    assert "'bb'" in msg, msg


def test_star_args_inputs_are_rejected() -> None:
    @step
    def star(*xs: int) -> int:
        return sum(xs)

    with pytest.raises(DefinitionError) as e:

        @job
        def starred():  # type: ignore[no-untyped-def]
            star(1, 2)

    assert str(e.value) == "job 'starred', step 'star': *args/**kwargs inputs are not supported"


def test_job_with_no_steps_is_rejected() -> None:
    with pytest.raises(DefinitionError) as e:

        @job
        def empty():  # type: ignore[no-untyped-def]
            pass

    assert str(e.value) == "job 'empty' calls no steps; call at least one step in its body"


def test_graph_job_with_no_steps_is_rejected() -> None:
    with pytest.raises(DefinitionError) as e:
        graph_job("empty_graph", {})
    assert "empty_graph" in str(e.value)


# -- graph_job --------------------------------------------------------------------------


def test_graph_job_builds_and_runs() -> None:
    g = graph_job(
        "graph",
        {
            "one": (emit, {"value": 1}),
            "two": (emit, {"value": 2}),
            "sum": (add, {"a": StepOutput("one"), "b": StepOutput("two")}),
            "all": (total, {"xs": [StepOutput("one"), StepOutput("two"), StepOutput("sum")]}),
        },
        description="from data",
        tags={"src": "yaml"},
    )
    assert g.description == "from data" and g.tags == {"src": "yaml"}
    assert g.nodes["all"].upstream == ("one", "two", "sum")
    result = g.execute_in_process(raise_on_error=True)
    assert result.output_for("sum") == 3
    assert result.output_for("all") == 6


def test_graph_job_cycle_names_the_steps_in_the_cycle() -> None:
    with pytest.raises(DefinitionError) as e:
        graph_job(
            "cyclic",
            {
                "a": (emit, {"value": StepOutput("b")}),
                "b": (emit, {"value": StepOutput("a")}),
            },
        )
    assert str(e.value) == "job 'cyclic' has a cycle among steps: a, b"


def test_graph_job_cycle_message_does_not_blame_steps_outside_the_cycle() -> None:
    # `start` feeds the cycle and `after` hangs off it: neither is part of the cycle.
    with pytest.raises(DefinitionError) as e:
        graph_job(
            "cyclic2",
            {
                "start": (emit, {"value": 1}),
                "a": (add, {"a": StepOutput("start"), "b": StepOutput("b")}),
                "b": (emit, {"value": StepOutput("a")}),
                "after": (emit, {"value": StepOutput("b")}),
            },
        )
    assert str(e.value) == "job 'cyclic2' has a cycle among steps: a, b"


def test_graph_job_self_loop_is_a_cycle() -> None:
    with pytest.raises(DefinitionError) as e:
        graph_job("selfish", {"a": (emit, {"value": StepOutput("a")})})
    assert str(e.value) == "job 'selfish' has a cycle among steps: a"


def test_graph_job_with_unknown_upstream() -> None:
    with pytest.raises(DefinitionError) as e:
        graph_job("dangling", {"a": (emit, {"value": StepOutput("nope")})})
    assert str(e.value) == "job 'dangling': step 'a' takes input from unknown step 'nope'"


def test_graph_job_with_unknown_input_names_job_and_step() -> None:
    with pytest.raises(DefinitionError) as e:
        graph_job("g", {"x": (emit, {"value": 1, "extra": 2})})
    msg = str(e.value)
    assert msg.startswith("job 'g', step 'x': ")
    assert "'extra'" in msg


# -- Definitions ------------------------------------------------------------------------


def test_definitions_holds_jobs_by_name() -> None:
    j1 = graph_job("one", {"e": (emit, {"value": 1})})
    j2 = graph_job("two", {"e": (emit, {"value": 2})})
    defs = Definitions(jobs=[j1, j2], executor="threadpool")
    assert defs.jobs == {"one": j1, "two": j2}
    assert defs.executor == "threadpool"


def test_definitions_with_duplicate_job_names_is_rejected() -> None:
    j1 = graph_job("same", {"e": (emit, {"value": 1})})
    j2 = graph_job("same", {"f": (emit, {"value": 2})})
    with pytest.raises(DefinitionError) as e:
        Definitions(jobs=[j1, j2])
    assert str(e.value) == "Definitions: two jobs are named 'same'"


# -- RetryPolicy ------------------------------------------------------------------------


def test_retry_policy_defaults() -> None:
    p = RetryPolicy()
    assert (p.max_retries, p.delay, p.backoff, p.jitter) == (0, 0.0, 1.0, 0.0)
    assert p.retry_on == frozenset(FailureKind) - {FailureKind.CANCELED}


def test_retry_policy_delay_with_backoff() -> None:
    p = RetryPolicy(max_retries=5, delay=1.5, backoff=2.0)
    # The wait before attempt n+1 is delay * backoff**(n-1).
    assert [p.delay_before(n) for n in (2, 3, 4, 5)] == [1.5, 3.0, 6.0, 12.0]
    flat = RetryPolicy(max_retries=3, delay=0.25)
    assert [flat.delay_before(n) for n in (2, 3, 4)] == [0.25, 0.25, 0.25]


def test_retry_policy_jitter_stays_within_bounds() -> None:
    p = RetryPolicy(max_retries=3, delay=1.0, backoff=3.0, jitter=0.5)
    for n, base in ((2, 1.0), (3, 3.0), (4, 9.0)):
        samples = [p.delay_before(n) for _ in range(200)]
        assert all(base <= s < base + 0.5 for s in samples)
        assert len(set(samples)) > 1  # really random
    assert RetryPolicy(delay=0.0, jitter=0.0).delay_before(2) == 0.0


def test_retry_policy_should_retry() -> None:
    p = RetryPolicy(max_retries=2, retry_on={"error"})
    assert p.retry_on == frozenset({FailureKind.ERROR})
    assert p.should_retry(1, FailureKind.ERROR)
    assert p.should_retry(2, FailureKind.ERROR)
    assert not p.should_retry(3, FailureKind.ERROR)  # 1 try + 2 retries
    assert not p.should_retry(1, FailureKind.TIMEOUT)
    assert not RetryPolicy(max_retries=3).should_retry(1, FailureKind.CANCELED)


@pytest.mark.parametrize(
    "kwargs", [{"max_retries": -1}, {"delay": -0.1}, {"backoff": 0.5}, {"jitter": -1.0}]
)
def test_retry_policy_rejects_out_of_range_values(kwargs: dict) -> None:
    with pytest.raises(ValueError) as e:
        RetryPolicy(**kwargs)
    assert next(iter(kwargs)) in str(e.value)


# -- loading jobs from files --------------------------------------------------------------------


def test_threads_loading_one_job_file_at_once_all_get_the_job(tmp_path: Path) -> None:
    """Steps of one job on a threaded worker (Dask, a thread pool) load its file at once: the
    ones that come second must wait for the import, not see a half-built module."""
    import threading

    from runyard.definitions import CodePointer
    from runyard.loader import load_job

    path = tmp_path / "slow_import.py"
    path.write_text(
        "import time\nfrom runyard import job, step\n\n"
        "time.sleep(0.3)\n\n"
        "@step\ndef one() -> int:\n    return 1\n\n"
        "@job\ndef slow():\n    one()\n"
    )
    results: list[object] = []

    def load() -> None:
        try:
            results.append(load_job(CodePointer(file=str(path)), "slow")[0].name)
        except Exception as e:
            results.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == ["slow"] * 4


# Names become file names (RUN_ID/STEP_KEY in the output store), so the grammar is checked
# where a name is defined, before any run: `alias("../../../../tmp/x")` once wrote to /tmp/x.
BAD_NAMES = ["../../../../tmp/x", "a/b", "..", ".hidden", "", "a b", "a\nb", "x" * 101, "1st", "é", "a\\b", "a\0b"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_alias_with_a_bad_name_is_refused_at_definition(bad: str) -> None:
    with pytest.raises(DefinitionError) as e:

        @job
        def traverse() -> None:
            add.alias(bad)(1)

    assert f"step 'add': alias {bad!r} is not a valid name" in str(e.value)
    assert "starts with a letter or '_'" in str(e.value) and "rename it" in str(e.value)


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_graph_job_keys_built_from_data_are_checked(bad: str) -> None:
    with pytest.raises(DefinitionError) as e:
        graph_job("from_data", {"ok": (emit, {"value": 1}), bad: (emit, {"value": 2})})
    assert str(e.value).startswith("graph_job 'from_data': step key ")


@pytest.mark.parametrize("bad", ["../x", "a/b", "my job"])
def test_job_and_step_names_are_checked(bad: str) -> None:
    with pytest.raises(DefinitionError, match="job name"):
        job(name=bad)(lambda: add(1))
    with pytest.raises(DefinitionError, match="step name"):
        step(name=bad)(lambda: 1)
    with pytest.raises(DefinitionError, match="job name"):
        graph_job(bad, {"e": (emit, {"value": 1})})


def test_a_lambda_step_needs_a_name() -> None:
    with pytest.raises(DefinitionError) as e:
        step(lambda: 1)
    assert str(e.value).startswith("step name (give one with @step(name=...)) '<lambda>' is not a valid name")
    assert step(name="one")(lambda: 1).name == "one"


def test_the_alias_is_checked_even_outside_a_job_body() -> None:
    with pytest.raises(DefinitionError, match="step 'add': alias '../x' is not a valid name"):
        add.alias("../x")


@pytest.mark.parametrize("good", ["a", "_a", "A1", "load.csv", "load-2", "x" * 100, "double_2"])
def test_good_names_pass(good: str) -> None:
    @job(name=good)
    def body() -> None:
        add.alias(good)(1)

    assert list(body.nodes) == [good]
    assert list(graph_job(good, {good: (emit, {"value": 1})}).nodes) == [good]


def test_repeated_calls_get_suffixed_keys_that_stay_valid() -> None:
    @job
    def fan_out() -> None:
        for i in range(3):
            add(i)

    assert list(fan_out.nodes) == ["add", "add_2", "add_3"]

    long = step(name="s" * 100)(lambda: 1)
    with pytest.raises(DefinitionError, match="step key 's{100}_2' is not a valid name"):

        @job
        def too_long() -> None:
            long()
            long()
