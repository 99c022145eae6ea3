"""Row formats, data errors naming file and row, and golden label masks on SmolLM2's template."""

from __future__ import annotations

import json

import pytest

from hwft.data.batching import micro_batches, pad, total_steps
from hwft.data.chat import IGNORE_INDEX, ChatRenderer, resolve_template, tokenize_examples
from hwft.data.formats import BUILTIN_FORMATS
from hwft.data.loading import Example, load_examples
from hwft.errors import DataError, RecipeError
from tests.conftest import PEER_DATA, REPO, write_recipe

FORMATS = {f.name: f for f in BUILTIN_FORMATS}


def test_alpaca_rows(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([
        {"instruction": "Add", "input": "2 and 2", "output": "4"},
        {"instruction": "Hi", "output": "Hello", "system": "Be kind."},
    ]))
    first, second = load_examples(path, "auto", FORMATS)
    assert first.messages == [{"role": "user", "content": "Add\n2 and 2"}, {"role": "assistant", "content": "4"}]
    assert second.messages[0] == {"role": "system", "content": "Be kind."}
    assert first.source == f"{path} row 1"


def test_peer_alpaca_file_loads_unchanged():
    examples = load_examples(PEER_DATA / "llamafactory" / "alpaca_en_demo.json", "alpaca", FORMATS)
    assert len(examples) > 100 and all(e.messages[-1]["role"] == "assistant" for e in examples)


@pytest.mark.parametrize(
    "name, content, fmt, message",
    [
        ("a.jsonl", '{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n', "alpaca",
         "a.jsonl row 2 (alpaca format): missing field 'output'"),
        ("b.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n{bad json\n', "auto",
         "b.jsonl line 2: not valid JSON"),
        ("c.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n', "messages",
         "c.jsonl row 1 (messages format): messages[0].role is 'robot'; expected one of system, user, assistant"),
        ("d.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', "messages",
         "has no assistant message to learn from"),
        ("e.json", '{"rows": []}', "auto", "a .json data file must hold a list of rows"),
        ("f.jsonl", '{"text": "x"}\n', "auto", "cannot tell the row's format from its keys ['text']"),
        ("g.jsonl", '{"instruction": "x", "output": "y"}\n', "alpacca", "did you mean 'alpaca'?"),
        ("h.csv", "a,b\n", "auto", "unsupported data file type '.csv'"),
        ("i.jsonl", '{"instruction": "x", "output": 3}\n', "alpaca", "field 'output' must be a string, got int"),
    ],
)
def test_data_errors_name_file_and_row(tmp_path, cli, name, content, fmt, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_examples(path, fmt, FORMATS)
    assert message in str(err.value) and str(path) in str(err.value)
    # The same message reaches the user from the CLI, exit code 2, before any weights load.
    recipe = write_recipe(tmp_path, "smollm2-135m", data={"train": [{"path": name, "format": fmt}]})
    code, _, stderr = cli("train", recipe, "--dry-run")
    assert code == 2 and message in stderr


def _segments(tokenizer, tok) -> list[str]:
    """The label tokens, decoded as contiguous runs."""
    runs, current = [], []
    for token, label in zip(tok.input_ids, tok.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


def _renderer(tokenizer, template=None):
    return ChatRenderer(tokenizer, resolve_template(template, REPO, tokenizer))


U = {"role": "user", "content": "Who are you?"}
A = {"role": "assistant", "content": "I am hwft-bot."}
S = {"role": "system", "content": "Be brief."}
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.mark.parametrize(
    "messages, text, segments",
    [
        # single turn: SmolLM2's template adds its default system prompt; only the answer and
        # its end-of-turn token are trained.
        ([U, A], SMOL_SYSTEM + "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\nI am hwft-bot.<|im_end|>\n",
         ["I am hwft-bot.<|im_end|>"]),
        # system prompt given: it replaces the default one and is not trained.
        ([S, U, A], "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n"
         "<|im_start|>assistant\nI am hwft-bot.<|im_end|>\n", ["I am hwft-bot.<|im_end|>"]),
        # multi-turn: every assistant turn is trained, nothing between them.
        ([U, {"role": "assistant", "content": "A bot."}, {"role": "user", "content": "Name?"}, A], None,
         ["A bot.<|im_end|>", "I am hwft-bot.<|im_end|>"]),
    ],
    ids=["single-turn", "system-prompt", "multi-turn"],
)
def test_golden_label_masks(tokenizer, messages, text, segments):
    renderer = _renderer(tokenizer)
    tok = renderer.tokenize(Example(messages, "golden"))
    if text is not None:
        assert tokenizer.decode(tok.input_ids) == text
    assert _segments(tokenizer, tok) == segments
    # the exact mask: labels exactly where the assistant's tokens are
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    trained_ends = [i for i, t in enumerate(tok.labels) if t == im_end]
    assert len(trained_ends) == len(segments)
    assert tok.labels[-1] == IGNORE_INDEX  # the trailing newline after <|im_end|> is not trained


def test_golden_mask_ids_single_turn(tokenizer):
    """Pinned token ids, so a tokenizer or template change shows up here first."""
    tok = _renderer(tokenizer).tokenize(Example([U, A], "golden"))
    trained = [t for t in tok.labels if t != IGNORE_INDEX]
    assert trained == tokenizer("I am hwft-bot.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.num_labels == len(trained)
    assert tok.labels[: len(tok.labels) - len(trained) - 1] == [IGNORE_INDEX] * (len(tok.labels) - len(trained) - 1)


def test_template_override(tokenizer, tmp_path):
    tok = _renderer(tokenizer, "chatml").tokenize(Example([U, A], "t"))
    assert tokenizer.decode(tok.input_ids).startswith("<|im_start|>user\n")  # no default system prompt
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}[assistant] {% endif %}")
    tok = ChatRenderer(tokenizer, resolve_template(str(jinja), tmp_path, tokenizer)).tokenize(Example([U, A], "t"))
    # " I" straddles the header's trailing space: a token overlapping the answer is trained.
    assert _segments(tokenizer, tok) == [" I am hwft-bot."]
    with pytest.raises(RecipeError, match="neither a built-in"):
        resolve_template("nope", tmp_path, tokenizer)


def test_truncation_is_counted(tokenizer):
    renderer = _renderer(tokenizer)
    long = Example([U, {"role": "assistant", "content": "word " * 200}], "long")
    gone = Example([{"role": "user", "content": "x " * 200}, A], "gone")
    data, stats = tokenize_examples([Example([U, A], "ok"), long, gone], renderer, max_length=64)
    assert (stats.examples, stats.truncated, stats.dropped) == (2, 2, 1)
    assert all(len(d.input_ids) <= 64 for d in data)
    assert "2 truncated to max_length 64" in stats.summary(64)
    with pytest.raises(DataError, match="no example has an assistant token within max_length 8"):
        tokenize_examples([gone], renderer, max_length=8)


def test_batches_are_seeded_and_padded(tokenizer):
    a = [idx for _, (_, idx) in zip(range(5), micro_batches(7, 3, seed=1))]
    b = [idx for _, (_, idx) in zip(range(5), micro_batches(7, 3, seed=1))]
    assert a == b and sorted(sum(a[:3], [])) == list(range(7))
    assert a != [idx for _, (_, idx) in zip(range(5), micro_batches(7, 3, seed=2))]
    assert total_steps(10, 3, 2, epochs=1, max_steps=None) == 2
    assert total_steps(10, 3, 2, epochs=1, max_steps=9) == 9
    renderer = _renderer(tokenizer)
    rows, _ = tokenize_examples([Example([U, A], "a"), Example([S, U, A], "b")], renderer, 128)
    batch = pad(rows, pad_id=2)
    width = max(len(r.input_ids) for r in rows)
    assert all(len(r) == width for r in batch["input_ids"])
    short = min(range(2), key=lambda i: len(rows[i].input_ids))
    assert batch["attention_mask"][short][-1] == 0 and batch["labels"][short][-1] == IGNORE_INDEX


def test_columns_mapping_and_max_samples(tmp_path):
    path = tmp_path / "renamed.jsonl"
    rows = [{"prompt": f"q{i}", "response": f"a{i}", "sys": "Be brief."} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    columns = {"instruction": "prompt", "output": "response", "system": "sys"}
    examples = load_examples(path, "auto", FORMATS, columns=columns, max_samples=3)
    assert len(examples) == 3
    assert examples[2].messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
