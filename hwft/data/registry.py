"""LLaMA-Factory's ``dataset_info.json``, read as it is.

A recipe may say ``data: {registry: data/dataset_info.json, train: [identity, glaive]}``. Each
name is looked up in the registry; its ``file_name`` (relative to the registry's folder),
``formatting`` (alpaca, sharegpt, openai), ``ranking`` (preference data), ``columns``, ``tags``
and ``num_samples`` are honoured. LLaMA-Factory's column names are translated to hwft's
(``prompt`` -> ``instruction``, ``query`` -> ``input``, ``response`` -> ``output``, and for
sharegpt ``messages`` -> ``conversations``); a ``kto_tag`` column makes the entry feedback rows
(kto), its values the ``label``. Entries that live on a hub are refused, since hwft never
downloads data. The ``images``, ``videos`` and ``audios`` columns are read as they are, their
paths relative to the registry's folder (LLaMA-Factory's ``dataset_dir``): hwft.data.media.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hwft.errors import DataError, did_you_mean
from hwft.textfile import read_text

HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
ALPACA_NAMES = {"prompt": "instruction", "query": "input", "response": "output"}


@dataclass
class RegistryEntry:
    name: str
    path: Path
    format: str  #: an hwft format name
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    max_samples: int | None = None


def read_registry(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"data.registry: file not found: {path}")
    try:
        registry = json.loads(read_text(path, DataError))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})") from None
    if not isinstance(registry, dict) or not all(isinstance(v, dict) for v in registry.values()):
        raise DataError(f"{path}: a dataset_info.json maps dataset names to objects")
    return registry


def lookup(registry: dict, path: Path, name: str, objective: str) -> RegistryEntry:
    """The entry ``name`` of ``registry`` (read from ``path``), translated for ``objective``:
    an alpaca entry is read as the kind of example the method trains on (hwft.methods)."""
    from hwft.methods.lookup import registry as methods

    kind = methods().methods[objective].kind if objective in methods() else "chat"
    if name not in registry:
        local = [n for n, e in registry.items() if "file_name" in e]
        raise DataError(
            f"{path}: no dataset named '{name}'{did_you_mean(name, registry)} "
            f"(entries with local files: {', '.join(local) or 'none'})"
        )
    entry = registry[name]
    where = f"{path}: dataset '{name}'"
    if "file_name" not in entry:
        hub = next((f"{k}: {entry[k]}" for k in HUB_KEYS if k in entry), "no file_name")
        raise DataError(
            f"{where} lives on a hub ({hub}); hwft never downloads data. Download it, then give "
            "the entry a file_name (a file or folder next to dataset_info.json)"
        )
    columns = dict(entry.get("columns") or {})
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise DataError(f"{where}: formatting '{formatting}' is not one of alpaca, sharegpt, openai")
    if formatting == "alpaca":
        columns = {ALPACA_NAMES.get(k, k): v for k, v in columns.items()}
    elif formatting == "sharegpt":
        columns = {("conversations" if k == "messages" else k): v for k, v in columns.items()}
    if "kto_tag" in columns:
        fmt = "feedback"
        columns["label"] = columns.pop("kto_tag")
    elif entry.get("ranking"):
        fmt = "preference"
    elif kind == "text" and formatting == "alpaca":
        # LLaMA-Factory's pre-training stage reads only the prompt column.
        fmt, columns = "text", {"text": columns.get("instruction", "instruction")}
    elif kind == "prompt" and formatting == "alpaca":
        fmt = "prompt"
        columns = {("reference" if k == "output" else k): v for k, v in columns.items()}
        columns.setdefault("reference", "output")
    else:
        fmt = {"alpaca": "alpaca", "sharegpt": "sharegpt", "openai": "messages"}[formatting]
    tags = dict(entry.get("tags") or {})
    return RegistryEntry(
        name, (path.parent / entry["file_name"]).resolve(), fmt, columns, tags, entry.get("num_samples")
    )
