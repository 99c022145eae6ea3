"""Model families: what each engine knows of a checkpoint's ``model_type``, in one table per
engine, found through the ``hwft_register_model_families`` hook.

A :class:`Family` record is everything an engine knows of a family: which fast paths apply
(``paths``: the names the engine's kernels and loaders ask for, such as ``fused_projections``,
``liger``, ``npu_ops``, ``packed_attention`` or ``mlx_packing``), the attention implementation
it needs where the engine's default cannot serve it, its GGUF layout (how it exports, and for
the families hwft's converter reads, how a GGUF imports without torch), its tiny test config
(the conformance suite's family matrix builds a 2-layer model of it), whether it is a
mixture of experts, the other model types the engine's record serves (mlx-lm loads mistral as
llama) and the engine's own options. The torch engine's table is :mod:`hwft_torch.families`,
MLX's :mod:`hwft_mlx.families`; a family is one record in each, and a plugin adds a family, or a
fast path for one, by registering a record, with no edit to either.

``model_type`` ``"*"`` is an engine's generic record: what applies to a family it has no row
for. :meth:`Families.lookup` returns the family's own record, or that generic one marked
``known=False``, so an unknown family takes the generic path (or the one line of refusal its
caller writes), never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from hwft.errors import UserError

GENERIC = "*"


@dataclass(frozen=True)
class GgufLayout:
    """How a family's Hugging Face tensors are laid out as llama.cpp's GGUF (hwft.use.gguf_writer)."""

    arch: str  #: the ``gguf.MODEL_ARCH`` member (LLAMA, QWEN2, ...)
    #: q and k projections permuted from Hugging Face's half-split rotary layout to GGML's
    #: interleaved one (llama.cpp's converter does this for the llama architecture)
    permute_qk: bool = False
    #: write ``<arch>.rope.dimension_count``: the rotated part of a head (the head size times
    #: the config's partial_rotary_factor, where it has one)
    rope_dimension_count: bool = False
    #: added to every RMSNorm weight: Gemma's norms scale by (1 + w), llama.cpp's by w
    norm_offset: float = 0.0
    #: the family's norms: "rms" (RMSNorm: ``attention.layer_norm_rms_epsilon``) or "layer"
    #: (LayerNorm with a bias: ``attention.layer_norm_epsilon``, StarCoder2's and StableLM's)
    norm: str = "rms"
    #: (GGUF key under ``<arch>.``, the config keys that may hold its value, first found wins):
    #: the family's own hyperparameters (soft-capping, sliding window, expert counts)
    metadata: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: config -> why llama.cpp cannot run this model as the architecture, or None
    check: Callable[[dict], str | None] | None = None
    #: config -> {GGUF key under ``<arch>.``: value} computed from several config keys (DeepSeek's
    #: MLA sizes); these win over the keys every architecture writes
    derived: Callable[[dict], dict] | None = None
    #: (tensor name, array, config) -> [(name, array), ...]: a tensor llama.cpp stores otherwise
    #: (DeepSeek's kv_b_proj, split in two); None from it: the tensor as it is
    split: Callable[[str, Any, dict], list | None] | None = None
    #: the inverses :mod:`hwft_torch.gguf_readback` uses for a family with ``derived`` or ``split``:
    #: (metadata under ``<arch>.``) -> config keys, and (parameter name, read, config) -> array or None
    config_back: Callable[[dict], dict] | None = None
    tensor_back: Callable[[str, Callable, Any], Any] | None = None
    #: how ``--verify`` reads the file back: "transformers" (its own GGUF loader) or "hwft"
    #: (hwft_torch.gguf_readback, hwft's inverse of its writer, where transformers reads no such file)
    readback: str = "transformers"
    #: GGUF tensor name (``blk.{bid}.attn_q``) -> Hugging Face parameter name, for the families
    #: whose GGUF files :mod:`hwft.gguf_convert` reads with numpy alone (the embedded model's);
    #: None: hwft imports no GGUF of this architecture
    import_names: Mapping[str, str] | None = None


#: Llama's GGUF tensor names as Hugging Face's (llama.cpp's convert_hf_to_gguf.py, read backwards).
LLAMA_IMPORT_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{bid}.attn_norm": "model.layers.{bid}.input_layernorm",
    "blk.{bid}.attn_q": "model.layers.{bid}.self_attn.q_proj",
    "blk.{bid}.attn_k": "model.layers.{bid}.self_attn.k_proj",
    "blk.{bid}.attn_v": "model.layers.{bid}.self_attn.v_proj",
    "blk.{bid}.attn_output": "model.layers.{bid}.self_attn.o_proj",
    "blk.{bid}.ffn_norm": "model.layers.{bid}.post_attention_layernorm",
    "blk.{bid}.ffn_gate": "model.layers.{bid}.mlp.gate_proj",
    "blk.{bid}.ffn_up": "model.layers.{bid}.mlp.up_proj",
    "blk.{bid}.ffn_down": "model.layers.{bid}.mlp.down_proj",
}
#: Llama's layout (Mistral's too, as llama.cpp writes it): both engines' llama records hold it,
#: so an install with either engine alone reads the embedded model's GGUF.
LLAMA_GGUF = GgufLayout("LLAMA", permute_qk=True, rope_dimension_count=True, import_names=LLAMA_IMPORT_NAMES)


@dataclass(frozen=True)
class Family:
    """One model family on one engine."""

    model_type: str  #: config.json's model_type, or "*" for the engine's generic record
    engine: str  #: the engine whose table it belongs to (torch, mlx, or a vendor engine's)
    description: str = ""
    #: the fast paths that apply (names the engine's kernels and loaders ask for)
    paths: frozenset[str] = frozenset()
    #: the attention implementation the family needs where the engine's default cannot serve it
    attention: str | None = None
    gguf: GgufLayout | None = None  #: how it exports as GGUF (and imports, with import_names); None: it does not
    options: Mapping[str, Any] = field(default_factory=dict)  #: engine-specific details
    #: config keys of its tiny test model, over hwft.testing.tiny.COMMON: the smallest shapes that
    #: still exercise what sets the family apart (None: no tiny model of it)
    tiny: Mapping[str, Any] | None = None
    moe: bool = False  #: a mixture of experts: LoRA on its experts and router, the load-balancing loss
    #: other model types this engine's record serves (mlx-lm loads mistral as its llama)
    serves: tuple[str, ...] = ()
    known: bool = True  #: False on the generic record :meth:`Families.lookup` hands an unknown family

    def has(self, path: str) -> bool:
        return path in self.paths


class Families:
    """Every registered family, by engine and model_type."""

    def __init__(self, records: dict[tuple[str, str], Family], owners: dict[tuple[str, str], str] | None = None):
        self.records = records
        self.owners = owners or {}

    def lookup(self, engine: str, model_type: str | None) -> Family:
        """The engine's record of ``model_type`` (or the record that serves it), else its
        generic record (``known=False``), else an empty one: no fast path, no GGUF."""
        found = self.records.get((engine, model_type or ""))
        if found is not None:
            return found
        serving = next((f for f in self.of(engine) if model_type in f.serves), None)
        if serving is not None:
            return serving
        generic = self.records.get((engine, GENERIC)) or Family(GENERIC, engine)
        return replace(generic, model_type=model_type or "", known=False)

    def of(self, engine: str) -> list[Family]:
        """The engine's table, generic record last."""
        return sorted(
            (f for (e, _), f in self.records.items() if e == engine),
            key=lambda f: (f.model_type == GENERIC, f.model_type),
        )

    def tiny(self, engine: str = "torch") -> dict[str, Mapping[str, Any]]:
        """model_type -> its tiny test config keys, for every family of ``engine``'s table that
        has one (the torch engine's builds them with transformers)."""
        return {f.model_type: f.tiny for f in self.of(engine) if f.tiny is not None}

    def moe(self, engine: str = "torch") -> list[str]:
        """The mixture-of-experts families of ``engine``'s table."""
        return [f.model_type for f in self.of(engine) if f.moe]

    def gguf_import(self, architecture: str) -> GgufLayout | None:
        """The layout hwft reads a GGUF of ``architecture`` (``general.architecture``) with, from
        any engine's table, or None."""
        for f in sorted(self.records.values(), key=lambda f: (f.engine, f.model_type)):
            if f.gguf is not None and f.gguf.import_names and f.gguf.arch.lower() == architecture:
                return f.gguf
        return None

    def with_path(self, engine: str, path: str) -> list[str]:
        """The model types on ``engine`` that have fast path ``path``."""
        return [f.model_type for f in self.of(engine) if f.has(path) and f.model_type != GENERIC]

    def to_json(self) -> list[dict]:
        return [
            {
                "engine": f.engine,
                "model_type": f.model_type,
                "paths": sorted(f.paths),
                "attention": f.attention,
                "gguf": f.gguf.arch if f.gguf else None,
                "plugin": self.owners.get((f.engine, f.model_type)),
            }
            for f in sorted(self.records.values(), key=lambda f: (f.engine, f.model_type == GENERIC, f.model_type))
        ]


def collect_families(pm) -> Families:
    """Every record registered through ``hwft_register_model_families``. A later registration
    of the same (engine, model_type) adds its paths and options to the earlier one's (so a
    vendor can give a built-in family one more fast path), and sets what it names."""
    records: dict[tuple[str, str], Family] = {}
    owners: dict[tuple[str, str], str] = {}

    for impl in pm.hook.hwft_register_model_families.get_hookimpls():
        plugin = pm.get_name(impl.plugin) or "?"

        def register(family: Family, _plugin=plugin) -> None:
            if not isinstance(family, Family):
                raise UserError(
                    f"plugin {_plugin}: hwft_register_model_families registered "
                    f"{type(family).__name__}, not an hwft.families.Family"
                )
            key = (family.engine, family.model_type)
            before = records.get(key)
            if before is not None:
                family = replace(
                    family,
                    paths=before.paths | family.paths,
                    options={**before.options, **family.options},
                    attention=family.attention or before.attention,
                    gguf=family.gguf or before.gguf,
                    description=family.description or before.description,
                    tiny=family.tiny if family.tiny is not None else before.tiny,
                    moe=family.moe or before.moe,
                    serves=tuple(dict.fromkeys(before.serves + family.serves)),
                )
            records[key] = family
            owners.setdefault(key, _plugin)

        impl.function(register=register)
    return Families(records, owners)


def who_runs_what(families: Families) -> str:
    """A Markdown table: every family a table names, what each engine gives it (fast paths,
    the attention it needs, GGUF). ``hwft env --families`` prints it; docs/families.md holds it."""
    torch_rows = {f.model_type: f for f in families.of("torch") if f.model_type != GENERIC}
    mlx_rows: dict[str, Family] = {}
    for f in families.of("mlx"):
        if f.model_type != GENERIC:
            for model_type in (f.model_type, *f.serves):
                mlx_rows[model_type] = f
    lines = ["| family | torch fast paths | torch attention | GGUF | MLX |", "|---|---|---|---|---|"]
    for model_type in sorted(set(torch_rows) | set(mlx_rows)):
        t, m = torch_rows.get(model_type), mlx_rows.get(model_type)
        torch_paths = (
            ", ".join(sorted(t.paths))
            if t
            else "generic: " + ", ".join(sorted(families.lookup("torch", model_type).paths))
        )
        attention = t.attention if t and t.attention else "sdpa"
        gguf = t.gguf.arch.lower() if t and t.gguf else "-"
        mlx = ", ".join(sorted(m.paths)) if m else "packs after a check at load"
        if m and m.model_type != model_type:
            mlx += f" (as {m.model_type})"
        lines.append(f"| {model_type} | {torch_paths} | {attention} | {gguf} | {mlx} |")
    return "\n".join(lines) + "\n"
