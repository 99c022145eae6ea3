"""What ``--resume`` checks before any weight loads: that the checkpoint is one hwft wrote
(its manifest, :func:`hwft.checkpoint.verify_manifest`), and that the recipe, the training
data and the global batch still describe the run it came from. Keys that change only what is
logged, kept or shown may differ (:data:`RESULT_NEUTRAL`); every other difference is refused,
naming the keys and both values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from hwft.checkpoint import SCHEMA, TRAINER_STATE, Checkpoint, data_digests, locate, verify_manifest
from hwft.errors import RecipeError, UserError

#: Recipe keys that may differ between a run and its resumption: they change what is logged,
#: kept or shown, never the trained weights. Every other difference is refused.
RESULT_NEUTRAL = (
    "output.",
    "eval.",
    "train.save_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.eval_every",
    "train.nonfinite_limit",
    "data.eval",
    "parallel.timeout",
    "parallel.accelerate_config",
    "parallel.offload_optimizer",
    "parallel.offload_params",
    "parallel.activation_checkpointing",
    "kernels.compile",
    "train.frozen_weights",  # the same products either way (hwft_torch.frozen_weights)
    "bench.",
)

#: Strategies whose checkpoints are the same portable files (full weights and optimizer state
#: by parameter name): a run saved by one resumes under another. DeepSpeed keeps its own.
PORTABLE_STRATEGIES = ("none", "ddp", "fsdp2")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _without_paths(recipe: dict) -> dict:
    out = json.loads(json.dumps(recipe))
    for spec in out.get("data", {}).get("train", []):
        if isinstance(spec, dict):
            spec.pop("path", None)
    return out


def recipe_differences(saved: dict, current: dict) -> list[str]:
    """Dotted recipe keys whose values differ and would change the trained result (training
    files are compared by content, see :func:`data_digests`, not by path)."""
    a, b = _flat(_without_paths(saved)), _flat(_without_paths(current))
    keys = sorted(set(a) | set(b))

    def neutral(key: str) -> bool:
        return any(key == n or key.startswith(n if n.endswith(".") else n + ".") for n in RESULT_NEUTRAL)

    diffs = [k for k in keys if a.get(k) != b.get(k) and not neutral(k)]
    strategies = (a.get("parallel.strategy"), b.get("parallel.strategy"))
    if "parallel.strategy" in diffs and all(s in PORTABLE_STRATEGIES for s in strategies):
        diffs.remove("parallel.strategy")  # the same portable files either way
    if "parallel.zero_stage" in diffs and "deepspeed" not in strategies:
        diffs.remove("parallel.zero_stage")
    if "train.gradient_accumulation_steps" in diffs:  # compared as processes x accumulation
        diffs.remove("train.gradient_accumulation_steps")
    return diffs


def open_checkpoint(recipe, wanted: str, world_size: int) -> Checkpoint:
    """Find, verify and compare the checkpoint to resume from: a UserError before any weight
    loads if it is not one hwft wrote, or the recipe (or the global batch) changed the result."""
    run_dir = Path(recipe.output.dir).expanduser().resolve()
    path = locate(run_dir, wanted)
    verify_manifest(path)
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        saved = yaml.safe_load((path / "recipe.yaml").read_text(encoding="utf-8"))
        assert state.get("schema") == SCHEMA and isinstance(saved, dict)
    except (OSError, ValueError, AssertionError, yaml.YAMLError):
        raise UserError(f"{path}: not a {SCHEMA} checkpoint (trainer_state.json or recipe.yaml unreadable)") from None
    current = yaml.safe_load(recipe.to_yaml())
    name = (saved.get("model") or {}).get("name")
    if isinstance(name, str) and not Path(name).is_absolute() and recipe.resolve_path(name).is_dir():
        # a checkpoint written before runs named their model folder absolutely (hwft.train.plan_run)
        saved["model"]["name"] = str(recipe.resolve_path(name))
    diffs = recipe_differences(saved, current)
    if diffs:
        shown = ", ".join(f"{k} ({_flat(saved).get(k)!r} -> {_flat(current).get(k)!r})" for k in diffs[:6])
        raise RecipeError(
            f"--resume: the recipe differs from the one {path.name} was trained with, in keys that change "
            f"the result: {shown}{' ...' if len(diffs) > 6 else ''}. Resume with the original values, or "
            "start a new run in another output.dir"
        )
    changed = [
        spec.path or spec.name or "random_tokens"
        for spec, old, new in zip(recipe.data.train, state.get("data_digests", []), data_digests(recipe), strict=False)
        if old != new
    ]
    if changed:
        raise UserError(
            f"--resume: training data {changed[0]} is not what {path.name} was trained on (its content changed); "
            "resume with the original files, or start a new run in another output.dir"
        )
    accumulation = recipe.train.gradient_accumulation_steps
    if state["world_size"] * state["accumulation"] != world_size * accumulation:
        raise UserError(
            f"--resume: {path.name} was trained with {state['world_size']} processes x {state['accumulation']} "
            f"accumulation micro-batches per step; this run has {world_size} x {accumulation}. Keep the "
            "global batch (processes x train.gradient_accumulation_steps) the same"
        )
    return Checkpoint(path, state)
