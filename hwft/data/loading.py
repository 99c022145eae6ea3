"""Read JSON and JSONL files into conversations, with errors naming file, row and field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hwft.data.formats import DataFormat, Message
from hwft.errors import DataError, did_you_mean


@dataclass
class Example:
    """One conversation and where it came from (for error messages)."""

    messages: list[Message]
    source: str  #: "file.jsonl row 12"


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(row number, row) pairs; rows numbered from 1 (JSONL: the line number)."""
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.suffix not in {".json", ".jsonl"}:
        raise DataError(f"{path}: unsupported data file type '{path.suffix}'; use .json or .jsonl")
    text = path.read_text(encoding="utf-8")
    rows: list[tuple[int, dict]] = []
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
            rows.append((lineno, row))
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})"
            ) from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of rows")
        rows = list(enumerate(data, start=1))
    for number, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path} row {number}: expected a JSON object, got {type(row).__name__}")
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def detect_format(row: dict, formats: dict[str, DataFormat], where: str) -> DataFormat:
    """The first format whose defining key the row has (a row may still fail its parse)."""
    for fmt in formats.values():
        if fmt.detect and fmt.detect(row):
            return fmt
    raise DataError(
        f"{where}: cannot tell the row's format from its keys {sorted(row)}; "
        f"set format: to one of {', '.join(formats)}"
    )


def load_examples(
    path: Path,
    format_name: str,
    formats: dict[str, DataFormat],
    columns: dict | None = None,
    max_samples: int | None = None,
) -> list[Example]:
    """Parse every row of one file with one format; the first bad row is an error."""
    rows = read_rows(path)
    if max_samples:
        rows = rows[:max_samples]
    if format_name == "auto":
        first = rows[0][1]
        renamed = {**first, **{want: first[have] for want, have in (columns or {}).items() if have in first}}
        fmt = detect_format(renamed, formats, f"{path} row {rows[0][0]}")
    elif format_name in formats:
        fmt = formats[format_name]
    else:
        raise DataError(
            f"unknown data format '{format_name}' for {path}{did_you_mean(format_name, formats)} "
            f"(known: auto, {', '.join(formats)})"
        )
    examples = []
    for number, row in rows:
        where = f"{path} row {number}"
        try:
            messages = fmt.parse(row, columns or {})
        except ValueError as exc:
            raise DataError(f"{where} ({fmt.name} format): {exc}") from None
        examples.append(Example(messages, where))
    return examples
