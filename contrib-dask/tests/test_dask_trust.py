"""Real `dask worker` processes obey their own runyard settings only (see docs/security.md).

The attacks are tasks a client of the scheduler submits to runyard's task function with a
forged request. (Such a client can submit any Python function too: Dask's scheduler is not
an authentication boundary, and only Dask's TLS can make it one. What is tested here is that
runyard's own task never runs a request that its signature and allowance do not admit.)
Attacker code would write a sentinel file; each test asserts that it does not exist.
"""

from __future__ import annotations

import base64
import pickle
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import distributed
import pytest
from runyard import ConfigError
from runyard.plugin import CodePointer, HandlerContext, StepRequest, sign_request
from runyard_dask import remote
from runyard_dask.handler import DaskStepHandler
from runyard_dask.settings import DaskConfig

from .conftest import SIGNING_KEY, CliCluster, write_job

KEY = SIGNING_KEY.encode()
GOOD = "from runyard import job, step\n\n@step\ndef emit():\n    return 5\n\n@job\ndef good():\n    emit()\n"


class _Sentinel:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


@pytest.fixture
def outside() -> Iterator[Path]:
    """A folder outside the workers' code locations (they allow pytest's tmp folder)."""
    path = Path(tempfile.mkdtemp(prefix="runyard-attacker-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def client(cli_cluster: CliCluster) -> Iterator[Any]:
    with distributed.Client(cli_cluster.address, timeout=60, set_as_default=False) as c:
        yield c


def request(tmp_path: Path, **changes: Any) -> StepRequest:
    fields: dict[str, Any] = dict(
        run_id=f"trust-{uuid.uuid4().hex[:8]}", step_key="emit", attempt=1, attempt_id=uuid.uuid4().hex[:12],
        job_name="good", code_pointer=CodePointer(file=str(write_job(tmp_path, GOOD, "good_jobs.py"))),
        output_store=str(tmp_path / "outputs"), inputs={},
    )
    fields.update(changes)
    return StepRequest(**fields)


def run_remote(client: Any, payload: Any) -> list[dict[str, Any]]:
    future = client.submit(remote.run_step, payload, f"trust-{uuid.uuid4().hex}", pure=False)
    return list(future.result(timeout=60)["events"])


def refused(events: list[dict[str, Any]]) -> str:
    assert len(events) == 1, events
    failure = events[0]["data"]["failure"]
    assert events[0]["type"] == "STEP_FAILURE" and failure["kind"] == "not_started"
    assert failure["message"].startswith("step request refused by the worker: ")
    return str(failure["message"])


def evil(folder: Path, sentinel: Path) -> Path:
    return write_job(folder, f"open({str(sentinel)!r}, 'w')\n" + GOOD, f"evil_{uuid.uuid4().hex[:6]}.py")


def test_the_genuine_request_runs(tmp_path: Path, client: Any) -> None:
    events = run_remote(client, sign_request(request(tmp_path), KEY))
    assert events[-1]["type"] == "STEP_SUCCESS"


def test_a_data_output_store_is_refused_unread(tmp_path: Path, client: Any) -> None:
    sentinel = tmp_path / "unpickled"
    blob = base64.b64encode(pickle.dumps(_Sentinel(sentinel))).decode()
    forged = request(tmp_path, output_store=f"data:application/octet-stream;base64,{blob}", inputs={"x": "x"})
    assert "is not one of this worker's output stores" in refused(run_remote(client, sign_request(forged, KEY)))
    assert not sentinel.exists()


def test_a_code_pointer_outside_the_code_locations_is_refused_unimported(
    tmp_path: Path, client: Any, outside: Path
) -> None:
    sentinel = tmp_path / "imported"
    forged = request(tmp_path, code_pointer=CodePointer(file=str(evil(outside, sentinel))))
    assert "outside this worker's code locations" in refused(run_remote(client, sign_request(forged, KEY)))
    assert not sentinel.exists()


def test_unsigned_and_altered_requests_are_refused(tmp_path: Path, client: Any) -> None:
    sentinel = tmp_path / "imported"
    # The evil file is inside the allowed folder: only the signature stands in the way.
    bad = {"file": str(evil(tmp_path, sentinel))}
    assert "not signed" in refused(run_remote(client, request(tmp_path, code_pointer=CodePointer(**bad)).to_dict()))
    signed = sign_request(request(tmp_path), KEY)
    assert "signature does not match" in refused(run_remote(client, {**signed, "code_pointer": bad}))
    assert not sentinel.exists()


def test_the_local_scheduler_entry_is_refused_on_a_distributed_worker(
    tmp_path: Path, client: Any, outside: Path
) -> None:
    """`run_local_step` carries its own allowance (for dask's local schedulers): a client of a
    cluster must not use it to hand a worker a grant of its choosing."""
    sentinel = tmp_path / "imported"
    key = "attacker-chosen-key-0123456789"
    forged = request(tmp_path, code_pointer=CodePointer(file=str(evil(outside, sentinel))))
    grant = (forged.run_id, key, {"code_locations": [str(outside)], "output_stores": [str(tmp_path)]})
    future = client.submit(remote.run_local_step, grant, sign_request(forged, key.encode()), "k", pure=False)
    assert "local schedulers only" in refused(future.result(timeout=60)["events"])
    assert not sentinel.exists()


def test_a_scheduler_address_without_a_key_is_a_config_error(
    tmp_path: Path, cli_cluster: CliCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RUNYARD_SIGNING_KEY")
    handler = DaskStepHandler(DaskConfig(address=cli_cluster.address),
                              HandlerContext(run_id="r", instance_home=None, output_store=str(tmp_path),
                                             max_concurrent=1))
    with pytest.raises(ConfigError, match="executor.dask.address: no step signing key is configured"):
        handler.setup()
    handler.teardown()
