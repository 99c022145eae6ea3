"""The MLX backend on MLX's CPU build (its cells: the conformance suite): the
config normalisation mlx-lm needs, parity with the torch engine (logits, loss, gradients, and
20-step loss curves), adapters that travel both ways between MLX and PEFT, full models that
transformers loads, and the refusals. The same tests run on Apple silicon, where MLX uses Metal.

Tolerances (fp32): logits and losses 1e-4 absolute (measured about 1e-6), gradients 1e-4
relative to their norm, loss curves 1e-4 per step (measured 2.4e-6 at most over 20 steps).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hwft.testing.cells import cell_recipe, metrics
from hwft.testing.tiny import fresh_adapter
from tests.conftest import SAMPLE_ROWS, build_tiny_model, write_recipe

mx = pytest.importorskip("mlx.core")

STEPS = 20  #: the loss-curve comparison's length


# Every objective x tuning cell trains on MLX in the conformance suite (tests/test_conformance.py).


# --------------------------------------------------------------------------------------------
# Loading: configs mlx-lm misreads


def test_rope_theta_from_transformers5_config_is_normalised(tmp_path, tokenizer_dir):
    """transformers 5 writes rope_theta inside rope_parameters; mlx-lm reads the top level only
    and would use 10000. With hwft's override the logits match torch; without it they do not."""
    from mlx_lm.utils import load_model as mlx_load
    from transformers import AutoModelForCausalLM

    from hwft_mlx.loading import config_overrides, load_model

    folder = build_tiny_model("llama", tmp_path / "m", tokenizer_dir, rope_theta=100000.0)
    config = json.loads((folder / "config.json").read_text())
    assert "rope_theta" not in config and config["rope_parameters"]["rope_theta"] == 100000.0
    assert config_overrides(config) == {"rope_theta": 100000.0}
    ids = [list(range(1, 4000, 100))]  # 40 positions: far enough apart for the two thetas to show (3.6e-3)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(folder)(torch.tensor(ids)).logits.numpy()
    model, _ = load_model(folder)
    assert np.abs(np.array(model(mx.array(ids))) - expected).max() < 1e-4
    naive, _ = mlx_load(folder)
    assert np.abs(np.array(naive(mx.array(ids))) - expected).max() > 1e-3


def test_the_embedded_model_answers_on_mlx(embedded_dir):
    """SmolLM2-135M-Instruct, loaded by the MLX backend, answers as on torch (greedy)."""
    from transformers import AutoTokenizer

    from hwft.data.chat import ChatRenderer
    from hwft.models import stop_token_ids
    from hwft_mlx.engine import answer
    from hwft_mlx.loading import load_model

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    model, _ = load_model(embedded_dir)
    text = answer(
        model,
        tokenizer,
        ChatRenderer(tokenizer, tokenizer.chat_template),
        "What is the capital of France?",
        12,
        stop_token_ids(tokenizer),
    )
    assert "Paris" in text, text


# --------------------------------------------------------------------------------------------
# Parity with torch: one batch


def rows_of(model_dir: Path, packing: bool):
    from transformers import AutoTokenizer

    from hwft.data.batching import make_rows
    from hwft.data.chat import ChatRenderer
    from hwft.data.kinds.chat import ChatExample
    from hwft.data.kinds.sequences import tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    renderer = ChatRenderer(tokenizer, tokenizer.chat_template)
    examples = [ChatExample(r["messages"]) for r in SAMPLE_ROWS]
    tokenized, _ = tokenize_examples(examples, renderer, 64)
    return make_rows(tokenized, 128 if packing else 64, packing)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logits_loss_and_gradients_match_torch(family, request, tmp_path):
    """Same weights (base + one PEFT adapter) and the same rows: logits of a padded batch, the
    sft loss of packed and of padded rows, and every LoRA gradient agree with the torch engine."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hwft.data.batching import pad
    from hwft_mlx.adapters import load_peft_adapter, lora_modules
    from hwft_mlx.loading import load_model
    from hwft_mlx.objective import summed_cross_entropy
    from hwft_torch.losses import causal_lm_loss
    from hwft_torch.objective import to_tensors

    model_dir = request.getfixturevalue(f"tiny_{family}")
    adapter = fresh_adapter(model_dir, tmp_path / "adapter")
    torch_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter, is_trainable=True)
    mlx_model, _ = load_model(model_dir)
    load_peft_adapter(mlx_model, adapter)

    padded = rows_of(model_dir, packing=False)
    ids = pad(padded, 2)["input_ids"]
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids)).logits.numpy()
    real = np.array(pad(padded, 2)["attention_mask"], dtype=bool)
    assert np.abs(np.array(mlx_model(mx.array(ids)))[real] - expected[real]).max() < 1e-4

    for packing in (True, False):
        rows = rows_of(model_dir, packing)
        assert any(len(r.lengths) > 1 for r in rows) == packing
        labels = sum(r.num_labels for r in rows)
        torch_model.zero_grad()
        batch = to_tensors(rows, 2, "sdpa", torch.device("cpu"))
        target = batch.pop("labels")
        torch_loss = causal_lm_loss(torch_model(**batch, use_cache=False).logits, target, labels)
        torch_loss.backward()

        def loss(m, rows=rows, labels=labels):
            return summed_cross_entropy(m, rows, 2, True) / labels

        value, grads = nn.value_and_grad(mlx_model, loss)(mlx_model)
        assert value.item() == pytest.approx(torch_loss.item(), abs=1e-4)
        grads = dict(tree_flatten(grads))
        torch_grads = {n: p.grad for n, p in torch_model.named_parameters() if p.requires_grad}
        assert len(grads) == len(torch_grads) == 2 * len(list(lora_modules(mlx_model)))
        for path, _ in lora_modules(mlx_model):
            for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
                g = np.array(grads[f"{path}.{ours}"]).T
                t = torch_grads[f"base_model.model.{path}.{theirs}.default.weight"].numpy()
                assert np.abs(g - t).max() <= 1e-4 * max(np.abs(t).max(), 1e-6) + 1e-7, (path, ours)


def test_reward_head_reads_what_transformers_reads(tiny_llama):
    """The same weights and score head: MLX's reward of right-padded rows (the head on the last
    non-padding token's hidden state) equals transformers' LlamaForSequenceClassification's."""
    from transformers import AutoModelForSequenceClassification

    from hwft.data.batching import pad
    from hwft_mlx.heads import add_score_head
    from hwft_mlx.loading import load_model
    from hwft_mlx.rm import sequence_rewards

    torch.manual_seed(0)
    reference = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1).eval()
    reference.config.pad_token_id = 2
    model, _ = load_model(tiny_llama)
    add_score_head(model, seed=0)
    model.score.weight = mx.array(reference.score.weight.detach().numpy())
    rows = rows_of(tiny_llama, packing=False)
    ids = pad(rows, 2)["input_ids"]
    assert len({len(r.input_ids) for r in rows}) > 1, "rows of different lengths, so padding is read past"
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids), attention_mask=torch.tensor(pad(rows, 2)["attention_mask"]))
    got = np.array(sequence_rewards(model, ids, 2))
    assert np.abs(got - expected.logits.squeeze(-1).numpy()).max() < 1e-4


def test_mlx_losses_hold_to_the_torch_reference():
    """DPO (every variant), ORPO, SimPO, KTO, the reward model's, PPO's and GRPO (every
    aggregation, clipped, with KL) on the same numbers."""
    from hwft_mlx import losses as ours
    from hwft_torch import losses as reference

    rng = np.random.default_rng(0)
    c, r, rc, rr = (rng.normal(-20, 3, 6).astype(np.float32) for _ in range(4))
    nc, nr = rng.integers(3, 9, 6).astype(np.float32), rng.integers(3, 9, 6).astype(np.float32)
    for kind in ("sigmoid", "robust", "hinge", "ipo"):
        want = reference.dpo_loss(
            *(torch.tensor(x) for x in (c, r, rc, rr)), 0.3, kind, 0.1, torch.tensor(nc), torch.tensor(nr)
        )
        got = ours.dpo_loss(*(mx.array(x) for x in (c, r, rc, rr)), 0.3, kind, 0.1, mx.array(nc), mx.array(nr))
        for w, g in zip(want, got, strict=True):
            assert np.allclose(np.array(g), w.numpy(), atol=1e-5), kind
    # orpo and simpo take mean answer log-probabilities (negative, some near 0 for log1mexp's branch)
    mc, mr = -rng.exponential(1.0, 6).astype(np.float32), -rng.exponential(1.0, 6).astype(np.float32)
    mc[0] = -1e-3
    pairs = {
        "orpo": ((0.3,), ("losses", "nll", "log_odds", "chosen_rewards", "rejected_rewards")),
        "simpo": ((2.0, 0.5, 0.1), ("losses", "chosen_rewards", "rejected_rewards")),
    }
    for kind, (settings, keys) in pairs.items():
        want = getattr(reference, f"{kind}_loss")(torch.tensor(mc), torch.tensor(mr), *settings)
        got = getattr(ours, f"{kind}_loss")(mx.array(mc), mx.array(mr), *settings)
        assert set(got) == set(keys) == set(want), kind
        for key in keys:
            assert np.allclose(np.array(got[key]), want[key].numpy(), atol=1e-5), (kind, key)
    for margin, center in ((0.0, 0.0), (0.5, 0.01)):
        want = reference.reward_model_loss(torch.tensor(c), torch.tensor(r), margin, center)
        got = ours.reward_model_loss(mx.array(c), mx.array(r), margin, center)
        assert np.allclose(np.array(got), want.numpy(), atol=1e-4), ("rm", margin, center)
    # ppo: ratios and values on both sides of their clipping ranges
    lp, old_lp, v, old_v, ret, adv = (rng.normal(0, 0.5, (3, 5)).astype(np.float32) for _ in range(6))
    pmask = (rng.random((3, 5)) > 0.2).astype(np.float32)
    args = (lp, old_lp, v, old_v, ret, adv, pmask)
    want, wstats = reference.ppo_loss(*(torch.tensor(x) for x in args), 0.2, 0.3, 0.5, 11.0)
    got, gstats = ours.ppo_loss(*(mx.array(x) for x in args), 0.2, 0.3, 0.5, 11.0)
    assert got.item() == pytest.approx(want.item(), abs=1e-6)
    assert {k: round(float(x), 4) for k, x in gstats.items()} == {k: round(float(x), 4) for k, x in wstats.items()}
    # kto: a positive and a clamped (negative) KL baseline, both weights
    desirable = np.array([True, False, True, True, False, False])
    for shift in (2.0, -2.0):
        args = (c, rc, c + shift, rc)
        want = reference.kto_loss(*(torch.tensor(x) for x in args), torch.tensor(desirable), 0.3, 1.0, 1.33)
        got = ours.kto_loss(*(mx.array(x) for x in args), mx.array(desirable), 0.3, 1.0, 1.33)
        assert set(got) == set(want) == {"losses", "rewards", "kl"}
        for key in want:
            assert np.allclose(np.array(got[key]), want[key].numpy(), atol=1e-5), ("kto", shift, key)
    logps, old, ref = (rng.normal(-2, 0.3, (4, 5)).astype(np.float32) for _ in range(3))
    adv, mask = rng.normal(0, 1, 4).astype(np.float32), (rng.random((4, 5)) > 0.2).astype(np.float32)
    for kind in ("dapo", "grpo", "dr_grpo"):
        want, wstats = reference.grpo_loss(
            *(torch.tensor(x) for x in (logps, old, ref, adv, mask)), 0.04, 0.2, 0.28, kind == "grpo", 13.0
        )
        got, gstats = ours.grpo_loss(
            *(mx.array(x) for x in (logps, old, ref, adv, mask)), 0.04, 0.2, 0.28, kind == "grpo", 13.0
        )
        assert got.item() == pytest.approx(want.item(), abs=1e-6), kind
        assert {k: round(float(v), 4) for k, v in gstats.items()} == {k: round(float(v), 4) for k, v in wstats.items()}


# --------------------------------------------------------------------------------------------
# Parity with torch: one recipe, 20 steps; adapters that travel


@pytest.fixture(scope="module")
def both_engines(tiny_llama, tmp_path_factory):
    """The same recipe and seed on the torch cpu backend and on mlx: 20 AdamW steps (cosine
    schedule, 2 micro-batches of 2 packed rows per step, clipping) from one PEFT adapter."""
    from hwft.plugins import reset_host
    from hwft.recipe import load_recipe
    from hwft.train import plan_run, run

    root = tmp_path_factory.mktemp("both")
    start = fresh_adapter(tiny_llama, root / "start")
    jobs = {}
    for backend in ("cpu", "mlx"):
        (root / backend).mkdir()
        recipe = write_recipe(
            root / backend,
            {"name": str(tiny_llama), "adapter": str(start)},
            backend=backend,
            train={
                "lr": 5e-3,
                "max_steps": STEPS,
                "micro_batch_size": 2,
                "gradient_accumulation_steps": 2,
                "max_length": 64,
                "precision": "fp32",
                "seed": 7,
                "warmup_steps": 2,
            },
        )
        reset_host()
        jobs[backend] = run(plan_run(load_recipe(recipe)), quiet=True)
    return jobs


def test_loss_curves_match_torch_for_20_steps(both_engines):
    curves = {name: [m["loss"] for m in metrics(job.run_dir.path)] for name, job in both_engines.items()}
    print("step  torch-cpu  mlx  |difference|")
    for step, (a, b) in enumerate(zip(curves["cpu"], curves["mlx"], strict=True), 1):
        print(f"{step:4d}  {a:.6f}  {b:.6f}  {abs(a - b):.1e}")
    assert len(curves["mlx"]) == STEPS
    assert max(abs(a - b) for a, b in zip(curves["cpu"], curves["mlx"], strict=True)) < 1e-4
    for curve in curves.values():  # both learn: a run that does not must fail
        assert curve[-1] < curve[0] - 0.3, curve  # 0.47 measured; a stalled run moves 0.01
    # the very same sequences, in the same order
    assert [s["examples"] for s in both_engines["cpu"].steps] == [s["examples"] for s in both_engines["mlx"].steps]


IDS = [[1, 420, 3100, 57, 300, 12, 9, 2000, 31, 2]]


def test_an_mlx_adapter_loads_in_peft(both_engines, tiny_llama):
    """adapter/ from MLX is a PEFT adapter: peft.PeftModel.from_pretrained on torch reproduces the
    MLX model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = both_engines["mlx"].run_dir.adapter_dir
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter).eval()
    with torch.no_grad():
        torch_logits = peft(torch.tensor(IDS)).logits.numpy()
    mlx_model = both_engines["mlx"].results.model
    mlx_model.eval()
    assert np.abs(np.array(mlx_model(mx.array(IDS))) - torch_logits).max() < 1e-4
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        assert np.abs(base(torch.tensor(IDS)).logits.numpy() - torch_logits).max() > 1e-2  # it did learn


def test_a_peft_adapter_loads_in_mlx(both_engines, tiny_llama):
    """adapter/ from the torch engine (peft) loads into the MLX backend with the same logits."""
    from hwft_mlx.adapters import load_peft_adapter
    from hwft_mlx.loading import load_model

    torch_model = both_engines["cpu"].results.model.eval()
    with torch.no_grad():
        torch_logits = torch_model(torch.tensor(IDS)).logits.numpy()
    mlx_model, _ = load_model(tiny_llama)
    load_peft_adapter(mlx_model, both_engines["cpu"].run_dir.adapter_dir)
    assert np.abs(np.array(mlx_model(mx.array(IDS))) - torch_logits).max() < 1e-4


def test_a_full_mlx_model_loads_in_transformers(tiny_qwen2, tmp_path, cli):
    """model/ from full tuning on MLX is HF safetensors: transformers loads it and gives the
    logits MLX gives for it; and it moved away from the base."""
    from transformers import AutoModelForCausalLM

    from hwft_mlx.loading import load_model

    recipe = cell_recipe(tmp_path, tiny_qwen2, "sft", "full", backend="mlx", train={"max_steps": 2})
    code, _, err = cli("train", recipe)
    assert code == 0, err
    saved = tmp_path / "out" / "model"
    with torch.no_grad():
        torch_logits = AutoModelForCausalLM.from_pretrained(saved)(torch.tensor(IDS)).logits.numpy()
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_qwen2)(torch.tensor(IDS)).logits.numpy()
    mlx_model, _ = load_model(saved)
    assert np.abs(np.array(mlx_model(mx.array(IDS))) - torch_logits).max() < 1e-4
    assert np.abs(base_logits - torch_logits).max() > 1e-2


# --------------------------------------------------------------------------------------------
# Refusals


def test_dora_is_refused_before_any_weight_loads(tiny_llama, tmp_path, cli):
    recipe = write_recipe(tmp_path, tiny_llama, backend="mlx", method={"lora": {"dora": True}})
    code, _, err = cli("train", recipe)
    assert code == 2 and "method.lora.dora: the MLX backend has no DoRA" in err, err
    assert not (tmp_path / "out").exists()


def test_adapters_the_mlx_backend_cannot_reproduce_are_refused(tiny_llama, tmp_path):
    """A DoRA adapter, and an adapter whose weights are only pickled (adapter_model.bin)."""
    from hwft.errors import ModelError
    from hwft_mlx.adapters import load_peft_adapter
    from hwft_mlx.loading import load_model

    adapter = fresh_adapter(tiny_llama, tmp_path / "a")
    model, _ = load_model(tiny_llama)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ModelError, match="uses use_dora, which the MLX backend does not load"):
        load_peft_adapter(model, adapter)
    pickled = tmp_path / "b"
    shutil.copytree(adapter, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(ModelError, match="never reads pickled adapter_model.bin"):
        load_peft_adapter(model, pickled)
