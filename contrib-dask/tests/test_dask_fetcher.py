"""How the engine reads finished Dask tasks: in few gathers on a wide run, at once for a lone
step, and a task result it cannot read is a failure, never a success.

The batching tests drive the fetcher's thread with stand-in handles and record the batches it
would gather (no cluster: what is under test is when it gathers, not the gather, which every
run on a real cluster in test_dask_executor.py and the conformance kit goes through)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from runyard import FailureKind
from runyard_dask import fetcher, remote
from runyard_dask.outcomes import from_result


class _Recording(fetcher.ResultFetcher):
    def __init__(self, in_flight: int) -> None:
        super().__init__(client=None, changed=threading.Event(), in_flight=lambda: in_flight)
        self.batches: list[tuple[float, int]] = []

    def _fetch(self, batch: list[Any]) -> None:
        self.batches.append((time.monotonic(), len(batch)))


def _handle() -> Any:
    return SimpleNamespace(fetched=False)


def test_a_lone_step_is_read_without_waiting_for_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetcher, "COALESCE", 30.0)  # a wait would show: nothing else is coming
    f = _Recording(in_flight=1)
    f.start()
    try:
        put = time.monotonic()
        h = _handle()
        f.put(h)
        deadline = put + 10
        while not h.fetched and time.monotonic() < deadline:
            time.sleep(0.01)
        assert h.fetched, "the lone finished step was not read within 10 s"
        assert f.batches[0][0] - put < 5, f.batches
    finally:
        f.close()


def test_tasks_ending_together_are_read_in_one_gather(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetcher, "COALESCE", 30.0)
    f = _Recording(in_flight=40)  # waits for a quarter of them: 10
    f.start()
    try:
        handles = [_handle() for _ in range(10)]
        for h in handles:
            f.put(h)
            time.sleep(0.03)
        deadline = time.monotonic() + 10
        while not all(h.fetched for h in handles) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [n for _, n in f.batches] == [10], f.batches
    finally:
        f.close()


def test_close_reads_what_ended_before_it_without_waiting_out_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetcher, "COALESCE", 30.0)
    f = _Recording(in_flight=400)
    f.start()
    h = _handle()
    f.put(h)
    started = time.monotonic()
    f.close()
    assert h.fetched and time.monotonic() - started < 5, f.batches


def test_task_result_travels_as_json_and_an_unreadable_one_is_a_failure() -> None:
    request = SimpleNamespace(step_key="s")
    handle = SimpleNamespace(request=request)
    assert remote.decode_result('{"events": [], "abandoned": false, "interrupted": "timeout"}') == {
        "events": [], "abandoned": False, "interrupted": "timeout"}
    assert remote.decode_result({"events": []}) == {"events": []}  # dask's local schedulers: as returned
    for bad in ("not json", "[1, 2]", b"\xff", 7, None):
        update = from_result(handle, bad)
        assert update.done and update.failure is not None, bad
        assert update.failure.kind is FailureKind.WORKER_LOST, (bad, update.failure)
