"""The board itself: its state and one method per route of the JSON API the page talks to
(:data:`ROUTES`). The recipe builder's form comes from the schema (:mod:`hwft.board.form`);
every check is the one ``hwft train`` makes, with its message. Runs, evaluations and exports are
``hwft`` child processes (:mod:`hwft.board.runs`); chat loads the result in this process, on
the backend ``hwft chat`` would pick, and streams the reply."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import yaml
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from hwft import llamafactory
from hwft.board import charts, form
from hwft.board.runs import Runs
from hwft.board.workspace import Workspace
from hwft.errors import RecipeError, UserError

STATIC = Path(__file__).with_name("static")


#: The largest JSON request (a recipe, a conversation); files come through /api/upload.
JSON_LIMIT = 1 << 20
#: The data tab's pictures of a row's images and videos: their longer side, in pixels.
THUMBNAIL = 96


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


class Board:
    """The board's state (the workspace, the runs it started, the chat model it has loaded) and
    its routes, one method each (:data:`ROUTES` maps them to paths)."""

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
        return {
            "yaml": yaml.safe_dump(raw, sort_keys=False, allow_unicode=True),
            "raw": raw,
            "note": note,
            "error": f"hwft: error: {error}" if error else None,
            "refusals": form.refusals(raw, self.host, str(path or "the recipe"), source.parent),
        }

    def recipe_of(self, body: dict):
        """The validated Recipe of a request body ({yaml, path}), as hwft train reads it."""
        from hwft.recipe import recipe_from_dict

        path = body.get("path") or ""
        raw, _ = self.parse(body.get("yaml", ""), path)
        source = self.source(path)
        recipe = recipe_from_dict(raw, source=str(path or "the recipe"), base_dir=source.parent)
        self.ws.check_recipe_paths(recipe)
        return recipe

    async def index(self, request: Request):
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    async def form_of(self, request: Request):
        recipes = self.ws.recipes()
        return JSONResponse(
            {
                "fields": self.fields,
                "recipes": recipes,
                "start": self.ws.first_recipe(recipes),
                "workspace": str(self.ws.root),
                "runs_dir": self.ws.relative(self.ws.runs),
            }
        )

    async def load_recipe(self, request: Request):
        path = request.query_params.get("path", "")
        file = self.ws.inside(path, "recipe path")
        if not file.is_file():
            raise UserError(f"recipe file not found: {path}")
        from hwft.textfile import read_text

        raw, note = self.parse(read_text(file, RecipeError), path)
        return JSONResponse(self.state(raw, path, note))

    async def edit(self, request: Request):
        """{yaml, path, set: [{key, value} | {key, text}]} -> the recipe's state after the edits.
        A ``text`` is read as the CLI reads ``key=text`` (YAML); empty text removes the key."""
        body = await _json(request)
        path = body.get("path") or ""
        raw, note = self.parse(body.get("yaml", ""), path)
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
        return JSONResponse(self.state(raw, path, note))

    async def save_recipe(self, request: Request):
        body = await _json(request)
        path = body.get("path") or ""
        if not path.endswith((".yaml", ".yml")):
            raise UserError(f"save as a .yaml file (got {path!r})")
        file = self.ws.inside(path, "recipe path")
        self.parse(body.get("yaml", ""), path)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(body.get("yaml", ""), encoding="utf-8")
        return JSONResponse({"saved": self.ws.relative(file)})

    async def dry_run(self, request: Request):
        """What ``hwft train R.yaml --dry-run`` says: data read, model found, backend chosen."""
        from hwft.train import plan_run

        body = await _json(request)
        plan = plan_run(self.recipe_of(body))
        return JSONResponse({"ok": f"ok: {plan.describe()}"})

    async def data_preview(self, request: Request):
        from hwft.data.inspect import inspect

        body = await _json(request)
        # each row's images and videos as small pictures beside its text (THUMBNAIL pixels)
        text, report = inspect(self.recipe_of(body), rows=int(body.get("rows", 3)), color=False, thumbnails=THUMBNAIL)
        return JSONResponse({"text": text, "report": report})

    async def upload_file(self, request: Request):
        path = request.query_params.get("path", "")
        file = self.ws.inside(path, "upload path")
        if file.exists() and request.query_params.get("overwrite") != "1":
            raise UserError(f"{path} exists; upload under another name")
        declared = int(request.headers.get("content-length") or 0)
        if declared > self.max_upload:
            return JSONResponse(
                {
                    "error": f"hwft: error: {path}: {declared} bytes is over the upload limit of "
                    f"{self.max_upload} bytes (hwft board --max-upload-mb)"
                },
                status_code=413,
            )
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > self.max_upload:
                return JSONResponse(
                    {
                        "error": f"hwft: error: {path}: over the upload limit of {self.max_upload} "
                        "bytes (hwft board --max-upload-mb)"
                    },
                    status_code=413,
                )
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(bytes(data))
        return JSONResponse({"saved": self.ws.relative(file), "bytes": len(data)})

    # -- runs -----------------------------------------------------------------------------------
    async def run_list(self, request: Request):
        return JSONResponse({"runs": [self.runs.status(n) for n in self.runs.names()]})

    async def start_run(self, request: Request):
        """Save the recipe to its path, then ``hwft train PATH`` (checked first, as hwft train checks)."""
        body = await _json(request)
        path = body.get("path") or ""
        if not path.endswith((".yaml", ".yml")):
            raise UserError("save the recipe under a .yaml path first (the run reads it from there)")
        from hwft.select import select_backend

        recipe = self.recipe_of(body)
        select_backend(recipe, self.host)
        file = self.ws.inside(path, "recipe path")
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(body["yaml"], encoding="utf-8")
        child = self.runs.start(file, recipe)
        return JSONResponse({"name": child.name, "pid": child.process.pid})

    async def stop_run(self, request: Request):
        name = (await _json(request)).get("name", "")
        self.runs.stop(name)
        return JSONResponse({"stopping": name})

    async def resume_run(self, request: Request):
        name = (await _json(request)).get("name", "")
        child = self.runs.resume(name)
        return JSONResponse({"name": child.name, "pid": child.process.pid})

    async def run_log(self, request: Request):
        name = request.query_params.get("name", "")
        kind = request.query_params.get("kind", "train")
        self.ws.inside(name, "run")
        child = self.runs.children.get(name if kind == "train" else f"{name}:{kind}")
        return JSONResponse(
            {
                "log": self.runs.log(name, kind),
                "code": child.code if child else None,
                "running": bool(child and child.code is None),
            }
        )

    async def run_chart(self, request: Request):
        names = request.query_params.getlist("run")
        metric = request.query_params.get("metric", "loss")
        series = {n: self.runs.series(n) for n in names}
        return Response(
            charts.curves(series, metric), media_type="image/svg+xml", headers={"cache-control": "no-store"}
        )

    # -- bench results from any machines -----------------------------------------------------------
    def bench_results(self) -> list:
        from hwft.bench.schema import SCHEMA, BenchResult

        found = []
        for file in sorted(self.ws.root.glob("**/*.json")):
            if (
                any(part.startswith(".") for part in file.relative_to(self.ws.root).parts)
                or file.stat().st_size > 8 << 20
            ):
                continue
            text = file.read_text(encoding="utf-8", errors="replace")
            if SCHEMA not in text[:4096]:
                continue
            try:
                found.append((self.ws.relative(file), BenchResult.model_validate_json(text)))
            except ValueError:
                continue
        return found

    async def bench_table(self, request: Request):
        from hwft.bench.report import label

        rows = []
        for file, r in self.bench_results():
            m = r.metrics
            rows.append(
                {
                    "file": file,
                    "label": label(r),
                    "workload": r.workload.recipe,
                    "hash": r.workload.hash,
                    "tokens_per_second": m.tokens_per_second,
                    "step_time_median_s": m.step_time_median_s,
                    "peak_memory_gib": (m.peak_memory_bytes or 0) / 2**30,
                    "memory_kind": m.memory_kind,
                    "mfu": m.mfu,
                    "eval_loss": m.eval_loss,
                    "cpu": r.fingerprint.get("cpu"),
                    "date": r.created,
                }
            )
        return JSONResponse({"results": rows})

    async def bench_chart(self, request: Request):
        results = [r for _, r in self.bench_results()]
        if not results:
            return Response("<svg xmlns='http://www.w3.org/2000/svg'/>", media_type="image/svg+xml")
        return Response(
            charts.bench(results, request.query_params.get("metric", "tokens_per_second")), media_type="image/svg+xml"
        )

    # -- using a result -------------------------------------------------------------------------
    async def chat_reply(self, request: Request):
        """Stream the reply of the run's result to {run, messages, max_new_tokens, temperature}."""
        from hwft.inference import Sampling, open_session, open_trained

        body = await _json(request)
        name = str(body.get("run", ""))
        folder = self.runs.folder(name)
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict)
                and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise UserError("messages: give a non-empty list of {role: system|user|assistant, content: text}")
        sampling = Sampling(
            max_new_tokens=min(int(body.get("max_new_tokens", 128)), 2048),
            temperature=float(body.get("temperature", 0.0)),
            seed=int(body.get("seed", 0)),
        )

        def reply():
            with self.chat_lock:
                if self.session is None or self.session[0] != name:
                    self.session = None
                    self.session = (name, open_session(open_trained(folder)))
                try:
                    yield from self.session[1].stream(messages, sampling)
                except UserError as exc:
                    yield f"\nhwft: error: {exc}"

        return StreamingResponse(
            reply(),
            media_type="text/plain; charset=utf-8",
            headers={"cache-control": "no-store", "x-content-type-options": "nosniff"},
        )

    async def evaluate(self, request: Request):
        body = await _json(request)
        name = str(body.get("run", ""))
        self.runs.folder(name)
        limit = int(body.get("limit", 20))
        child = self.runs.task(
            name,
            "eval",
            ["eval", name, "--limit", str(limit), "--max-new-tokens", str(int(body.get("max_new_tokens", 48)))],
        )
        return JSONResponse({"task": child.name})

    async def export_result(self, request: Request):
        body = await _json(request)
        name = str(body.get("run", ""))
        self.runs.folder(name)
        to = str(body.get("to", ""))
        formats = self.host.exporters().formats()
        if to not in formats:
            raise UserError(f"export format {to!r} is not registered (registered: {', '.join(formats)})")
        child = self.runs.task(name, f"export-{to}", ["export", name, "--to", to, "--verify", "--overwrite"])
        return JSONResponse({"task": child.name})

    async def machine(self, request: Request):
        from hwft.environment import env_report

        report = env_report()
        report["export_formats"] = self.host.exporters().formats()
        return JSONResponse(report)


#: (HTTP method, path, Board method) of every route of the API.
ROUTES = (
    ("GET", "/", "index"),
    ("GET", "/api/form", "form_of"),
    ("GET", "/api/recipe/load", "load_recipe"),
    ("POST", "/api/recipe", "edit"),
    ("POST", "/api/recipe/save", "save_recipe"),
    ("POST", "/api/check", "dry_run"),
    ("POST", "/api/data", "data_preview"),
    ("PUT", "/api/upload", "upload_file"),
    ("GET", "/api/runs", "run_list"),
    ("POST", "/api/runs/start", "start_run"),
    ("POST", "/api/runs/stop", "stop_run"),
    ("POST", "/api/runs/resume", "resume_run"),
    ("GET", "/api/runs/log", "run_log"),
    ("GET", "/api/chart.svg", "run_chart"),
    ("GET", "/api/bench", "bench_table"),
    ("GET", "/api/bench/chart.svg", "bench_chart"),
    ("POST", "/api/chat", "chat_reply"),
    ("POST", "/api/eval", "evaluate"),
    ("POST", "/api/export", "export_result"),
    ("GET", "/api/env", "machine"),
)
