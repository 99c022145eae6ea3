"""Data kinds (hwft.data.kinds): the built-ins registered through the hook a plugin uses, each
with its typed example, renderer and batcher; a format says which kind it makes; and an
out-of-tree kind (tests/kind_plugin, hwft-completion) that trains through the hooks alone."""

from __future__ import annotations

import json

import pytest

from hwft.data.kinds import DataKind, Example, collect_kinds
from hwft.errors import UserError
from hwft.plugins import get_host, reset_host
from tests.conftest import REPO, write_jsonl, write_recipe

PLUGIN = REPO / "tests" / "kind_plugin"


def test_the_built_in_kinds_register_through_the_plugin_hook():
    reset_host()
    host = get_host()
    kinds = host.data_kinds()
    assert list(kinds.by_name) == ["chat", "text", "tokens", "preference", "feedback", "prompt"]
    assert [k for k, r in kinds.by_name.items() if r.sequences] == ["chat", "text", "tokens"]
    assert next(p for p in host.plugins if p.name == "core-kinds").hooks == ["hwft_register_data_kinds"]
    # every format names the kind it makes, and every kind's example says its kind
    formats = host.data_formats()
    assert {f.name: f.kind for f in formats.values()} == {
        "preference": "preference",
        "feedback": "feedback",
        "sharegpt": "chat",
        "messages": "chat",
        "alpaca": "chat",
        "prompt": "prompt",
        "text": "text",
        "tokens": "tokens",
    }
    assert all(r.example.kind == name and issubclass(r.example, Example) for name, r in kinds.by_name.items())
    # a method trains on its kind, with the kind's batcher; cpt takes tokens rows as they are
    methods = host.methods()
    assert methods.get("cpt").reads("tokens") and not methods.get("sft").reads("tokens")
    assert methods.get("kto").reads("preference")  # converted: a pair is two answers


def vendor(*records):
    """A plugin manager with one plugin registering ``records`` as data kinds."""
    import pluggy

    from hwft import hookspecs

    pm = pluggy.PluginManager("hwft")
    pm.add_hookspecs(hookspecs)

    class Vendor:
        @pluggy.HookimplMarker("hwft")
        def hwft_register_data_kinds(self, register):
            for record in records:
                register(record)

    pm.register(Vendor(), name="vendor")
    return pm


def test_a_kind_is_refused_where_its_record_is_wrong():
    from dataclasses import dataclass

    @dataclass
    class Mislabelled(Example):
        kind = "other"

    with pytest.raises(UserError, match="data kind 'mine': its example class Mislabelled says kind 'other'"):
        collect_kinds(vendor(DataKind("mine", "its example says another kind", Mislabelled, "x:y")))
    chat = get_host().data_kinds().get("chat")
    with pytest.raises(UserError, match="data kind 'chat' is registered twice"):
        collect_kinds(vendor(chat, chat))
    with pytest.raises(UserError, match="no data kind named 'chatt' is registered"):
        get_host().data_kinds().get("chatt")


@pytest.fixture
def completion_plugin(tmp_path, monkeypatch):
    """hwft-completion installed: a dist-info with its entry point on sys.path, as pip leaves it."""
    site = tmp_path / "site"
    info = site / "hwft_completion-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hwft-completion\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[hwft]\ncompletion = hwft_completion.plugin\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(PLUGIN))
    reset_host()
    yield
    reset_host()


ROWS = [{"prompt": f"{a} plus {b} is", "completion": f" {a + b}."} for a, b in ((1, 2), (2, 2), (3, 4), (5, 1), (2, 7))]


def test_an_out_of_tree_data_kind_trains_through_its_hooks(completion_plugin, tiny_llama, tmp_path, cli):
    """hwft-completion's kind, format and method, installed: its rows are read and detected as
    its format (preferred over the built-in prompt format, which also reads ``prompt``), shown by
    `hwft data inspect` with the completion marked, and trained by its method on both engines with
    each engine's own next-token loss: the same first loss (one model, fp32: 1e-4), falling."""
    pytest.importorskip("mlx.core")
    write_jsonl(tmp_path / "completions.jsonl", ROWS)
    losses = {}
    for backend in ("cpu", "mlx"):
        folder = tmp_path / backend
        folder.mkdir()
        write_jsonl(folder / "completions.jsonl", ROWS)
        recipe = write_recipe(
            folder,
            tiny_llama,
            backend=backend,
            data={"train": [{"path": "completions.jsonl"}]},
            method={"objective": "csft", "tuning": "full"},
            train={"max_steps": 4, "micro_batch_size": 5, "lr": 1e-3, "precision": "fp32"},
        )
        if backend == "cpu":
            code, out, err = cli("data", "inspect", recipe, "--json")
            assert code == 0, err
            shown = json.loads(out)["rows"][0]
            assert shown["marked"] == "1 plus 2 is[[ 3.<|im_end|>]]", shown  # SmolLM2 ends a sequence with <|im_end|>
            assert shown["trained_text"].startswith(" 3.")
        code, _, err = cli("train", recipe)
        assert code == 0, err
        losses[backend] = [json.loads(x)["loss"] for x in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    assert losses["cpu"][0] == pytest.approx(losses["mlx"][0], abs=1e-4), losses
    assert losses["cpu"][-1] < losses["cpu"][0] and losses["mlx"][-1] < losses["mlx"][0], losses
    code, out, _ = cli("plugins", "--json")
    listed = json.loads(out)
    assert {
        "name": "completion",
        "example": "CompletionExample",
        "sequences": True,
        "plugin": "completion",
        "description": "a prompt and its completion as plain text, the loss on the completion",
    } in listed["data_kinds"]
    assert {
        "name": "completion",
        "kind": "completion",
        "description": "prompt + completion as plain text (TRL's prompt-completion rows)",
    } in listed["data_formats"]


def test_the_kind_package_touches_nothing_of_hwft():
    for tree in ("hwft", "backends"):
        for path in (REPO / tree).rglob("*.py"):
            assert "hwft_completion" not in path.read_text(encoding="utf-8"), path
