"""`runyard ui` without a browser: what the server refuses (foreign hosts, missing tokens,
forged or repeated actions) and how the command refuses to start. The application is
called through ASGI directly, with real storage under it; the browser tests
(test_ui_browser.py) cover the pages themselves."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette", reason="the ui extra is not installed: pip install 'runyard[ui]'")

from runyard.events import EventType  # noqa: E402
from runyard.instance import Instance  # noqa: E402
from runyard.storage import RunRecord, RunStatus  # noqa: E402
from runyard.ui.app import create_app  # noqa: E402

RUNYARD = Path(sys.executable).parent / "runyard"


def call(app: Any, method: str, path: str, *, headers: dict[str, str] | None = None, body: bytes = b"",
         query: str = "") -> tuple[int, dict[str, str], bytes]:
    """One request through the ASGI interface; returns status, headers and body."""
    hdrs = {"host": "127.0.0.1:8765", **(headers or {})}
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in hdrs.items()],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8765),
    }
    sent: list[dict[str, Any]] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, out


PG_SERVER = os.environ.get("RUNYARD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="module")
def pg_url() -> Any:
    """A database of this module's own on the project's PostgreSQL (a missing server fails)."""
    import uuid

    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    try:
        admin = psycopg.connect(PG_SERVER, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.fail(f"PostgreSQL is not reachable at {PG_SERVER} ({e}): run `bash scripts/services.sh postgres`")
    name = f"runyard_ui_test_{uuid.uuid4().hex[:10]}"
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(PG_SERVER, dbname=name)
    finally:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
def instance(request: pytest.FixtureRequest, tmp_path: Path) -> Instance:
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        inst = Instance(tmp_path / "home", config={"storage": {"postgres": {"url": url, "schema": tmp_path.name}}})
    else:
        inst = Instance(tmp_path / "home")
    inst.storage.add_run(RunRecord(run_id="a" * 32, job_name="etl", status=RunStatus.SUCCESS, tags={"team": "x"}))
    inst.storage.add_run(RunRecord(run_id="b" * 32, job_name="report", status=RunStatus.FAILURE))
    return inst


def test_pages_and_api_serve_stored_runs(instance: Instance) -> None:
    app = create_app(instance)
    status, headers, body = call(app, "GET", "/")
    assert status == 200 and "a" * 12 in body.decode() and "report" in body.decode()
    assert "script-src 'self'" in headers["content-security-policy"]
    status, _, body = call(app, "GET", "/api/runs", query="job=etl")
    data = json.loads(body)
    assert [r["run_id"] for r in data["runs"]] == ["a" * 32] and data["total"] == 1
    assert call(app, "GET", "/api/runs", query="status=BOGUS")[0] == 400
    assert call(app, "GET", "/api/runs", query="tag=novalue")[0] == 400
    status, _, body = call(app, "GET", f"/runs/{'b' * 8}")  # a unique prefix
    assert status == 200 and "b" * 32 in body.decode()
    assert call(app, "GET", "/runs/zzz")[0] == 404


def test_runs_are_paged_newest_first(instance: Instance) -> None:
    for i in range(55):
        instance.storage.add_run(RunRecord(run_id=f"p{i:031d}", job_name="many", created_at=1e9 + i))
    app = create_app(instance)
    first = json.loads(call(app, "GET", "/api/runs")[2])
    second = json.loads(call(app, "GET", "/api/runs", query="page=2")[2])
    assert first["total"] == 57 and first["pages"] == 2
    assert len(first["runs"]) == 50 and len(second["runs"]) == 7
    ids = [r["run_id"] for r in first["runs"] + second["runs"]]
    assert len(set(ids)) == 57
    created = [r["created_at"] for r in first["runs"] + second["runs"]]
    assert created == sorted(created, reverse=True)
    page1 = call(app, "GET", "/")[2].decode()
    page2 = call(app, "GET", "/", query="page=2")[2].decode()
    assert 'id="next-page"' in page1 and 'id="prev-page"' not in page1
    assert 'id="prev-page"' in page2 and 'id="next-page"' not in page2


def test_foreign_host_is_refused_on_localhost(instance: Instance) -> None:
    # A page of another site whose name resolves to 127.0.0.1 (DNS rebinding) sends its own Host.
    assert call(create_app(instance), "GET", "/", headers={"host": "evil.example:8765"})[0] == 403
    assert call(create_app(instance), "GET", "/", headers={"host": "localhost:8765"})[0] == 200
    assert call(create_app(instance), "GET", "/", headers={"host": "[::1]:8765"})[0] == 200


def test_token_is_required_and_traded_for_a_cookie(instance: Instance) -> None:
    token = "t" * 24
    app = create_app(instance, token=token, remote=True)
    assert call(app, "GET", "/", headers={"host": "box:8765"})[0] == 401
    assert call(app, "GET", "/", headers={"host": "box:8765"}, query="token=wrong")[0] == 401
    status, headers, _ = call(app, "GET", "/", headers={"host": "box:8765"}, query=f"token={token}&job=etl")
    assert status == 303 and headers["location"] == "/?job=etl"  # the token leaves the address
    assert "httponly" in headers["set-cookie"].lower() and "samesite=strict" in headers["set-cookie"].lower()
    assert call(app, "GET", "/", headers={"host": "box:8765", "cookie": f"runyard_ui_token={token}"})[0] == 200
    assert call(app, "GET", "/api/runs", headers={"host": "box:8765", "authorization": f"Bearer {token}"})[0] == 200
    with pytest.raises(Exception, match="token"):
        create_app(instance, remote=True)


def _csrf(app: Any, run_id: str) -> str:
    page = call(app, "GET", f"/runs/{run_id}")[2].decode()
    return page.split('name="csrf" value="', 1)[1].split('"', 1)[0]


def test_actions_need_csrf_same_origin_and_a_key(instance: Instance) -> None:
    app = create_app(instance)
    run_id = "b" * 32
    form = {"content-type": "application/x-www-form-urlencoded"}
    csrf = _csrf(app, run_id)
    key = "k" * 20
    assert call(app, "POST", f"/runs/{run_id}/cancel", headers=form, body=f"key={key}".encode())[0] == 403
    assert call(app, "POST", f"/runs/{run_id}/cancel", headers={**form, "origin": "http://evil.example"},
                body=f"csrf={csrf}&key={key}".encode())[0] == 403
    assert call(app, "POST", f"/runs/{run_id}/cancel", headers=form, body=f"csrf={csrf}".encode())[0] == 400
    # A finished run is not canceled; the refusal says why, and nothing is recorded.
    status, _, body = call(app, "POST", f"/runs/{run_id}/cancel", headers=form,
                           body=f"csrf={csrf}&key={key}".encode())
    assert status == 409 and "already ended FAILURE" in body.decode()
    # Re-executing with a stale view of the run's re-executions is refused.
    status, _, body = call(app, "POST", f"/runs/{run_id}/reexecute", headers=form,
                           body=f"csrf={csrf}&key={key}&seen=3".encode())
    assert status == 409 and "after this page was loaded" in body.decode()
    assert instance.storage.get_events(run_id, types=[EventType.ENGINE]) == []


def test_a_repeated_action_key_acts_once(instance: Instance) -> None:
    """A double click or a resubmitted form carries the same key: one cancel, the same answer."""
    run_id = "c" * 32
    instance.storage.add_run(RunRecord(run_id=run_id, job_name="etl", status=RunStatus.QUEUED))
    app = create_app(instance)
    form = {"content-type": "application/x-www-form-urlencoded"}
    body = f"csrf={_csrf(app, run_id)}&key={'q' * 20}".encode()
    answers = [call(app, "POST", f"/runs/{run_id}/cancel", headers=form, body=body) for _ in range(2)]
    for t in app.app.state.actions.threads:  # type: ignore[attr-defined]
        t.join(30)
    assert [a[0] for a in answers] == [303, 303]
    assert answers[0][1]["location"] == answers[1][1]["location"]
    assert instance.storage.get_run(run_id).status is RunStatus.CANCELED
    notes = instance.storage.get_events(run_id, types=[EventType.ENGINE])
    assert [n.event.data["action"] for n in notes] == ["cancel"]
    assert len(instance.storage.get_events(run_id, types=[EventType.RUN_CANCELED])) == 1
    # A new key (another tab) once the run has ended is refused, not repeated.
    other = f"csrf={_csrf(app, run_id)}&key={'z' * 20}".encode()
    status, _, text = call(app, "POST", f"/runs/{run_id}/cancel", headers=form, body=other)
    assert status == 409 and "already ended CANCELED" in text.decode()


def _runyard(args: list[str], home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "RUNYARD_UI_TOKEN"}
    full.update(RUNYARD_HOME=str(home), **env)
    return subprocess.run([str(RUNYARD), *args], env=full, capture_output=True, text=True, timeout=60)


def test_listening_beyond_localhost_needs_the_flag_and_a_token(tmp_path: Path) -> None:
    proc = _runyard(["ui", "--host", "0.0.0.0", "--port", "0"], tmp_path)
    assert proc.returncode == 2 and "--allow-remote" in proc.stderr
    proc = _runyard(["ui", "--host", "0.0.0.0", "--port", "0", "--allow-remote"], tmp_path)
    assert proc.returncode == 2 and "RUNYARD_UI_TOKEN" in proc.stderr
    proc = _runyard(["ui", "--host", "0.0.0.0", "--port", "0", "--allow-remote"], tmp_path,
                    RUNYARD_UI_TOKEN="short")
    assert proc.returncode == 2 and "at least 16" in proc.stderr


def test_missing_extra_gives_the_install_hint(tmp_path: Path) -> None:
    code = ("import sys\nsys.modules['starlette'] = None\n"  # as if the ui extra were not installed
            "from runyard.cli import main\nmain(['ui', '--port', '0'])\n")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RUNYARD_HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "pip install 'runyard[ui]'" in proc.stderr and "starlette" in proc.stderr


DEPENDENT_JOB = """
import os
import pathlib

# Who imported this file: the test checks that the viewer never did.
with open(os.environ.get("RY_IMPORTS", os.devnull), "a") as f:
    f.write(f"{os.getpid()}\\n")

import ry_only_in_the_worker  # installed where the job runs, not where runyard ui runs

from runyard import job, step


@step
def extract() -> int:
    return ry_only_in_the_worker.VALUE


@step
def double(x: int) -> int:
    return 2 * x


@step
def triple(x: int) -> int:
    return 3 * x


@step
def total(a: int, b: int) -> int:
    return a + b


@job
def needs_deps():
    x = extract()
    total(double(x), triple(x))
"""


def test_the_graph_comes_from_the_recorded_plan_not_the_jobs_code(tmp_path: Path) -> None:
    """A job whose dependencies are missing where `runyard ui` runs (its file fails to import
    there) still shows its step graph: the plan recorded with the run, read from storage.
    Both ways a run is created: executed here (RUN_START) and launched (RUN_QUEUED)."""
    deps = tmp_path / "deps"
    deps.mkdir()
    (deps / "ry_only_in_the_worker.py").write_text("VALUE = 7\n")
    job_file = tmp_path / "needs_deps.py"
    job_file.write_text(DEPENDENT_JOB)
    imports = tmp_path / "imports.txt"
    home = tmp_path / "home"
    env = {**os.environ, "RUNYARD_HOME": str(home), "PYTHONPATH": str(deps), "RY_IMPORTS": str(imports)}
    for command in (["job", "execute", "-f", str(job_file)], ["job", "launch", "-f", str(job_file), "--wait"]):
        done = subprocess.run([str(RUNYARD), *command], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    inst = Instance(home)
    runs = inst.storage.list_runs()
    assert len(runs) == 2 and all(r.status is RunStatus.SUCCESS for r in runs)
    app = create_app(inst)
    expected = [["extract", []], ["double", ["extract"]], ["triple", ["extract"]], ["total", ["double", "triple"]]]
    for run in runs:
        status, _, body = call(app, "GET", f"/api/runs/{run.run_id}/graph")
        assert status == 200 and json.loads(body) == {"steps": expected}, body
    # The file cannot be imported here, and the viewer did not try.
    assert "ry_only_in_the_worker" not in sys.modules
    assert str(os.getpid()) not in imports.read_text().split()
    # A run recorded without a plan (an older runyard) says so instead of importing its code.
    inst.storage.add_run(RunRecord(run_id="c" * 32, job_name="needs_deps", code_pointer={"file": str(job_file)}))
    status, _, body = call(app, "GET", f"/api/runs/{'c' * 32}/graph")
    assert status == 200 and "no recorded plan" in json.loads(body)["error"]
    assert str(os.getpid()) not in imports.read_text().split()
