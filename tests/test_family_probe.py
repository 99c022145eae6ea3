"""Every text model family both transformers and mlx-lm implement (hwft.testing.family_probe):
each trains on both engines and exports, or is refused in one line, and never fails with a
traceback or a weight's bare name.

The whole enumeration takes about 8 minutes on 2 cores (--jobs 2), too long for CI: its recorded
results (docs/family-probe.json, rendered as the table in docs/families.md) are held here to
a rotating sample of families probed afresh (two a run, chosen by the ISO week, or named in
HWFT_FAMILY_SAMPLE), and the generic paths each have a test of their own below:

- a small model of any config keeps one layer of each kind (hwft.shrink);
- the MLX engine trains a family outside its table only after mlx-lm's logits match
  transformers' on a small model of its config (hwft_mlx.agreement): Starcoder2 matches, GLM
  (the first GLM, not GLM-4) does not, and is refused in one line;
- the torch engine packs a family outside its table only after its packed rows give each
  example its own logits (hwft_torch.packing_proof);
- a failure hwft did not foresee is one line with its cause (hwft.entry.failure).
"""

from __future__ import annotations

import datetime
import json
import os

import pytest

from hwft.testing import family_probe
from tests.conftest import REPO

pytest.importorskip("mlx.core")

RECORDED = REPO / "docs" / "family-probe.json"
DOCS = REPO / "docs" / "families.md"
#: Families probed afresh per run: about 40 s each here.
SAMPLE_SIZE = 2


def recorded() -> dict[str, dict[str, str]]:
    return json.loads(RECORDED.read_text(encoding="utf-8"))


def sample() -> list[str]:
    """The families this run probes: HWFT_FAMILY_SAMPLE's, or SAMPLE_SIZE of the recorded ones
    that reach training, picked by the ISO week (a week's runs probe the same ones)."""
    if os.environ.get("HWFT_FAMILY_SAMPLE"):
        return os.environ["HWFT_FAMILY_SAMPLE"].split(",")
    built = sorted(t for t, row in recorded().items() if row.get("build") == "ok")
    week = datetime.date.today().isocalendar()[1]
    return [built[(week * SAMPLE_SIZE + i) % len(built)] for i in range(SAMPLE_SIZE)]


def kinds(row: dict[str, str]) -> dict[str, str]:
    return {stage: value.split(":")[0] for stage, value in row.items()}


def test_the_docs_table_is_the_recorded_enumeration():
    text = DOCS.read_text(encoding="utf-8")
    assert family_probe.table(recorded()) in text, "regenerate: python -m hwft.testing.family_probe --json ..."


def test_every_shared_model_type_is_recorded():
    """A transformers or mlx-lm upgrade that adds a family adds a row, once the probe reruns."""
    assert sorted(recorded()) == family_probe.shared_model_types()


def test_nothing_recorded_fails_with_a_traceback_or_a_bare_weight_name():
    for model_type, row in recorded().items():
        for stage, value in row.items():
            assert not value.startswith("broken"), (model_type, stage, value)
            assert "Traceback" not in value and not value.rstrip().endswith("weight."), (model_type, stage, value)


@pytest.mark.parametrize("model_type", sample())
def test_a_sampled_family_probes_as_recorded(model_type, tmp_path):
    """Built, trained on both engines and exported afresh: each stage ends as it is recorded
    (ok, or refused in one line)."""
    row = family_probe.probe_in_child(model_type, tmp_path)
    print(model_type, json.dumps(row, indent=1))
    assert kinds(row) == kinds(recorded()[model_type]), (row, recorded()[model_type])
    assert not any(v.startswith("broken") for v in row.values()), row


def test_a_small_model_keeps_one_layer_of_each_kind():
    from hwft.shrink import layers_kept, shrink

    kinds_ = ["sliding_attention"] * 5 + ["full_attention"]
    config = {"num_hidden_layers": 6, "layer_types": kinds_ * 1, "no_rope_layers": [1, 1, 1, 0, 1, 1], "head_dim": 128}
    assert layers_kept(config) == [0, 5]
    small = shrink(config)
    assert small["layer_types"] == ["sliding_attention", "full_attention"] and small["num_hidden_layers"] == 2
    assert small["no_rope_layers"] == [1, 1] and small["head_dim"] == 16
    assert "tie_word_embeddings" not in small  # as the checkpoint has it
    hybrid = {"num_hidden_layers": 4, "layer_types": ["linear_attention"] * 3 + ["full_attention"]}
    assert shrink(hybrid)["layer_types"] == ["linear_attention", "full_attention"]


def mlx_train(model_type: str, folder, tokenizer_dir) -> tuple[int, str]:
    from hwft.testing.tiny import build_tiny_model
    from tests.conftest import write_recipe

    model = build_tiny_model(model_type, folder / "model", tokenizer_dir)
    recipe = write_recipe(folder, model, backend="mlx", train={"max_steps": 1}, output={"plot": False})
    from hwft import cli
    from hwft.plugins import reset_host

    reset_host()
    return cli.main(["train", str(recipe)]), str(recipe)


def test_mlx_trains_a_family_outside_its_table_only_after_agreeing_with_transformers(tmp_path, tokenizer_dir, capsys):
    """Starcoder2 (not in the MLX table): mlx-lm's logits are transformers' on a small model of
    its config, and it trains. GLM (the first one; GLM-4 is in the table): mlx-lm's differ
    (measured 4.8e-3 of the largest logit), so it is refused in one line, before training,
    where it once trained a different model without a word."""
    code, _ = mlx_train("starcoder2", tmp_path / "starcoder2", tokenizer_dir)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "starcoder2 is not in hwft's MLX family table; mlx-lm's starcoder2 gave transformers' logits" in err
    code, _ = mlx_train("glm", tmp_path / "glm", tokenizer_dir)
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = [line for line in err.splitlines() if line.startswith("hwft: error")]
    assert "Traceback" not in err and "step 1/" not in err
    assert line.startswith("hwft: error: glm is not in hwft's MLX family table, and mlx-lm's glm does not compute")
    assert "logits differ from transformers'" in line and "Train it on a torch backend" in line
    assert not (tmp_path / "glm" / "out" / "metrics.jsonl").exists()


def test_torch_packs_a_family_outside_its_table_only_after_its_proof(tmp_path, tokenizer_dir, cli):
    """Helium's packed rows give each example its own logits: it packs, and says so. Mamba's
    state runs on across a packed row (there is no attention to mask): refused in one line,
    and it trains with packing off."""
    from hwft.testing.tiny import build_tiny_model
    from tests.conftest import write_recipe

    for model_type, packs in (("helium", True), ("mamba", False)):
        folder = tmp_path / model_type
        model = build_tiny_model(model_type, folder / "model", tokenizer_dir)
        recipe = write_recipe(
            folder,
            model,
            method={"tuning": "full"},
            data={"packing": True},
            train={"max_steps": 1},
            output={"plot": False},
        )
        code, _, err = cli("train", recipe)
        if packs:
            assert code == 0, err
            assert "packing: helium is not in hwft's family table; its packed forward matched" in err
            continue
        assert code == 2, err
        (line,) = [line for line in err.splitlines() if line.startswith("hwft: error")]
        assert line.startswith("hwft: error: data.packing:") and "Traceback" not in err and "step 1/" not in err
        assert "transformers' mamba cannot keep packed examples apart here" in err
        assert "set data.packing: false" in err
        code, _, err = cli("train", recipe, "data.packing=false")
        assert code == 0, err
        assert "attention: eager, not sdpa (mamba has no sdpa path)" in err


def test_a_failure_hwft_did_not_foresee_is_one_line_with_its_cause(capsys, monkeypatch):
    from hwft.entry import FAILURE_EXIT_CODE, guarded

    def broken() -> int:
        raise RuntimeError("the size of tensor a (4) must match\nthe size of tensor b (8)")

    monkeypatch.delenv("HWFT_TRACEBACKS", raising=False)
    assert guarded(broken) == FAILURE_EXIT_CODE == 1
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert line.startswith("hwft: error: an unexpected failure, not a problem hwft found in your input: ")
    assert "RuntimeError: the size of tensor a (4) must match" in line
    assert "(raised in " in line and "test_family_probe.py:" in line and "--debug shows the traceback" in line
    monkeypatch.setenv("HWFT_TRACEBACKS", "1")
    assert guarded(broken) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    with pytest.raises(RuntimeError):
        guarded(broken, debug=True)


@pytest.mark.parametrize("model_type", ["starcoder2", "stablelm", "nemotron"])
def test_a_gguf_layout_row_reads_back_through_transformers_own_loader(model_type, tmp_path, tokenizer_dir, cli):
    """The families whose torch row exists for their GGUF layout (LayerNorm's epsilon key,
    Nemotron's norms stored plus one, a partial rotary width): two LoRA steps, merged, written
    as f16 GGUF, and read back by transformers' GGUF loader (its own inverse of llama.cpp's
    converter) with the trained model's logits. Measured within 5e-4 of the largest logit here;
    f16 rounding allows 1e-2 (hwft_torch.export.GGUF_TOLERANCE)."""
    from hwft.testing.tiny import build_tiny_model
    from tests.conftest import write_recipe

    model = build_tiny_model(model_type, tmp_path / "model", tokenizer_dir)
    recipe = write_recipe(tmp_path, model, train={"max_steps": 2}, output={"plot": False})
    code, _, err = cli("train", recipe, "--quiet")
    assert code == 0, err
    code, out, err = cli(
        "export", tmp_path / "out", "--to", "gguf", "--gguf-type", "f16", "--verify", "--out", tmp_path / "gguf"
    )
    assert code == 0 and '"ok": true' in out, err[-2000:]
    assert "hwft's inverse" not in err  # transformers' own loader read it
    assert json.loads(out.strip().splitlines()[-1])["relative"] < 2e-3


def test_fsdp2_refuses_to_pack_a_family_it_cannot_prove(tmp_path, tokenizer_dir):
    """Under fsdp2 over 2 ranks each rank reads only its shards, so there is no whole model to run
    the packing proof on: a family outside the table is refused in one line naming the ways on,
    by both ranks alike, before a step."""
    import subprocess
    import sys

    from hwft.testing.tiny import build_tiny_model
    from tests.conftest import write_recipe

    model = build_tiny_model("helium", tmp_path / "model", tokenizer_dir)
    recipe = write_recipe(tmp_path, model, data={"packing": True}, train={"max_steps": 1}, output={"plot": False})
    done = subprocess.run(
        [sys.executable, "-m", "hwft", "train", str(recipe), "--nproc", "2", "parallel.strategy=fsdp2"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert (
        "hwft: error: data.packing: helium is not in hwft's family table, and its packing is proven on the whole "
        "model, which no fsdp2 rank holds here; set data.packing: false, or parallel.strategy: ddp"
    ) in done.stderr
    assert "Traceback" not in done.stderr and "step 1/" not in done.stderr
