"""``hwft board``: the web UI's HTTP side, a Starlette app served by uvicorn.

The page (``static/``) talks to the JSON routes of :class:`hwft.board.board.Board`, one method
each. This module guards them and serves them.

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
import os
import secrets
import sys

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from hwft.board.board import ROUTES, STATIC, Board
from hwft.board.workspace import OutsideWorkspace, Workspace
from hwft.errors import UserError

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
                return await JSONResponse(
                    {"error": "hwft board answers only requests addressed to localhost"}, status_code=421
                )(scope, receive, send)
        if self.token is not None:
            given = (
                request.query_params.get("token")
                or request.cookies.get(COOKIE)
                or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            )
            if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
                return await JSONResponse(
                    {"error": "hwft board: open the address with ?token=TOKEN (printed when the board started)"},
                    status_code=401,
                )(scope, receive, send)
            if request.query_params.get("token"):

                async def with_cookie(message):
                    if message["type"] == "http.response.start":
                        cookie = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
                        message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie.encode())]
                    await send(message)

                return await self.app(scope, receive, with_cookie)
        if request.method not in ("GET", "HEAD") and CHANGE_HEADER not in request.headers:
            return await JSONResponse(
                {"error": f"hwft board: a change needs the {CHANGE_HEADER} header"}, status_code=403
            )(scope, receive, send)
        return await self.app(scope, receive, send)


def make_app(
    workspace: Workspace, host: str = "127.0.0.1", token: str | None = None, max_upload: int = 64 << 20
) -> Guard:
    """The board's Starlette app (:data:`hwft.board.board.ROUTES` onto Board methods, a
    workspace error 403, any other user error 400) behind its :class:`Guard`."""
    board = Board(workspace, max_upload)

    def handled(method):
        async def route(request: Request):
            try:
                return await method(request)
            except OutsideWorkspace as exc:
                return JSONResponse({"error": f"hwft: error: {exc}"}, status_code=403)
            except UserError as exc:
                return JSONResponse({"error": f"hwft: error: {exc}"}, status_code=400)

        return route

    routes: list[BaseRoute] = [
        Route(path, handled(getattr(board, name)), methods=[verb]) for verb, path, name in ROUTES
    ]
    routes.append(Mount("/static", app=StaticFiles(directory=STATIC), name="static"))

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
        print(
            f"hwft board: http://{shown}:{bound}{query}  (workspace {ws.root}; runs in {ws.relative(ws.runs)}; "
            "Ctrl-C stops)",
            file=sys.stderr,
            flush=True,
        )

    original = server.startup

    async def startup(sockets=None):
        await original(sockets)
        announce()

    server.startup = startup
    server.run()
    return 0
