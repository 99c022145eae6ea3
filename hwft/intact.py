"""Whether the files a run reads are whole: a copy or download that was interrupted leaves a
``.safetensors`` or JSON file cut short, which the libraries that read it report with a
traceback (safetensors' ``incomplete metadata, file not fully covered``, a JSON decoder's
``Expecting value``). These checks read no tensor and import no engine.

A safetensors file is 8 bytes (little-endian u64: the header's length N), N bytes of JSON
header (each tensor's ``data_offsets`` into the data that follows), then the data: whole when
its size is exactly ``8 + N + the largest end offset``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from hwft.errors import ModelError

#: JSON files of a model or adapter folder that a loader parses (the tokenizer's are checked
#: when the tokenizer fails to load: hwft.models.load_tokenizer).
FOLDER_JSON = (
    "config.json",
    "adapter_config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file, or None when it is."""
    size = path.stat().st_size
    if size < 8:
        return f"is cut short ({size} bytes; a safetensors file starts with an 8-byte header length)"
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if 8 + length > size:
            return f"is cut short ({size} bytes, of which its header alone promises {8 + length})"
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            return "has no readable safetensors header (is it a safetensors file?)"
    if not isinstance(header, dict):
        return "has no readable safetensors header (is it a safetensors file?)"
    ends = [
        entry["data_offsets"][1]
        for key, entry in header.items()
        if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets") or ()) == 2
    ]
    expected = 8 + length + max(ends, default=0)
    if size < expected:
        return f"is cut short ({size} of the {expected} bytes its header describes)"
    if size > expected:
        return f"has {size - expected} bytes more than its header describes"
    return None


def json_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole JSON file, or None when it is. A file whose object or list
    never closes was cut short; any other parse error is a malformed file."""
    data = path.read_bytes()
    try:
        json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        if data.lstrip()[:1] in (b"{", b"[") and not data.rstrip().endswith((b"}", b"]")):
            return f"is cut short ({len(data)} bytes end mid-way through its JSON)"
        return f"is not valid JSON ({getattr(exc, 'msg', exc)})"
    return None


def check_folder(folder: Path, what: str) -> None:
    """A ModelError naming the first file of a model or adapter folder that is not whole:
    every ``*.safetensors`` file, the shards an index names, and the JSON files loaders parse."""
    for name in FOLDER_JSON:
        if (folder / name).is_file() and (problem := json_problem(folder / name)):
            raise ModelError(damaged(folder, name, problem, what))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set((json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelError(
                f"{what} {folder}: {missing[0]} is missing ({len(missing)} of the {len(shards)} shards "
                "model.safetensors.index.json names); copy the folder again"
            )
    for path in sorted(folder.glob("*.safetensors")):
        if problem := safetensors_problem(path):
            raise ModelError(damaged(folder, path.name, problem, what))


def damaged(folder: Path, name: str, problem: str, what: str) -> str:
    return (
        f"{what} {folder}: {name} {problem}; an interrupted copy or download leaves a file so. Copy or "
        "download it again"
    )
