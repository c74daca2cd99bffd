"""Job authoring API: `@step`, `@job`, `RetryPolicy`, `Definitions`.

A job is built by calling steps inside the job's body. Inside that body a step call
does not run the step: it records a node of the graph and returns a `StepOutput`
handle that later calls take as input. Outside a job body a step is a plain function,
so steps can be unit-tested directly.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import inspect
import random
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, overload

import attrs

from .errors import DefinitionError
from .events import FailureKind

NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
"""What a step name, step key (alias, `graph_job` key) or job name may be."""

MAX_NAME_LENGTH = 100
"""Longest name: keys become file names in output stores, with room for a suffix."""

NAME_RULE = (
    f"a name starts with a letter or '_', holds only ASCII letters, digits, '_', '.' and '-', "
    f"and is at most {MAX_NAME_LENGTH} characters"
)


def check_name(name: Any, what: str) -> str:
    """Return ``name`` if it follows `NAME_RULE`; else a DefinitionError naming it and ``what`` it is.

    Keys are parts of output references (``RUN_ID/STEP_KEY...``), tags and selections, so a key such as
    ``../../tmp/x`` or ``a/b`` must never get as far as a run.
    """
    if isinstance(name, str) and len(name) <= MAX_NAME_LENGTH and NAME_PATTERN.fullmatch(name):
        return name
    shown = repr(name) if len(repr(name)) <= 120 else repr(name)[:117] + "..."
    raise DefinitionError(f"{what} {shown} is not a valid name: {NAME_RULE}; rename it")


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How often and how soon a failed step is tried again.

    The wait before attempt ``n+1`` is ``delay * backoff**(n-1)`` seconds plus a random
    ``[0, jitter)`` seconds, so that many retries do not hit a service at the same moment.
    ``retry_on`` names the failure kinds that are retried; by default every kind but a
    cancellation.
    """

    max_retries: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    delay: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    backoff: float = attrs.field(default=1.0, validator=attrs.validators.ge(1))
    jitter: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    retry_on: frozenset[FailureKind] = attrs.field(
        default=frozenset(k for k in FailureKind if k is not FailureKind.CANCELED),
        converter=lambda kinds: frozenset(FailureKind(k) for k in kinds),
    )

    def should_retry(self, attempt: int, kind: FailureKind) -> bool:
        return attempt <= self.max_retries and kind in self.retry_on

    def delay_before(self, next_attempt: int) -> float:
        base = self.delay * self.backoff ** max(next_attempt - 2, 0)
        return base + (random.uniform(0, self.jitter) if self.jitter else 0.0)


@attrs.frozen
class StepOutput:
    """Handle to the output of one step call inside a job body."""

    key: str

    def __repr__(self) -> str:
        return f"StepOutput({self.key!r})"


@attrs.frozen
class FromStep:
    key: str


@attrs.frozen
class FromSteps:
    keys: tuple[str, ...]


@attrs.frozen
class Constant:
    value: Any


InputSource = FromStep | FromSteps | Constant


@attrs.frozen
class StepNode:
    """One call of a step in a job: its unique key and where each input comes from."""

    key: str
    step: StepDefinition
    inputs: dict[str, InputSource]

    @property
    def upstream(self) -> tuple[str, ...]:
        keys: list[str] = []
        for src in self.inputs.values():
            if isinstance(src, FromStep):
                keys.append(src.key)
            elif isinstance(src, FromSteps):
                keys.extend(src.keys)
        return tuple(dict.fromkeys(keys))


class _JobBuilder:
    def __init__(self, job_name: str) -> None:
        self.job_name = job_name
        self.nodes: dict[str, StepNode] = {}
        self._counts: dict[str, int] = {}

    def add(self, step: StepDefinition, alias: str | None, args: tuple, kwargs: dict) -> StepOutput:
        if alias is not None:
            check_name(alias, f"job '{self.job_name}': step alias")
            if alias in self.nodes:
                raise DefinitionError(
                    f"job '{self.job_name}': two step calls are named '{alias}'; "
                    "give each .alias() a distinct name"
                )
            key = alias
        else:
            n = self._counts.get(step.name, 0)
            key = step.name
            while key in self.nodes:
                n += 1
                key = f"{step.name}_{n + 1}"
            self._counts[step.name] = n
            if len(key) > MAX_NAME_LENGTH:  # step.name is valid, so only a long name's suffix can break the rule
                check_name(key, f"job '{self.job_name}': step key")
        inputs = step.bind_inputs(self.job_name, key, args, kwargs)
        self.nodes[key] = StepNode(key=key, step=step, inputs=inputs)
        return StepOutput(key)


_current_builder: contextvars.ContextVar[_JobBuilder | None] = contextvars.ContextVar(
    "runyard_job_builder", default=None
)


def _to_source(job_name: str, key: str, param: str, value: Any) -> InputSource:
    if isinstance(value, StepOutput):
        return FromStep(value.key)
    if isinstance(value, list | tuple) and any(isinstance(v, StepOutput) for v in value):
        if not all(isinstance(v, StepOutput) for v in value):
            raise DefinitionError(
                f"job '{job_name}', step '{key}', input '{param}': a fan-in list must hold "
                "only step outputs, not a mix of outputs and constants"
            )
        return FromSteps(tuple(v.key for v in value))
    return Constant(value)


class StepDefinition:
    """A Python function that runs as one step of a job. Create with `@step`."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        retry: RetryPolicy | None = None,
        tags: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> None:
        self.fn = fn
        self.name = check_name(
            name or getattr(fn, "__name__", None), "step name (give one with @step(name=...))"
        )
        self.description = description or inspect.getdoc(fn)
        self.retry = retry
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if timeout is not None and timeout <= 0:
            raise DefinitionError(f"step '{self.name}': timeout must be > 0 seconds, got {timeout}")
        self.timeout = timeout
        self.signature = inspect.signature(fn)
        params = list(self.signature.parameters)
        self.takes_context = bool(params) and params[0] == "context"
        self._positional = self._plain_positional()

    def __repr__(self) -> str:
        return f"<step {self.name}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        builder = _current_builder.get()
        if builder is None:
            return self.fn(*args, **kwargs)
        return builder.add(self, None, args, kwargs)

    def alias(self, name: str) -> Callable[..., StepOutput]:
        """Name this call of the step: ``add.alias("first")(x)`` gets the key ``first``."""
        check_name(name, f"step '{self.name}': alias")

        def call(*args: Any, **kwargs: Any) -> StepOutput:
            builder = _current_builder.get()
            if builder is None:
                raise DefinitionError(f"step '{self.name}'.alias('{name}') is only usable inside a job body")
            return builder.add(self, name, args, kwargs)

        return call

    def _plain_positional(self) -> tuple[tuple[str, ...], tuple[Any, ...]] | None:
        """``(names, defaults of the trailing ones)`` when every input is an ordinary positional
        parameter, so that a call with positional arguments only binds without `inspect` (the
        common case, and most of the time of tracing a large job); else None."""
        names: list[str] = []
        defaults: list[Any] = []
        for i, p in enumerate(self.signature.parameters.values()):
            if i == 0 and self.takes_context:
                continue
            if p.kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
                return None
            if p.default is not inspect.Parameter.empty:
                defaults.append(p.default)
            elif defaults:
                return None
            names.append(p.name)
        return tuple(names), tuple(defaults)

    def bind_inputs(self, job_name: str, key: str, args: tuple, kwargs: dict) -> dict[str, InputSource]:
        plain = self._positional
        if plain is not None and not kwargs:
            names, defaults = plain
            if len(names) - len(defaults) <= len(args) <= len(names):
                given = len(args)
                inputs = {name: _to_source(job_name, key, name, value)
                          for name, value in zip(names[:given], args, strict=True)}
                missing = len(names) - given  # the last ones, which have defaults
                for name, value in zip(names[given:], defaults[len(defaults) - missing:], strict=True):
                    inputs[name] = _to_source(job_name, key, name, value)
                return inputs
        if self.takes_context:
            args = (None, *args)
        params = [p for p in self.signature.parameters if p != "context" or not self.takes_context]
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in self.signature.parameters.values())
        unknown = [k for k in kwargs if k not in params and not accepts_any]
        if unknown:
            raise DefinitionError(
                f"job '{job_name}', step '{key}': unknown input '{unknown[0]}' "
                f"(the step's inputs are: {', '.join(params) or 'none'})"
            )
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise DefinitionError(
                f"job '{job_name}', step '{key}': {e} (the step's inputs are: {', '.join(params) or 'none'})"
            ) from None
        bound.apply_defaults()
        inputs: dict[str, InputSource] = {}
        for param, value in bound.arguments.items():
            if self.takes_context and param == "context":
                continue
            kind = self.signature.parameters[param].kind
            if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                raise DefinitionError(f"job '{job_name}', step '{key}': *args/**kwargs inputs are not supported")
            inputs[param] = _to_source(job_name, key, param, value)
        return inputs


@overload
def step(fn: Callable[..., Any], /) -> StepDefinition: ...
@overload
def step(
    *,
    name: str | None = None,
    description: str | None = None,
    retry: RetryPolicy | None = None,
    tags: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> Callable[[Callable[..., Any]], StepDefinition]: ...
def step(fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """Make a function a step. Use bare (``@step``) or with options (``@step(retry=...)``).

    A step whose first parameter is named ``context`` receives a `StepContext`.
    """
    if fn is not None:
        return StepDefinition(fn, **options)
    return lambda f: StepDefinition(f, **options)


@attrs.frozen(kw_only=True)
class CodePointer:
    """Where a job's code lives, so that another process can load it again."""

    file: str | None = None
    module: str | None = None
    attribute: str | None = None  # the job's variable name, when known

    def __attrs_post_init__(self) -> None:
        if (self.file is None) == (self.module is None):
            raise ValueError("a CodePointer needs exactly one of file= and module=")

    def to_dict(self) -> dict[str, str]:
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, str]) -> CodePointer:
        return cls(file=d.get("file"), module=d.get("module"), attribute=d.get("attribute"))

    def describe(self) -> str:
        return f"-f {self.file}" if self.file else f"-m {self.module}"


def _pointer_for(fn: Callable[..., Any]) -> CodePointer | None:
    mod = sys.modules.get(fn.__module__)
    if fn.__module__ == "__main__" or getattr(mod, "__runyard_file__", None):
        path = getattr(mod, "__file__", None)
        return CodePointer(file=str(Path(path).resolve())) if path else None
    return CodePointer(module=fn.__module__)


ExecutorSelection = str | Mapping[str, Mapping[str, Any]]


class JobDefinition:
    """A DAG of step calls. Create with `@job` or `graph_job`."""

    def __init__(
        self,
        *,
        name: str,
        nodes: Mapping[str, StepNode],
        description: str | None = None,
        executor: str | None = None,
        executor_config: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        code_pointer: CodePointer | None = None,
    ) -> None:
        self.name = check_name(name, "job name")
        self.nodes = dict(nodes)
        self.description = description
        self.executor = executor
        self.executor_config = dict(executor_config) if executor_config else None
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.code_pointer = code_pointer
        if not self.nodes:
            raise DefinitionError(f"job '{name}' calls no steps; call at least one step in its body")
        if executor_config is not None and executor is None:
            raise DefinitionError(f"job '{name}': executor_config needs executor= to say which executor it configures")
        with _no_cyclic_gc():  # only lasting objects are made: see `_no_cyclic_gc`
            for key in self.nodes:  # also keys built from data by graph_job
                check_name(key, f"job '{name}': step key")
            _check_graph(name, self.nodes)

    def __repr__(self) -> str:
        return f"<job {self.name}: {len(self.nodes)} steps>"

    def execute_in_process(
        self,
        *,
        run_config: Mapping[str, Any] | None = None,
        instance: Any = None,
        step_selection: Iterable[str] | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        raise_on_error: bool = False,
    ) -> Any:
        """Run every step in this process, one at a time, and return an `ExecutionResult`.

        Always uses the in-process executor, whatever the job or instance names. Without
        ``instance``, runs against an ephemeral in-memory instance.
        """
        from .execution import execute_job

        return execute_job(
            self,
            instance=instance,
            executor="in_process",
            run_config=run_config,
            step_selection=step_selection,
            parent_run_id=parent_run_id,
            tags=tags,
            raise_on_error=raise_on_error,
        )


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """The cyclic garbage collector paused for a block that makes lasting objects.

    Tracing a job and checking its graph make a few objects per step and free almost none
    (what they free, reference counting frees), so the collector's passes over the growing
    graph were wasted work that grew with the job: building 100k steps cost 1.7x per step
    what 5k did (issue 18). Whatever the block leaves is collected as usual once it ends.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _check_graph(job_name: str, nodes: Mapping[str, StepNode]) -> None:
    """Reject unknown inputs and cycles, naming the steps involved."""
    ups = {k: n.upstream for k, n in nodes.items()}
    for key, node_ups in ups.items():
        for up in node_ups:
            if up not in nodes:
                raise DefinitionError(
                    f"job '{job_name}': step '{key}' takes input from unknown step '{up}'"
                )
    # Kahn's algorithm; whatever is left over sits on or behind a cycle.
    indegree = {k: len(u) for k, u in ups.items()}
    down: dict[str, list[str]] = {k: [] for k in nodes}
    for key, node_ups in ups.items():
        for up in node_ups:
            down[up].append(key)
    ready = [k for k, d in indegree.items() if d == 0]
    seen = 0
    while ready:
        k = ready.pop()
        seen += 1
        for d in down[k]:
            indegree[d] -= 1
            if indegree[d] == 0:
                ready.append(d)
    if seen != len(nodes):
        # What Kahn's algorithm leaves holds the cycles plus steps downstream of them;
        # peel off steps with nothing left downstream until only the cycles remain.
        left = {k for k, d in indegree.items() if d > 0}
        changed = True
        while changed:
            changed = False
            for k in list(left):
                if not any(d in left for d in down[k]):
                    left.discard(k)
                    changed = True
        cyclic = sorted(left)
        raise DefinitionError(f"job '{job_name}' has a cycle among steps: {', '.join(cyclic)}")


def job(
    fn: Callable[[], Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    executor: str | None = None,
    executor_config: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
) -> Any:
    """Make a job from a function whose body calls steps.

    ``executor`` names the executor plugin the job runs on (overridden by ``--executor``
    and by the run config's ``execution`` section); ``executor_config`` configures it.
    """

    def build(body: Callable[[], Any]) -> JobDefinition:
        job_name = name or body.__name__
        builder = _JobBuilder(job_name)
        token = _current_builder.set(builder)
        try:
            with _no_cyclic_gc():
                body()
        finally:
            _current_builder.reset(token)
        return JobDefinition(
            name=job_name,
            nodes=builder.nodes,
            description=description or inspect.getdoc(body),
            executor=executor,
            executor_config=executor_config,
            tags=tags,
            code_pointer=_pointer_for(body),
        )

    if fn is not None:
        return build(fn)
    return build


def graph_job(
    name: str,
    steps: Mapping[str, tuple[StepDefinition, Mapping[str, Any]]],
    **options: Any,
) -> JobDefinition:
    """Build a job from an explicit dependency mapping instead of a job body.

    ``steps`` maps each step key to ``(step, inputs)``; an input value is a step key
    wrapped in `StepOutput`, a list of them (fan-in), or a constant. Useful when the graph
    comes from data; cycles and unknown upstream keys are rejected here.
    """
    check_name(name, "job name")
    for key in steps:
        check_name(key, f"graph_job '{name}': step key")
    nodes = {
        key: StepNode(key=key, step=s, inputs=s.bind_inputs(name, key, (), dict(inputs)))
        for key, (s, inputs) in steps.items()
    }
    return JobDefinition(name=name, nodes=nodes, **options)


class Definitions:
    """The jobs of one code location, with a default executor for them."""

    def __init__(
        self,
        *,
        jobs: Iterable[JobDefinition] = (),
        executor: ExecutorSelection | None = None,
    ) -> None:
        self.jobs = {}
        for j in jobs:
            if j.name in self.jobs:
                raise DefinitionError(f"Definitions: two jobs are named '{j.name}'")
            self.jobs[j.name] = j
        self.executor = executor
