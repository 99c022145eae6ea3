"""Reading files, the catalogue of data errors, golden label masks, mixing, `hwft data inspect`."""

from __future__ import annotations

import codecs
import json

import pytest

from hwft.data.batching import make_rows, pad
from hwft.data.chat import IGNORE_INDEX, ChatRenderer, resolve_template
from hwft.data.formats import BUILTIN_FORMATS
from hwft.data.kinds.chat import ChatExample
from hwft.data.kinds.sequences import tokenize_examples
from hwft.data.loading import load_examples, mix
from hwft.errors import DataError, RecipeError
from tests.conftest import PEER_DATA, REPO, write_jsonl, write_recipe

FORMATS = {f.name: f for f in BUILTIN_FORMATS}


def test_alpaca_rows(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(
        json.dumps(
            [
                {"instruction": "Add", "input": "2 and 2", "output": "4"},
                {"instruction": "Hi", "output": "Hello", "system": "Be kind."},
            ]
        )
    )
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
        # malformed JSON / JSONL: the file and the line
        (
            "b.jsonl",
            '{"messages": [{"role": "user", "content": "x"}]}\n{bad json\n',
            "auto",
            "b.jsonl line 2: not valid JSON",
        ),
        (
            "b2.json",
            '[{"instruction": "x", "output": "y"},\n {"instruction": "x" "output": "y"}]',
            "auto",
            "b2.json: not valid JSON at line 2, column 22",
        ),
        ("e.json", '{"rows": []}', "auto", "a .json data file must hold a list of rows, or one object per line"),
        ("h.csv", "a,b\n", "auto", "unsupported data file type '.csv'; use .json, .jsonl or .parquet"),
        # missing or misnamed fields: the row, the field, what would be accepted
        (
            "a.jsonl",
            '{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n',
            "alpaca",
            "a.jsonl row 2 (alpaca format): missing field 'output' (the row has instruction; this format "
            "reads instruction, input, output, system, history)",
        ),
        (
            "a2.jsonl",
            '{"instruction": "x", "outputs": "y"}\n',
            "alpaca",
            "missing field 'output' (the row has instruction, outputs; this format reads instruction, input, "
            "output, system, history; if 'outputs' holds it, map it with columns: {output: outputs})",
        ),
        (
            "f.jsonl",
            '{"question": "x"}\n',
            "auto",
            "f.jsonl row 1: cannot tell the row's format from its fields ['question']; set format: to one of",
        ),
        ("i.jsonl", '{"instruction": "x", "output": 3}\n', "alpaca", "field 'output' must be a string, got int"),
        ("g.jsonl", '{"instruction": "x", "output": "y"}\n', "alpacca", "did you mean 'alpaca'?"),
        # unknown roles
        (
            "c.jsonl",
            '{"messages": [{"role": "robot", "content": "x"}]}\n',
            "messages",
            "c.jsonl row 1 (messages format): messages[0].role is 'robot'; expected one of user, assistant, system, "
            "tool",
        ),
        (
            "c2.json",
            '[{"conversations": [{"from": "humman", "value": "x"}]}]',
            "auto",
            "conversations[0].from is 'humman'; expected one of human, gpt, system, observation, function_call; "
            "did you mean 'human'?",
        ),
        # conversations without an assistant turn to end them
        (
            "d.jsonl",
            '{"messages": [{"role": "user", "content": "x"}]}\n',
            "messages",
            "field 'messages' has no assistant turn to learn from",
        ),
        (
            "d2.jsonl",
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, '
            '{"role": "user", "content": "z"}]}\n',
            "auto",
            "field 'messages' ends with a user turn; the last turn must be the assistant's",
        ),
        # every label masked: nothing in the row to learn from
        (
            "m.jsonl",
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", '
            '"loss_weight": 0}]}\n',
            "auto",
            "m.jsonl row 1: every label is masked",
        ),
        # nulls and empty answers: refused, never trained as an empty answer
        (
            "n.jsonl",
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": null}]}\n',
            "auto",
            "n.jsonl row 1 (messages format): messages[1].content is null; give the turn's text (an "
            "assistant turn may be null only beside its tool_calls)",
        ),
        (
            "n2.json",
            '[{"conversations": [{"from": "human", "value": null}, {"from": "gpt", "value": "y"}]}]',
            "auto",
            "n2.json row 1 (sharegpt format): conversations[0].value is null; give the turn's text",
        ),
        (
            "n3.jsonl",
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}\n',
            "auto",
            "n3.jsonl row 1 (messages format): messages[1] is an assistant turn with no text and no tool "
            "calls: the model would learn to answer nothing",
        ),
        (
            "n4.jsonl",
            '{"instruction": "x", "output": null}\n',
            "alpaca",
            "n4.jsonl row 1 (alpaca format): field 'output' is null",
        ),
        (
            "n5.jsonl",
            '{"instruction": "x", "output": "y"}\nnull\n',
            "auto",
            "n5.jsonl row 2: expected a JSON object, got null",
        ),
        (
            "n6.jsonl",
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": '
            '[{"type": "text", "text": null}]}]}\n',
            "auto",
            "messages[1].content[0] is a text part whose text is null",
        ),
        (
            "n7.jsonl",
            '{"instruction": "x", "output": ""}\n',
            "alpaca",
            "field 'output' is empty: the model would learn to answer nothing",
        ),
        # bytes that are no Unicode text: the byte, its offset, the encoding tried
        (
            "l.jsonl",
            '{"instruction": "café", "output": "y"}\n'.encode("latin-1"),
            "auto",
            "l.jsonl: not valid text at byte 20 (0xe9): tried UTF-8, as no byte-order mark names UTF-16 or "
            "UTF-32. hwft reads UTF-8 (with or without a byte-order mark), UTF-16 or UTF-32 (with a byte-order "
            "mark); save the file as UTF-8",
        ),
        (
            "l2.json",
            codecs.BOM_UTF16_LE + '[{"text": "'.encode("utf-16-le") + b"\x00\xd8" + '"}]'.encode("utf-16-le"),
            "auto",
            "l2.json: not valid text at byte 24 (0x00): tried UTF-16, as its byte-order mark says",
        ),
    ],
)
def test_data_errors_name_file_and_row(tiny_llama, tmp_path, cli, name, content, fmt, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    # The message reaches the user from the CLI with exit code 2: parse errors before any
    # weights load (--dry-run), tokenisation errors when the run starts.
    recipe = write_recipe(tmp_path, tiny_llama, data={"train": [{"path": name, "format": fmt}]})
    code, _, stderr = cli("train", recipe, "--dry-run")
    if code == 0:
        code, _, stderr = cli("train", recipe)
        assert not (tmp_path / "out").exists()  # nothing half-made left behind
    assert code == 2 and message in stderr and str(path) in stderr


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_data_files_in_any_unicode_encoding_read_alike(tmp_path, encoding, suffix):
    """Excel and Notepad save with a byte-order mark (UTF-8's, or UTF-16's as "Unicode"); each
    file reads to the very examples its UTF-8 twin does, non-ASCII text included."""
    rows = [{"instruction": "Qui es-tu ? 你是谁", "output": "hwft-bot ✓"}, {"instruction": "x", "output": "y"}]
    text = (
        "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows)
        if suffix == ".jsonl"
        else json.dumps(rows, ensure_ascii=False)
    )
    (tmp_path / f"plain{suffix}").write_bytes(text.encode("utf-8"))
    (tmp_path / f"other{suffix}").write_bytes(text.encode(encoding))
    # python's "utf-16" and "utf-32" codecs write a byte-order mark; "-be" writes none (zero bytes tell)
    expected = load_examples(tmp_path / f"plain{suffix}", "alpaca", FORMATS)
    got = load_examples(tmp_path / f"other{suffix}", "alpaca", FORMATS)
    assert [e.messages for e in got] == [e.messages for e in expected]
    assert got[0].messages[0]["content"] == "Qui es-tu ? 你是谁"


def test_empty_after_filtering(tiny_llama, tmp_path, cli):
    rows = [{"messages": [{"role": "user", "content": "x " * 80}, {"role": "assistant", "content": "y"}]}] * 3
    write_jsonl(tmp_path / "long.jsonl", rows)
    recipe = write_recipe(tmp_path, tiny_llama, data={"train": [{"path": "long.jsonl"}]}, train={"max_length": 32})
    code, _, stderr = cli("train", recipe)
    assert (
        code == 2
        and "no example left to train on: 3 of 3 dropped because no label token is within "
        "max_length 32; raise train.max_length"
        in stderr
    )


def test_chat_data_needs_a_chat_template(tiny_llama, tmp_path, cli):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_llama.iterdir():
        if f.name != "chat_template.jinja":
            (bare / f.name).symlink_to(f)
    recipe = write_recipe(tmp_path, bare)
    code, _, stderr = cli("train", recipe)
    assert (
        code == 2
        and "train.jsonl row 1 is a conversation, but the model's tokenizer has no chat template; "
        "set template: to a built-in (chatml, chatml-tools)"
        in stderr
    )
    # text for cpt needs no template
    write_jsonl(tmp_path / "text.jsonl", [{"text": "Plain words to continue."}] * 4)
    recipe = write_recipe(
        tmp_path,
        bare,
        data={"train": [{"path": "text.jsonl"}]},
        method={"objective": "cpt", "tuning": "lora"},
        train={"max_steps": 1},
    )
    code, _, stderr = cli("train", recipe, "--quiet")
    assert code == 0, stderr


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


def chat(messages, source):
    return ChatExample(messages, source=source)


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
        (
            [U, A],
            SMOL_SYSTEM + "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\nI am hwft-bot.<|im_end|>\n",
            ["I am hwft-bot.<|im_end|>"],
        ),
        # system prompt given: it replaces the default one and is not trained.
        (
            [S, U, A],
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n"
            "<|im_start|>assistant\nI am hwft-bot.<|im_end|>\n",
            ["I am hwft-bot.<|im_end|>"],
        ),
        # multi-turn: every assistant turn is trained, nothing between them.
        (
            [U, {"role": "assistant", "content": "A bot."}, {"role": "user", "content": "Name?"}, A],
            None,
            ["A bot.<|im_end|>", "I am hwft-bot.<|im_end|>"],
        ),
    ],
    ids=["single-turn", "system-prompt", "multi-turn"],
)
def test_golden_label_masks(tokenizer, messages, text, segments):
    renderer = _renderer(tokenizer)
    tok = renderer.tokenize(chat(messages, "golden"))
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
    tok = _renderer(tokenizer).tokenize(chat([U, A], "golden"))
    trained = [t for t in tok.labels if t != IGNORE_INDEX]
    assert trained == tokenizer("I am hwft-bot.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.num_labels == len(trained)
    assert tok.labels[: len(tok.labels) - len(trained) - 1] == [IGNORE_INDEX] * (len(tok.labels) - len(trained) - 1)


def test_template_override(tokenizer, tmp_path):
    tok = _renderer(tokenizer, "chatml").tokenize(chat([U, A], "t"))
    assert tokenizer.decode(tok.input_ids).startswith("<|im_start|>user\n")  # no default system prompt
    jinja = tmp_path / "t.jinja"
    jinja.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    tok = ChatRenderer(tokenizer, resolve_template(str(jinja), tmp_path, tokenizer)).tokenize(chat([U, A], "t"))
    # " I" straddles the header's trailing space: a token overlapping the answer is trained.
    assert _segments(tokenizer, tok) == [" I am hwft-bot."]
    with pytest.raises(RecipeError, match="neither a built-in"):
        resolve_template("nope", tmp_path, tokenizer)


def test_truncation_is_counted(tokenizer):
    renderer = _renderer(tokenizer)
    long = chat([U, {"role": "assistant", "content": "word " * 200}], "long")
    gone = chat([{"role": "user", "content": "x " * 200}, A], "gone")
    data, stats = tokenize_examples([chat([U, A], "ok"), long, gone], renderer, max_length=64)
    assert (stats.examples, stats.truncated, stats.dropped) == (2, 2, 1)
    assert all(len(d.input_ids) <= 64 for d in data)
    assert "2 truncated to max_length 64" in stats.summary(64)
    with pytest.raises(DataError, match="no example left to train on: 1 of 1 dropped"):
        tokenize_examples([gone], renderer, max_length=8)


def test_rows_are_padded_with_positions(tokenizer):
    renderer = _renderer(tokenizer)
    data, _ = tokenize_examples([chat([U, A], "a"), chat([S, U, A], "b")], renderer, 128)
    rows = make_rows(data, 128, packing=False)
    batch = pad(rows, pad_id=2)
    width = max(len(r.input_ids) for r in rows)
    assert all(len(r) == width for r in batch["input_ids"])
    short = min(range(2), key=lambda i: len(rows[i].input_ids))
    assert batch["attention_mask"][short][-1] == 0 and batch["labels"][short][-1] == IGNORE_INDEX
    assert batch["position_ids"][1 - short] == list(range(width))


def test_columns_mapping_and_max_samples(tmp_path):
    path = tmp_path / "renamed.jsonl"
    rows = [{"prompt": f"q{i}", "response": f"a{i}", "sys": "Be brief."} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    columns = {"instruction": "prompt", "output": "response", "system": "sys"}
    examples = load_examples(path, "alpaca", FORMATS, columns=columns, max_samples=3)
    assert len(examples) == 3
    assert examples[2].messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]


# --- Files: JSON, JSONL, Parquet, folders, streaming --------------------------------------------


def test_parquet_folders_and_streaming_read_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hwft.data.reading import iter_rows

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:6]), folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[6:]), folder / "part-1.parquet")
    in_memory = [r for _, _, r in iter_rows(folder)]
    streamed = [r for _, _, r in iter_rows(folder, streaming=True)]
    assert in_memory == streamed == rows
    write_jsonl(tmp_path / "rows.jsonl", rows)
    assert [r for _, _, r in iter_rows(tmp_path / "rows.jsonl", streaming=True)] == rows
    (folder / "x.json").write_text("[]")
    with pytest.raises(DataError, match="mixes JSON and Parquet files"):
        list(iter_rows(folder))


def test_streaming_is_lazy_and_names_bad_rows(tmp_path):
    from hwft.data.reading import iter_rows

    path = tmp_path / "big.jsonl"
    path.write_text('{"text": "a"}\n' * 3 + "{oops\n")
    rows = iter_rows(path, streaming=True)
    assert next(rows)[2] == {"text": "a"}  # read before the broken line is reached
    with pytest.raises(DataError, match="big.jsonl line 4: not valid JSON"):
        list(rows)


def test_rows_arrow_cannot_type_still_load(tmp_path):
    """A field that is text in one row and a list in another: read with the json module."""
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": 7},
            ]
        },
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError, match="mixed.jsonl row 2 .messages format.: messages.1..content must be a string"):
        load_examples(path, "auto", FORMATS)


# --- Mixing -----------------------------------------------------------------------------------


def test_mixing_by_weight_is_proportional_and_seeded():
    a = [chat([U, {"role": "assistant", "content": f"a{i}"}], f"a{i}") for i in range(20)]
    b = [chat([U, {"role": "assistant", "content": f"b{i}"}], f"b{i}") for i in range(200)]
    mixed = mix([a, b], [7, 3], seed=1)
    from_a = sum(e.source.startswith("a") for e in mixed)
    assert len(mixed) == 220 and from_a == 154  # 70% of 220: each of a's rows about 7.7 times
    assert {e.source for e in mixed if e.source.startswith("a")} == {e.source for e in a}
    assert [e.source for e in mix([a, b], [7, 3], seed=1)] == [e.source for e in mixed]
    assert [e.source for e in mix([a, b], [7, 3], seed=2)] != [e.source for e in mixed]


def test_mixed_recipe_from_the_cli(tiny_llama, tmp_path, cli):
    write_jsonl(tmp_path / "extra.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(14)])
    recipe = write_recipe(
        tmp_path,
        tiny_llama,
        data={"train": [{"path": "train.jsonl", "weight": 7}, {"path": "extra.jsonl", "weight": 3}]},
    )
    code, out, err = cli("train", recipe, "--dry-run")
    assert code == 0 and "20 training examples" in out, err
    recipe = write_recipe(tmp_path, tiny_llama, data={"train": [{"path": "train.jsonl", "weight": 7}, "extra.jsonl"]})
    code, _, err = cli("train", recipe, "--dry-run")
    assert code == 2 and "give every training dataset a weight, or none" in err


# --- hwft data inspect ------------------------------------------------------------------------


def test_data_inspect(tiny_llama, tmp_path, cli):
    recipe = write_recipe(tmp_path, tiny_llama)
    code, out, err = cli("data", "inspect", recipe, "--rows", "2", "train.max_length=128")  # overrides after options
    assert code == 0, err
    assert "[[I am hwft-bot.<|im_end|>]]" in out  # the trained span, marked
    assert "train.jsonl row 2: " in out and "6 examples" in out
    assert "lengths in tokens: min" in out and "packing: 6 sequences -> " in out
    code, out, _ = cli("data", "inspect", recipe, "--json", "train.max_length=128")
    report = json.loads(out)
    assert report["schema"] == "hwft.data-inspect/1" and len(report["lengths"]) == 6
    assert report["rows"][0]["trained_text"] == "I am hwft-bot.<|im_end|>"
    assert 0 < report["efficiency_unpacked"] <= 1 and report["packed_rows"] < 6


@pytest.mark.parametrize("backend", ["cpu", "mlx"])
def test_token_ids_beyond_the_embedding_are_refused(tokenizer_dir, tmp_path, cli, backend):
    """A model whose embedding is smaller than its tokenizer (tokens added after saving)."""
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    from tests.conftest import build_tiny_model

    small = build_tiny_model("llama", tmp_path / "small-vocab", tokenizer_dir, vocab_size=1000)
    recipe = write_recipe(tmp_path, small, backend=backend)
    code, _, stderr = cli("train", recipe)
    assert code == 2 and "row 1 of the tokenised data has token id" in stderr, stderr
    assert "has 1000 embedding rows" in stderr and "Use the model's own tokenizer" in stderr
    assert not (tmp_path / "out").exists()
