"""Every model family hwft's tables name, on both engines: a 2-layer, 64-wide model of each
(hwft.testing.tiny.tiny_families), random weights.

- MLX reads each family's transformers-5 config as transformers does (the keys hwft translates,
  and the logits);
- packed rows keep their examples apart on torch (sdpa, eager, hwft's per-example sdpa) and on
  MLX (mlx-lm's own forward with hwft's segment mask), sliding windows included;
- a family outside the MLX table packs after its load-time proof, or is refused in one line;
- the family matrix: sft on packed rows with LoRA, dpo with LoRA and sft with full tuning, from
  one recipe on the ``cpu`` and ``mlx`` backends, give the same losses step by step, and what
  they trained exports (peft, hf, mlx) with the trained model's logits;
- GGUF: each family's export read back through transformers' own GGUF loader, or hwft's
  inverse of its writer where transformers reads no such file.

Tolerances: fp32 throughout. Logits of one model on two engines differ by float rounding
(measured at most 7e-7 of the largest logit; allowed 1e-5). Losses over 3 AdamW steps from one
start (LoRA runs start from one PEFT adapter, since the engines draw different A matrices):
measured at most 1e-5 apart, allowed 1e-4, because Adam divides each gradient entry by its own
size and so carries rounding of the gradients into the weights at full size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hwft.testing.cells import cell_recipe, metrics
from hwft.testing.tiny import build_tiny_model, fresh_adapter, moe_families, tiny_families

mx = pytest.importorskip("mlx.core")

FAMILIES = list(tiny_families())  #: the families whose torch records give a tiny config
MOE_FAMILIES = moe_families()

LOGITS = 1e-5  #: max |MLX - torch| / max |logit|, one model
LOSSES = 1e-4  #: |MLX - torch| per step, 3 steps from one start
GRAD_NORM = 1e-3  #: relative, the first step's gradient norm
#: The least top-k router margin the MoE tests accept: the gap between the k-th and the
#: (k+1)-th expert's score, in the router's own units; rounding between the engines is ~1e-7.
ROUTER_MARGIN = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    """{family: folder}, each built once, on first use."""
    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def get(family: str, **config) -> Path:
        key = family + "".join(f"-{k}{v}" for k, v in sorted(config.items()))
        if key not in built:
            built[key] = build_tiny_model(family, root / key, tokenizer_dir, **config)
        return built[key]

    return get


def random_ids(length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 4000, length)


def torch_model(folder: Path, attention: str | None = None):
    from transformers import AutoModelForCausalLM

    from hwft_torch.modeling import family_attention, model_type_of

    needed = family_attention(model_type_of(folder))
    name = attention or (needed[0] if needed else "sdpa")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=name).eval()


# --------------------------------------------------------------------------------------------
# MLX reads each family's config as transformers wrote it


#: What hwft's translation must put where mlx-lm reads it (hwft_mlx.families).
TRANSLATED = {
    "qwen3_moe": {"num_experts": 4},
    "glm4": {"partial_rotary_factor": 0.5, "rope_theta": 10000.0},
    "gemma3_text": {"rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 2},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_reads_the_family_as_transformers_does(family, models):
    from hwft_mlx.loading import config_overrides, load_model

    folder = models(family)
    config = json.loads((folder / "config.json").read_text())
    overrides = config_overrides(config)
    for key, value in TRANSLATED.get(family, {}).items():
        assert overrides.get(key) == value, (key, overrides)
    ids = random_ids(20)[None]  # longer than Gemma 3's sliding window of 8
    with torch.no_grad():
        expected = torch_model(folder)(torch.tensor(ids)).logits.numpy()
    model, _ = load_model(folder)
    got = np.array(model(mx.array(ids)))
    assert np.abs(got - expected).max() / np.abs(expected).max() < LOGITS


def test_a_gemma3_config_without_a_repeating_pattern_is_refused(models):
    from hwft.errors import ModelError
    from hwft_mlx.families import gemma3_text_config

    with pytest.raises(ModelError, match="repeats one sliding/full pattern"):
        gemma3_text_config({"layer_types": ["sliding_attention", "full_attention", "full_attention"]})
    with pytest.raises(ModelError, match="needs a full-attention layer"):
        gemma3_text_config({"layer_types": ["sliding_attention"] * 2})


# --------------------------------------------------------------------------------------------
# Packed rows


def packed_rows():
    """Two rows packing 3 and 2 examples of 6 to 20 tokens (longer than an 8-token window)."""
    from hwft.data.batching import make_rows
    from hwft.data.chat import IGNORE_INDEX, Tokenized

    sequences = [random_ids(n, seed).tolist() for seed, n in enumerate((13, 11, 6, 20, 9))]
    rows = make_rows([Tokenized(s, [IGNORE_INDEX] + s[1:]) for s in sequences], 40, packing=True)
    assert [r.lengths for r in rows] == [[20, 13, 6], [11, 9]]
    return rows


def examples_of(rows):
    for b, row in enumerate(rows):
        start = 0
        for n in row.lengths:
            yield b, start, row.input_ids[start : start + n]
            start += n


#: Mistral with an 8-token sliding window (Mistral v0.1's kind), Gemma 3's own window of 8.
WINDOWED = {"mistral": {"sliding_window": 8}}


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_keep_examples_apart_on_torch(family, models):
    """Every attention path hwft trains with, sliding windows kept inside packed rows."""
    from hwft_torch.objective import to_tensors
    from hwft_torch.packed_attention import register

    folder = models(family, **WINDOWED.get(family, {}))
    rows = packed_rows()
    paths = ["eager"] if family == "gemma2" else ["sdpa", "eager", register()]
    for attention in paths:
        model = torch_model(folder, attention)
        batch = to_tensors(rows, 2, attention, torch.device("cpu"))
        batch.pop("labels")
        with torch.no_grad():
            packed = model(**batch, use_cache=False).logits
            for b, start, ids in examples_of(rows):
                alone = model(torch.tensor([ids])).logits[0]
                torch.testing.assert_close(
                    packed[b, start : start + len(ids)], alone, atol=1e-5, rtol=0, msg=f"{family} {attention}"
                )


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_keep_examples_apart_on_mlx(family, models):
    """mlx-lm's own forward with hwft's segment mask (hwft_mlx.packing), and the load-time proof."""
    from hwft_mlx.forward import mask_dims, output_logits, packing_problem
    from hwft_mlx.loading import load_model
    from hwft_mlx.objective import packed_segments
    from hwft_mlx.packing import prove, row_logits

    model, _ = load_model(models(family))
    assert packing_problem(model) is None
    assert prove(model, output_logits, 4096, mask_dims(model)) is None  # what a family outside the table passes
    rows = packed_rows()
    width = max(len(r.input_ids) for r in rows)
    ids = mx.array([r.input_ids + [2] * (width - len(r.input_ids)) for r in rows])
    packed = np.array(row_logits(model, ids, packed_segments(rows, width), output_logits, mask_dims(model)))
    for b, start, example in examples_of(rows):
        alone = np.array(model(mx.array([example])))[0]
        got = packed[b, start : start + len(example)]
        assert np.abs(got - alone).max() / np.abs(alone).max() < LOGITS, family


def write_mlx_recipe(folder: Path, model: Path, **train) -> Path:
    return cell_recipe(
        folder,
        model,
        "sft",
        "lora",
        backend="mlx",
        train={"max_steps": 2, **train},
        data={"train": [{"path": "data.jsonl"}], "packing": True},
        eval={"prompts": []},
    )


def test_a_family_outside_the_mlx_table_packs_after_its_proof(tmp_path, tokenizer_dir, cli):
    """Starcoder2 (rotary, not in the table) packs once its proof passes; Cohere, whose own call
    scales the logits (logit_scale) where hwft's forward does not, is refused in one line."""
    from hwft.testing.tiny import COMMON

    for family, packs in (("starcoder2", True), ("cohere", False)):
        folder = tmp_path / family
        build_tiny_model_of(family, folder, tokenizer_dir, **COMMON)
        (tmp_path / f"run-{family}").mkdir()
        code, _, err = cli("train", write_mlx_recipe(tmp_path / f"run-{family}", folder))
        if packs:
            assert code == 0, err
            assert "its packed forward matched its own on two examples, so rows pack" in err
        else:
            assert code == 2, err
            assert "data.packing: mlx-lm's cohere cannot pack rows here: a packed example's logits differ" in err
            assert "set data.packing: false" in err and "Traceback" not in err


def build_tiny_model_of(family: str, out: Path, tokenizer_dir: Path, **config) -> Path:
    """A tiny model of a family hwft.testing.tiny does not list (transformers' own config)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from hwft.testing.tiny import TOKENIZER_FILES, truncated_tokenizer

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **config)).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)
    whole = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    (out / "tokenizer.json").write_text(json.dumps(truncated_tokenizer(whole, 4096)), encoding="utf-8")
    return out


@pytest.mark.parametrize("family, config", [("mistral", {"sliding_window": 8}), ("gemma2", {"sliding_window": 16})])
def test_rows_longer_than_a_window_mlx_does_not_apply_are_refused(family, config, models, tmp_path, cli):
    code, _, err = cli("train", write_mlx_recipe(tmp_path, models(family, **config)))
    assert code == 2, err
    window = config["sliding_window"]
    assert (
        f"train.max_length: 64 is longer than {family}'s sliding window ({window} tokens), which mlx-lm's " in err
        and f"Set train.max_length: {window} or less, or train on torch" in err
    )
    assert not (tmp_path / "out").exists()


def test_gemma2_trains_with_eager_attention_on_torch_and_says_so(models, tmp_path, cli):
    recipe = cell_recipe(tmp_path, models("gemma2"), "sft", "lora", train={"max_steps": 1}, eval={"prompts": []})
    code, _, err = cli("train", recipe)
    assert code == 0, err
    assert "attention: eager, not sdpa (Gemma 2 soft-caps its attention scores, which sdpa cannot)" in err


# --------------------------------------------------------------------------------------------
# The family matrix: one recipe, both engines, the same losses


def router_margins(folder: Path, ids: list[int]) -> float:
    """The least gap, over tokens and MoE layers, between the k-th and (k+1)-th expert's routing
    score of the torch model (softmax-ordered logits; DeepSeek-V3: sigmoid plus its bias)."""
    model = torch_model(folder)
    k = model.config.num_experts_per_tok
    gaps = []

    def hook(module, args, _output):
        logits = args[0].reshape(-1, args[0].shape[-1]).float() @ module.weight.float().T
        if hasattr(module, "e_score_correction_bias"):
            logits = logits.sigmoid() + module.e_score_correction_bias
        top = logits.topk(k + 1, dim=-1).values
        gaps.append(float((top[:, k - 1] - top[:, k]).min()))

    routers = [m for n, m in model.named_modules() if type(m).__name__.endswith(("TopKRouter", "TopkRouter"))]
    assert routers, "no router found"
    handles = [r.register_forward_hook(hook) for r in routers]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    return min(gaps)


def cell_token_ids(folder: Path) -> list[int]:
    """Every token the sft and dpo cells train on, end to end."""
    from transformers import AutoTokenizer

    from hwft.testing.cells import CHATS, PAIRS

    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in CHATS]
    texts += [json.dumps(p) for p in PAIRS]
    return [t for text in texts for t in tokenizer(text)["input_ids"]][:2048]


#: LoRA targets: all-linear, as PEFT reads it, in every family: MoE experts and routers
#: (hwft_mlx.moe_lora) and DeepSeek's kv_b_proj, which mlx-lm holds as two per-head layers.
LORA_TARGETS: dict[str, list[str]] = {}
CELLS = (("sft", "lora"), ("dpo", "lora"), ("sft", "full"))


@pytest.mark.parametrize("family", FAMILIES)
def test_both_engines_train_the_family_alike(family, models, tmp_path, cli):
    folder = models(family)
    if family in MOE_FAMILIES:
        margin = router_margins(folder, cell_token_ids(folder))
        assert margin > ROUTER_MARGIN, f"routing near a tie ({margin:.1e}): pick another seed"
    start = fresh_adapter(folder, tmp_path / "start", target_modules=LORA_TARGETS.get(family, "all-linear"))
    if family in MOE_FAMILIES:  # PEFT's all-linear: the experts and routers too
        assert json.loads((start / "adapter_config.json").read_text())["target_parameters"]
    for objective, tuning in CELLS:
        runs = {}
        for backend in ("cpu", "mlx"):
            where = tmp_path / f"{objective}-{tuning}-{backend}"
            where.mkdir()
            model = {"name": str(folder), "adapter": str(start)} if tuning == "lora" else folder
            recipe = cell_recipe(
                where,
                model,
                objective,
                tuning,
                backend=backend,
                train={"max_steps": 3},
                data={"train": [{"path": "data.jsonl"}], "packing": objective == "sft"},
                eval={"prompts": []},
            )
            code, _, err = cli("train", recipe)
            assert code == 0, f"{family} {objective}/{tuning} on {backend}: {err[-2000:]}"
            runs[backend] = metrics(where / "out")
        cpu, mlx = ([m["loss"] for m in runs[b]] for b in ("cpu", "mlx"))
        what = f"{family} {objective}/{tuning}: cpu {cpu}, mlx {mlx}"
        assert max(abs(a - b) for a, b in zip(cpu, mlx, strict=True)) < LOSSES, what
        assert cpu[-1] < cpu[0], what
        first = runs["cpu"][0]["grad_norm"], runs["mlx"][0]["grad_norm"]
        assert abs(first[0] - first[1]) < GRAD_NORM * first[0], (what, first)
        if family in ("qwen3_moe", "mixtral"):  # router_aux_loss_coef: in sft's and dpo's loss, logged
            aux = [[m["aux_loss"] for m in runs[b]] for b in ("cpu", "mlx")]
            assert max(abs(a - b) for a, b in zip(*aux, strict=True)) < LOSSES, (what, aux)
            assert all(2.0 - 1e-3 < a < 4.0 for a in aux[0]), aux  # k (=2) when balanced, E * k at most
    # what each engine trained exports, and reloads with the trained model's logits
    for backend, to in (("cpu", "peft"), ("cpu", "hf"), ("mlx", "mlx")):
        out = tmp_path / f"export-{backend}-{to}"
        code, stdout, err = cli(
            "export", tmp_path / f"sft-lora-{backend}" / "out", "--to", to, "--out", out, "--verify"
        )
        assert code == 0 and json.loads(stdout)["ok"], f"{family} {backend} --to {to}: {err[-1500:]}"


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_adapters_travel_between_peft_and_mlx(family, models, tmp_path):
    """LoRA on the experts and the router (PEFT's target_parameters; hwft_mlx.moe_lora), both
    ways: a PEFT adapter put on the MLX model, and one made on MLX loaded by PEFT, give the
    same logits as the other engine (and not the base model's)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hwft.recipe import LoraSpec
    from hwft_mlx.adapters import add_lora, load_peft_adapter, save_peft_adapter
    from hwft_mlx.loading import load_model

    folder = models(family)
    targets = LORA_TARGETS.get(family, "all-linear")
    ids = random_ids(24)[None]
    with torch.no_grad():
        base = torch_model(folder)(torch.tensor(ids)).logits.numpy()

    def peft_logits(adapter):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), adapter).eval()
        with torch.no_grad():
            return model(torch.tensor(ids)).logits.numpy()

    def close(a, b):
        return np.abs(a - b).max() / np.abs(b).max()

    start = fresh_adapter(folder, tmp_path / "peft", target_modules=targets)
    mlx_model, _ = load_model(folder)
    load_peft_adapter(mlx_model, start)
    assert close(np.array(mlx_model(mx.array(ids))), peft_logits(start)) < LOGITS
    mlx_model, _ = load_model(folder)  # all-linear everywhere: what MLX adapts, PEFT loads
    add_lora(mlx_model, LoraSpec(r=8, alpha=16, dropout=0.0, target_modules="all-linear"), seed=0)
    for _, module in mlx_model.named_modules():  # B drawn non-zero, so the adapter does something
        for key in ("lora_b", "gate_up_b", "down_b"):
            if key in module:
                module[key] = mx.random.normal(module[key].shape) * 0.02
    save_peft_adapter(mlx_model, tmp_path / "mlx", LoraSpec(r=8, alpha=16), str(folder))
    theirs = peft_logits(tmp_path / "mlx")
    assert close(np.array(mlx_model(mx.array(ids))), theirs) < LOGITS
    assert close(theirs, base) > 1e-2
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["gate.weight", "gate_up_proj", "down_proj"]
    assert not {"gate_proj", "up_proj", "down_proj"} & set(config["target_modules"])  # as PEFT's all-linear


@pytest.mark.parametrize("objective", ["orpo", "simpo", "kto"])
def test_the_router_term_is_in_every_preference_loss_alike(objective, models, tmp_path, cli):
    """Qwen3-MoE (router_aux_loss_coef 0.01): orpo, simpo and kto add the router's
    load-balancing term of the policy's forward on both engines, with the same aux_loss."""
    folder = models("qwen3_moe")
    start = fresh_adapter(folder, tmp_path / "start")
    runs = {}
    for backend in ("cpu", "mlx"):
        where = tmp_path / backend
        where.mkdir()
        recipe = cell_recipe(
            where,
            {"name": str(folder), "adapter": str(start)},
            objective,
            "lora",
            backend=backend,
            train={"max_steps": 2},
            eval={"prompts": []},
        )
        code, _, err = cli("train", recipe)
        assert code == 0, err
        assert f"moe: router load-balancing loss in the {objective} loss" in err
        runs[backend] = metrics(where / "out")
    for key in ("loss", "aux_loss"):
        cpu, mlx = ([m[key] for m in runs[b]] for b in ("cpu", "mlx"))
        assert max(abs(a - b) for a, b in zip(cpu, mlx, strict=True)) < LOSSES, (key, cpu, mlx)


def test_moe_experts_run_as_one_grouped_matmul_on_torch(models):
    """The MoE families load with transformers' grouped_mm experts (no loop over the experts in
    Python), with the logits and gradients of its default loop."""
    from transformers import AutoModelForCausalLM

    from hwft_torch.modeling import experts_implementation

    ids = torch.tensor(random_ids(32)[None])
    for family in MOE_FAMILIES:
        chosen = experts_implementation(family)
        assert chosen == {"experts_implementation": "grouped_mm"}, family
        runs = []
        for kwargs in ({"experts_implementation": "eager"}, chosen):
            model = AutoModelForCausalLM.from_pretrained(models(family), dtype=torch.float32, **kwargs)
            logits = model(ids, use_cache=False).logits
            logits.logsumexp(-1).mean().backward()
            runs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
        torch.testing.assert_close(runs[1][0], runs[0][0], atol=1e-5, rtol=0, msg=family)
        for name, grad in runs[0][1].items():
            torch.testing.assert_close(runs[1][1][name], grad, atol=1e-5, rtol=1e-4, msg=f"{family} {name}")


def test_the_mlx_router_loss_equals_transformers():
    """hwft_mlx.losses.load_balancing_loss against transformers' load_balancing_loss_func (the
    one Mixtral and Qwen3-MoE train with), padding masked, on random logits of 3 layers."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from hwft_mlx.losses import load_balancing_loss

    rng = np.random.default_rng(0)
    logits = [rng.normal(0, 1, (2 * 7, 8)).astype(np.float32) for _ in range(3)]
    mask = (np.arange(7)[None] < np.array([[7], [4]])).astype(np.int64)
    for k in (1, 2):
        want = load_balancing_loss_func(tuple(torch.tensor(x) for x in logits), 8, k, torch.tensor(mask))
        got = load_balancing_loss([mx.array(x.reshape(2, 7, 8)) for x in logits], 8, k, mx.array(mask))
        assert got.item() == pytest.approx(want.item(), abs=1e-6)


# --------------------------------------------------------------------------------------------
# GGUF, read back through transformers' own GGUF loader (or hwft's inverse of its writer)

#: transformers' GGUF loader reads some of each architecture's keys and takes its config
#: class's defaults for the rest. These give the tiny models the values every released
#: checkpoint of the family has, so that the defaults hold: Qwen3's head size 128 (and
#: Qwen3-MoE's expert width 768), Gemma's head size 256 with the query scale it implies, Gemma
#: 3's layer pattern (every 6th layer full; llama.cpp's too) with a window longer than the rows.
GGUF_SHAPES = {
    "smollm3": {"no_rope_layers": [1, 1]},  # llama.cpp's pattern: rotary on all but every 4th layer
    "qwen3": {"head_dim": 128},
    "qwen3_moe": {"head_dim": 128, "moe_intermediate_size": 768},
    "gemma2": {"head_dim": 256, "query_pre_attn_scalar": 256},
    "gemma3_text": {"head_dim": 256, "query_pre_attn_scalar": 256, "layer_types": None, "sliding_window": 512},
}
#: q8_0 moves a random tiny MoE's hidden states enough to flip its near-tie routing (measured
#: 6.8e-2 of the largest logit against the 5e-2 allowed); its f16 export holds to 5e-4.
GGUF_TYPES = {"qwen3_moe": ("f16",)}


#: Families transformers' GGUF loader does not read: --verify reads them with hwft's inverse of
#: its writer (hwft_torch.gguf_readback) and says so.
HWFT_READBACK = ["mixtral", "olmo2", "granite", "glm4", "smollm3", "deepseek_v3"]


@pytest.mark.parametrize("family", ["mistral", "qwen3", "qwen3_moe", "phi3", "gemma2", "gemma3_text", *HWFT_READBACK])
def test_gguf_export_reads_back(family, models, tmp_path, cli, capsys):
    from gguf import GGUFReader

    folder = models(family, **GGUF_SHAPES.get(family, {}))
    capsys.readouterr()  # what building the model printed
    for gguf_type in GGUF_TYPES.get(family, ("f16", "q8_0")):
        out = tmp_path / f"{family}-{gguf_type}.gguf"
        code, stdout, err = cli("export", folder, "--to", "gguf", "--gguf-type", gguf_type, "--out", out, "--verify")
        assert code == 0, err
        report = json.loads(stdout)
        assert report["ok"] and report["argmax_agreement"] >= 0.9, report
        assert ("with hwft's inverse of its writer" in err) == (family in HWFT_READBACK), err
    fields = GGUFReader(str(out)).fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    assert arch == {
        "mistral": "llama",
        "mixtral": "llama",
        "qwen3_moe": "qwen3moe",
        "gemma3_text": "gemma3",
        "deepseek_v3": "deepseek2",
    }.get(family, family)
    if family == "granite":
        assert float(fields["granite.logit_scale"].parts[-1][0]) == 4.0
        assert float(fields["granite.attention.scale"].parts[-1][0]) == 0.25
    if family == "mixtral":
        assert int(fields["llama.expert_count"].parts[-1][0]) == 4
    if family == "deepseek_v3":  # MLA as llama.cpp's deepseek2 reads it: MQA over the latent, kv_b split
        assert arch == "deepseek2" and int(fields["deepseek2.attention.head_count_kv"].parts[-1][0]) == 1
        assert int(fields["deepseek2.attention.key_length"].parts[-1][0]) == 16 + 8
        tensors = {t.name: tuple(int(d) for d in t.shape) for t in GGUFReader(str(out)).tensors}
        assert "blk.1.attn_kv_b.weight" not in tensors and "blk.1.exp_probs_b.bias" in tensors
        assert tensors["blk.1.attn_k_b.weight"] == (8, 16, 4)  # GGML order: nope, latent, heads
    if family == "qwen3_moe":
        assert int(fields["qwen3moe.expert_count"].parts[-1][0]) == 4
        assert "blk.0.ffn_gate_exps.weight" in {t.name for t in GGUFReader(str(out)).tensors}
    if family == "gemma2":
        assert float(fields["gemma2.final_logit_softcapping"].parts[-1][0]) == 30.0


def test_gguf_refuses_layer_patterns_llama_cpp_does_not_run(models, tmp_path, cli):
    code, _, err = cli("export", models("gemma3_text"), "--to", "gguf", "--out", tmp_path / "g.gguf")
    assert code == 2 and "llama.cpp's gemma3 makes every 6th layer full attention" in err, err
    code, _, err = cli("export", models("smollm3"), "--to", "gguf", "--out", tmp_path / "s.gguf")
    assert code == 2 and "llama.cpp's smollm3 skips rotary embeddings on every 4th layer" in err, err


# --------------------------------------------------------------------------------------------
# Fast paths, from the family table, each with its logits on and off


def torch_families_with(path: str) -> list[str]:
    from hwft.plugins import get_host

    return [f for f in FAMILIES if get_host().families().lookup("torch", f).has(path)]


@pytest.mark.parametrize("family", torch_families_with("fused_projections"))
def test_fused_projections_give_peft_s_logits_and_gradients_in_every_family(family, models):
    """kernels.fused_projections (hwft_torch.fused_projections) on each family that has the path."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hwft_torch.compiling import decoder_layers
    from hwft_torch.fused_projections import fuse_sibling_projections

    folder = models(family)  # built before the seed below, which both copies then start from

    def lora():
        torch.manual_seed(0)  # the same random adapter (B not zero) in both copies
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager" if family == "gemma2" else "sdpa"
        )
        return get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        )

    plain, fused = lora(), lora()
    groups = fuse_sibling_projections(decoder_layers(fused))
    assert groups >= 2, f"{family}: {groups} sibling groups fused"  # q/k/v in each of the 2 layers at least
    ids = torch.tensor(random_ids(16)[None])
    out = {}
    for label, model in (("plain", plain), ("fused", fused)):
        logits = model(input_ids=ids, use_cache=False).logits
        logits.logsumexp(-1).mean().backward()
        out[label] = logits
    torch.testing.assert_close(out["fused"], out["plain"], atol=1e-5, rtol=0)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, p in fused.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.cuda
@pytest.mark.parametrize("family", torch_families_with("liger"))
def test_liger_gives_the_same_logits_in_every_family(family, models):
    """Liger's apply_liger_kernel_to_<family> (hwft_torch.liger) on an NVIDIA GPU: logits with it
    on and off, in fp32 (Triton's kernels round differently from torch's: 1e-4 of the largest)."""
    import liger_kernel.transformers as lk

    from hwft.plugins import get_host

    target = get_host().families().lookup("torch", family).options["liger"]
    ids = torch.tensor(random_ids(32)[None], device="cuda")
    with torch.no_grad():
        off = torch_model(models(family)).cuda()(ids).logits
        model = torch_model(models(family)).cuda()
        getattr(lk, f"apply_liger_kernel_to_{target}")(
            model=model, cross_entropy=False, fused_linear_cross_entropy=False
        )
        on = model(ids).logits
    assert (on - off).abs().max() / off.abs().max() < 1e-4


def test_who_runs_what_is_the_table_in_the_docs():
    from hwft.families import who_runs_what
    from hwft.plugins import get_host
    from tests.conftest import REPO

    assert who_runs_what(get_host().families()) in (REPO / "docs" / "families.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("backend", ["cpu", "mlx"])
def test_the_moe_recipe_runs_as_written(backend, models, tmp_path, cli):
    """configs/moe.yaml on the tiny Qwen3-MoE, as its first line says (model.name=...), 2 steps:
    the router term logged, the experts and router in the saved PEFT adapter."""
    from tests.conftest import REPO

    code, _, err = cli(
        "train",
        REPO / "configs" / "moe.yaml",
        f"model.name={models('qwen3_moe')}",
        f"backend={backend}",
        "train.max_steps=2",
        f"output.dir={tmp_path / 'out'}",
        "eval.prompts=[]",
    )
    assert code == 0, err
    assert "moe: router load-balancing loss in the sft loss" in err
    assert all("aux_loss" in m for m in metrics(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert set(config["target_parameters"]) == {"gate.weight", "gate_up_proj", "down_proj"}


def test_a_glm4_with_tied_embeddings_trains_on_mlx_as_on_torch(tmp_path, tokenizer_dir, cli):
    """GLM-4 with tie_word_embeddings (no lm_head.weight in the folder): mlx-lm's glm4 module
    has an output layer of its own and refused the folder with a weight's bare name; hwft reads
    the embeddings there (hwft_mlx.loading.TiedHead), one matrix trained once, as transformers
    ties them. LoRA from one start and full tuning: the same losses on both engines, 3 steps."""
    folder = build_tiny_model("glm4", tmp_path / "glm4", tokenizer_dir, tie_word_embeddings=True)
    start = fresh_adapter(folder, tmp_path / "start")
    for tuning in ("lora", "full"):
        runs = {}
        for backend in ("cpu", "mlx"):
            where = tmp_path / f"{tuning}-{backend}"
            where.mkdir()
            model = {"name": str(folder), "adapter": str(start)} if tuning == "lora" else folder
            recipe = cell_recipe(
                where, model, "sft", tuning, backend=backend, train={"max_steps": 3}, eval={"prompts": []}
            )
            code, _, err = cli("train", recipe)
            assert code == 0, f"glm4 tied {tuning} on {backend}: {err[-2000:]}"
            runs[backend] = [m["loss"] for m in metrics(where / "out")]
        assert max(abs(a - b) for a, b in zip(runs["cpu"], runs["mlx"], strict=True)) < LOSSES, (tuning, runs)
