"""``hwft board``: the web UI's HTTP side, a Starlette app served by uvicorn.

The page (``static/``) talks to the JSON routes below. The recipe builder's form comes from the
schema (:mod:`hwft.board.form`); every check is the one ``hwft train`` makes, with its message.
Runs, evaluations and exports are ``hwft`` child processes (:mod:`hwft.board.runs`); chat loads
the result in this process, on the backend ``hwft chat`` would pick, and streams the reply.

Security (:class:`Guard`): 127.0.0.1 by default; any other address needs an access token (given,
or made and printed at start). On loopback the Host header must name loopback (a page elsewhere
cannot reach the board through DNS rebinding), and every request that changes something must
carry the ``X-Hwft-Board`` header, which a page of another origin cannot send without the
board's consent (no CORS here). Every path stays inside the workspace; uploads have a size limit.
No route runs a shell.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import sys
import threading
from pathlib import Path

import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from hwft import llamafactory
from hwft.board import charts, form
from hwft.board.runs import Runs
from hwft.board.workspace import OutsideWorkspace, Workspace
from hwft.errors import RecipeError, UserError

STATIC = Path(__file__).with_name("static")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
#: The header every request that changes something carries (the page's fetch sends it).
CHANGE_HEADER = "x-hwft-board"
COOKIE = "hwft_board_token"


class Guard:
    """ASGI middleware: the Host check (loopback), the access token, the change header."""

    def __init__(self, app, host: str, token: str | None):
        self.app, self.host, self.token = app, host, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        if self.host in LOOPBACK:
            named = request.headers.get("host") or ""
            named = named.split("]")[0] + "]" if named.startswith("[") else named.split(":")[0]
            if named not in LOOPBACK:
                return await JSONResponse({"error": "hwft board answers only requests addressed to localhost"},
                                          status_code=421)(scope, receive, send)
        if self.token is not None:
            given = request.query_params.get("token") or request.cookies.get(COOKIE) \
                or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
                return await JSONResponse({"error": "hwft board: open the address with ?token=TOKEN (printed when "
                                                   "the board started)"}, status_code=401)(scope, receive, send)
            if request.query_params.get("token"):
                async def with_cookie(message):
                    if message["type"] == "http.response.start":
                        cookie = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
                        message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie.encode())]
                    await send(message)
                return await self.app(scope, receive, with_cookie)
        if request.method not in ("GET", "HEAD") and CHANGE_HEADER not in request.headers:
            return await JSONResponse({"error": f"hwft board: a change needs the {CHANGE_HEADER} header"},
                                      status_code=403)(scope, receive, send)
        return await self.app(scope, receive, send)


class Board:
    """The board's state: the workspace, the runs it started, the chat model it has loaded."""

    def __init__(self, workspace: Workspace, max_upload: int):
        from hwft.plugins import get_host

        self.ws, self.max_upload = workspace, max_upload
        self.runs = Runs(workspace)
        self.host = get_host()
        self.chat_lock = threading.Lock()
        self.session = None  #: (run name, hwft.inference.Session) of the last chat
        self.fields = form.describe(self.host)

    # -- recipes ------------------------------------------------------------------------------
    def source(self, path: str) -> Path:
        """The recipe file a request names (relative paths in it resolve beside it)."""
        return self.ws.inside(path, "recipe path") if path else self.ws.root / "recipe.yaml"

    def parse(self, text: str, path: str) -> tuple[dict, str | None]:
        """(the recipe mapping, a note) from YAML text; a LLaMA-Factory recipe is translated."""
        from hwft.recipe import parse_recipe_text

        source = self.source(path)
        raw = parse_recipe_text(text, path or "the recipe")
        if llamafactory.looks_like(raw):
            imported = llamafactory.translate(raw, source)
            return imported.recipe, f"imported from LLaMA-Factory: {imported.summary()}"
        return raw, None

    def state(self, raw: dict, path: str, note: str | None = None) -> dict:
        """The recipe as the page shows it: its YAML, what hwft train says of it, the refused options."""
        source = self.source(path)
        error = form.check(raw, self.host, str(path or "the recipe"), source.parent)
        if error is None:
            from hwft.recipe import recipe_from_dict

            try:
                self.ws.check_recipe_paths(recipe_from_dict(raw, str(path), source.parent))
            except UserError as exc:
                error = str(exc)
        return {"yaml": yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), "raw": raw, "note": note,
                "error": f"hwft: error: {error}" if error else None,
                "refusals": form.refusals(raw, self.host, str(path or "the recipe"), source.parent)}

    def recipe_of(self, body: dict):
        """The validated Recipe of a request body ({yaml, path}), as hwft train reads it."""
        from hwft.recipe import recipe_from_dict

        path = body.get("path") or ""
        raw, _ = self.parse(body.get("yaml", ""), path)
        source = self.source(path)
        recipe = recipe_from_dict(raw, source=str(path or "the recipe"), base_dir=source.parent)
        self.ws.check_recipe_paths(recipe)
        return recipe


#: The largest JSON request (a recipe, a conversation); files come through /api/upload.
JSON_LIMIT = 1 << 20


async def _json(request: Request) -> dict:
    data = await request.body()
    if len(data) > JSON_LIMIT:
        raise UserError("request too large")
    try:
        body = json.loads(data or b"{}")
    except ValueError:
        raise UserError("the request body must be JSON") from None
    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object")
    return body


def make_app(workspace: Workspace, host: str = "127.0.0.1", token: str | None = None,
             max_upload: int = 64 << 20) -> Starlette:
    board = Board(workspace, max_upload)

    def handled(fn):
        async def route(request: Request):
            try:
                return await fn(request)
            except OutsideWorkspace as exc:
                return JSONResponse({"error": f"hwft: error: {exc}"}, status_code=403)
            except UserError as exc:
                return JSONResponse({"error": f"hwft: error: {exc}"}, status_code=400)
        return route

    async def index(request: Request):
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    async def api_form(request: Request):
        recipes = board.ws.recipes()
        return JSONResponse({"fields": board.fields, "recipes": recipes, "start": board.ws.first_recipe(recipes),
                             "workspace": str(board.ws.root),
                             "runs_dir": board.ws.relative(board.ws.runs)})

    async def api_load(request: Request):
        path = request.query_params.get("path", "")
        file = board.ws.inside(path, "recipe path")
        if not file.is_file():
            raise UserError(f"recipe file not found: {path}")
        from hwft.textfile import read_text

        raw, note = board.parse(read_text(file, RecipeError), path)
        return JSONResponse(board.state(raw, path, note))

    async def api_recipe(request: Request):
        """{yaml, path, set: [{key, value} | {key, text}]} -> the recipe's state after the edits.
        A ``text`` is read as the CLI reads ``key=text`` (YAML); empty text removes the key."""
        body = await _json(request)
        path = body.get("path") or ""
        raw, note = board.parse(body.get("yaml", ""), path)
        for edit in body.get("set") or []:
            key = str(edit.get("key", ""))
            if "text" in edit:
                text = str(edit["text"])
                if not text.strip():
                    raw = form.removed(raw, key)
                    continue
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError:
                    raise RecipeError(f"{key}: {text!r} is not a YAML value") from None
            else:
                value = edit.get("value")
            raw = form.set_key(raw, key, value)
        return JSONResponse(board.state(raw, path, note))

    async def api_save(request: Request):
        body = await _json(request)
        path = body.get("path") or ""
        if not path.endswith((".yaml", ".yml")):
            raise UserError(f"save as a .yaml file (got {path!r})")
        file = board.ws.inside(path, "recipe path")
        board.parse(body.get("yaml", ""), path)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(body.get("yaml", ""), encoding="utf-8")
        return JSONResponse({"saved": board.ws.relative(file)})

    async def api_check(request: Request):
        """What ``hwft train R.yaml --dry-run`` says: data read, model found, backend chosen."""
        from hwft.train import plan_run

        body = await _json(request)
        plan = plan_run(board.recipe_of(body))
        return JSONResponse({"ok": f"ok: {plan.describe()}"})

    async def api_data(request: Request):
        from hwft.data.inspect import inspect

        body = await _json(request)
        text, report = inspect(board.recipe_of(body), rows=int(body.get("rows", 3)), color=False)
        return JSONResponse({"text": text, "report": report})

    async def api_upload(request: Request):
        path = request.query_params.get("path", "")
        file = board.ws.inside(path, "upload path")
        if file.exists() and request.query_params.get("overwrite") != "1":
            raise UserError(f"{path} exists; upload under another name")
        declared = int(request.headers.get("content-length") or 0)
        if declared > board.max_upload:
            return JSONResponse({"error": f"hwft: error: {path}: {declared} bytes is over the upload limit of "
                                 f"{board.max_upload} bytes (hwft board --max-upload-mb)"}, status_code=413)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > board.max_upload:
                return JSONResponse({"error": f"hwft: error: {path}: over the upload limit of {board.max_upload} "
                                     "bytes (hwft board --max-upload-mb)"}, status_code=413)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(bytes(data))
        return JSONResponse({"saved": board.ws.relative(file), "bytes": len(data)})

    # -- runs -----------------------------------------------------------------------------------
    async def api_runs(request: Request):
        return JSONResponse({"runs": [board.runs.status(n) for n in board.runs.names()]})

    async def api_start(request: Request):
        """Save the recipe to its path, then ``hwft train PATH`` (checked first, as hwft train checks)."""
        body = await _json(request)
        path = body.get("path") or ""
        if not path.endswith((".yaml", ".yml")):
            raise UserError("save the recipe under a .yaml path first (the run reads it from there)")
        from hwft.select import select_backend

        recipe = board.recipe_of(body)
        select_backend(recipe, board.host)
        file = board.ws.inside(path, "recipe path")
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(body["yaml"], encoding="utf-8")
        child = board.runs.start(file, recipe)
        return JSONResponse({"name": child.name, "pid": child.process.pid})

    async def api_stop(request: Request):
        name = (await _json(request)).get("name", "")
        board.runs.stop(name)
        return JSONResponse({"stopping": name})

    async def api_resume(request: Request):
        name = (await _json(request)).get("name", "")
        child = board.runs.resume(name)
        return JSONResponse({"name": child.name, "pid": child.process.pid})

    async def api_log(request: Request):
        name = request.query_params.get("name", "")
        kind = request.query_params.get("kind", "train")
        board.ws.inside(name, "run")
        child = board.runs.children.get(name if kind == "train" else f"{name}:{kind}")
        return JSONResponse({"log": board.runs.log(name, kind), "code": child.code if child else None,
                             "running": bool(child and child.code is None)})

    async def api_chart(request: Request):
        names = request.query_params.getlist("run")
        metric = request.query_params.get("metric", "loss")
        series = {n: board.runs.series(n) for n in names}
        return Response(charts.curves(series, metric), media_type="image/svg+xml",
                        headers={"cache-control": "no-store"})

    # -- bench results from any machines -----------------------------------------------------------
    def bench_results():
        from hwft.bench.schema import SCHEMA, BenchResult

        found = []
        for file in sorted(board.ws.root.glob("**/*.json")):
            if any(part.startswith(".") for part in file.relative_to(board.ws.root).parts) or file.stat().st_size > 8 << 20:
                continue
            text = file.read_text(encoding="utf-8", errors="replace")
            if SCHEMA not in text[:4096]:
                continue
            try:
                found.append((board.ws.relative(file), BenchResult.model_validate_json(text)))
            except ValueError:
                continue
        return found

    async def api_bench(request: Request):
        from hwft.bench.report import label

        rows = []
        for file, r in bench_results():
            m = r.metrics
            rows.append({"file": file, "label": label(r), "workload": r.workload.recipe, "hash": r.workload.hash,
                         "tokens_per_second": m.tokens_per_second, "step_time_median_s": m.step_time_median_s,
                         "peak_memory_gib": (m.peak_memory_bytes or 0) / 2**30, "memory_kind": m.memory_kind,
                         "mfu": m.mfu, "eval_loss": m.eval_loss, "cpu": r.fingerprint.get("cpu"),
                         "date": r.created})
        return JSONResponse({"results": rows})

    async def api_bench_chart(request: Request):
        results = [r for _, r in bench_results()]
        if not results:
            return Response("<svg xmlns='http://www.w3.org/2000/svg'/>", media_type="image/svg+xml")
        return Response(charts.bench(results, request.query_params.get("metric", "tokens_per_second")),
                        media_type="image/svg+xml")

    # -- using a result -------------------------------------------------------------------------
    async def api_chat(request: Request):
        """Stream the reply of the run's result to {run, messages, max_new_tokens, temperature}."""
        from hwft.inference import Sampling, open_session, open_trained

        body = await _json(request)
        name = str(body.get("run", ""))
        folder = board.runs.folder(name)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in messages):
            raise UserError("messages: give a non-empty list of {role: system|user|assistant, content: text}")
        sampling = Sampling(max_new_tokens=min(int(body.get("max_new_tokens", 128)), 2048),
                            temperature=float(body.get("temperature", 0.0)), seed=int(body.get("seed", 0)))

        def reply():
            with board.chat_lock:
                if board.session is None or board.session[0] != name:
                    board.session = None
                    board.session = (name, open_session(open_trained(folder)))
                try:
                    yield from board.session[1].stream(messages, sampling)
                except UserError as exc:
                    yield f"\nhwft: error: {exc}"

        return StreamingResponse(reply(), media_type="text/plain; charset=utf-8",
                                 headers={"cache-control": "no-store", "x-content-type-options": "nosniff"})

    async def api_eval(request: Request):
        body = await _json(request)
        name = str(body.get("run", ""))
        board.runs.folder(name)
        limit = int(body.get("limit", 20))
        child = board.runs.task(name, "eval", ["eval", name, "--limit", str(limit), "--max-new-tokens",
                                               str(int(body.get("max_new_tokens", 48)))])
        return JSONResponse({"task": child.name})

    async def api_export(request: Request):
        body = await _json(request)
        name = str(body.get("run", ""))
        board.runs.folder(name)
        to = str(body.get("to", ""))
        formats = board.host.exporters().formats()
        if to not in formats:
            raise UserError(f"export format {to!r} is not registered (registered: {', '.join(formats)})")
        child = board.runs.task(name, f"export-{to}", ["export", name, "--to", to, "--verify", "--overwrite"])
        return JSONResponse({"task": child.name})

    async def api_env(request: Request):
        from hwft.environment import env_report

        report = env_report()
        report["export_formats"] = board.host.exporters().formats()
        return JSONResponse(report)

    routes = [
        Route("/", index),
        Route("/api/form", handled(api_form)),
        Route("/api/recipe/load", handled(api_load)),
        Route("/api/recipe", handled(api_recipe), methods=["POST"]),
        Route("/api/recipe/save", handled(api_save), methods=["POST"]),
        Route("/api/check", handled(api_check), methods=["POST"]),
        Route("/api/data", handled(api_data), methods=["POST"]),
        Route("/api/upload", handled(api_upload), methods=["PUT"]),
        Route("/api/runs", handled(api_runs)),
        Route("/api/runs/start", handled(api_start), methods=["POST"]),
        Route("/api/runs/stop", handled(api_stop), methods=["POST"]),
        Route("/api/runs/resume", handled(api_resume), methods=["POST"]),
        Route("/api/runs/log", handled(api_log)),
        Route("/api/chart.svg", handled(api_chart)),
        Route("/api/bench", handled(api_bench)),
        Route("/api/bench/chart.svg", handled(api_bench_chart)),
        Route("/api/chat", handled(api_chat), methods=["POST"]),
        Route("/api/eval", handled(api_eval), methods=["POST"]),
        Route("/api/export", handled(api_export), methods=["POST"]),
        Route("/api/env", handled(api_env)),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        board.runs.close()  # SIGTERM to what is still running: each run writes a checkpoint

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.board = board
    return Guard(app, host, token)


def serve(workspace: str, runs: str, host: str, port: int, token: str | None, max_upload_mb: int) -> int:
    """Serve until interrupted; children started here are stopped (SIGTERM: a checkpoint) on exit."""
    import uvicorn

    ws = Workspace(workspace, runs)
    os.chdir(ws.root)  # relative paths mean what they mean to hwft train run there (output.dir, dataset_dir)
    if host not in LOOPBACK and token is None:
        token = secrets.token_urlsafe(24)
    app = make_app(ws, host, token, max_upload_mb << 20)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host

    def announce():
        bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
        query = f"/?token={token}" if token else "/"
        print(f"hwft board: http://{shown}:{bound}{query}  (workspace {ws.root}; runs in {ws.relative(ws.runs)}; "
              "Ctrl-C stops)", file=sys.stderr, flush=True)

    original = server.startup

    async def startup(sockets=None):
        await original(sockets)
        announce()

    server.startup = startup
    server.run()
    return 0
