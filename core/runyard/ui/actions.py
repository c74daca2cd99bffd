"""Cancel and re-execute from the browser, each at most once per intent.

A disabled button stops only one tab's double click. Here the server decides:

* every form carries an action key made when the page was drawn; a key seen before gets
  the first submission's result, never a second action;
* a re-execution also carries how many re-executions of the run the page saw: if another
  tab (or the CLI) has re-executed it since, the request is refused, not repeated. The
  run it creates is tagged with the key (`ACTION_TAG`), so even a restarted server finds it;
* a cancel is refused while the run is being canceled or has ended.

Actions of one server run one at a time (a lock), and each is recorded as an ENGINE event
of the run, so the run's event log says who did what.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import attrs

from ..errors import RunyardError
from ..events import Event, EventType
from ..instance import Instance
from ..storage import RunFilter, RunStatus
from .views import ACTION_TAG

MAX_REMEMBERED = 10_000  # action keys kept for answering repeats


@attrs.frozen
class ActionResult:
    ok: bool
    message: str
    run_id: str  # the run to show next (the new run of a re-execution)


class Actions:
    def __init__(self, instance: Instance, *, cancel_grace: float = 10.0) -> None:
        self.instance = instance
        self.cancel_grace = cancel_grace
        self._lock = threading.Lock()
        self._done: OrderedDict[str, ActionResult] = OrderedDict()
        self._canceling: set[str] = set()
        self.threads: list[threading.Thread] = []

    def _remember(self, key: str, result: ActionResult) -> ActionResult:
        self._done[key] = result
        while len(self._done) > MAX_REMEMBERED:  # the oldest keys are from pages long gone
            self._done.popitem(last=False)
        return result

    def _note(self, run_id: str, message: str, **data: Any) -> None:
        self.instance.storage.store_events(
            [Event(type=EventType.ENGINE, run_id=run_id, message=message, data={"source": "runyard ui", **data})]
        )

    def cancel(self, run_id: str, key: str, client: str) -> ActionResult:
        from ..runs import cancel_run, get_run

        with self._lock:
            if key in self._done:
                return self._done[key]
            run = get_run(self.instance, run_id)
            if run.status.is_finished:
                return ActionResult(False, f"run {run.run_id} has already ended {run.status.value}", run.run_id)
            if run.run_id in self._canceling or run.status is RunStatus.CANCELING:
                return ActionResult(False, f"run {run.run_id} is already being canceled", run.run_id)
            self._canceling.add(run.run_id)
            self._note(run.run_id, f"cancel requested in runyard ui by {client}", action="cancel", key=key)

            def work() -> None:
                try:
                    cancel_run(self.instance, run.run_id, grace=self.cancel_grace)
                finally:
                    with self._lock:
                        self._canceling.discard(run.run_id)

            # The worker gets `cancel_grace` seconds to stop its steps: not a wait for the browser.
            t = threading.Thread(target=work, name=f"runyard-ui-cancel-{run.run_id[:8]}", daemon=True)
            t.start()
            self.threads.append(t)
            return self._remember(key, ActionResult(True, f"cancel requested for run {run.run_id}", run.run_id))

    def reexecute(self, run_id: str, key: str, seen: int, client: str) -> ActionResult:
        from ..definitions import CodePointer
        from ..loader import load_job
        from ..runs import create_run, get_run, launch_run, reexecution_selection

        storage = self.instance.storage
        with self._lock:
            if key in self._done:
                return self._done[key]
            parent = get_run(self.instance, run_id)
            earlier, _ = storage.page_runs(RunFilter(parent_run_id=parent.run_id, tag=(ACTION_TAG, key)), limit=1)
            if earlier:  # submitted before this server (re)started
                return ActionResult(True, f"run {parent.run_id} was re-executed as run {earlier[0].run_id}",
                                    earlier[0].run_id)
            children, count = storage.page_runs(RunFilter(parent_run_id=parent.run_id), limit=1)
            if count != seen:
                latest = children[0].run_id if children else parent.run_id
                return ActionResult(
                    False,
                    f"run {parent.run_id} was re-executed (as run {latest}) after this page was loaded; "
                    "reload the page to re-execute it again",
                    latest,
                )
            if not parent.code_pointer:
                raise RunyardError(f"run {parent.run_id} has no code pointer: its job cannot be loaded again")
            pointer = CodePointer.from_dict(parent.code_pointer)
            job, loc = load_job(pointer, parent.job_name)
            selection = reexecution_selection(self.instance, parent, job, from_failure=True, steps=None)
            child = create_run(
                self.instance, job, pointer=pointer, definitions=loc.definitions, run_config=parent.run_config,
                executor=parent.executor, tags={**parent.tags, ACTION_TAG: key}, step_selection=selection,
                parent_run_id=parent.run_id,
            )
            self._note(parent.run_id, f"re-executed from failure in runyard ui by {client} as run {child.run_id}",
                       action="reexecute", key=key, child_run_id=child.run_id)
            self._note(child.run_id, f"re-execution of run {parent.run_id} from failure, from runyard ui by {client}",
                       action="reexecute", key=key, parent_run_id=parent.run_id)
            launch_run(self.instance, child)
            return self._remember(key, ActionResult(
                True, f"run {parent.run_id} re-executed from failure as run {child.run_id}", child.run_id))
