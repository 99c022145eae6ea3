"""``hwft serve``: an OpenAI-compatible chat-completions endpoint on localhost.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` (``stream: true`` sends server-sent
events, ``data: {chunk}`` lines ending with ``data: [DONE]``, as OpenAI's clients read them) and
``GET /health``. Requests take ``messages`` (string content, or a list of text parts and, for
a vision-language model (hwft.vision), ``image_url`` parts: a ``data:`` URL, or a local path
only under the folder ``--images-from`` names; hwft never fetches a URL),
``max_tokens`` / ``max_completion_tokens``, ``temperature`` (OpenAI's default 1.0), ``top_p``,
``seed`` and ``stop`` (strings). One model answers one request at a time (a lock); the
standard library's threading HTTP server keeps other connections waiting, not refused.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from hwft.inference import Sampling, Session

#: Longest reply a request may ask for when it names no max_tokens.
DEFAULT_MAX_TOKENS = 512


class BadRequest(ValueError):
    """A request the endpoint refuses with 400 and this message."""


def image_part(part: dict, where: str, images_from: Path | None):
    """The image of an ``image_url`` part: inline data, or a file under ``images_from``."""
    from hwft.data.media import from_part

    try:
        image = from_part(part, where)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if image.data is not None:
        return image
    if images_from is None:
        raise BadRequest(
            f"{where}: a local image path ({image.given}); this server reads images sent inline as data: URLs, "
            "and local files only under the folder hwft serve --images-from names"
        )
    path = (images_from / Path(image.given.removeprefix("file://"))).resolve()
    if not path.is_relative_to(images_from.resolve()) or not path.is_file():
        raise BadRequest(f"{where}: no image {image.given} under {images_from}")
    image.path = path
    return image


def parse_request(body: dict, images_from: Path | None = None) -> tuple[list[dict], Sampling, list[str], bool, list]:
    """(messages, sampling, stop strings, stream, images) from an OpenAI chat-completions body;
    an ``image_url`` part becomes an <image> placeholder where it stands and an image."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: give a non-empty list of {role, content}")
    out, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise BadRequest(f"messages[{i}]: role must be system, developer, user or assistant")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image_url", ...}]
            text = ""
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    text += str(part.get("text", ""))
                elif kind == "image_url":
                    images.append(image_part(part, f"messages[{i}].content[{j}]", images_from))
                    text += "<image>"
                else:
                    raise BadRequest(f"messages[{i}].content[{j}]: only text and image_url parts are supported")
            content = text
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content: give a string")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    if body.get("n", 1) != 1:
        raise BadRequest("n: only 1 completion per request")
    limit = body.get("max_completion_tokens", body.get("max_tokens")) or DEFAULT_MAX_TOKENS
    temperature, top_p = body.get("temperature", 1.0), body.get("top_p", 1.0)
    seed = body.get("seed")
    for key, value, low in (("max_tokens", limit, 1), ("temperature", temperature, 0), ("top_p", top_p, 0)):
        if not isinstance(value, int | float) or isinstance(value, bool) or value < low:
            raise BadRequest(f"{key}: give a number >= {low}")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop: give a string or a list of strings")
    sampling = Sampling(
        int(limit), float(temperature), float(top_p), int(seed) if isinstance(seed, int) else random.randrange(2**31)
    )
    return out, sampling, stop, bool(body.get("stream", False)), images


def with_stops(pieces, stop: list[str]):
    """Text pieces cut at the first stop string; holds back text that may begin one. Yields
    pieces; returns True (StopIteration.value) when a stop string ended the reply."""
    if not stop:
        yield from pieces
        return False
    hold = max(len(s) for s in stop) - 1
    text, sent = "", 0
    for piece in pieces:
        text += piece
        cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            if cut > sent:
                yield text[sent:cut]
            return True
        if len(text) - hold > sent:
            yield text[sent : len(text) - hold]
            sent = len(text) - hold
    if len(text) > sent:
        yield text[sent:]
    return False


def make_server(
    session: Session,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str = "hwft",
    images_from: Path | None = None,
):
    """A ThreadingHTTPServer bound to (host, port) answering with ``session``; ``port`` 0
    picks a free one (``server.server_address``)."""
    lock = threading.Lock()
    created = int(time.time())

    class Handler(BaseHTTPRequestHandler):
        server_version = "hwft-serve"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # one quiet line per request on stderr
            pass

        def send_json(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
            self.send_json(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self.send_json(
                    200,
                    {
                        "object": "list",
                        "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "hwft"}],
                    },
                )
            elif self.path.rstrip("/") == "/health":
                self.send_json(200, {"status": "ok", "model": model_name, "backend": session.backend})
            else:
                self.error(404, f"no route {self.path}; try POST /v1/chat/completions", "not_found_error")

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self.error(404, f"no route {self.path}; try POST /v1/chat/completions", "not_found_error")
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                messages, sampling, stop, stream, images = parse_request(body, images_from)
            except (ValueError, BadRequest) as exc:  # JSONDecodeError is a ValueError
                self.error(400, str(exc) if isinstance(exc, BadRequest) else f"the body is not JSON: {exc}")
                return
            ident = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            head = {"id": ident, "created": int(time.time()), "model": model_name}
            with lock:
                try:
                    prompt = session.image_prompt(messages, images)[0] if images else session.prompt_ids(messages)
                except UserError as exc:  # a model or engine that reads no images; an image that does not decode
                    self.error(400, str(exc))
                    return
                prompt_tokens = len(prompt)
                pieces = with_stops(session.stream(messages, sampling, images or None), stop)
                if stream:
                    self.stream(head, pieces)
                    return
                text, stopped = "", False
                while True:
                    try:
                        text += next(pieces)
                    except StopIteration as end:
                        stopped = bool(end.value)
                        break
            finish = "stop" if stopped else session.finish_reason
            self.send_json(
                200,
                {
                    **head,
                    "object": "chat.completion",
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                    ],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": session.generated_tokens,
                        "total_tokens": prompt_tokens + session.generated_tokens,
                    },
                },
            )

        def stream(self, head: dict, pieces) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def event(delta: dict, finish: str | None = None) -> None:
                chunk = {
                    **head,
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            try:
                event({"role": "assistant", "content": ""})
                stopped = False
                while True:
                    try:
                        event({"content": next(pieces)})
                    except StopIteration as end:
                        stopped = bool(end.value)
                        break
                event({}, "stop" if stopped else session.finish_reason)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # the client left: stop generating
                pieces.close()

    try:
        return ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:  # taken since hwft.ports.check_bind looked (a race), or port 0 refused
        from hwft.errors import UserError
        from hwft.ports import bind_message

        raise UserError(bind_message(exc, host, port, "hwft serve")) from None


def serve(session: Session, host: str, port: int, model_name: str, images_from: str | None = None) -> int:
    server = make_server(session, host, port, model_name, Path(images_from) if images_from else None)
    bound_host, bound_port = server.server_address[:2]
    print(
        f"hwft serve: http://{bound_host}:{bound_port}/v1 (model '{model_name}', OpenAI chat completions; "
        "Ctrl-C stops)",
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
