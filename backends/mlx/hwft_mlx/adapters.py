# mlx's nn.Module.__getattr__ has no return annotation, so pyright reads each child module
# (``model.args``, ``glu.gate_proj``) as possibly None:
# pyright: reportOptionalMemberAccess=false, reportOptionalCall=false
"""What trains on MLX and how adapters travel: LoRA, QLoRA and freeze tuning, the reference
policy with the adapters off, and PEFT adapters both ways.

LoRA follows PEFT's convention on both engines: ``y = W x + s * B A dropout(x)`` with
``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``), ``A`` uniform in ``±1/sqrt(in)`` (PEFT's
kaiming-uniform with a = sqrt(5)), ``B`` zero. mlx-lm's ``LoRALinear`` computes exactly that when
given the scale (its own default of 20 is not used); it stores ``A`` and ``B`` transposed, which
saving and loading undo, so an adapter written here is a PEFT adapter and a PEFT adapter loads
here.

QLoRA quantises the frozen base's linear layers with MLX's affine quantisation (group size 64,
4 or 8 bits; there is no NF4 in MLX) and trains LoRA on top. As on torch, the adapter saved is a
plain PEFT adapter whose base is the unquantised model folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from hwft import lora_targets
from hwft.errors import ModelError
from hwft.recipe import LoraSpec
from hwft_mlx import vision
from hwft_mlx.arrays import load_arrays
from hwft_mlx.forward import family
from hwft_mlx.heads import SCORE_MODULES
from hwft_mlx.loading import refresh_router
from hwft_mlx.media import is_vision
from hwft_mlx.moe_lora import (
    MLP_NAMES,
    LoRAEmbedQ,
    LoRAGate,
    LoRASwitchGLU,
    LoRAUnembedOut,
    expert_modules,
    from_peft,
    is_router_gate,
    is_switch_glu,
    mla_attentions,
    mla_from_peft,
    mla_to_peft,
    to_peft,
    wrap_experts,
    wrap_mla,
    wrap_routers,
)

#: PEFT's key prefix for a causal LM's adapter weights.
PEFT_PREFIX = "base_model.model."
#: Group size of MLX's affine quantisation for qlora.
QUANT_GROUP = 64


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def linear_layers(model: nn.Module, targets: str | list[str]) -> list[tuple[str, nn.Module]]:
    """(path, module) of the linear layers LoRA adapts, as :mod:`hwft.lora_targets` reads
    ``targets`` (every Linear but the output layer for all-linear, as PEFT's); an entry that
    names none is refused, naming the model's linear modules."""
    parts = is_vision(model)  # a vision-language model: the layers of the parts method.vision trains
    linear = [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.QuantizedLinear)
        and path != "lm_head"
        and (not parts or vision.adapted(model, path))
    ]
    mla = [f"{path}.kv_b_proj" for path, _ in mla_attentions(model)]  # PEFT's name for DeepSeek's two halves
    lora_targets.check(targets, [path for path, _ in linear] + mla)
    return [(path, module) for path, module in linear if lora_targets.matches(targets, path)]


def add_lora(model: nn.Module, spec: LoraSpec, seed: int) -> list[str]:
    """Freeze the model and wrap the targeted layers in LoRA (A random from ``seed``, B zero);
    returns the wrapped paths."""
    from mlx_lm.tuner.lora import LoRALinear

    model.freeze()
    layers = linear_layers(model, spec.target_modules)
    moe = spec.target_modules == "all-linear" and any(is_switch_glu(m) for _, m in model.named_modules())
    if moe:  # as PEFT's all-linear on an MoE model: no dense or shared-expert MLP Linears
        layers = [(path, m) for path, m in layers if path.rsplit(".", 1)[-1] not in MLP_NAMES]
    mx.random.seed(seed)
    scale = lora_scale(spec.alpha, spec.r, spec.rslora)
    model.update_modules(
        tree_unflatten(
            [
                # Linear or QuantizedLinear (QLoRA), both of which from_base wraps
                (path, LoRALinear.from_base(m, r=spec.r, dropout=spec.dropout, scale=scale))  # pyright: ignore[reportArgumentType]
                for path, m in layers
            ]
        )
    )
    experts = []
    if moe:  # as PEFT's all-linear: the experts and routers of MoE layers too
        experts = wrap_experts(model, spec.r, scale, spec.dropout)
        router = family(model).options.get("router")
        experts += wrap_routers(model, router, spec.r, scale) if router else []
    if spec.target_modules == "all-linear" or "kv_b_proj" in spec.target_modules:  # DeepSeek's MLA, as PEFT's
        experts += wrap_mla(model, spec.r, scale)
    refresh_router(model)
    return [path for path, _ in layers] + experts


def quantize_base(model: nn.Module, bits: int) -> int:
    """Quantise the linear layers (not embeddings or the output layer) in place; returns how
    many. Layers whose input size is not a multiple of the group size stay as they are."""
    count = 0

    def pick(path: str, module: nn.Module) -> bool:
        nonlocal count
        ok = isinstance(module, nn.Linear) and path != "lm_head" and module.weight.shape[1] % QUANT_GROUP == 0
        count += ok
        return ok

    nn.quantize(model, group_size=QUANT_GROUP, bits=bits, class_predicate=pick)
    return count


def lora_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """LoRA layers whose ``lora_a`` is (in, r) and ``lora_b`` (r, out): mlx-lm's LoRALinear,
    and hwft's LoRAGate on a router that is not a Linear (hwft_mlx.moe_lora)."""
    from mlx_lm.tuner.lora import LoRALinear

    return ((p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear | LoRAGate))


@contextmanager
def adapters_disabled(model: nn.Module):
    """The base model: every LoRA update scaled by 0 for the duration (the reference policy)."""
    mla = [m for _, m in model.named_modules() if isinstance(m, LoRAEmbedQ | LoRAUnembedOut)]
    saved = [(m, m.scale) for m in [*(m for _, m in lora_modules(model)), *(m for _, m in expert_modules(model)), *mla]]
    for m, _ in saved:
        m.scale = 0.0
    try:
        yield model
    finally:
        for m, scale in saved:
            m.scale = scale


class Reference:
    """The frozen reference policy of GRPO: the base with the adapter scaled to zero (lora,
    qlora), or the parameters as they were before the first update (full). MLX arrays are
    immutable and the optimizer replaces them, so keeping the old parameter tree costs nothing
    until the first update, and one model's worth after it."""

    def __init__(self, model: nn.Module, adapters: bool):
        self.model = model
        self.snapshot = None if adapters else tree_map(lambda a: a, model.parameters())

    @contextmanager
    def active(self):
        if self.snapshot is None:
            with adapters_disabled(self.model):
                yield self.model
            return
        current = self.model.parameters()
        self.model.update(self.snapshot)
        try:
            yield self.model
        finally:
            self.model.update(current)


def peft_path(path: str) -> str:
    """An MLX module path as PEFT names it on the transformers 5 model: mlx-lm's
    ``switch_mlp`` is transformers' ``experts``, Mixtral's ``block_sparse_moe`` its ``mlp``, and
    mlx-vlm's ``language_model.model`` a vision-language model's ``model.language_model``."""
    return vision.peft_path(path.replace(".block_sparse_moe.", ".mlp.").replace(".switch_mlp", ".experts"))


def mlx_path(path: str, modules: dict) -> str | None:
    """The MLX module a PEFT path names (:func:`peft_path` inverted), or None."""
    for candidate in (
        path,
        vision.mlx_path(path),
        path.replace(".mlp.experts", ".mlp.switch_mlp"),
        path.replace(".mlp.experts", ".block_sparse_moe.switch_mlp"),
        path.replace(".mlp.gate", ".block_sparse_moe.gate"),
    ):
        if candidate in modules:
            return candidate
    return None


def target_name(path: str) -> str:
    """The name PEFT's target_modules gives a module: its own, or with its parent's where its
    own is a list index (a projector's ``mlp.0``: a bare ``0`` would match every layer 0)."""
    parent, _, name = path.rpartition(".")
    return f"{parent.rpartition('.')[2]}.{name}" if name.isdigit() else name


#: PEFT's rank and alpha patterns for a fused gate/up expert projection: twice the rank, so
#: that each half keeps r (what PEFT's all-linear writes for MoE models).
GATE_UP_PATTERN = r".*\.gate_up_proj"


def save_peft_adapter(model: nn.Module, out: Path, spec: LoraSpec, base: str) -> None:
    """adapter_config.json + adapter_model.safetensors with PEFT's key names and layout:
    ``lora_A.weight`` is (r, in) and ``lora_B.weight`` (out, r). A reward model's score head is
    saved beside them as PEFT's SEQ_CLS task saves it (``base_model.model.score.weight``). MoE
    routers and experts go in as PEFT 0.21 writes them (``target_parameters``;
    :mod:`hwft_mlx.moe_lora`)."""
    weights, names, parameters, ranks = {}, set(), [], []
    scored = "score" in model
    if scored:
        weights[f"{PEFT_PREFIX}score.weight"] = model.score.weight.astype(mx.float32)
    router = family(model).options.get("router")
    for path, m in lora_modules(model):
        key = peft_path(path)
        weights[f"{PEFT_PREFIX}{key}.lora_A.weight"] = m.lora_a.T.astype(mx.float32)
        weights[f"{PEFT_PREFIX}{key}.lora_B.weight"] = m.lora_b.T.astype(mx.float32)
        if router and (path == router or path.endswith("." + router)):
            parameters = ["gate.weight"]  # the router's weight: a parameter to PEFT, not a Linear
        else:
            names.add(target_name(path))
    for path, attention in mla_attentions(model):
        if isinstance(attention.embed_q, LoRAEmbedQ):
            a, b = mla_to_peft(attention)
            weights[f"{PEFT_PREFIX}{path}.kv_b_proj.lora_A.weight"] = a
            weights[f"{PEFT_PREFIX}{path}.kv_b_proj.lora_B.weight"] = b
            names.add("kv_b_proj")
            ranks.append(a.shape[0])
    experts = list(expert_modules(model))
    for path, m in experts:
        key = f"{PEFT_PREFIX}{peft_path(path)}"
        for inner, (a, b) in ((".base_layer", to_peft(m.gate_up_a, m.gate_up_b)), ("", to_peft(m.down_a, m.down_b))):
            weights[f"{key}{inner}.lora_A.weight"] = mx.array(a)
            weights[f"{key}{inner}.lora_B.weight"] = mx.array(b)
    ranks += [m.lora_a.shape[1] for _, m in lora_modules(model)] + [m.down_a.shape[1] for _, m in experts]
    r = int(ranks[0])
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if scored else "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(names),
        "bias": "none",
        "use_rslora": spec.rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": SCORE_MODULES if scored else None,
        "layers_to_transform": None,
        "rank_pattern": {GATE_UP_PATTERN: 2 * r} if experts else {},
        "alpha_pattern": {GATE_UP_PATTERN: 2 * spec.alpha} if experts else {},
        "target_parameters": parameters + (["gate_up_proj", "down_proj"] if experts else []) or None,
    }
    if is_vision(model):  # the trained parts' layers only: a vision tower may share their names
        config["exclude_modules"] = vision.excluded(model)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapter_model.safetensors"), weights, metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def read_peft_adapter(folder: Path) -> tuple[LoraSpec, dict[str, tuple[mx.array, mx.array]]]:
    """A PEFT LoRA adapter folder: its settings and {module path: (A, B)}, refusing what the MLX
    backend cannot reproduce exactly (DoRA, per-module ranks or alphas, pickled weights)."""
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file():
        raise ModelError(
            f"model.adapter: {folder} is not a PEFT adapter folder (no adapter_config.json); "
            "give the adapter/ folder of an earlier run"
        )
    if not weights_file.is_file():
        raise ModelError(
            f"model.adapter: {folder} has no adapter_model.safetensors (hwft never reads "
            "pickled adapter_model.bin); re-save it with safe_serialization=True"
        )
    config = json.loads(config_file.read_text(encoding="utf-8"))
    r, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    moe = {"rank_pattern": {GATE_UP_PATTERN: 2 * r}, "alpha_pattern": {GATE_UP_PATTERN: 2 * alpha}}
    unsupported = [
        k
        for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save")
        if config.get(k) and config.get(k) != moe.get(k)
    ]  # MoE experts' doubled gate/up rank: read
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        what = ", ".join(unsupported) or config.get("peft_type")
        raise ModelError(
            f"model.adapter: {folder} uses {what}, which the MLX backend does not load; plain LoRA adapters load"
        )
    pairs: dict[str, dict[str, mx.array]] = {}
    for key, value in load_arrays(weights_file).items():
        path, _, which = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if which not in ("A.weight", "B.weight"):
            raise ModelError(f"model.adapter: {weights_file} holds {key}, not a LoRA A/B weight")
        pairs.setdefault(path, {})[which[0]] = value
    spec = LoraSpec(
        r=r,
        alpha=alpha,
        dropout=float(config.get("lora_dropout", 0.0)),
        rslora=bool(config.get("use_rslora")),
        target_modules=sorted({p.rsplit(".", 1)[-1] for p in pairs} - {"base_layer", "experts"}),
    )
    return spec, {p: (w["A"], w["B"]) for p, w in pairs.items()}


def load_peft_adapter(model: nn.Module, folder: Path, dropout: float | None = None) -> LoraSpec:
    """Freeze the model and put a PEFT adapter's LoRA on it, trainable."""
    from mlx_lm.tuner.lora import LoRALinear

    spec, weights = read_peft_adapter(folder)
    modules = dict(model.named_modules())
    dropout = spec.dropout if dropout is None else dropout
    scale = lora_scale(spec.alpha, spec.r, spec.rslora)
    linear, experts, kv_b = [], {}, []
    mla = dict(mla_attentions(model))
    for path, (a, b) in weights.items():
        # PEFT nests the fused gate/up update (experts.base_layer) inside the down one (experts)
        block = (
            path.removesuffix(".base_layer")
            if path.endswith(".experts.base_layer")
            else path
            if path.endswith(".experts")
            else None
        )
        where = mlx_path(block or path, modules)
        if where is None and path.endswith(".kv_b_proj") and path.rpartition(".")[0] in mla:
            kv_b.append((path.rpartition(".")[0], a, b))  # DeepSeek's MLA: mlx-lm's two halves
            continue
        if where is None:
            raise ModelError(f"model.adapter: {folder} adapts {path}, which this model does not have")
        if block is not None:
            experts.setdefault(where, []).append((a, b))
        elif isinstance(modules[where], nn.Linear | nn.QuantizedLinear) or is_router_gate(modules[where]):
            linear.append((where, a, b))
        else:
            raise ModelError(
                f"model.adapter: {folder} adapts {path}, a {type(modules[where]).__name__} the MLX "
                "backend puts no LoRA on"
            )
    model.freeze()
    wrapped = []
    for where, a, b in linear:
        lora = (
            LoRAGate(modules[where], a.shape[0], scale)
            if is_router_gate(modules[where])
            else LoRALinear.from_base(modules[where], r=a.shape[0], dropout=dropout, scale=scale)
        )
        lora.lora_a, lora.lora_b = a.T.astype(mx.float32), b.T.astype(mx.float32)
        wrapped.append((where, lora))
    for where, pairs in experts.items():
        glu = modules[where]
        count, inner, hidden = glu.gate_proj.weight.shape
        if not is_switch_glu(glu) or len(pairs) != 2:
            raise ModelError(f"model.adapter: {folder} adapts the experts at {where} in a way hwft does not read")
        # which pair is which, by shape: gate_up's A reads the hidden size and its B writes 2I
        pairs.sort(key=lambda ab: not (ab[0].shape[1] == hidden and ab[1].shape[0] == 2 * inner))
        (gu_a, gu_b), (d_a, d_b) = pairs
        lora = LoRASwitchGLU(glu, d_a.shape[0] // count, scale, dropout)
        lora.gate_up_a, lora.gate_up_b = from_peft(
            np.array(gu_a.astype(mx.float32)), np.array(gu_b.astype(mx.float32)), count
        )
        lora.down_a, lora.down_b = from_peft(np.array(d_a.astype(mx.float32)), np.array(d_b.astype(mx.float32)), count)
        wrapped.append((where, lora))
    model.update_modules(tree_unflatten(wrapped))
    for where, a, b in kv_b:
        mla_from_peft(mla[where], a, b, scale)
    refresh_router(model)
    return spec


def freeze_layers(model: nn.Module, spec) -> int:
    """freeze tuning (:mod:`hwft.freeze`): every weight frozen but the chosen layers' (spec:
    hwft.recipe.FreezeSpec); returns how many tensors train."""

    from hwft.freeze import trainable

    model.freeze()
    chosen = trainable([path for path, _ in tree_flatten(model.parameters())], spec)
    modules = dict(model.named_modules())
    for path in chosen:
        owner, _, key = path.rpartition(".")
        modules[owner].unfreeze(recurse=False, keys=[key])
    return len(chosen)
