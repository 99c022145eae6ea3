"""SDPA once per packed example, for devices without a varlen attention kernel.

A packed row holds several examples, and attention must stay within each. The plain way is one
SDPA call over the whole row with a block-diagonal causal mask. That computes every (query, key)
pair of the row, L^2, then masks most of them away; the CPU's flash kernel cannot skip masked
blocks. Here each example is its own causal SDPA call. That costs sum_i L_i^2, with no mask,
and the causal kernel skips the upper triangle. It is the same maths: the logits agree within
float rounding (tests/test_packing.py).

In bf16 on the CPU each example's attention is :mod:`hwft_torch.blocked_attention` (plain
matmuls in query blocks, which use the CPU's bf16 units), where it keeps its probabilities
within bounds; otherwise torch's SDPA.

The examples are found where ``position_ids`` restart at 0, the signal flash-attention's varlen
path reads. Right padding restarts too (hwft.data.batching.pad), so it forms one more segment.
Anything else takes transformers' own sdpa path with its mask:
- an accelerator (finding the segments would synchronise with the host at every layer, and the
  small calls are launch-bound: slower, as a bench on an H100 showed);
- no position ids;
- a KV cache (generation);
- a row that does not start at position 0;
- a sliding-window layer (Mistral, Gemma 2/3) with an example longer than its window.

The rows are split laid end to end (rather than slicing each example out of its row) and SDPA
serves grouped-query heads itself (``enable_gqa``, rather than copying the key/value heads):
each halved a layer's attention time (docs/benchmarks.md, "The measurements behind the code").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hwft_torch import blocked_attention

NAME = "hwft_packed_sdpa"


def register() -> str:
    """Make ``attn_implementation=NAME`` loadable (transformers' sdpa mask builder); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each example in one row: where the positions restart at 0."""
    starts = (position_ids == 0).nonzero().flatten().tolist()
    return list(zip(starts, starts[1:] + [position_ids.shape[0]], strict=True))


@torch.compiler.disable  # finds the examples on the host (.tolist()); kernels.compile runs it eagerly
def packed_sdpa_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    is_causal=None,
    position_ids=None,
    **kwargs,
):
    """transformers' attention-function signature: (B, H, L, D) in, ((B, L, H, D), None) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if position_ids is not None and position_ids.dim() == 3:
        # 3-D rotary positions (a vision-language model whose layers are given them, GLM-4.5V's):
        # a packed example's restart at 0 in each of the three rows (hwft_torch.media_packing)
        position_ids = position_ids[0]
    # CPU only: on an accelerator, finding the segments synchronises with the host at every
    # layer and the small calls are launch-bound; the masked call is one kernel there, and
    # flash-attention's varlen path is the way to skip the masked pairs.
    packed = (
        query.device.type == "cpu"
        and position_ids is not None
        and position_ids.shape[-1] == query.shape[2] == key.shape[2]
        and bool((position_ids[..., 0] == 0).all())
    )
    window = kwargs.get("sliding_window")
    if packed and window:
        assert position_ids is not None  # packed
        # A sliding-window layer: one causal call per example keeps no window, so an example
        # longer than it takes the masked call (transformers' mask holds the window).
        packed = max(e - s for s, e in segments(position_ids.expand(query.shape[0], -1).reshape(-1))) <= window
    if not packed:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    # The rows end to end: (B, H, L, D) -> (1, H, B*L, D). Each row starts at position 0, so no
    # example crosses a row boundary. split's backward is one cat, where slicing per example
    # would zero-fill a whole-row gradient for every example.
    assert position_ids is not None  # packed
    batch, heads, length, dim = query.shape
    sizes = [e - s for s, e in segments(position_ids.expand(batch, -1).reshape(-1))]

    def flat(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.transpose(0, 1).reshape(1, x.shape[1], batch * length, dim).split(sizes, dim=2)

    # Grouped-query attention: SDPA maps the query heads onto the key/value heads itself.
    gqa = heads != key.shape[1]
    # bf16 on the CPU: plain matmuls in query blocks (hwft_torch.blocked_attention), where torch's
    # flash kernel gains little from bf16 units; anything else, or an example too long to keep its
    # probabilities, takes SDPA.
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype

    def attend(q, k, v):
        if blocked_attention.serves(dtype, q.device, heads, q.shape[2], dropout):
            return blocked_attention.causal(q.to(dtype), k.to(dtype), v.to(dtype), scaling)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=gqa)

    out = torch.cat([attend(q, k, v) for q, k, v in zip(flat(query), flat(key), flat(value), strict=True)], dim=2)
    return out.reshape(heads, batch, length, dim).permute(1, 2, 0, 3).contiguous(), None
