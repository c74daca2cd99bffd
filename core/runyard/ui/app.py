"""The ASGI application of ``runyard ui``: server-rendered pages, a small JSON API their
scripts poll for live changes, and two POST actions guarded against CSRF and repeats."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import RunyardError
from ..instance import Instance
from ..storage import RunFilter, RunStatus
from . import views
from .actions import Actions

HERE = Path(__file__).parent
PAGE_SIZE = 50
LOG_PAGE = 2000
EVENT_PAGE = 20000
TOKEN_COOKIE = "runyard_ui_token"
HEALTH_EVERY = 2.0  # seconds between checks of an open run's worker
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


def _host_name(header: str) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:8765`` -> ``[::1]``)."""
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0]


class Guard:
    """Host and token checks in front of every request.

    Bound to localhost, only a ``Host`` naming localhost is served: a page of another site
    that resolves its own name to 127.0.0.1 (DNS rebinding) gets 403. With a token (required
    to listen beyond localhost) every request must carry it: ``Authorization: Bearer``, the
    cookie set by opening any page once with ``?token=``, or that query parameter.
    """

    def __init__(self, app: ASGIApp, *, token: str | None, remote: bool) -> None:
        self.app = app
        self.token = token
        self.remote = remote

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        host = _host_name(request.headers.get("host") or "")
        if not self.remote and host not in LOCAL_HOSTS:
            await PlainTextResponse(f"runyard ui serves localhost only, not host '{host}'", 403)(scope, receive, send)
            return
        if self.token is not None:
            given = request.query_params.get("token")
            header = request.headers.get("authorization", "")
            candidates = [given, request.cookies.get(TOKEN_COOKIE),
                          header[7:] if header.lower().startswith("bearer ") else None]
            if not any(c and hmac.compare_digest(c.encode(), self.token.encode()) for c in candidates):
                await PlainTextResponse(
                    "runyard ui needs its token: open the address printed by `runyard ui` (…/?token=…), "
                    "or send 'Authorization: Bearer <RUNYARD_UI_TOKEN>'", 401,
                )(scope, receive, send)
                return
            if given:
                # Trade the query token for a cookie at once, so it leaves the address bar and history.
                rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
                response = RedirectResponse(request.url.path + (f"?{rest}" if rest else ""), 303)
                response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _headers(response: Response) -> Response:
    # Scripts and styles come from /static only: nothing inline, so injected markup cannot run.
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
    )
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _fmt_time(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def create_app(instance: Instance, *, token: str | None = None, remote: bool = False,
               cancel_grace: float = 10.0) -> ASGIApp:
    """The application over ``instance``'s storage. ``remote``: serve any Host (needs ``token``)."""
    if remote and not token:
        raise RunyardError("serving beyond localhost needs a token (RUNYARD_UI_TOKEN)")
    storage = instance.storage
    actions = Actions(instance, cancel_grace=cancel_grace)
    secret = secrets.token_bytes(32)
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    env.filters["time"] = _fmt_time
    env.filters["duration"] = _fmt_duration
    env.filters["json"] = lambda v: json.dumps(v, default=str)
    static_version = str(int(max(p.stat().st_mtime for p in (HERE / "static").iterdir())))
    checked: dict[str, float] = {}  # run id -> when its worker's health was last checked

    def csrf_token() -> str:
        return hmac.new(secret, b"csrf", hashlib.sha256).hexdigest()

    def render(name: str, status: int = 200, **context: Any) -> Response:
        html = env.get_template(name).render(static="/static", v=static_version, csrf=csrf_token(), **context)
        return _headers(HTMLResponse(html, status))

    def run_filter(request: Request) -> tuple[RunFilter, dict[str, str]]:
        q = request.query_params
        chosen = {k: q.get(k, "").strip() for k in ("job", "status", "tag")}
        status = chosen["status"]
        if status and status not in views.status_choices():
            raise ValueError(f"status: expected one of {', '.join(views.status_choices())}, got '{status}'")
        tag = None
        if chosen["tag"]:
            k, sep, v = chosen["tag"].partition("=")
            if not sep:
                raise ValueError(f"tag: expected KEY=VALUE, got '{chosen['tag']}'")
            tag = (k.strip(), v.strip())
        where = RunFilter(job_name=chosen["job"] or None, statuses=(RunStatus(status),) if status else None, tag=tag)
        return where, chosen

    def page_number(request: Request) -> int:
        try:
            return max(1, int(request.query_params.get("page", "1")))
        except ValueError:
            return 1

    def runs_data(request: Request) -> dict[str, Any]:
        where, chosen = run_filter(request)
        page = page_number(request)
        runs, total = storage.page_runs(where, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        return {"runs": [views.run_row(r) for r in runs], "total": total, "page": page,
                "pages": max(1, -(-total // PAGE_SIZE)), "filters": chosen}

    def bad_request(message: str) -> Response:
        return render("error.html", 400, title="Bad request", message=message)

    def runs_page(request: Request) -> Response:
        try:
            data = runs_data(request)
        except ValueError as e:
            return bad_request(str(e))
        filters = {k: v for k, v in data["filters"].items() if v}
        return render("runs.html", **data, statuses=views.status_choices(), query=urlencode(filters))

    def runs_api(request: Request) -> Response:
        try:
            return JSONResponse(runs_data(request))
        except ValueError as e:
            return JSONResponse({"error": str(e)}, 400)

    def find_run(run_id: str) -> Any:
        from ..runs import get_run

        return get_run(instance, run_id)

    def run_page(request: Request) -> Response:
        try:
            run = find_run(request.path_params["run_id"])
        except RunyardError as e:
            return render("error.html", 404, title="No such run", message=str(e))
        res = run.resolution or {}
        _, reexecutions = storage.page_runs(RunFilter(parent_run_id=run.run_id), limit=0)
        return render(
            "run.html", run=run, row=views.run_row(run), resolution=res,
            executor_settings=views.settings_rows(res.get("executor")),
            launcher_settings=views.settings_rows(res.get("run_launcher")),
            can_cancel=not run.status.is_finished,
            can_reexecute=run.status in (RunStatus.FAILURE, RunStatus.CANCELED),
            reexecutions=reexecutions, action_key=secrets.token_urlsafe(16),
            notice=request.query_params.get("notice", ""),
        )

    def int_param(request: Request, name: str, default: int) -> int:
        try:
            return max(0, int(request.query_params.get(name, default)))
        except ValueError:
            return default

    def events_api(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        run = storage.get_run(run_id)
        if run is None:
            return JSONResponse({"error": f"no run '{run_id}'"}, 404)
        if not run.status.is_finished and time.monotonic() - checked.get(run_id, 0.0) > HEALTH_EVERY:
            # A run whose worker died ends FAILURE here, as `run show` would mark it, rather
            # than looking alive on an open page forever.
            checked[run_id] = time.monotonic()
            from ..runs import check_run

            try:
                run = check_run(instance, run)
            except Exception:  # a launcher that cannot say: show the run as stored
                pass
        after = int_param(request, "after", 0)
        events, last, more = views.events_after(storage, run_id, after,
                                                limit=min(int_param(request, "limit", EVENT_PAGE), EVENT_PAGE))
        head = json.dumps({"run": views.run_row(run), "last": last, "more": more, "now": time.time()})
        return Response(head[:-1] + ', "events": ' + events + "}", media_type="application/json")

    def logs_api(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        step = request.query_params.get("step")
        if not step:
            return JSONResponse({"error": "give ?step=STEP_KEY"}, 400)
        limit = min(int_param(request, "limit", LOG_PAGE), LOG_PAGE)
        logs, more = views.step_logs(storage, run_id, step, int_param(request, "after", 0), limit)
        return Response(f'{{"more": {json.dumps(more)}, "logs": {logs}}}', media_type="application/json")

    def graph_api(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        if storage.get_run(run_id) is None:
            return JSONResponse({"error": "no such run"}, 404)
        return JSONResponse(views.step_graph(storage, run_id))

    async def action(request: Request) -> Response:
        # Our forms are url-encoded and tiny: parsed here, without python-multipart.
        body = await request.body()
        if len(body) > 8192 or not request.headers.get("content-type", "").startswith(
                "application/x-www-form-urlencoded"):
            return PlainTextResponse("expected a small url-encoded form", 400)
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        origin = request.headers.get("origin")
        if origin and origin != "null" and origin.split("://", 1)[-1] != request.headers.get("host"):
            return PlainTextResponse(f"cross-site request refused (origin {origin})", 403)
        if not hmac.compare_digest(str(form.get("csrf", "")), csrf_token()):
            return PlainTextResponse("missing or wrong CSRF token: reload the page and try again", 403)
        key = str(form.get("key", ""))
        if not 16 <= len(key) <= 64:
            return PlainTextResponse("missing action key: reload the page and try again", 400)
        client = request.client.host if request.client else "unknown"
        run_id = request.path_params["run_id"]
        name = request.path_params["action"]
        try:
            if name == "cancel":
                result = await run_in_threadpool(actions.cancel, run_id, key, client)
            elif name == "reexecute":
                try:
                    seen = int(str(form.get("seen", "")))
                except ValueError:
                    return PlainTextResponse("missing 'seen': reload the page and try again", 400)
                result = await run_in_threadpool(actions.reexecute, run_id, key, seen, client)
            else:
                return PlainTextResponse(f"unknown action '{name}'", 404)
        except RunyardError as e:
            return render("error.html", 409, title=f"Cannot {name} run {run_id}", message=str(e))
        except Exception as e:  # the job's code failing to load, a launcher failing: say what
            return render("error.html", 500, title=f"Could not {name} run {run_id}",
                          message=f"{type(e).__name__}: {e}")
        if not result.ok:
            return render("error.html", 409, title=f"Not done: {name}", message=result.message,
                          link=f"/runs/{quote(result.run_id)}")
        return RedirectResponse(f"/runs/{quote(result.run_id)}?{urlencode({'notice': result.message})}", 303)

    routes = [
        Route("/", runs_page),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Route("/api/runs", runs_api),
        Route("/runs/{run_id}", run_page),
        Route("/api/runs/{run_id}/events", events_api),
        Route("/api/runs/{run_id}/logs", logs_api),
        Route("/api/runs/{run_id}/graph", graph_api),
        Route("/runs/{run_id}/{action}", action, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.actions = actions
    return Guard(app, token=token, remote=remote)
