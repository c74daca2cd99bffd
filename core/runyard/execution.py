"""Running a job: choosing the executor, checking it can honour the job, driving the engine."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from .config import Selection, parse_selection, structure
from .definitions import CodePointer, Definitions, JobDefinition
from .engine import Cancellation, Engine, EngineResult, StepState
from .errors import ConfigError, RunyardError, StepSelectionError
from .events import Event, EventType, FailureInfo, FailureKind
from .instance import Instance
from .plan import ExecutionPlan
from .plugin import Capabilities, ExecutorConfig, ExecutorSpec, HandlerContext, StepHandler
from .registry import load_object
from .storage import RunRecord, RunStatus

BUILTIN_DEFAULT_EXECUTOR = "multi_or_in_process"
_UNFINISHED = (RunStatus.QUEUED, RunStatus.STARTING, RunStatus.STARTED, RunStatus.CANCELING)
RESOURCES_TAG = "runyard/resources"


@attrs.frozen
class ResolvedExecutor:
    name: str
    config: dict[str, Any]
    layers: tuple[Selection, ...]  # every layer that named this executor, highest first
    overridden: tuple[Selection, ...] = ()  # configured layers that named another executor, highest first


def resolve_executor(
    job: JobDefinition,
    *,
    definitions: Definitions | None = None,
    run_config: Mapping[str, Any] | None = None,
    instance: Instance | None = None,
    override: str | None = None,
) -> ResolvedExecutor:
    """Pick the executor: ``--executor`` > run config ``execution`` > the job's own >
    ``Definitions`` default > the instance's ``executor`` > the built-in default.

    The name comes from the highest layer that names one; its config merges every layer
    that names that same executor, higher layers winning key by key.
    """
    layers: list[Selection] = []
    if override:
        layers.append(Selection(override, {}, "--executor"))
    if run_config and run_config.get("execution") is not None:
        sel = parse_selection(run_config["execution"], source="run config", path="execution")
        if sel:
            layers.append(sel)
    if job.executor:
        layers.append(Selection(job.executor, dict(job.executor_config or {}), f"job '{job.name}'"))
    if definitions is not None and definitions.executor is not None:
        sel = parse_selection(definitions.executor, source="Definitions", path="executor")
        if sel:
            layers.append(sel)
    if instance is not None and instance.sections["executor"] is not None:
        layers.append(instance.sections["executor"])  # type: ignore[arg-type]
    layers.append(Selection(BUILTIN_DEFAULT_EXECUTOR, {}, "default"))
    name = layers[0].name
    same = tuple(sel for sel in layers if sel.name == name)
    config: dict[str, Any] = {}
    for sel in reversed(same):
        config.update(sel.config)
    # The built-in default is a fallback, not a choice someone made: not worth reporting.
    other = tuple(sel for sel in layers if sel.name != name and sel.source != "default")
    return ResolvedExecutor(name, config, same, other)


def check_capabilities(job: JobDefinition, executor: str, caps: Capabilities, max_concurrent: int) -> None:
    """Reject, before anything runs, configuration the executor cannot honour."""
    problems: list[str] = []
    for key, node in job.nodes.items():
        if node.step.timeout and not caps.enforces_timeouts:
            problems.append(
                f"step '{key}' has timeout={node.step.timeout:g}s but executor '{executor}' cannot "
                "enforce timeouts (it lacks capability 'enforces_timeouts'); remove the timeout or "
                "use an executor that can (e.g. in_process)"
            )
        if RESOURCES_TAG in node.step.tags and not caps.supports_resources:
            problems.append(
                f"step '{key}' requests resources (tag '{RESOURCES_TAG}') but executor '{executor}' "
                "does not support resources (it lacks capability 'supports_resources')"
            )
    if caps.max_concurrency is not None and max_concurrent > caps.max_concurrency:
        problems.append(
            f"executor.{executor}.max_concurrent: {max_concurrent} is more than executor "
            f"'{executor}' can run at once ({caps.max_concurrency})"
        )
    if problems:
        raise ConfigError("\n".join(problems))


def structure_executor_config(resolved: ResolvedExecutor, spec: ExecutorSpec) -> ExecutorConfig:
    """Structure the merged settings, blaming a bad key on the layer that wrote it."""
    path = f"executor.{resolved.name}"
    for sel in resolved.layers:
        if not sel.config:
            continue
        try:
            structure(sel.config, spec.config, source=sel.source, path=path)
        except ConfigError as e:
            # A layer may rightly leave a required key to another layer; anything else is its fault.
            if not all("is missing" in line for line in str(e).splitlines()):
                raise
    return structure(resolved.config, spec.config, source=resolved.layers[0].source, path=path)


class ExecutionResult:
    """The outcome of executing a job: status, events and access to step outputs."""

    def __init__(
        self, *, run: RunRecord, engine: EngineResult | None, events: list[Event], instance: Instance, output_store: str
    ) -> None:
        self.run = run
        self.run_id = run.run_id
        self.status = run.status
        self.events = events
        self.step_states: Mapping[str, str] = dict(engine.states) if engine else {}
        self._outputs = dict(engine.outputs) if engine else {}
        self._instance = instance
        self._store_url = output_store

    @property
    def success(self) -> bool:
        return self.status is RunStatus.SUCCESS

    def output_for(self, step_key: str) -> Any:
        """The value step ``step_key`` returned in this run."""
        from .outputs import open_output_store

        if step_key not in self.step_states:
            raise KeyError(f"run {self.run_id} has no step '{step_key}'; steps: {', '.join(self.step_states)}")
        if self.step_states[step_key] != StepState.SUCCESS:
            raise RunyardError(f"step '{step_key}' has no output: it ended {self.step_states[step_key]}")
        return open_output_store(self._store_url).get(self._outputs[step_key])

    def failure_for(self, step_key: str) -> FailureInfo | None:
        """The failure of the last attempt of ``step_key``, if it failed."""
        for ev in reversed(self.events):
            if ev.step_key == step_key and ev.type is EventType.STEP_FAILURE:
                return ev.failure
        return None

    def events_for(self, step_key: str) -> list[Event]:
        return [e for e in self.events if e.step_key == step_key]

    def __repr__(self) -> str:
        return f"<ExecutionResult {self.run_id} {self.status.value}>"


@attrs.frozen
class ValidatedRun:
    plan: ExecutionPlan
    resolved: ResolvedExecutor
    config: ExecutorConfig
    max_concurrent: int
    capabilities: Capabilities
    handler_cls: Any  # the StepHandler class, when imported
    parent_refs: dict[str, str]  # outputs of unselected upstream steps, from the parent run


def validate_run(
    job: JobDefinition,
    *,
    instance: Instance,
    executor: str | None,
    definitions: Definitions | None,
    run_config: Mapping[str, Any],
    step_selection: list[str] | None,
    parent_run_id: str | None,
    import_handler: bool,
) -> ValidatedRun:
    """Everything that can be wrong with a run, checked before it is recorded or started.

    ``import_handler`` imports the executor's handler to use the capabilities it declares
    at run time; a launch leaves it False so that the launching process imports no backend.
    """
    plan = ExecutionPlan.build(job, step_selection)
    if plan.external:
        if not parent_run_id:
            raise StepSelectionError(
                f"the selected steps read outputs of unselected step(s) {', '.join(sorted(plan.external))}; "
                "pass the run they come from (parent_run_id / --parent RUN_ID)"
            )
    refs = parent_outputs(instance, parent_run_id, plan.external) if plan.external and parent_run_id else {}
    resolved = resolve_executor(
        job, definitions=definitions, run_config=run_config, instance=instance, override=executor
    )
    spec: ExecutorSpec = instance.registry.executor(resolved.name)
    config = structure_executor_config(resolved, spec)
    handler_cls = load_object(spec.handler, what=f"executor '{resolved.name}'") if import_handler else None
    caps: Capabilities = (handler_cls.capabilities if handler_cls else None) or spec.capabilities
    max_concurrent = config.max_concurrent or spec.default_max_concurrent or os.cpu_count() or 1
    if caps.max_concurrency is not None and config.max_concurrent is None:
        max_concurrent = min(max_concurrent, caps.max_concurrency)
    check_capabilities(job, resolved.name, caps, max_concurrent)
    return ValidatedRun(plan, resolved, config, max_concurrent, caps, handler_cls, refs)


def new_run_record(
    job: JobDefinition,
    pointer: CodePointer,
    run_config: Mapping[str, Any],
    executor: str,
    tags: Mapping[str, str] | None,
    parent_run_id: str | None,
    step_selection: list[str] | None,
) -> RunRecord:
    return RunRecord(
        job_name=job.name,
        code_pointer=pointer.to_dict(),
        run_config=_storable(run_config),
        executor=executor,
        tags={**job.tags, **(tags or {})},
        parent_run_id=parent_run_id,
        step_selection=step_selection,
    )


def parent_outputs(instance: Instance, parent_run_id: str, keys: Iterable[str]) -> dict[str, str]:
    """References to outputs of ``keys`` in the parent run (or, through re-executions, its parents)."""
    wanted = set(keys)
    found: dict[str, str] = {}
    run_id: str | None = parent_run_id
    while wanted and run_id:
        run = instance.storage.get_run(run_id)
        if run is None:
            raise StepSelectionError(f"parent run {run_id} not found in this instance")
        for stored in instance.storage.get_events(run_id, types=[EventType.STEP_OUTPUT]):
            ev = stored.event
            if ev.step_key in wanted:
                found[ev.step_key] = ev.data["ref"]
        wanted -= set(found)
        run_id = run.parent_run_id
    if wanted:
        raise StepSelectionError(
            f"run {parent_run_id} has no output for step(s) {', '.join(sorted(wanted))} that the "
            "selected steps need; add them to the selection"
        )
    return found


def execute_job(
    job: JobDefinition,
    *,
    instance: Instance | None = None,
    executor: str | None = None,
    definitions: Definitions | None = None,
    run_config: Mapping[str, Any] | None = None,
    step_selection: Iterable[str] | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    raise_on_error: bool = False,
    cancellation: Cancellation | None = None,
    run: RunRecord | None = None,
    on_events: Callable[[Sequence[Event]], None] | None = None,
) -> ExecutionResult:
    """Execute ``job`` in this process (the engine here, steps wherever the executor puts them).

    Configuration problems raise before any step runs; a failing step does not raise unless
    ``raise_on_error``: the result says what failed. ``on_events``, when given, is called with
    each batch of events right after it is written to storage (the CLI shows progress with it).
    """
    instance = instance if instance is not None else Instance.ephemeral()
    run_config = dict(run_config or {})
    selection = list(step_selection) if step_selection is not None else None
    v = validate_run(
        job,
        instance=instance,
        executor=executor,
        definitions=definitions,
        run_config=run_config,
        step_selection=selection,
        parent_run_id=parent_run_id,
        import_handler=True,
    )
    plan, resolved, config, max_concurrent, caps = v.plan, v.resolved, v.config, v.max_concurrent, v.capabilities
    handler_cls = v.handler_cls
    pointer = job.code_pointer or CodePointer(module="__main__")
    from .worker import register_job

    register_job(pointer, job)
    store = instance.output_store(shared=caps.needs_shared_outputs)
    storage = instance.storage
    if on_events is None:
        sink = storage.store_events
    else:

        def sink(events: Sequence[Event]) -> None:
            storage.store_events(events)
            on_events(events)

    outs = v.parent_refs
    if run is None:
        run = new_run_record(job, pointer, run_config, resolved.name, tags, parent_run_id, selection)
        storage.add_run(run)
    handler: StepHandler = handler_cls(
        config,
        HandlerContext(
            run_id=run.run_id,
            instance_home=str(instance.home) if instance.home else None,
            output_store=store.url,
            max_concurrent=max_concurrent,
        ),
    )
    engine = Engine(
        plan=plan,
        handler=handler,
        capabilities=caps,
        run_id=run.run_id,
        sink=sink,
        code_pointer=pointer,
        output_store=store.url,
        max_concurrent=max_concurrent,
        tag_limits=config.tag_concurrency_limits,
        run_config=run_config,
        parent_outputs=outs,
        cancellation=cancellation,
    )
    if not storage.set_run_status(run.run_id, RunStatus.STARTED, only_from=[RunStatus.QUEUED, RunStatus.STARTING]):
        current = storage.get_run(run.run_id)
        if current is not None and current.status is RunStatus.CANCELING and cancellation is not None:
            cancellation.cancel()  # canceled while starting: run the engine so everything is skipped
        elif current is None or current.status.is_finished:
            raise RunyardError(f"run {run.run_id} is already {current.status.value if current else 'gone'}")
    sink([Event(type=EventType.RUN_START, run_id=run.run_id, data={"executor": resolved.name, "steps": len(plan)})])
    try:
        result = engine.run()
    except BaseException as e:
        sink(
            [
                Event(
                    type=EventType.RUN_FAILURE,
                    run_id=run.run_id,
                    message=f"engine error: {type(e).__name__}: {e}",
                    data={"failure": FailureInfo(kind=FailureKind.ERROR, message=str(e)).to_dict()},
                )
            ]
        )
        storage.set_run_status(run.run_id, RunStatus.FAILURE, only_from=_UNFINISHED)
        raise
    if result.canceled:
        status, ev_type, msg = RunStatus.CANCELED, EventType.RUN_CANCELED, "run canceled"
    elif result.success:
        status, ev_type, msg = RunStatus.SUCCESS, EventType.RUN_SUCCESS, "run succeeded"
    else:
        failed = [k for k, s in result.states.items() if s == StepState.FAILED]
        status, ev_type, msg = RunStatus.FAILURE, EventType.RUN_FAILURE, f"step(s) failed: {', '.join(failed)}"
    # The first final status wins: a monitor may have failed the run meanwhile.
    if storage.set_run_status(run.run_id, status, only_from=_UNFINISHED):
        sink([Event(type=ev_type, run_id=run.run_id, message=msg)])
    final = storage.get_run(run.run_id) or run
    events = [s.event for s in storage.get_events(run.run_id)]
    res = ExecutionResult(run=final, engine=result, events=events, instance=instance, output_store=store.url)
    if raise_on_error and not res.success:
        raise RunyardError(f"job '{job.name}' run {run.run_id} ended {status.value}: {msg}")
    return res


def _storable(run_config: Mapping[str, Any]) -> dict[str, Any]:
    from .config import unstructure

    return unstructure(dict(run_config))
