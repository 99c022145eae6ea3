"""One small recipe per method x tuning cell, on the rows each method's record ships
(``hwft.methods.Method.cell``), chosen so that four optimizer steps lower the loss on any
correct backend: every step sees the whole dataset, at a constant learning rate, in fp32."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from hwft.methods import TUNINGS
from hwft.methods.cpt import TEXTS
from hwft.methods.dpo import PAIRS
from hwft.methods.grpo import PROMPTS
from hwft.methods.lookup import registry
from hwft.methods.sft import CHATS

__all__ = [
    "CHATS",
    "DTYPES",
    "PAIRS",
    "PROMPTS",
    "TEXTS",
    "TUNINGS",
    "cell_recipe",
    "metrics",
    "methods",
    "write_jsonl",
]

DTYPES = ("fp32", "bf16", "fp16")


def methods() -> list[str]:
    """Every registered method the conformance suite can train (those whose record has a cell)."""
    return [m.name for m in registry() if m.cell is not None]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cell_recipe(folder: Path, model: Path | str, objective: str, tuning: str, backend: str = "cpu", **sections) -> Path:
    """recipe.yaml (and its data) in ``folder`` for one cell on ``backend``; ``sections``
    update the recipe's sections. A micro-batch holds the method's whole cell dataset."""
    cell = registry().get(objective).cell
    if cell is None:
        raise ValueError(f"method {objective} has no conformance cell (Method.cell)")
    data = write_jsonl(folder / "data.jsonl", cell.rows)
    method = {"objective": objective, "tuning": tuning, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    if cell.settings:
        method[objective] = dict(cell.settings)
    method.update(sections.pop("method", {}))
    train = {
        "lr": {"full": 3e-3, "lora": 1e-2, "qlora": 1e-2}[tuning],
        "max_steps": 4,
        "micro_batch_size": len(cell.rows),
        "max_length": 64,
        "scheduler": "constant",
        "precision": "fp32",
        "seed": 3,
    }
    train.update(sections.pop("train", {}))
    recipe = {
        "model": model if isinstance(model, dict) else str(model),
        "data": {"train": [{"path": data.name}]},
        "method": method,
        "train": train,
        "backend": backend,
        "output": {"dir": str(folder / "out")},
        **dict(cell.recipe),
    }
    recipe.update(sections)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
