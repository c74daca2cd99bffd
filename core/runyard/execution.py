"""Running a job: choosing the executor, checking it can honour the job, driving the engine."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from .config import RunConfig, run_config_source
from .definitions import CodePointer, Definitions, JobDefinition
from .engine import Cancellation, Engine, EngineResult, StepState
from .errors import ConfigError, PluginError, RunyardError, StepSelectionError
from .events import Event, EventType, FailureInfo, FailureKind
from .instance import Instance, plugin_spec
from .plan import ExecutionPlan
from .plugin import ExecutorSpec, HandlerContext, StepHandler
from .registry import load_object
from .resolution import (
    BUILTIN_DEFAULT_EXECUTOR,
    ResolvedExecutor,
    ResolvedRun,
    executor_config,
    resolve_executor,
    resolve_run,
    structure_executor_config,
)
from .storage import RunRecord, RunStatus

_UNFINISHED = (RunStatus.QUEUED, RunStatus.STARTING, RunStatus.STARTED, RunStatus.CANCELING)
RESOURCES_TAG = "runyard/resources"

__all__ = [  # resolution lives in runyard.resolution; these names stay importable from here
    "BUILTIN_DEFAULT_EXECUTOR",
    "ResolvedExecutor",
    "ResolvedRun",
    "resolve_executor",
    "structure_executor_config",
]


def check_capabilities(job: JobDefinition, resolution: ResolvedRun) -> None:
    """Reject, before anything runs, steps the resolved executor cannot honour."""
    executor, caps = resolution.executor.name, resolution.capabilities
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
    if problems:
        raise ConfigError("\n".join(problems))


class ExecutionResult:
    """The outcome of executing a job: status, events and access to step outputs."""

    def __init__(
        self, *, run: RunRecord, engine: EngineResult | None, events: list[Event] | None, instance: Instance,
        output_store: str,
    ) -> None:
        self.run = run
        self.run_id = run.run_id
        self.status = run.status
        self._events = events
        self.step_states: Mapping[str, str] = dict(engine.states) if engine else {}
        self._outputs = dict(engine.outputs) if engine else {}
        self._instance = instance
        self._store_url = output_store

    @property
    def events(self) -> list[Event]:
        """Every event of the run, read from the instance's storage when first asked for.

        Not read before: a large run's events decoded cost more memory than the rest of the
        run (about 1.5 KB per step; issue 18), and most callers look only at the status."""
        if self._events is None:
            self._events = [s.event for s in self._instance.storage.get_events(self.run_id)]
        return self._events

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
    resolution: ResolvedRun
    parent_refs: dict[str, str]  # outputs of unselected upstream steps, from the parent run
    run_config: RunConfig  # the run config as validated: record and run this one
    step_selection: list[str] | None


def validate_run(
    job: JobDefinition,
    *,
    instance: Instance,
    executor: str | None,
    definitions: Definitions | None,
    run_config: Mapping[str, Any] | None,
    step_selection: Iterable[str] | None,
    parent_run_id: str | None,
    launcher: bool = False,
    resolution: ResolvedRun | None = None,
) -> ValidatedRun:
    """Everything that can be wrong with a run, checked before it is recorded or started.

    Resolves the run (`runyard.resolution.resolve_run`; ``launcher`` includes the run
    launcher) unless ``resolution`` is given: a stored run is executed as it was resolved.
    Imports no backend. The run config and selection it returns are the ones to record and
    run: a `RunConfig` that keeps naming its file, and a list (``step_selection`` may be an
    iterator, read once here).
    """
    run_config = RunConfig(run_config, source=run_config_source(run_config))
    step_selection = list(step_selection) if step_selection is not None else None
    plan = ExecutionPlan.build(job, step_selection)
    if plan.external:
        if not parent_run_id:
            raise StepSelectionError(
                f"the selected steps read outputs of unselected step(s) {', '.join(sorted(plan.external))}; "
                "pass the run they come from (parent_run_id / --parent RUN_ID)"
            )
    refs = parent_outputs(instance, parent_run_id, plan.external) if plan.external and parent_run_id else {}
    if resolution is None:
        resolution = resolve_run(
            job, instance=instance, definitions=definitions, run_config=run_config, executor=executor, launcher=launcher
        )
    check_capabilities(job, resolution)
    return ValidatedRun(plan, resolution, refs, run_config, step_selection)


def new_run_record(
    job: JobDefinition,
    pointer: CodePointer,
    run_config: Mapping[str, Any],
    resolution: ResolvedRun,
    tags: Mapping[str, str] | None,
    parent_run_id: str | None,
    step_selection: list[str] | None,
) -> RunRecord:
    return RunRecord(
        job_name=job.name,
        code_pointer=pointer.to_dict(),
        run_config=_storable(run_config),
        executor=resolution.executor.name,
        tags={**job.tags, **(tags or {})},
        parent_run_id=parent_run_id,
        step_selection=step_selection,
        resolution=resolution.to_dict(),
    )


def prepare_handler(
    resolution: ResolvedRun, instance: Instance, *, run_id: str, output_store: str
) -> tuple[ExecutorSpec, StepHandler]:
    """The step handler of a resolved run: its config structured from the resolution, with
    the one ``max_concurrent`` the engine uses, and told where its settings were written."""
    ex = resolution.executor
    spec: ExecutorSpec = plugin_spec(instance.registry, "executor", ex.selection())
    config = executor_config(resolution, spec)
    now = spec.capabilities_of(config)
    if now != resolution.capabilities:
        # Settings read from the environment ({env: NAME}) may mean something else here
        # than where the run was resolved: refuse rather than run with the wrong limits.
        raise ConfigError(
            f"{ex.where()}: executor '{ex.name}' has other capabilities here than when the run was "
            f"resolved ({_caps_diff(resolution.capabilities, now)}); a setting read from the "
            "environment ({env: NAME}) differs between the two places: set it alike"
        )
    handler_cls = load_object(spec.handler, what=f"executor '{ex.name}'")
    declared = getattr(handler_cls, "capabilities", None)
    if declared is not None and declared != resolution.capabilities:
        raise PluginError(
            f"executor '{ex.name}': {spec.handler} declares capabilities on the handler class, which runyard "
            "no longer reads; declare them on the ExecutorSpec (capabilities=, or capabilities_for= when "
            "they depend on settings)"
        )
    context = HandlerContext(
        run_id=run_id,
        instance_home=str(instance.home) if instance.home else None,
        output_store=output_store,
        max_concurrent=resolution.max_concurrent,
        config_source=ex.config_source,
        config_path=ex.path,
        setting_sources=ex.setting_sources(),
    )
    return spec, handler_cls(config, context)


def _caps_diff(before: Any, after: Any) -> str:
    a, b = attrs.asdict(before), attrs.asdict(after)
    return ", ".join(f"{k}: {a[k]} then, {b[k]} now" for k in a if a[k] != b[k])


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
    resolution: ResolvedRun | None = None,
) -> ExecutionResult:
    """Execute ``job`` in this process (the engine here, steps wherever the executor puts them).

    Configuration problems raise before any step runs; a failing step does not raise unless
    ``raise_on_error``: the result says what failed. ``on_events``, when given, is called with
    each batch of events right after it is written to storage (the CLI shows progress with it).

    The run is resolved here (`runyard.resolution.resolve_run`) and the resolution stored
    with it, unless ``resolution`` is given: the run worker passes the one stored at launch.
    """
    instance = instance if instance is not None else Instance.ephemeral()
    v = validate_run(
        job, instance=instance, executor=executor, definitions=definitions, run_config=run_config,
        step_selection=step_selection, parent_run_id=parent_run_id, resolution=resolution,
    )
    plan, res, run_config, selection = v.plan, v.resolution, v.run_config, v.step_selection
    pointer = job.code_pointer or CodePointer(module="__main__")
    from .worker import register_job

    register_job(pointer, job)
    store = instance.output_store(shared=res.capabilities.needs_shared_outputs)
    storage = instance.storage
    if on_events is None:
        sink = storage.store_events
    else:

        def sink(events: Sequence[Event]) -> None:
            storage.store_events(events)
            on_events(events)

    outs = v.parent_refs
    new = run is None
    if run is None:
        run = new_run_record(job, pointer, run_config, res, tags, parent_run_id, selection)
    # The handler's backend is imported before the run is recorded: a missing one is a
    # configuration error, not a failed run.
    _, handler = prepare_handler(res, instance, run_id=run.run_id, output_store=store.url)
    if new:
        storage.add_run(run)
    engine = Engine(
        plan=plan,
        handler=handler,
        capabilities=res.capabilities,
        run_id=run.run_id,
        sink=sink,
        code_pointer=pointer,
        output_store=store.url,
        max_concurrent=res.max_concurrent,
        tag_limits=handler.config.tag_concurrency_limits,
        run_config=dict(run_config),
        parent_outputs=outs,
        cancellation=cancellation,
    )
    if not storage.set_run_status(run.run_id, RunStatus.STARTED, only_from=[RunStatus.QUEUED, RunStatus.STARTING]):
        current = storage.get_run(run.run_id)
        if current is not None and current.status is RunStatus.CANCELING and cancellation is not None:
            cancellation.cancel()  # canceled while starting: run the engine so everything is skipped
        elif current is None or current.status.is_finished:
            raise RunyardError(f"run {run.run_id} is already {current.status.value if current else 'gone'}")
    sink(
        [
            Event(
                type=EventType.RUN_START,
                run_id=run.run_id,
                # A run created here has no RUN_QUEUED event: its plan's graph goes here.
                data={"executor": res.executor.name, "steps": len(plan), "max_concurrent": res.max_concurrent,
                      **({"plan": plan.graph()} if new else {})},
            )
        ]
    )
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
    res = ExecutionResult(run=final, engine=result, events=None, instance=instance, output_store=store.url)
    if raise_on_error and not res.success:
        raise RunyardError(f"job '{job.name}' run {run.run_id} ended {status.value}: {msg}")
    return res


def _storable(run_config: Mapping[str, Any]) -> dict[str, Any]:
    from .config import unstructure

    return unstructure(dict(run_config))
