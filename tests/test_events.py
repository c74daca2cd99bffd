"""Events and their stable, versioned JSON form."""

from __future__ import annotations

import json

import pytest
from runyard import Event, EventType, FailureInfo, FailureKind
from runyard.events import EVENT_SCHEMA_VERSION, STEP_TERMINAL

_DATA = {
    EventType.STEP_FAILURE: {
        "failure": {"kind": "error", "message": "ValueError: x", "error_class": "builtins.ValueError"}
    },
    EventType.RUN_FAILURE: {"failure": {"kind": "error", "message": "engine error"}},
    EventType.STEP_OUTPUT: {"ref": "run/step", "type": "int"},
    EventType.STEP_STDOUT: {"text": "hello\n"},
    EventType.STEP_STDERR: {"text": "oops\n"},
    EventType.STEP_RETRY: {"delay": 0.5, "next_attempt": 2, "kind": "error"},
    EventType.STEP_START: {"pid": 123, "host": "box"},
    EventType.STEP_LOG: {"level": "WARNING", "logger": "x"},
    EventType.STEP_SUCCESS: {"duration": 0.25},
}


def _full(t: EventType) -> Event:
    return Event(
        type=t,
        run_id="r" * 32,
        timestamp=1700000000.123456,
        step_key="step_2" if t.name.startswith("STEP") else None,
        attempt=2 if t.name.startswith("STEP") else None,
        attempt_id="a1b2c3d4e5f60718" if t.name.startswith("STEP") else None,
        message=f"a {t.value} happened: ünïcode ✓",
        data=_DATA.get(t, {}),
    )


@pytest.mark.parametrize("t", list(EventType))
def test_json_round_trip_of_every_event_type(t: EventType) -> None:
    ev = _full(t)
    text = ev.to_json()
    assert Event.from_json(text) == ev
    assert Event.from_dict(json.loads(text)) == ev
    assert Event.from_dict(ev.to_dict()) == ev


@pytest.mark.parametrize("t", list(EventType))
def test_minimal_event_round_trip(t: EventType) -> None:
    ev = Event(type=t, run_id="run1")
    assert Event.from_json(ev.to_json()) == ev


def test_stable_keys() -> None:
    ev = _full(EventType.STEP_FAILURE)
    d = ev.to_dict()
    assert list(d) == ["v", "type", "run_id", "timestamp", "step_key", "attempt", "attempt_id", "message", "data"]
    assert d["v"] == EVENT_SCHEMA_VERSION == 1
    assert d["type"] == "STEP_FAILURE"
    assert d["run_id"] == "r" * 32
    assert d["timestamp"] == 1700000000.123456
    assert d["step_key"] == "step_2"
    assert d["attempt"] == 2
    assert d["attempt_id"] == "a1b2c3d4e5f60718"
    assert d["data"] == _DATA[EventType.STEP_FAILURE]
    assert json.loads(ev.to_json()) == d


def test_optional_keys_are_left_out_when_empty() -> None:
    d = Event(type=EventType.RUN_START, run_id="r", timestamp=1.5).to_dict()
    assert d == {"v": 1, "type": "RUN_START", "run_id": "r", "timestamp": 1.5}


def test_event_type_values_are_their_names() -> None:
    # The JSON form stores the value; renaming one would break stored events.
    assert {t.name for t in EventType} == {t.value for t in EventType}
    assert STEP_TERMINAL == {EventType.STEP_SUCCESS, EventType.STEP_FAILURE}
    assert {k.value for k in FailureKind} == {
        "error", "timeout", "signal", "oom", "not_started", "worker_lost", "canceled",
    }


def test_json_is_compact_and_plain() -> None:
    text = Event(type=EventType.STEP_STDOUT, run_id="r", timestamp=2.0, data={"text": "x"}).to_json()
    assert text == '{"v":1,"type":"STEP_STDOUT","run_id":"r","timestamp":2.0,"data":{"text":"x"}}'


@pytest.mark.parametrize("kind", list(FailureKind))
def test_failure_info_round_trip(kind: FailureKind) -> None:
    full = FailureInfo(
        kind=kind, message="it broke", error_class="builtins.OSError", traceback="Traceback ...\nOSError: x",
        exit_code=137, signal=9,
    )
    assert FailureInfo.from_dict(full.to_dict()) == full
    assert FailureInfo.from_dict(json.loads(json.dumps(full.to_dict()))) == full
    minimal = FailureInfo(kind=kind, message="")
    assert minimal.to_dict() == {"kind": kind.value, "message": ""}
    assert FailureInfo.from_dict(minimal.to_dict()) == minimal


def test_failure_info_zero_exit_code_is_kept() -> None:
    info = FailureInfo(kind=FailureKind.WORKER_LOST, message="exited", exit_code=0)
    assert info.to_dict()["exit_code"] == 0
    assert FailureInfo.from_dict(info.to_dict()) == info


def test_failure_travels_inside_an_event() -> None:
    info = FailureInfo(kind=FailureKind.OOM, message="killed", exit_code=137, signal=9)
    ev = Event(type=EventType.STEP_FAILURE, run_id="r", step_key="s", attempt=1,
               message=info.message, data={"failure": info.to_dict()})
    back = Event.from_json(ev.to_json())
    assert back.failure == info
    assert Event(type=EventType.STEP_SUCCESS, run_id="r").failure is None


def test_unknown_event_type_is_rejected() -> None:
    with pytest.raises(ValueError):
        Event.from_json('{"v":1,"type":"NOT_A_TYPE","run_id":"r","timestamp":1.0}')


def test_many_from_json_equals_from_json_one_by_one_and_shares_repeated_strings() -> None:
    events = [_full(t) for t in EventType] * 3 + [Event(type=EventType.STEP_OUTPUT, run_id="r" * 32, step_key="s",
                                                          data={"ref": "x" * 300, "type": "int", "n": [1, {"a": 2}]})]
    bodies = [e.to_json() for e in events]
    one_by_one = [Event.from_json(b) for b in bodies]
    together = Event.many_from_json(list(bodies), chunk=7)  # several chunks, one cut mid-list
    assert together == one_by_one == events
    # A large run's events repeat the same strings: decoded together they are one object each.
    assert len({id(e.run_id) for e in together}) == 1
    assert len({id(e.attempt_id) for e in together if e.attempt_id}) == 1
    keys = [next(iter(e.data)) for e in Event.many_from_json(list(bodies)) if e.type is EventType.STEP_OUTPUT]
    assert len({id(k) for k in keys}) == 1  # within a chunk, equal payload keys are shared
    assert Event.many_from_json([]) == []


def test_the_result_s_events_are_read_from_storage_when_first_asked_for() -> None:
    from runyard import job, step

    @step
    def one() -> int:
        return 1

    @job
    def lazy() -> None:
        one()

    result = lazy.execute_in_process()
    stored = [s.event for s in result._instance.storage.get_events(result.run_id)]
    assert result._events is None  # not decoded until asked for
    assert result.events == stored and [e.type for e in stored][0] is EventType.RUN_START
    assert result.events is result.events  # read once
    assert [e.type for e in result.events_for("one")][-1] is EventType.STEP_SUCCESS
