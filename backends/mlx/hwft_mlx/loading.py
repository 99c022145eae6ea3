"""Loading a Hugging Face model folder into mlx-lm: its transformers-5 config.json put where
mlx-lm's ``ModelArgs`` reads it (the keys every family shares, then the family record's own:
hwft_mlx.families), sliding windows mlx-lm would ignore found, the router of an MoE family
recorded for its load-balancing loss, and the padding row kept out of the gradient."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from hwft.errors import ModelError
from hwft.models import has_random_weights
from hwft_mlx import router
from hwft_mlx.forward import family

DTYPES = {"fp32": mx.float32, "bf16": mx.bfloat16, "fp16": mx.float16}


def shared_overrides(config: dict) -> dict:
    """Keys every family's transformers-5 config.json holds where mlx-lm does not look.

    transformers 5 writes ``rope_parameters: {rope_theta, rope_type, partial_rotary_factor,
    ...}`` instead of the top-level ``rope_theta`` / ``rope_scaling`` / ``partial_rotary_factor``
    that mlx-lm's model arguments read. Without this mlx-lm silently uses theta 10000 (for
    SmolLM2, theta 100000, that is garbage) or fails on a required argument (glm4).
    """
    rope = config.get("rope_parameters")
    out: dict = {}
    kinds = config.get("layer_types")
    if config.get("full_attention_interval") is None and isinstance(kinds, list) and "full_attention" in kinds:
        # Qwen3-Next/3.5: transformers 5 lists each layer's kind; mlx-lm reads one full layer every N
        interval = kinds.index("full_attention") + 1
        if kinds == ["full_attention" if (i + 1) % interval == 0 else kinds[0] for i in range(len(kinds))]:
            out["full_attention_interval"] = interval
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):  # one per layer type (OLMo 3)
        rope = rope["full_attention"]  # what mlx-lm's single rope_theta means; a family record may say more
    if isinstance(rope, dict) and "rope_theta" in rope:  # flat form (not per layer type)
        if config.get("rope_theta") is None:
            out["rope_theta"] = rope["rope_theta"]
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default" and config.get("rope_scaling") is None:
            out["rope_scaling"] = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if config.get("partial_rotary_factor") is None and rope.get("partial_rotary_factor") is not None:
            out["partial_rotary_factor"] = rope["partial_rotary_factor"]
    return out


#: Names one quantity goes by across transformers' configs (as config.json holds them) and
#: mlx-lm's ``ModelArgs``: a field mlx-lm reads that the config lacks takes the first of its
#: group the config has. (transformers' own ``attribute_map`` of the family's config class is
#: read too: GPT-2's ``n_embd`` is its ``hidden_size``.)
SYNONYMS = (
    ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_seq_len"),
    ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"),
    ("num_experts_per_tok", "moe_topk", "moe_k", "top_k"),
    ("moe_intermediate_size", "expert_intermediate_size"),
    ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon"),
    ("hidden_size", "n_embd", "d_model"),
    ("num_hidden_layers", "n_layer", "n_layers"),
    ("num_attention_heads", "n_head", "n_heads"),
    ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"),
    ("intermediate_size", "n_inner", "ffn_hidden_size"),
    ("rope_theta", "rotary_emb_base"),
    ("partial_rotary_factor", "rotary_pct"),
)


def synonym_overrides(config: dict) -> dict:
    """The fields of the mlx-lm ``ModelArgs`` this config loads with that the config lacks, each
    from the key transformers keeps the same quantity under (:data:`SYNONYMS`, the config
    class's ``attribute_map``), and ``head_dim`` from the widths where mlx-lm requires it.
    Without this mlx-lm either refuses the config (a required field missing: GPT-2's ``n_ctx``)
    or, worse, takes its own default for a field with one (Qwen3-MoE's expert count)."""
    import dataclasses

    from mlx_lm.utils import _get_classes

    try:
        args_class = _get_classes(config)[1]
        fields = dataclasses.fields(args_class)
    except (KeyError, ValueError, TypeError, SystemExit):  # SystemExit: a module that needs a package (olmo)
        return {}
    aliases: dict[str, list[str]] = {}
    for group in SYNONYMS:
        for name in group:
            aliases.setdefault(name, []).extend(other for other in group if other != name)
    try:
        from transformers import AutoConfig

        attribute_map = dict(getattr(AutoConfig.for_model(config["model_type"]), "attribute_map", {}) or {})
    except (ImportError, KeyError, ValueError):
        attribute_map = {}
    for canonical, own in attribute_map.items():
        aliases.setdefault(canonical, []).insert(0, own)
        aliases.setdefault(own, []).insert(0, canonical)
    out: dict = {}
    for f in fields:
        if config.get(f.name) is not None:
            continue
        found = next((config[a] for a in aliases.get(f.name, ()) if config.get(a) is not None), None)
        if found is not None:
            out[f.name] = found
    required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if "rotary_dim" in required and config.get("rotary_dim") is None:  # MiniMax: the rotated part of a head
        head = config.get("head_dim") or (config.get("hidden_size", 0) // max(1, config.get("num_attention_heads", 1)))
        rope = config["rope_parameters"] if isinstance(config.get("rope_parameters"), dict) else {}
        factor = config.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
        out["rotary_dim"] = int(head * factor)
    if "head_dim" in required and "head_dim" not in out and config.get("head_dim") is None:
        width, heads = config.get("hidden_size") or out.get("hidden_size"), config.get("num_attention_heads")
        if width and heads:
            out["head_dim"] = width // heads
    for f in fields:  # a required field the config has no value for: None (Exaone 4's rope_scaling), which
        # mlx-lm's module either takes as "none" or fails on; a family outside the MLX table trains
        # only once a small model of it gives transformers' logits (hwft_mlx.agreement)
        if f.name in required and config.get(f.name) is None and f.name not in out and not f.name.endswith("_config"):
            out[f.name] = None  # (not a nested config: a flat one is the text config, Qwen3.5's from_dict reads)
    return out


def text_only_type(config: dict) -> dict:
    """``{"model_type": X}`` for a text-only save of a vision-language family (transformers'
    ``X_text``: Qwen3.5's language model alone, as the torch engine trains and exports it) where
    mlx-lm has no module of that name but has one for ``X`` (whose arguments take the text config);
    else nothing. The proof against transformers (hwft_mlx.agreement) still decides."""
    import importlib.util

    model_type = str(config.get("model_type", ""))
    base = model_type.removesuffix("_text")
    if base == model_type or importlib.util.find_spec(f"mlx_lm.models.{model_type}") is not None:
        return {}
    return {"model_type": base} if importlib.util.find_spec(f"mlx_lm.models.{base}") is not None else {}


def mlx_architecture(config: dict) -> str:
    """The mlx-lm architecture (module under mlx_lm.models) a config loads as, or its
    model_type where mlx-lm has none (loading then refuses it)."""
    from mlx_lm.utils import _get_classes

    try:
        return _get_classes({**config, **text_only_type(config)})[0].__module__.rsplit(".", 1)[-1]
    except (KeyError, ValueError, SystemExit):  # SystemExit: mlx-lm's olmo exits where ai2-olmo is missing
        return str(config.get("model_type", ""))


def config_overrides(config: dict) -> dict:
    """What hwft puts over a config.json before mlx-lm reads it: the keys every family shares
    (:func:`shared_overrides`), the fields mlx-lm reads under other names
    (:func:`synonym_overrides`), then the family's own (``options["config"]`` of its record in
    :mod:`hwft_mlx.families`)."""
    from hwft.plugins import get_host

    out = {**text_only_type(config), **shared_overrides(config)}
    out.update(synonym_overrides({**config, **out}))
    family = get_host().families().lookup("mlx", mlx_architecture(config))
    translate = family.options.get("config")
    if translate is not None:
        out.update(translate({**config, **out}))
    return out


def ignored_window(config: dict) -> int | None:
    """The sliding window a config sets that mlx-lm's forward does not apply (``options
    ["window"]`` in hwft_mlx.families), or None: no window, or one mlx-lm applies."""
    from hwft.plugins import get_host

    window = config.get("sliding_window")
    if not window or config.get("use_sliding_window") is False:  # Qwen: a window, switched off
        return None
    applies = get_host().families().lookup("mlx", mlx_architecture(config)).options.get("window")
    return None if applies is not None and applies(config) else int(window)


def load_model(path: Path, trust_remote_code: bool = False) -> tuple[nn.Module, dict]:
    """The mlx-lm model of an HF safetensors folder, with its config normalised; of a model.shape
    folder (hwft.models.with_random_weights), built with random weights."""
    from mlx_lm.utils import load_model as mlx_load

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path / 'config.json'}: {exc}") from None
    random = has_random_weights(path)  # model.shape: mlx's own initialisers, seeded by train.seed
    if not random and not list(path.glob("model*.safetensors")):
        raise ModelError(f"{path} has no model*.safetensors; the MLX backend loads safetensors folders only")
    try:
        try:
            model, _ = mlx_load(
                path, model_config=config_overrides(config), trust_remote_code=trust_remote_code, strict=not random
            )
        except ValueError as exc:
            if not untied_head_missing(exc, config):
                raise
            # transformers ties this model's output layer to its embeddings (no lm_head.weight in the
            # folder); mlx-lm's module for it always has its own: it reads the embeddings instead
            model, _ = mlx_load(
                path, model_config=config_overrides(config), trust_remote_code=trust_remote_code, strict=False
            )
            tie_output_layer(model)
    except SystemExit:  # mlx-lm's olmo module exits on import where the package it needs is missing
        raise ModelError(
            f"mlx-lm cannot load {path} (model_type {config.get('model_type')}): its module for it stopped on "
            "import, needing a package this install lacks (mlx-lm printed which above)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - "Model type X not supported.", weights, args: mlx-lm's words, one line
        lines = [line.strip().rstrip(",.") for line in str(exc).strip().splitlines() if line.strip()]
        reason = lines[0] if lines else type(exc).__name__
        if len(lines) > 1:  # weight names, one per line after the count: the first few, on the one line
            reason += " " + ", ".join(lines[1:4]) + (", ..." if len(lines) > 4 else "")
        raise ModelError(f"mlx-lm cannot load {path} (model_type {config.get('model_type')}): {reason}") from None
    if isinstance(config.get("pad_token_id"), int):
        keep_padding_row(model, config["pad_token_id"])
    record_router(model, config)
    return model, config


def untied_head_missing(exc: ValueError, config: dict) -> bool:
    """Whether mlx-lm refused the folder only for the output layer a tied config has none of."""
    lines = [line.strip().rstrip(",.") for line in str(exc).strip().splitlines() if line.strip()]
    return bool(config.get("tie_word_embeddings")) and lines == ["Missing 1 parameters:", "lm_head.weight"]


class TiedHead(nn.Module):
    """An output layer that is the embedding matrix (``embed_tokens.as_linear``), holding no
    weight of its own: the embedding stays the model's one copy, trained once, as transformers
    ties them."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # not a child: its weight is the model's own

    def __call__(self, hidden: mx.array) -> mx.array:
        return self._embedding.as_linear(hidden)  # pyright: ignore[reportOptionalMemberAccess]


def tie_output_layer(model: nn.Module) -> None:
    """Replace mlx-lm's own ``lm_head`` with the tied embeddings (:class:`TiedHead`)."""
    from hwft_mlx.packing import language_model

    model.lm_head = TiedHead(language_model(model).embed_tokens)  # pyright: ignore[reportArgumentType]
    model.args.tie_word_embeddings = True  # pyright: ignore[reportOptionalMemberAccess] - output_logits reads it


#: The attribute a model keeps the router load-balancing loss its config asks for in
#: (hwft.router_balance.RouterBalance).
_BALANCE = "_hwft_router_balance"


def record_router(model: nn.Module, config: dict) -> None:
    """Where the config asks for a router load-balancing loss and the family names its gates
    (``options["router"]`` in hwft_mlx.families), make them record their logits
    (:mod:`hwft_mlx.router`)."""
    from hwft.router_balance import router_balance

    balance = router_balance(config)
    suffix = family(model).options.get("router")
    if balance is not None and suffix and router.install(model, suffix):
        object.__setattr__(model, _BALANCE, balance)


def refresh_router(model: nn.Module) -> None:
    """After LoRA wrapped a recording gate: record at the LoRA layer instead (hwft_mlx.router)."""
    if getattr(model, _BALANCE, None) is not None:
        router.install(model, family(model).options["router"])


def router_balance_of(model: nn.Module):
    """The model's hwft.router_balance.RouterBalance, or None."""
    return getattr(model, _BALANCE, None)


class PaddingEmbedding(nn.Embedding):
    """nn.Embedding whose row ``padding_idx`` takes no gradient from the lookup, as torch's
    ``nn.Embedding(padding_idx=...)`` (which every transformers family hwft knows builds with
    the config's pad_token_id). Where the pad token is also the end-of-turn token (SmolLM2),
    full tuning would otherwise train its input embedding on MLX and not on torch; with tied
    embeddings the output layer's share of that row still trains, on both."""

    padding_idx: int = -1

    def __call__(self, x: mx.array) -> mx.array:
        h = super().__call__(x)
        return mx.where((x == self.padding_idx)[..., None], mx.stop_gradient(h), h)


def keep_padding_row(model: nn.Module, pad_id: int) -> None:
    """Make the decoder's token embedding a :class:`PaddingEmbedding` of ``pad_id``, in place:
    its weights and their names stay as they are."""
    embedding = getattr(getattr(model, "model", None), "embed_tokens", None)
    if type(embedding) is nn.Embedding and 0 <= pad_id < embedding.weight.shape[0]:
        embedding.__class__ = PaddingEmbedding
        embedding.padding_idx = pad_id
