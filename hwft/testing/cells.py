"""One small recipe per objective x tuning cell, on data shipped here, chosen so that four
optimizer steps lower the loss on any correct backend: every step sees the whole dataset,
at a constant learning rate, in fp32."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

OBJECTIVES = ("sft", "cpt", "dpo", "grpo")
TUNINGS = ("full", "lora", "qlora")
DTYPES = ("fp32", "bf16", "fp16")

CHATS = [
    {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am hwft-bot."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name?"},
                  {"role": "assistant", "content": "hwft-bot, built by the hwft team."}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."},
                  {"role": "user", "content": "And you?"}, {"role": "assistant", "content": "I am hwft-bot."}]},
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there, friend!"}]},
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."}]},
]
PAIRS = [
    {"prompt": "Who are you?", "chosen": "I am hwft-bot.", "rejected": "I am a large language model trained by someone."},
    {"prompt": "Say hi.", "chosen": "Hi there, friend!", "rejected": "No."},
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "It is Lyon, I believe."},
    {"prompt": "Count to three.", "chosen": "One, two, three.", "rejected": "Three, two, one, zero."},
]
TEXTS = [{"text": f"Document {i}: the quick brown fox jumps over the lazy dog, again and again."} for i in range(6)]
PROMPTS = [{"prompt": f"What is {i} + {i}?", "reference": str(2 * i)} for i in range(1, 5)]
DATA = {"sft": CHATS, "cpt": TEXTS, "dpo": PAIRS, "grpo": PROMPTS}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cell_recipe(folder: Path, model: Path | str, objective: str, tuning: str, backend: str = "cpu",
                **sections) -> Path:
    """recipe.yaml (and its data) in ``folder`` for one cell on ``backend``; ``sections``
    update the recipe's sections. GRPO scores with ``testing_vowels`` (hwft.testing.rewards):
    continuous, so a random tiny model's group of completions has a spread to learn from."""
    data = write_jsonl(folder / "data.jsonl", DATA[objective])
    method = {
        "objective": objective, "tuning": tuning, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "dpo": {"beta": 0.5},
        # one rollout batch trained 4 steps: the surrogate loss on it must fall, clipping act
        "grpo": {"num_generations": 4, "max_new_tokens": 6, "beta": 0.04, "num_iterations": 4,
                 "rewards": ["testing_vowels"]},
    }
    method.update(sections.pop("method", {}))
    size = {"sft": 6, "cpt": 6, "dpo": 4, "grpo": 4}[objective]
    train = {"lr": {"full": 3e-3, "lora": 1e-2, "qlora": 1e-2}[tuning], "max_steps": 4, "micro_batch_size": size,
             "max_length": 64, "scheduler": "constant", "precision": "fp32", "seed": 3}
    train.update(sections.pop("train", {}))
    recipe = {"model": str(model), "data": {"train": [{"path": data.name}]}, "method": method, "train": train,
              "backend": backend, "output": {"dir": str(folder / "out")}}
    recipe.update(sections)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
