"""The execution plan: the job's steps in a deterministic order, and step selection."""

from __future__ import annotations

import fnmatch
import heapq
from collections.abc import Iterable

import attrs

from .definitions import JobDefinition, StepNode
from .errors import StepSelectionError


@attrs.frozen
class PlanStep:
    node: StepNode
    upstream: tuple[str, ...]
    downstream: tuple[str, ...]

    @property
    def key(self) -> str:
        return self.node.key


class ExecutionPlan:
    """Steps of a job (or a selection of them) in a deterministic topological order.

    Ties are broken by the order of the calls in the job body, so two plans of the
    same job list their steps identically.
    """

    def __init__(self, job: JobDefinition, steps: dict[str, PlanStep], external: frozenset[str]) -> None:
        self.job = job
        self.steps = steps
        # Upstream keys outside the selection whose outputs come from an earlier run.
        self.external = external

    @classmethod
    def build(cls, job: JobDefinition, step_selection: Iterable[str] | None = None) -> ExecutionPlan:
        nodes = job.nodes
        selected = set(nodes) if step_selection is None else resolve_selection(job, step_selection)
        order = {k: i for i, k in enumerate(nodes)}
        down: dict[str, list[str]] = {k: [] for k in selected}
        indegree: dict[str, int] = {}
        external: set[str] = set()
        for k in nodes:
            if k not in selected:
                continue
            ups = nodes[k].upstream
            n = 0
            for up in ups:
                if up in selected:
                    down[up].append(k)
                    n += 1
                else:
                    external.add(up)
            indegree[k] = n
        # Ties go to the earlier call in the job body, so every plan of a job is identical.
        heap = [order[k] for k, d in indegree.items() if d == 0]
        heapq.heapify(heap)
        keys = list(nodes)
        steps: dict[str, PlanStep] = {}
        while heap:
            k = keys[heapq.heappop(heap)]
            node = nodes[k]
            steps[k] = PlanStep(
                node=node,
                upstream=tuple(u for u in node.upstream if u in selected),
                downstream=tuple(down[k]),
            )
            for d in down[k]:
                indegree[d] -= 1
                if indegree[d] == 0:
                    heapq.heappush(heap, order[d])
        return cls(job, steps, frozenset(external))

    def __len__(self) -> int:
        return len(self.steps)

    def graph(self) -> list[list[str | list[str]]]:
        """``[[key, [upstream keys]], ...]`` in plan order: the JSON form recorded with the run
        (its RUN_QUEUED event, or RUN_START for a run executed where it was created), which
        `runyard ui` draws without importing the job."""
        return [[k, list(s.upstream)] for k, s in self.steps.items()]


def resolve_selection(job: JobDefinition, selection: Iterable[str]) -> set[str]:
    """Resolve step keys and glob patterns (``load_*``) to the keys they name."""
    chosen: set[str] = set()
    for pattern in selection:
        if any(c in pattern for c in "*?["):
            hits = fnmatch.filter(job.nodes, pattern)
        else:
            hits = [pattern] if pattern in job.nodes else []
        if not hits:
            raise StepSelectionError(
                f"job '{job.name}' has no step matching '{pattern}'; its steps are: "
                + ", ".join(job.nodes)
            )
        chosen.update(hits)
    return chosen
