"""Who ran a benchmark on what: the hardware fingerprint, and the workload's hash.

The workload hash covers what changes the computed numbers (the resolved recipe without its
output folder, backend and shown prompts; the data files' and model config's contents rather
than their paths; the bench's steps, warmup and held-out size), so the same recipe run on a
Mac, an Ascend node and an NVIDIA server hashes alike and can be compared.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
from pathlib import Path

from hwft import __version__
from hwft.hardware import cpu_name, host_memory_gb
from hwft.records import Availability

#: Distributions whose versions every result records (None: not installed).
PACKAGES = (
    "torch",
    "torch-npu",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "deepspeed",
    "mlx",
    "mlx-lm",
    "liger-kernel",
    "flash-attn",
)


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def fingerprint(backend: str, availability: Availability) -> dict:
    devices = [dict(d) for d in availability.devices]
    first = devices[0] if devices else {}
    return {
        "hwft": __version__,
        "backend": backend,
        "device": first.get("name") or cpu_name(),
        "device_count": len(devices) or 1,
        "devices": devices,
        "runtime": {k: v for k, v in availability.details.items()},
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "memory_gb": host_memory_gb(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": {p: version(p) for p in PACKAGES},
    }


def file_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files in name order (streamed: weights can be large)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        with f.open("rb") as stream:
            h.update(hashlib.file_digest(stream, "sha256").digest())
    return h.hexdigest()[:16]


def model_identity(model) -> str:
    """The model by content: the embedded model by its GGUF file, a folder by its config and
    its safetensors weights. Two folders of one shape with different weights (a random stand-in
    for the real model, say) never share a workload hash."""
    if model.kind == "random" and model.tokenizer is not None:  # model.shape: its config, and whose tokenizer
        return f"random:{file_digest(Path(model.source))}:{model_identity(model.tokenizer)}"
    if model.kind == "embedded" and model.source is not None and Path(model.source).is_file():
        return f"{model.name}:{file_digest(Path(model.source))}"
    config = model.path / "config.json"
    if not config.is_file():
        return model.name
    parts = [file_digest(config)] + [file_digest(f) for f in sorted(model.path.glob("*.safetensors"))]
    return hashlib.sha256(" ".join(parts).encode()).hexdigest()[:16]


def workload_hash(recipe, model_id: str, bench: dict) -> str:
    """Hash of the workload; equal hashes mean the same computation."""
    raw = recipe.model_dump(mode="json")
    for key in ("output", "backend", "eval"):
        raw.pop(key, None)
    for spec in raw["data"]["train"] + raw["data"]["eval"]:
        if spec["path"]:
            spec["path"] = file_digest(recipe.resolve_path(spec["path"]))
    if raw["data"]["registry"]:
        raw["data"]["registry"] = file_digest(recipe.resolve_path(raw["data"]["registry"]))
    raw["model"]["name"] = model_id
    if raw["model"].get("shape"):
        raw["model"]["shape"] = file_digest(recipe.resolve_path(raw["model"]["shape"]))
    if raw["model"]["adapter"]:
        raw["model"]["adapter"] = file_digest(recipe.resolve_path(raw["model"]["adapter"]))
    text = json.dumps({"recipe": raw, "bench": bench}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
