"""The torch engine's model-family table (hwft.families), registered through
``hwft_register_model_families`` as a plugin's would be.

Fast paths (``Family.paths``) the torch engine's kernels and loaders ask for:

- ``fused_projections``: the decoder layers name their sibling projections as Llama does
  (``self_attn.{q,k,v}_proj``, ``mlp.{gate,up}_proj``), so hwft_sibling_projections can run
  each group as one matmul (it still checks each module, and skips what does not match);
- ``packed_attention``: attention goes through transformers' AttentionInterface and takes
  ``position_ids``, so hwft_packed_sdpa can keep a packed row's examples apart;
- ``liger``: Liger has ``apply_liger_kernel_to_<options["liger"]>`` for the family;
- ``npu_ops``: the family's RMSNorm, rotary embedding and gated MLP are the Llama shapes that
  torch-npu's fused operators replace (hwft_ascend.kernels).

The generic record (``"*"``) is what a family without a row gets: the two paths that check the
model themselves, no Liger, no NPU operators, no GGUF.
"""

from __future__ import annotations

from hwft.families import GENERIC, Family, GgufLayout

ENGINE = "torch"
LLAMA_LIKE = frozenset({"fused_projections", "packed_attention", "liger", "npu_ops"})

FAMILIES = (
    Family("llama", ENGINE, "Llama 2/3, SmolLM2", LLAMA_LIKE, options={"liger": "llama"},
           gguf=GgufLayout("LLAMA", permute_qk=True, rope_dimension_count=True)),
    Family("qwen2", ENGINE, "Qwen2, Qwen2.5", LLAMA_LIKE, options={"liger": "qwen2"}, gguf=GgufLayout("QWEN2")),
    Family("qwen3", ENGINE, "Qwen3", LLAMA_LIKE - {"npu_ops"}, options={"liger": "qwen3"}),
    Family("mistral", ENGINE, "Mistral", LLAMA_LIKE, options={"liger": "mistral"}),
    Family("gemma2", ENGINE, "Gemma 2", LLAMA_LIKE - {"npu_ops"}, attention="eager",
           options={"liger": "gemma2", "attention_why": "Gemma 2 soft-caps its attention scores, which sdpa cannot"}),
    Family(GENERIC, ENGINE, "any other family transformers loads", frozenset({"fused_projections", "packed_attention"})),
)
