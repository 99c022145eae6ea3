"""Property-based tests (hypothesis) of what reads user input: the data readers and the recipe
parser. Whatever they are given, they either accept it or raise hwft's UserError with a message
naming the file (and row or key) — never another exception, never a traceback for the user."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hwft.data.loading import load_examples
from hwft.errors import UserError
from hwft.recipe import Recipe, load_recipe, recipe_from_dict

#: Derandomised: CI sees the same examples every run (raise max_examples locally to search wider).
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, width=32) | st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)

ROLE_KEYS = ["role", "content", "from", "value", "loss_weight", "tool_calls"]
ROW_KEYS = [
    "instruction",
    "input",
    "output",
    "messages",
    "conversations",
    "text",
    "prompt",
    "chosen",
    "rejected",
    "system",
    "history",
    "tools",
    "reference",
]
turns = st.lists(
    st.dictionaries(
        st.sampled_from(ROLE_KEYS),
        st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "robot", "hi", ""]) | json_values,
        max_size=4,
    ),
    max_size=4,
)
#: Rows built from the fields real formats read, with values of any JSON shape.
rows = st.dictionaries(st.sampled_from(ROW_KEYS), turns | json_values, min_size=1, max_size=5) | json_values


def read(text: str | bytes, suffix: str, fmt: str = "auto"):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        try:
            return load_examples(path, format=fmt)
        except UserError as exc:
            assert "data" + suffix in str(exc), str(exc)  # the message names the file
            return None


@SETTINGS
@given(
    st.lists(rows, min_size=1, max_size=4),
    st.sampled_from(["auto", "alpaca", "sharegpt", "messages", "text", "preference", "prompt"]),
)
def test_jsonl_rows_are_read_or_refused_naming_the_file(items, fmt):
    read("".join(json.dumps(r) + "\n" for r in items), ".jsonl", fmt)
    read(json.dumps(items), ".json", fmt)


@SETTINGS
@given(st.text(max_size=60))
def test_any_text_as_a_data_file_is_read_or_refused(text):
    read(text, ".jsonl")
    read(text, ".json")


@SETTINGS
@given(st.binary(max_size=60) | st.text(max_size=30).map(lambda t: t.encode("utf-16")))
def test_any_bytes_as_a_data_file_are_read_or_refused(data):
    """Undecodable bytes, byte-order marks, odd encodings: read, or refused naming the file."""
    read(data, ".jsonl")
    read(data, ".json")


@SETTINGS
@given(
    st.lists(
        st.text(alphabet=st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=20).filter(str.strip),
        min_size=1,
        max_size=4,
    )
)
def test_well_formed_alpaca_rows_always_load(texts):
    """(A blank instruction is refused on purpose: the model would learn an answer to nothing.)"""
    items = [{"instruction": t, "output": t[::-1] or "x"} for t in texts]
    examples = read("".join(json.dumps(r) + "\n" for r in items), ".jsonl", "alpaca")
    assert examples is not None and len(examples) == len(items)


SECTIONS = ["model", "data", "method", "train", "kernels", "backend", "parallel", "output", "eval", "template", "bogus"]
KEYS = [
    "name",
    "train",
    "objective",
    "tuning",
    "lr",
    "max_steps",
    "micro_batch_size",
    "dir",
    "strategy",
    "zero_stage",
    "r",
    "attention",
    "prompts",
    "typo",
]
recipes = st.dictionaries(
    st.sampled_from(SECTIONS), st.dictionaries(st.sampled_from(KEYS), json_values, max_size=3) | json_values, max_size=5
)


@SETTINGS
@given(recipes)
def test_any_recipe_mapping_validates_or_names_what_is_wrong(raw):
    try:
        recipe_from_dict(raw, source="r.yaml")
    except UserError as exc:
        assert "r.yaml" in str(exc), str(exc)


@SETTINGS
@given(st.text(max_size=80), st.lists(st.text(max_size=20), max_size=2))
def test_any_recipe_text_and_overrides_load_or_are_refused(text, overrides):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "r.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_recipe(path, overrides)
        except UserError:
            pass


@SETTINGS
@given(
    st.floats(1e-6, 1.0),
    st.integers(1, 64),
    st.sampled_from(["sft", "cpt", "dpo", "orpo", "simpo", "kto", "rm", "grpo", "ppo"]),
    st.sampled_from(["full", "lora", "qlora"]),
    st.integers(1, 8),
)
def test_a_valid_recipe_round_trips_through_its_saved_yaml(lr, r, objective, tuning, accumulation):
    raw = {
        "data": "d.jsonl",
        "method": {"objective": objective, "tuning": tuning, "lora": {"r": r}},
        "train": {"lr": lr, "gradient_accumulation_steps": accumulation},
    }
    recipe = recipe_from_dict(raw, base_dir="/base")
    again = Recipe.model_validate(yaml.safe_load(recipe.to_yaml()))
    assert again.model_dump() == recipe.model_dump() | {"data": again.model_dump()["data"]}
    assert again.data.train[0].path == "/base/d.jsonl"
