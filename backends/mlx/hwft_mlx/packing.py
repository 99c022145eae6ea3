"""Packed rows on MLX, for every family mlx-lm implements, through mlx-lm's own forward.

A packed row holds several examples, and attention must stay within each. mlx-lm's models take
no mask and no position ids, but every one of them builds its masks with
``create_attention_mask(h, cache, window_size=...)``, which asks the cache for it
(``cache.make_mask``) when there is one. :class:`SegmentMask` is such a cache: it stores
nothing (``update_and_fetch`` hands the keys and values back, ``offset`` stays 0) and answers
``make_mask`` with the causal mask restricted to each example, and to the sliding window where
the layer asks for one. Given to every layer, it packs any family without a per-family forward.

The positions still run 0..L-1 over the row instead of restarting per example. That changes
nothing for rotary or position-free (NoPE) attention, whose scores depend only on the distance
between query and key, and the mask keeps only pairs within one example (the torch engine
restarts positions; the family tests hold the two to the same losses). A family with absolute
position embeddings would see different positions: :func:`prove` finds that out.

A family in :mod:`hwft_mlx.families` with the ``mlx_packing`` path is proven by the tests
(tests/test_families.py). Any other architecture packs after :func:`prove` passes when the
model loads: two short examples packed in one row give, token for token, the logits each gives
alone through mlx-lm's own call. Where it does not, packing is refused in one line.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from hwft_mlx.arrays import number

#: What a proof allows between a packed example's logits and its own (fp32 in: float rounding;
#: bf16 or fp16 weights: a few units of their last place on logits of size ~1-10).
PROOF_TOLERANCE = {mx.float32: 1e-4, mx.bfloat16: 5e-2, mx.float16: 1e-2}


class SegmentMask:
    """A stand-in for mlx-lm's KV cache that keeps nothing and builds masks that keep each
    packed example to itself. ``segments`` is (batch, L): the example each position belongs to
    (hwft.data.batching.segment_ids), or None for rows of one example each. ``dims`` is the rank
    of the family's attention scores the mask must broadcast against: 4, (batch, heads, L, L),
    for most; 5 where the family groups query heads under their key/value head
    (batch, kv_heads, repeats, L, L), as mlx-lm's gemma2 does (``options["mask_dims"]`` in
    hwft_mlx.families)."""

    offset = 0  # positions start at 0, as without a cache

    def __init__(self, segments: np.ndarray | None, dims: int = 4):
        self.segments, self.dims = segments, dims

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        """What ``create_attention_mask`` returns without a cache, restricted to each example:
        ``"causal"`` or a boolean (L, L) array where nothing packs, else (batch, 1, L, L)
        (``dims`` 5: (batch, 1, 1, L, L))."""
        from mlx_lm.models.base import create_causal_mask

        windowed = window_size is not None and n > window_size
        if self.segments is None:
            if n == 1:
                return None
            return create_causal_mask(n, window_size=window_size) if return_array or windowed else "causal"
        causal = np.tri(n, dtype=bool)
        if windowed and window_size is not None:
            causal &= ~np.tri(n, k=-window_size, dtype=bool)
        same = self.segments[:, :, None] == self.segments[:, None, :]
        mask = (same & causal)[:, None]
        return mx.array(mask[:, None] if self.dims == 5 else mask)


def language_model(model: nn.Module) -> nn.Module:
    """The decoder stack inside an mlx-lm model (``model.model`` for the families hwft knows;
    ``language_model.model`` where a text model sits inside a multimodal one)."""
    inner = getattr(model, "model", None)
    if inner is None and hasattr(model, "language_model"):
        inner = getattr(model.language_model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise TypeError(f"{type(model).__module__} has no decoder stack at .model")
    return inner


def decoder_hidden(
    model: nn.Module, input_ids: mx.array, segments: np.ndarray | None = None, mask_dims: int = 4
) -> mx.array:
    """The decoder's last hidden states (after its final norm), each packed example attending
    only itself: mlx-lm's own decoder with a :class:`SegmentMask` for every layer."""
    inner = language_model(model)
    mask = SegmentMask(segments, mask_dims)
    return inner(input_ids, cache=[mask] * len(inner["layers"]))


def row_logits(
    model: nn.Module, input_ids: mx.array, segments: np.ndarray | None, output_logits, mask_dims: int = 4
) -> mx.array:
    return output_logits(model, decoder_hidden(model, input_ids, segments, mask_dims))


def prove(model: nn.Module, output_logits, vocabulary: int, mask_dims: int = 4) -> str | None:
    """None when two rows of two packed examples each give every example the logits it has
    alone through mlx-lm's own forward; else why not, in a few words. Run once, when the model
    loads. Two rows, split at different places, so that a mask broadcast against the wrong
    axis of the attention scores (the batch against the heads) shows."""
    rng = np.random.default_rng(0)
    splits = ((5, 7), (8, 4))
    examples = [[rng.integers(3, vocabulary, n) for n in split] for split in splits]
    rows = mx.array(np.stack([np.concatenate(pair) for pair in examples]))
    segments = np.array([[0] * a + [1] * b for a, b in splits])
    try:
        packed = row_logits(model, rows, segments, output_logits, mask_dims)
        expected = mx.stack([mx.concatenate([model(mx.array(ids[None]))[0] for ids in pair]) for pair in examples])
    except Exception as exc:  # noqa: BLE001 - an architecture we cannot drive this way: say so
        return f"its forward does not take a mask from the cache ({type(exc).__name__}: {exc})"
    if packed.shape != expected.shape:
        return f"the packed forward gave logits of shape {packed.shape}, mlx-lm's {expected.shape}"
    scale = number(mx.abs(expected).max()) or 1.0
    difference = number(mx.abs(packed.astype(mx.float32) - expected.astype(mx.float32)).max()) / scale
    allowed = PROOF_TOLERANCE.get(expected.dtype, 5e-2)
    if not difference <= allowed:
        return (
            f"a packed example's logits differ from its own by {difference:.1e} of the largest (allowed {allowed:.0e})"
        )
    return None
