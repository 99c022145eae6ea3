"""``hwft chat``: talk to a trained model, its reply streamed token by token.

Interactive on a terminal (history kept; ``/reset`` forgets it, ``/system TEXT`` sets the
system prompt, ``/exit`` or Ctrl-D leaves). For scripts: ``--prompt TEXT`` answers once, and
``--prompt -`` or a piped stdin answers the whole of stdin as one message.
"""

from __future__ import annotations

import sys
import time

from hwft.inference import Sampling, Session, open_session, open_trained

HELP = "/reset forgets the conversation, /system TEXT sets the system prompt, /exit leaves"


def loaded(args) -> Session:
    started = time.perf_counter()
    trained = open_trained(args.target, base=args.base, trust_remote_code=args.trust_remote_code)
    session = open_session(trained, args.backend, args.precision)
    print(
        f"hwft: {trained.describe()} on {session.backend} ({time.perf_counter() - started:.1f}s)",
        file=sys.stderr,
        flush=True,
    )
    return session


def sampling_of(args) -> Sampling:
    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def say(session: Session, messages: list[dict], sampling: Sampling, out=None, media: list | None = None) -> str:
    """Stream one reply to ``out`` (stdout) and return it."""
    out = out or sys.stdout
    pieces = []
    for piece in session.stream(messages, sampling, media):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    out.write("\n")
    out.flush()
    return "".join(pieces).strip()


def media_of(images: list[str], videos: list[str], text: str) -> tuple[str, list]:
    """--image and --video files (relative to the working directory) and the prompt with one
    <image> or <video> for each: where the text has its own placeholders, or before the text."""
    from pathlib import Path

    from hwft.data.media import PLACEHOLDERS, from_reference, locate
    from hwft.errors import UserError

    media = []
    for kind, paths in (("image", images), ("video", videos)):
        try:
            given = [from_reference(kind, path, f"--{kind} {path}") for path in paths]
        except ValueError as exc:
            raise UserError(str(exc)) from None
        locate(given, Path.cwd(), f"--{kind}")
        if PLACEHOLDERS[kind] not in text:
            text = PLACEHOLDERS[kind] * len(given) + text
        media += given
    return text, media


def chat(args) -> int:
    if (args.image or args.video) and args.prompt is None:
        from hwft.errors import UserError

        flag = "--image" if args.image else "--video"
        raise UserError(f"{flag} goes with --prompt (one question about the images or videos); add --prompt TEXT")
    session = loaded(args)
    sampling = sampling_of(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    prompt = args.prompt
    if prompt is None and not args.interactive and not sys.stdin.isatty():
        prompt = "-"
    if prompt is not None:
        text = sys.stdin.read() if prompt == "-" else prompt
        given = args.image or args.video
        text, media = media_of(args.image, args.video, text.strip()) if given else (text.strip(), None)
        say(session, [*system, {"role": "user", "content": text}], sampling, media=media)
        return 0
    print(f"hwft chat: {HELP}", file=sys.stderr)
    history: list[dict] = []
    while True:
        sys.stderr.write("> ")  # the prompt on stderr: stdout holds the replies only
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:  # Ctrl-D
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            print("(conversation forgotten)", file=sys.stderr)
            continue
        if line.startswith("/system"):
            text = line.removeprefix("/system").strip()
            system = [{"role": "system", "content": text}] if text else []
            print(f"(system prompt {'set' if text else 'cleared'})", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"(unknown command {line.split()[0]}: {HELP})", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        reply = say(session, [*system, *history], sampling)
        history.append({"role": "assistant", "content": reply})
