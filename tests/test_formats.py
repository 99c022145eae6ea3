"""Row formats on the shapes users bring: LLaMA-Factory's demo files and registry, ShareGPT,
OpenAI messages with tools and typed parts, reasoning, text, preference, feedback and prompt rows."""

from __future__ import annotations

import json

import pytest

from hwft.data.chat import IGNORE_INDEX, TEMPLATES, ChatRenderer, TokenizeStats, resolve_template
from hwft.data.formats import BUILTIN_FORMATS, Mapping
from hwft.data.kinds.chat import ChatExample
from hwft.data.kinds.feedback import FeedbackExample, feedback_items
from hwft.data.kinds.preference import tokenize_pair
from hwft.data.kinds.text import TextExample
from hwft.data.kinds.text import encode as encode_text
from hwft.data.loading import load_examples
from hwft.errors import DataError
from tests.conftest import PEER_DATA, write_jsonl, write_recipe

LF = PEER_DATA / "llamafactory"
FORMATS = {f.name: f for f in BUILTIN_FORMATS}


def trained_text(tokenizer, tok) -> list[str]:
    """The label tokens, decoded as contiguous runs."""
    runs, current = [], []
    for token, label in zip(tok.input_ids, tok.labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return [tokenizer.decode(r) for r in runs + ([current] if current else [])]


# --- LLaMA-Factory's demo files, each read unchanged -----------------------------------------


def test_peer_sharegpt_tool_calls():
    examples = load_examples(LF / "glaive_toolcall_en_demo.json", "sharegpt", FORMATS)
    assert len(examples) == 300
    first = examples[0]
    roles = [m["role"] for m in first.messages]
    assert roles == ["user", "assistant", "user", "assistant", "tool", "assistant", "user", "assistant"]
    call = first.messages[3]
    assert call["content"] == "" and call["tool_calls"] == [
        {
            "type": "function",
            "function": {"name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}},
        }
    ]
    assert first.tools[0]["type"] == "function" and first.tools[0]["function"]["name"] == "search_recipes"
    assert sum(e.tools is None for e in examples) == 109  # rows whose tools are "[]"


def test_peer_preference_sharegpt():
    examples = load_examples(LF / "dpo_en_demo.json", "auto", FORMATS, objective="dpo")
    assert len(examples) == 300 and all(e.kind == "preference" for e in examples)
    e = examples[0]
    assert e.messages[-1]["role"] == "user" and e.messages[-1]["content"].startswith("Hi! I'd like to create")
    assert e.chosen[0]["role"] == "assistant" and e.chosen[0]["content"].startswith("That sounds like a fun")
    assert e.rejected[0]["content"] != e.chosen[0]["content"]


def test_peer_v1_messages_with_typed_parts_and_loss_weight():
    examples = load_examples(LF / "v1_sft_demo.jsonl", "auto", FORMATS)
    assert len(examples) == 500
    user, assistant = examples[0].messages
    assert user == {"role": "user", "content": "hi"}
    assert assistant["content"].startswith("Hello! I am {{name}}") and "train" not in assistant


def test_peer_v1_preference_shares_the_prompt():
    examples = load_examples(LF / "v1_dpo_demo.jsonl", "auto", FORMATS, objective="dpo")
    assert len(examples) == 10
    e = examples[0]
    assert [m["role"] for m in e.messages] == ["system", "user"]
    assert e.chosen[0]["content"].startswith("Abdulah Hasanagic is the proud owner")
    assert e.rejected[0]["content"].startswith(" Abdulah")


def test_peer_text_for_cpt():
    examples = load_examples(LF / "c4_demo.jsonl", "auto", FORMATS, objective="cpt")
    assert len(examples) == 300 and all(e.kind == "text" and e.text for e in examples)


# --- LLaMA-Factory's registry ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name, objective, kind, count",
    [
        ("identity", "sft", "chat", 91),
        ("alpaca_en_demo", "sft", "chat", 999),
        ("glaive_toolcall_en_demo", "sft", "chat", 300),
        ("dpo_en_demo", "dpo", "preference", 300),
        ("c4_demo", "cpt", "text", 300),
        ("alpaca_en_demo", "grpo", "prompt", 999),
        ("kto_en_demo", "kto", "feedback", 300),
    ],
)
def test_registry_entries_load_as_llamafactory_describes_them(name, objective, kind, count):
    from hwft.data.loading import load_train_data
    from hwft.plugins import get_host
    from hwft.recipe import recipe_from_dict

    recipe = recipe_from_dict(
        {"data": {"registry": str(LF / "dataset_info.json"), "train": [name]}, "method": {"objective": objective}}
    )
    data = load_train_data(recipe, get_host().data_formats())
    assert len(data.examples) == count and {e.kind for e in data.examples} == {kind}
    if objective == "grpo":  # alpaca's output is the reference answer of a prompt row
        assert data.examples[0].reference and data.examples[0].messages[-1]["role"] == "user"
    if objective == "kto":  # the kto_tag column is each answer's label; the last turn the answer
        assert sum(e.label for e in data.examples) == 150
        first = data.examples[0]
        assert [m["role"] for m in first.messages] == ["user"] and first.completion[0]["content"].startswith("Ooh ooh")


def test_registry_dry_run_from_the_cli(tiny_llama, tmp_path, cli):
    recipe = write_recipe(
        tmp_path, tiny_llama, data={"registry": str(LF / "dataset_info.json"), "train": ["identity", "alpaca_en_demo"]}
    )
    code, out, err = cli("train", recipe, "--dry-run")
    assert code == 0, err
    assert "1090 training examples" in out


@pytest.mark.parametrize(
    "name, message",
    [
        ("alpaca_en", "lives on a hub (hf_hub_url: llamafactory/alpaca_en); hwft never downloads data"),
        ("idenity", "no dataset named 'idenity'; did you mean 'identity'?"),
    ],
)
def test_registry_refusals(tiny_llama, tmp_path, cli, name, message):
    recipe = write_recipe(tmp_path, tiny_llama, data={"registry": str(LF / "dataset_info.json"), "train": [name]})
    code, _, err = cli("train", recipe, "--dry-run")
    assert code == 2 and message in err and "dataset_info.json" in err


# --- Tools, reasoning, typed parts ------------------------------------------------------------


def test_tools_need_a_template_that_renders_them(tokenizer):
    (example,) = load_examples(LF / "glaive_toolcall_en_demo.json", "sharegpt", FORMATS, max_samples=1)
    example.source = "glaive row 1"
    own = ChatRenderer(tokenizer, tokenizer.chat_template)  # SmolLM2's template has no tool support
    assert own.tool_support == {"results"}
    with pytest.raises(
        DataError,
        match="glaive row 1 uses tools, but the chat template does not render tool "
        "calls or definitions .* set template: chatml-tools",
    ):
        own.tokenize(example)


def test_tool_calls_render_and_train_with_chatml_tools(tokenizer):
    (example,) = load_examples(LF / "glaive_toolcall_en_demo.json", "sharegpt", FORMATS, max_samples=1)
    renderer = ChatRenderer(tokenizer, TEMPLATES["chatml-tools"])
    assert renderer.tool_support == {"definitions", "calls", "results"}
    tok = renderer.tokenize(example)
    text = tokenizer.decode(tok.input_ids)
    assert text.startswith("<|im_start|>system\n# Tools\n") and '"name": "search_recipes"' in text
    assert '<tool_response>\n{"recipes"' in text
    trained = trained_text(tokenizer, tok)
    # every assistant turn is trained, the tool call included; the tool's result is not
    assert len(trained) == 4
    assert trained[1] == (
        '<tool_call>\n{"name": "search_recipes", "arguments": {"ingredients": '
        '["chicken", "bell peppers", "rice"]}}\n</tool_call><|im_end|>'
    )
    assert not any("tool_response" in t for t in trained)


def test_openai_tool_calls_and_tools(tokenizer, tmp_path):
    row = {
        "tools": [{"type": "function", "function": {"name": "now", "description": "time", "parameters": {}}}],
        "messages": [
            {"role": "user", "content": "Time?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "now", "arguments": "{}"}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
            {"role": "assistant", "content": "It is noon."},
        ],
    }
    (example,) = load_examples(write_jsonl(tmp_path / "t.jsonl", [row]), "auto", FORMATS)
    assert example.messages[1]["tool_calls"][0]["function"] == {"name": "now", "arguments": {}}
    tok = ChatRenderer(tokenizer, TEMPLATES["chatml-tools"]).tokenize(example)
    assert trained_text(tokenizer, tok)[-1] == "It is noon.<|im_end|>"


@pytest.mark.parametrize(
    "mode, expected", [("keep", "<think>\n2 and 2 make 4.\n</think>\n\n4<|im_end|>"), ("strip", "4<|im_end|>")]
)
def test_reasoning_kept_or_stripped(tokenizer, tmp_path, mode, expected):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\n2 and 2 make 4.\n</think>\n\n4"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "2 and 2 make 4."},
            ]
        },
    ]
    examples = load_examples(write_jsonl(tmp_path / "r.jsonl", rows), "auto", FORMATS, reasoning=mode)
    renderer = ChatRenderer(tokenizer, TEMPLATES["chatml"])
    for e in examples:
        assert trained_text(tokenizer, renderer.tokenize(e)) == [expected]


def test_loss_weight_zero_turns_are_context(tokenizer, tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "value": "hi"}]},
            {"role": "assistant", "content": [{"type": "text", "value": "old answer"}], "loss_weight": 0.0},
            {"role": "user", "content": "again"},
            {
                "role": "assistant",
                "content": [{"type": "reasoning", "value": "greet"}, {"type": "text", "text": "hello"}],
            },
        ]
    }
    (example,) = load_examples(write_jsonl(tmp_path / "w.jsonl", [row]), "auto", FORMATS)
    tok = ChatRenderer(tokenizer, TEMPLATES["chatml"]).tokenize(example)
    assert trained_text(tokenizer, tok) == ["<think>\ngreet\n</think>\n\nhello<|im_end|>"]


def test_sharegpt_tags_and_columns_rename():
    mapping = Mapping(
        {"conversations": "dialog"},
        {"role_tag": "speaker", "content_tag": "text", "user_tag": "customer", "assistant_tag": "agent"},
    )
    example = FORMATS["sharegpt"].parse(
        {"dialog": [{"speaker": "customer", "text": "hi"}, {"speaker": "agent", "text": "hello"}]}, mapping
    )
    assert example.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(ValueError, match=r"dialog\[0\].speaker is 'human'; expected one of .*customer"):
        FORMATS["sharegpt"].parse({"dialog": [{"speaker": "human", "text": "hi"}]}, mapping)


# --- Preference and prompt rows, tokenised for the methods that consume them ------------------


def test_preference_pair_shares_prompt_tokens(tokenizer, tmp_path):
    rows = [{"prompt": "Name?", "chosen": "hwft-bot.", "rejected": "No idea."}]
    (example,) = load_examples(write_jsonl(tmp_path / "p.jsonl", rows), "auto", FORMATS, objective="dpo")
    pair = tokenize_pair(ChatRenderer(tokenizer, TEMPLATES["chatml"]), example)
    assert trained_text(tokenizer, pair.chosen) == ["hwft-bot.<|im_end|>"]
    assert trained_text(tokenizer, pair.rejected) == ["No idea.<|im_end|>"]
    assert pair.chosen.input_ids[: pair.prompt_length] == pair.rejected.input_ids[: pair.prompt_length]
    assert tokenizer.decode(pair.chosen.input_ids[: pair.prompt_length]).endswith("<|im_start|>assistant\n")


def test_alpaca_preference_and_prompt_rows(tmp_path):
    rows = [{"instruction": "Add", "input": "2 and 2", "chosen": "4", "rejected": "5"}]
    (pref,) = load_examples(write_jsonl(tmp_path / "a.jsonl", rows), "preference", FORMATS, objective="dpo")
    assert pref.messages == [{"role": "user", "content": "Add\n2 and 2"}]
    rows = [{"question": "2+2?", "answer": "4"}]
    (prompt,) = load_examples(
        write_jsonl(tmp_path / "g.jsonl", rows), "auto", FORMATS, columns={"prompt": "question"}, objective="grpo"
    )
    assert prompt.kind == "prompt" and prompt.reference == "4" and prompt.messages[-1]["content"] == "2+2?"


def test_feedback_rows_in_trl_alpaca_and_conversation_shapes(tokenizer, tmp_path):
    """kto's rows: TRL's unpaired prompt/completion/label, alpaca with a label, and a
    conversation whose last turn is the answer; each tokenised with its mismatched pair."""

    rows = [
        {"prompt": "Name?", "completion": "hwft-bot.", "label": True},
        {"instruction": "Add", "input": "2 and 2", "output": "5", "label": 0},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
            ],
            "label": True,
        },
    ]
    examples = load_examples(write_jsonl(tmp_path / "k.jsonl", rows), "feedback", FORMATS, objective="kto")
    assert [e.label for e in examples] == [True, False, True]
    assert examples[1].messages == [{"role": "user", "content": "Add\n2 and 2"}]
    assert [m["role"] for m in examples[2].messages] == ["system", "user"]
    items, stats = feedback_items(examples, ChatRenderer(tokenizer, TEMPLATES["chatml"]), 512)
    assert stats.examples == 3 and [i.desirable for i in items] == [True, False, True]
    assert trained_text(tokenizer, items[0].sequence) == ["hwft-bot.<|im_end|>"]
    # each prompt with the answer of the row before it; the first with the last's
    assert trained_text(tokenizer, items[0].mismatched) == ["Hello!<|im_end|>"]
    assert trained_text(tokenizer, items[1].mismatched) == ["hwft-bot.<|im_end|>"]
    assert tokenizer.decode(items[1].mismatched.input_ids).count("Add\n2 and 2") == 1


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "a", "completion": "b", "label": "yes"}, "field 'label' is 'yes'; a feedback label is true"),
        ({"prompt": "a", "completion": "b"}, "missing field 'label'"),
        ({"messages": [{"role": "assistant", "content": "b"}], "label": True}, "must follow a user or tool turn"),
        ({"messages": [{"role": "user", "content": "a"}], "label": True}, "has no assistant turn to learn from"),
    ],
)
def test_feedback_refusals(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        load_examples(write_jsonl(tmp_path / "k.jsonl", [row]), "feedback", FORMATS, objective="kto")


def test_kto_needs_two_rows(tokenizer):

    one = FeedbackExample(
        [{"role": "user", "content": "a"}], completion=[{"role": "assistant", "content": "b"}], label=True
    )
    with pytest.raises(DataError, match="kto needs at least 2 feedback rows"):
        feedback_items([one], ChatRenderer(tokenizer, TEMPLATES["chatml"]), 64)


def test_text_longer_than_max_length_is_split_not_cut(tokenizer):
    renderer = ChatRenderer(tokenizer, None)
    chunks = encode_text(TextExample("word " * 100), renderer, 32, TokenizeStats())
    assert len(chunks) == 4 and all(len(c.input_ids) <= 32 for c in chunks)
    assert chunks[-1].input_ids[-1] == tokenizer.eos_token_id
    assert all(c.labels[0] == IGNORE_INDEX and c.labels[1:] == c.input_ids[1:] for c in chunks)


def test_objective_and_row_kind_must_agree(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "plain"}])
    with pytest.raises(DataError, match="a text row .text format., but objective 'sft' trains on chat rows"):
        load_examples(path, "auto", FORMATS)
    assert json.dumps(resolve_template("chatml-tools", tmp_path, None))  # a built-in by name


def test_shipped_registry_recipe_mixes_and_renders_tools(tokenizer_dir, cli, tmp_path):
    """configs/data-mix.yaml: a registry with openai and sharegpt entries, mixed 7:3, tool rows
    rendered through chatml-tools."""
    from tests.conftest import REPO

    recipe = REPO / "configs" / "data-mix.yaml"
    code, out, err = cli("train", recipe, "--dry-run")
    assert code == 0 and "58 training examples" in out, err
    code, out, err = cli("data", "inspect", recipe, "--json", "--rows", "60")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    tool_rows = [r for r in rows if "tools.json" in r["source"]]
    assert len(tool_rows) == 17 and any("<tool_call>" in r["trained_text"] for r in tool_rows)
    assert all("<tool_response>" not in r["trained_text"] for r in tool_rows)


def test_registry_num_samples_and_packing_scope(tmp_path, cli, tiny_llama):
    write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(9)
        ],
    )
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"chat": {"file_name": "chat.jsonl", "formatting": "openai", "num_samples": 4}})
    )
    recipe = write_recipe(tmp_path, tiny_llama, data={"registry": "dataset_info.json", "train": ["chat"]})
    code, out, err = cli("train", recipe, "--dry-run")
    assert code == 0 and "4 training examples" in out, err
    code, _, err = cli("data", "inspect", recipe, "method.objective=dpo", "data.packing=true")
    assert code == 2 and "data.packing applies to sft and cpt rows, not to dpo" in err


@pytest.mark.parametrize(
    "option, expected",
    [
        ({}, ["4<|im_end|>", "I am hwft-bot.<|im_end|>"]),
        ({"mask_history": True}, ["I am hwft-bot.<|im_end|>"]),
        ({"train_on_prompt": True}, None),
    ],
)
def test_mask_history_and_train_on_prompt(tokenizer, option, expected):
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And you?"},
        {"role": "assistant", "content": "I am hwft-bot."},
    ]
    tok = ChatRenderer(tokenizer, TEMPLATES["chatml"], **option).tokenize(ChatExample(messages, source="r"))
    if expected is None:  # every token after the first is a label
        assert tok.labels[1:] == tok.input_ids[1:]
    else:
        assert trained_text(tokenizer, tok) == expected
