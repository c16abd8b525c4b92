"""The HTTP side of `deltatune ui`: a JSON API over the runs folder, jobs and the playground, and the page.

The page (`static/`: one HTML file, one script, one stylesheet, charts drawn as inline SVG by the script)
is served from the package: nothing is fetched from the internet.
"""

from __future__ import annotations

import contextlib
import hmac
import os
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltatune import webguard
from deltatune.ui import runs as runs_mod
from deltatune.ui.jobs import JobError, Jobs
from deltatune.ui.playground import Playground, PlaygroundError

STATIC = os.path.join(os.path.dirname(__file__), "static")
COOKIE = "deltatune_ui_key"
LOGIN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>deltatune ui: key</title>
<link rel="stylesheet" href="/static/style.css"></head><body><main class="login">
<h1>deltatune</h1><p>This board needs the API key (<code>DELTATUNE_API_KEY</code>).</p>
<form method="post" action="/login"><input type="password" name="key" id="key" placeholder="API key" autofocus>
<button type="submit">Enter</button></form>{error}</main></body></html>"""


class _KeyGuard:
    """ASGI middleware: with an API key set, every request needs it (`Authorization: Bearer <key>`,
    `x-api-key`, or the cookie that `/login` sets for the browser); the login page itself is open."""

    OPEN = ("/login", "/static/style.css")

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.key is None or scope["path"] in self.OPEN or self._ok(scope):
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith("/api/"):
            response = JSONResponse(
                {"error": "a valid API key is needed: 'Authorization: Bearer <key>'"}, status_code=401
            )
        else:
            response = RedirectResponse("/login", status_code=303)
        await response(scope, receive, send)

    def _ok(self, scope) -> bool:
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        if not given:
            for part in headers.get(b"cookie", b"").split(b";"):
                name, _, value = part.strip().partition(b"=")
                if name == COOKIE.encode():
                    given = value
        return hmac.compare_digest(given, self.key)


class _BrowserGuard:
    """ASGI middleware against other web pages the user's browser opens. The board launches jobs, so:

    - *cross-site requests*: a request that changes something (any method but GET/HEAD/OPTIONS) whose `Origin`
      is not this board's own (its host:port against the `Host` header; `null` never is), or that the browser marks
      `Sec-Fetch-Site: cross-site`, gets 403: a page elsewhere could otherwise POST a form or a `text/plain`
      body, which needs no CORS preflight, to `/api/jobs`;
    - *DNS rebinding*: with `allowed_hosts` (the command line passes the local names when it binds a local
      address), a `Host` header naming anything else gets 403: a page on `evil.example` whose name is made to
      resolve to 127.0.0.1 would otherwise read the board as its own origin.

    Clients that are not browsers (curl, scripts) send neither `Origin` nor a foreign `Host`, and pass.
    """

    SAFE = (b"GET", b"HEAD", b"OPTIONS")

    def __init__(self, app, allowed_hosts: tuple[str, ...] | None, proxy_hosts: tuple[str, ...] = ()):
        self.app = app
        self.allowed = webguard.allowed_set(allowed_hosts)
        self.proxy_hosts = webguard.allowed_set(
            proxy_hosts
        )  # `--allowed-host`: pages served under those names

    async def __call__(self, scope, receive, send) -> None:
        problem = self._problem(scope) if scope["type"] == "http" else None
        if problem is None:
            await self.app(scope, receive, send)
            return
        await JSONResponse({"error": problem}, status_code=403)(scope, receive, send)

    def _problem(self, scope) -> str | None:
        headers = dict(scope["headers"])
        if problem := webguard.host_problem(headers, self.allowed):
            return problem
        host = headers.get(b"host", b"").decode("latin-1")
        if scope["method"].encode() in self.SAFE:
            return None
        origin = headers.get(b"origin")
        if origin is not None:  # the page's own origin, or a name the board is served under through a proxy
            netloc = origin.decode("latin-1").partition("://")[2].lower()
            if netloc == host.lower() or webguard.host_name(netloc) in self.proxy_hosts:
                return None
            return "a request from another site's page was refused: use the board's own page"
        if headers.get(b"sec-fetch-site") == b"cross-site":
            return "a request from another site's page was refused: use the board's own page"
        return None


async def _json_body(request: Request) -> dict[str, Any] | JSONResponse:
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # RecursionError: nested too deeply
        return JSONResponse({"error": "the request body is not valid JSON"}, status_code=400)
    if not isinstance(body, dict):
        return JSONResponse({"error": "the request body must be a JSON object"}, status_code=400)
    if problem := _bad_text(body):
        return JSONResponse({"error": f"the request body holds {problem}; send plain text"}, status_code=400)
    return body


def _bad_text(value: Any) -> str | None:
    """What no path, name or prompt may hold, anywhere in a parsed body: a NUL (which no file name can hold) or an
    escaped lone surrogate (`\\ud800` parses, but is no character: paths and tokenizers fail on it)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                return "a NUL character"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "a lone surrogate (half of a UTF-16 pair)"
    return None


def create_app(
    runs_dir: str,
    *,
    api_key: str | None = None,
    allowed_hosts: tuple[str, ...] | None = None,
    proxy_hosts: tuple[str, ...] = (),
) -> FastAPI:
    """The UI app over `runs_dir` (created if missing). With `api_key`, every endpoint needs it; with
    `allowed_hosts`, a request's `Host` header must name one of them; a page served under one of `proxy_hosts`
    (`--allowed-host`) counts as the board's own (see `_BrowserGuard`)."""
    os.makedirs(runs_dir, exist_ok=True)
    root = os.path.realpath(runs_dir)
    jobs = Jobs(root)
    playground = Playground()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await run_in_threadpool(jobs.close)  # SIGTERM to running jobs: train saves a checkpoint

    app = FastAPI(title="deltatune ui", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.jobs, app.state.playground, app.state.root = jobs, playground, root
    app.add_middleware(_KeyGuard, api_key=api_key)
    app.add_middleware(
        _BrowserGuard, allowed_hosts=allowed_hosts, proxy_hosts=proxy_hosts
    )  # added last: runs first
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def not_found(e: Exception) -> HTTPException:
        return HTTPException(404, str(e.args[0]) if e.args else str(e))

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's own (an unknown route's 404)
    async def _http(_request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(os.path.join(STATIC, "index.html"), headers={"Cache-Control": "no-store"})

    @app.get("/login", include_in_schema=False)
    async def login_page():
        return HTMLResponse(LOGIN_PAGE.format(error=""))

    @app.post("/login", include_in_schema=False)
    async def login(request: Request):
        form = parse_qs((await request.body()).decode("utf-8", errors="replace"))
        given = (form.get("key") or [""])[0]
        if api_key is None or not hmac.compare_digest(given.encode(), api_key.encode()):
            return HTMLResponse(LOGIN_PAGE.format(error='<p class="error">wrong key</p>'), status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, given, httponly=True, samesite="strict")
        return response

    @app.get("/api/meta")
    async def meta():
        from deltatune import tracking
        from deltatune.compare import DEFAULT_METHODS
        from deltatune.config import METHODS
        from deltatune.embedded import DEFAULT_MODEL

        return {
            "methods": list(METHODS),
            "compare_methods": list(DEFAULT_METHODS),
            "default_model": DEFAULT_MODEL,
            "trackers": list(tracking.BACKENDS),
            "root": root,
        }

    @app.get("/api/runs")
    async def list_runs():
        found = await run_in_threadpool(runs_mod.scan, root, jobs.running_outputs())
        return {"root": root, "runs": found}

    @app.get("/api/run")
    async def run_detail(path: str = Query(...)):
        try:
            folder = runs_mod.resolve(root, path)
        except runs_mod.RunNotFound as e:
            raise not_found(e) from None
        kind = runs_mod.kind_of(folder)
        running = jobs.running_outputs()
        if kind == "train":
            info = runs_mod.train_run(root, folder, running)
            problems: list[str] = []
            info["config"] = runs_mod.read_yaml(os.path.join(folder, "train_config.yaml"), problems)
            info["summary"] = runs_mod.read_json(os.path.join(folder, "summary.json"), problems)
            return info
        if kind == "compare":
            info = runs_mod.compare_run(root, folder, running)
            info["results"] = runs_mod.read_json(os.path.join(folder, "results.json"), [])
            return info
        raise HTTPException(404, f"{path!r} is not a run folder")

    @app.get("/api/metrics")
    async def metrics(path: str = Query(...), since: int = Query(0, ge=0)):
        """Rows of a run's `metrics.jsonl` from line `since`: poll with the returned `next`."""
        try:
            folder = runs_mod.resolve(root, path)
        except runs_mod.RunNotFound as e:
            raise not_found(e) from None
        rows, next_line, bad = runs_mod.read_metrics(os.path.join(folder, "metrics.jsonl"), since)
        status = runs_mod.train_run(root, folder, jobs.running_outputs())["status"]
        return {"rows": rows, "next": next_line, "skipped": bad, "status": status}

    @app.get("/api/adapters")
    async def list_adapters():
        return {"adapters": await run_in_threadpool(runs_mod.adapters, root)}

    @app.get("/api/jobs")
    async def list_jobs():
        return {"jobs": jobs.list()}

    @app.post("/api/jobs")
    async def start_job(request: Request):
        body = await _json_body(request)
        if isinstance(body, JSONResponse):
            return body
        kind = str(body.get("kind", ""))
        try:
            job = await run_in_threadpool(jobs.start, kind, body)
        except (JobError, runs_mod.RunNotFound) as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return job.info()

    @app.get("/api/jobs/{job_id}")
    async def job_log(job_id: str, offset: int = Query(0, ge=0)):
        try:
            return jobs.log(job_id, offset)
        except KeyError as e:
            raise not_found(e) from None

    @app.post("/api/jobs/{job_id}/stop")
    async def stop_job(job_id: str):
        try:
            return jobs.stop(job_id).info()
        except KeyError as e:
            raise not_found(e) from None

    @app.post("/api/playground")
    async def play(request: Request):
        body = await _json_body(request)
        if isinstance(body, JSONResponse):
            return body
        adapters = body.get("adapters") or []
        if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
            return JSONResponse({"error": "adapters must be a list of adapter folders"}, status_code=400)
        try:
            max_new = int(body.get("max_new_tokens") or 40)
            temperature = float(body.get("temperature") or 0.0)
        except (TypeError, ValueError, OverflowError):  # OverflowError: Infinity or 1e999 as max_new_tokens
            return JSONResponse({"error": "max_new_tokens and temperature must be numbers"}, status_code=400)
        if not 0.0 <= temperature < float("inf"):  # NaN too
            return JSONResponse({"error": "temperature must be a finite number >= 0"}, status_code=400)
        try:
            return await run_in_threadpool(
                playground.answer,
                str(body.get("base") or "") or None,
                adapters,
                str(body.get("prompt") or ""),
                max_new,
                temperature,
            )
        except PlaygroundError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except (OSError, ValueError) as e:
            return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=400)

    return app
