"""Rows from JSON, JSONL and Parquet files or folders. Rows are numbered from 1.

JSON and JSONL are read with the ``json`` module: it names the line that is broken, reads rows
whose fields change type from row to row, and reads a .jsonl file lazily, line by line, for
``data.streaming``. (They were read with ``datasets``/Arrow before; property tests found JSON
rows of mixed shapes on which pyarrow's JSON reader crashed the process.) Parquet is read with
``datasets``: Arrow-backed in memory, a lazy row stream when streaming.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from hwft.errors import DataError
from hwft.textfile import read_lines, read_text

#: File suffix -> ``datasets`` builder.
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def data_files(path: Path) -> list[Path]:
    """The data files a dataset path names: the file itself, or every data file under a folder."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in BUILDERS and p.is_file())
        if not files:
            raise DataError(f"{path}: the folder holds no .json, .jsonl or .parquet files")
        kinds = {BUILDERS[p.suffix] for p in files}
        if len(kinds) > 1:
            raise DataError(f"{path}: the folder mixes JSON and Parquet files; keep one kind per dataset")
        return files
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.suffix not in BUILDERS:
        raise DataError(
            f"{path}: unsupported data file type '{path.suffix}'; use .json, .jsonl or .parquet (or a folder of them)"
        )
    return [path]


def json_type(value) -> str:
    """A value's type as JSON names it."""
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def iter_rows(path: Path, streaming: bool = False) -> Iterator[tuple[str, int, dict]]:
    """(file, row number, row) for every row of a dataset path, in file order."""
    for file in data_files(path):
        count = 0
        for number, row in _file_rows(file, streaming):
            if not isinstance(row, dict):
                raise DataError(f"{file} row {number}: expected a JSON object, got {json_type(row)}")
            count += 1
            yield str(file), number, row
        if count == 0:
            raise DataError(f"{file}: no rows")


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)
    return datasets


def _file_rows(file: Path, streaming: bool) -> Iterator[tuple[int, dict]]:
    if BUILDERS[file.suffix] == "json":
        # In memory the whole file is read first, so a broken line is reported before any row.
        yield from _json_rows(file) if streaming else list(_json_rows(file))
        return
    datasets = _quiet_datasets()
    try:
        table = datasets.load_dataset("parquet", data_files=str(file), split="train", streaming=streaming)
        # Arrow gives every row every column of the file; a field a row lacks reads None.
        for number, row in enumerate(table, start=1):
            yield number, {k: v for k, v in row.items() if v is not None}
    except Exception as exc:  # noqa: BLE001 - any failure of the reader is the file's
        raise DataError(f"{file}: cannot be read as Parquet ({type(exc).__name__}: {exc})") from None


def _json_lines(file: Path, lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, dict]]:
    number = 0
    for lineno, line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file} line {lineno}: not valid JSON ({exc.msg})") from None
        number += 1
        yield number, row


def _json_rows(file: Path) -> Iterator[tuple[int, dict]]:
    """JSON/JSONL rows read with the ``json`` module, in any Unicode encoding (hwft.textfile);
    malformed text names its line. A .json file holding JSON lines (as LLaMA-Factory's loader
    accepts) is read as JSONL; one whole object is neither (``datasets`` would read it as a
    single row)."""
    if file.suffix == ".jsonl":
        yield from _json_lines(file, read_lines(file, DataError))  # lazily: streaming reads files larger than memory
        return
    text = read_text(file, DataError)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and exc.lineno > 1:  # a second value on a later line: JSON lines
            yield from _json_lines(file, enumerate((line.removesuffix("\r") for line in text.split("\n")), start=1))
            return
        raise DataError(f"{file}: not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})") from None
    if isinstance(data, dict):
        raise DataError(
            f"{file}: a .json data file must hold a list of rows, or one object per line; "
            f"this one is a single object with fields {sorted(data)[:5]}"
        )
    if not isinstance(data, list):
        raise DataError(f"{file}: a .json data file must hold a list of rows (JSONL: one object per line)")
    yield from enumerate(data, start=1)
