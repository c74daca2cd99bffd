"""`runyard api execute-step`, in a real subprocess, runs only signed requests within its own
code locations and output stores; forged ones are refused with a STEP_FAILURE saying why, and
the attacker code (which would write a sentinel file) never runs. Plus the signing core."""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from runyard.errors import ConfigError
from runyard.events import Event, EventType
from runyard.instance import Instance
from runyard.plugin import CodePointer, RequestRefused, StepRequest, sign_request, verify_request
from runyard.trust import WorkerPolicy, load_worker_policy

RUNYARD = str(Path(sys.executable).parent / "runyard")
KEY = "a-key-for-the-trust-tests-0123456789"


class _Sentinel:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _request(tmp_path: Path, **changes: Any) -> StepRequest:
    fields: dict[str, Any] = dict(
        run_id="r" * 32, step_key="emit", attempt=1, attempt_id="a1", job_name="chain_job",
        code_pointer=CodePointer(module="runyard.testing.jobs"), output_store=str(tmp_path / "outputs"), inputs={},
    )
    fields.update(changes)
    return StepRequest(**fields)


def _run(tmp_path: Path, payload: Any, *args: str, key: str | None = KEY) -> tuple[int, list[Event], str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RUNYARD_SIGNING_KEY", "RUNYARD_STEP_WORKER")}
    env["RUNYARD_HOME"] = str(tmp_path / "home")
    if key is not None:
        env["RUNYARD_SIGNING_KEY"] = key
    proc = subprocess.run(
        [RUNYARD, "api", "execute-step", "--code-location", "runyard.testing", "--output-store",
         str(tmp_path / "outputs"), *args],
        input=json.dumps(payload), capture_output=True, text=True, timeout=60, env=env,
    )
    return proc.returncode, [Event.from_json(line) for line in proc.stdout.splitlines()], proc.stderr


def _refused(result: tuple[int, list[Event], str]) -> str:
    code, events, stderr = result
    assert code == 0, stderr
    assert len(events) == 1, events
    failure = events[0].failure
    assert events[0].type is EventType.STEP_FAILURE and failure is not None
    assert failure.kind.value == "not_started" and failure.message.startswith("step request refused by the worker")
    return failure.message


def _evil(tmp_path: Path, sentinel: Path) -> str:
    path = tmp_path / "attacker" / "evil_jobs.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"open({str(sentinel)!r}, 'w')\nfrom runyard.testing.jobs import chain_job\n")
    return str(path)


def test_execute_step_refuses_forged_requests(tmp_path: Path) -> None:
    sentinel = tmp_path / "sentinel"
    key = KEY.encode()
    blob = base64.b64encode(pickle.dumps(_Sentinel(sentinel))).decode()
    data_store = _request(tmp_path, step_key="double", output_store=f"data:application/octet-stream;base64,{blob}",
                          inputs={"x": "x"})
    assert "output store 'data:" in _refused(_run(tmp_path, sign_request(data_store, key)))
    outside = _request(tmp_path, code_pointer=CodePointer(file=_evil(tmp_path, sentinel)))
    assert "outside this worker's code locations" in _refused(_run(tmp_path, sign_request(outside, key)))
    assert "not signed" in _refused(_run(tmp_path, _request(tmp_path).to_dict()))
    signed = sign_request(_request(tmp_path), key)
    altered = {**signed, "code_pointer": {"file": outside.code_pointer.file}}
    assert "signature does not match" in _refused(_run(tmp_path, altered))
    # Without a key configured, nothing runs unless the caller says the request is its own.
    assert "no step signing key is configured" in _refused(_run(tmp_path, _request(tmp_path).to_dict(), key=None))
    assert not sentinel.exists(), "execute-step ran attacker code"
    code, events, _ = _run(tmp_path, _request(tmp_path).to_dict(), "--allow-unsigned", key=None)
    assert code == 0 and events[-1].type is EventType.STEP_SUCCESS
    # --allow-unsigned never lifts the allowance.
    assert "outside this worker's code locations" in _refused(
        _run(tmp_path, outside.to_dict(), "--allow-unsigned", key=None))
    assert not sentinel.exists()
    code, events, _ = _run(tmp_path, signed)
    assert code == 0 and events[-1].type is EventType.STEP_SUCCESS


def test_signature_covers_every_field(tmp_path: Path) -> None:
    key = KEY.encode()
    signed = sign_request(_request(tmp_path, inputs={"x": "r/emit"}, run_config={"a": [1, 2]}), key)
    assert verify_request(signed, key) == _request(tmp_path, inputs={"x": "r/emit"}, run_config={"a": [1, 2]})
    for field, value in [("run_config", {"a": [1, 3]}), ("inputs", {"x": "r/other"}), ("attempt", 2),
                         ("output_store", "/elsewhere"), ("step_key", "double"), ("extra", 1)]:
        with pytest.raises(RequestRefused, match="signature does not match"):
            verify_request({**signed, field: value}, key)
    with pytest.raises(RequestRefused, match="signature does not match"):
        verify_request(signed, b"another-key-0123456789")
    with pytest.raises(RequestRefused, match="signature does not match"):
        verify_request({**signed, "signature": 7}, key)


@pytest.mark.parametrize("ref", ["../x", "/etc/passwd", "a/../../b", "", "a//b", "s3://bucket/x", "a\\..\\b"])
def test_input_references_stay_inside_the_store(tmp_path: Path, ref: str) -> None:
    from runyard.trust import CodeLocation

    policy = WorkerPolicy(code_locations=(CodeLocation(module="runyard.testing"),),
                          output_stores=(str(tmp_path.resolve()),), require_signature=False)
    with pytest.raises(RequestRefused, match="output reference"):
        policy.check(_request(tmp_path, output_store=str(tmp_path), inputs={"x": ref}))


def test_output_stores_allow_their_folders_only(tmp_path: Path) -> None:
    from runyard.trust import CodeLocation

    policy = WorkerPolicy(code_locations=(CodeLocation(module="runyard.testing"),),
                          output_stores=(str((tmp_path / "out").resolve()), "s3://bucket/runyard"),
                          require_signature=False)
    for ok in [tmp_path / "out", tmp_path / "out" / "sub", f"file://{tmp_path}/out", "s3://bucket/runyard/x"]:
        policy.check(_request(tmp_path, output_store=str(ok)))
    for bad in [tmp_path / "outside", tmp_path / "out" / ".." / "other", "s3://bucket/runyard-other",
                "s3://bucket/runyard/../x", "memory://1", "data:,x"]:
        with pytest.raises(RequestRefused, match="output store"):
            policy.check(_request(tmp_path, output_store=str(bad)))


def test_code_locations_allow_their_own_files_only_after_resolving_links(tmp_path: Path) -> None:
    """The worker resolves every request's paths itself: a folder that merely shares the
    location's name as a prefix, a link out of the location and a non-Python file are refused."""
    from runyard.trust import CodeLocation

    jobs, elsewhere = tmp_path / "jobs", tmp_path / "jobs2"
    (jobs / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    for f in (jobs / "a.py", jobs / "sub" / "b.py", elsewhere / "c.py", jobs / "notes.txt"):
        f.write_text("")
    (jobs / "link.py").symlink_to(elsewhere / "c.py")
    (tmp_path / "out2").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "escape").symlink_to(tmp_path / "out2")
    policy = WorkerPolicy(code_locations=(CodeLocation.parse(str(jobs), base=None, where="test"),),
                          output_stores=(str((tmp_path / "out").resolve()),), require_signature=False)
    for ok in (jobs / "a.py", jobs / "sub" / "b.py", jobs / "sub" / ".." / "a.py"):
        policy.check(_request(tmp_path, code_pointer=CodePointer(file=str(ok)), output_store=str(tmp_path / "out")))
    for bad in (elsewhere / "c.py", jobs / "link.py", jobs / ".." / "jobs2" / "c.py"):
        with pytest.raises(RequestRefused, match="outside this worker's code locations"):
            policy.check(_request(tmp_path, code_pointer=CodePointer(file=str(bad)),
                                  output_store=str(tmp_path / "out")))
    with pytest.raises(RequestRefused, match="not a Python file"):
        policy.check(_request(tmp_path, code_pointer=CodePointer(file=str(jobs / "notes.txt")),
                              output_store=str(tmp_path / "out")))
    with pytest.raises(RequestRefused, match="output store"):
        policy.check(_request(tmp_path, code_pointer=CodePointer(file=str(jobs / "a.py")),
                              output_store=str(tmp_path / "out" / "escape")))


def test_runyard_yaml_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / "jobs").mkdir(parents=True)
    (home / "runyard.yaml").write_text(
        "step_worker:\n  code_locations: [./jobs, mypkg.jobs]\n  output_stores: [shared]\n"
        "  signing_key: {env: MY_RUNYARD_KEY}\n")
    monkeypatch.delenv("RUNYARD_STEP_WORKER", raising=False)
    monkeypatch.setenv("MY_RUNYARD_KEY", KEY)
    policy = load_worker_policy(instance=Instance(home))
    assert [str(loc) for loc in policy.code_locations] == [str((home / "jobs").resolve()), "mypkg.jobs"]
    assert policy.output_stores == (str((home / "shared").resolve()),)
    assert policy.signing_key == KEY.encode()
    monkeypatch.delenv("MY_RUNYARD_KEY")
    with pytest.raises(ConfigError, match="step_worker.signing_key: environment variable 'MY_RUNYARD_KEY'"):
        load_worker_policy(instance=Instance(home))
    (home / "runyard.yaml").write_text("step_worker:\n  code_locations: ['not a module']\n")
    with pytest.raises(ConfigError, match="neither a path"):
        load_worker_policy(instance=Instance(home))


@pytest.mark.parametrize("changes", [{"inputs": "abc"}, {"code_pointer": {"file": 5}}, {"inputs": {"x": 3}},
                                     {"output_store": ["a"]}, {"code_pointer": {"module": "os; x"}}])
def test_requests_of_the_wrong_shape_are_refused_not_crashed(tmp_path: Path, changes: dict[str, Any]) -> None:
    from runyard.trust import CodeLocation

    policy = WorkerPolicy(code_locations=(CodeLocation(module="runyard.testing"),),
                          output_stores=(str(tmp_path.resolve()),), signing_key=KEY.encode())
    body = {**_request(tmp_path).to_dict(), **changes}
    from runyard.trust import _mac

    with pytest.raises(RequestRefused):
        policy.admit({**body, "signature": _mac(KEY.encode(), body)})


def test_bad_worker_environment_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNYARD_STEP_WORKER", '{"code_locations": "/srv/jobs"}')
    with pytest.raises(ConfigError, match="RUNYARD_STEP_WORKER: code_locations: expected a list of strings"):
        load_worker_policy(instance=Instance(tmp_path))
