"""A user's text file (data, recipe, registry, template) as text, whichever Unicode encoding
saved it.

The encoding is read off the first bytes, as JSON's RFC 4627 and Python's
``json.detect_encoding`` do: a byte-order mark names UTF-8, UTF-16 or UTF-32 (Excel and Notepad
write one), and a file without one is UTF-8, or UTF-16/UTF-32 where the zero bytes around its
first ASCII character say so. Anything else that does not decode is refused, naming the file,
the byte offset, the byte and the encoding tried.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path

from hwft.errors import UserError

#: What the messages say hwft reads.
ACCEPTED = "UTF-8 (with or without a byte-order mark), UTF-16 or UTF-32 (with a byte-order mark)"
#: json.detect_encoding's codec names, as a user knows them.
NAMES = {
    "utf-8": "UTF-8",
    "utf-16": "UTF-16",
    "utf-32": "UTF-32",
    "utf-16-le": "UTF-16-LE",
    "utf-16-be": "UTF-16-BE",
    "utf-32-le": "UTF-32-LE",
    "utf-32-be": "UTF-32-BE",
}
BLOCK = 1 << 20


def detect(head: bytes) -> tuple[str, int]:
    """(codec, bytes to skip) for a file that starts with ``head`` (its first 4 bytes or more).
    UTF-8's mark is skipped here rather than by utf-8-sig, whose offsets start after it."""
    encoding = json.detect_encoding(head)
    return ("utf-8", len(codecs.BOM_UTF8)) if encoding == "utf-8-sig" else (encoding, 0)


def undecodable(
    path: Path, encoding: str, offset: int, data: bytes, marked: bool = False, error: type[UserError] = UserError
) -> UserError:
    byte = f" (0x{data[0]:02x})" if data else ""
    name = NAMES.get(encoding, encoding)
    if encoding == "utf-8":
        why = "as its byte-order mark says" if marked else "as no byte-order mark names UTF-16 or UTF-32"
    else:
        why = "as its byte-order mark says" if encoding in ("utf-16", "utf-32") else "as its zero bytes suggest"
    return error(
        f"{path}: not valid text at byte {offset}{byte}: tried {name}, {why}. hwft reads {ACCEPTED}; "
        "save the file as UTF-8"
    )


def read_text(path: Path, error: type[UserError] = UserError) -> str:
    """The whole file as text (a byte-order mark removed); ``error``: the UserError to raise."""
    data = Path(path).read_bytes()
    encoding, start = detect(data[:4])
    try:
        return data[start:].decode(encoding)
    except UnicodeDecodeError as exc:
        where = start + exc.start
        raise undecodable(path, encoding, where, data[where : start + exc.end], bool(start), error) from None


def read_lines(path: Path, error: type[UserError] = UserError) -> Iterator[tuple[int, str]]:
    """(line number from 1, line without its end) lazily, for files larger than memory. A bad
    byte is reported at its offset in the file, however far in it is."""
    with open(path, "rb") as f:
        encoding, start = detect(f.read(4))
        f.seek(start)
        decoder = codecs.getincrementaldecoder(encoding)("strict")
        offset, pending, number = start, "", 0
        while True:
            block = f.read(BLOCK)
            held = len(decoder.getstate()[0])  # bytes of a character split across blocks
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                where = offset - held + exc.start
                raise undecodable(path, encoding, where, exc.object[exc.start : exc.end], bool(start), error) from None
            offset += len(block)
            lines = (pending + text).split("\n")
            pending = lines.pop() if block else ""
            if not block and lines and not lines[-1]:
                lines.pop()  # the file's last line end
            for line in lines:
                number += 1
                yield number, line.removesuffix("\r")
            if not block:
                return
