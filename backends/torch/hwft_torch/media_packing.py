"""Packed rows with images and videos on the torch engine (hwft.vision families whose record
says ``packs``: Qwen2-VL, Qwen2.5-VL and Qwen3-VL).

A Qwen VL model places its tokens with 3-D rotary positions (temporal, height, width) that it
works out from the ids, the image and video grids and the token types (``get_rope_index``); for
a row of several examples it would count on from one example into the next. So a packed row
goes in with ``position_ids`` of shape (4, rows, tokens): the first, each example's text
positions restarting at 0 (transformers builds the block-diagonal mask from where they restart,
the forward taking no mask), the other three each example's own 3-D positions, from the model's
own ``get_rope_index`` on that example alone. The pixels and grids are the row's examples' in
order, as for a batch of them.

The load-time proof (hwft_torch.packing_proof.media_packing_problem): two of the run's own
rows with images, packed into one, must give each example the logits it has alone (the forward
placing it itself); otherwise packing is refused in one line.
"""

from __future__ import annotations

import torch

from hwft_torch.unwrap import base_model


def rope_index(model):
    """The model's get_rope_index (on the multimodal backbone), or None where it has none."""
    base = base_model(model)
    for part in (base, getattr(base, "model", None)):
        found = getattr(part, "get_rope_index", None)
        if found is not None:
            return found
    return None


def packed_positions(model, rows: list, batch: dict[str, torch.Tensor], types: str) -> torch.Tensor:
    """(4, rows, width) position ids of a micro-batch with packed rows: text positions (the
    batch's, restarting per example), then each example's own 3-D positions; the padding past a
    row's end keeps its text positions in all four."""
    rope = rope_index(model)
    if rope is None:
        raise RuntimeError(f"{type(base_model(model)).__name__} has no get_rope_index to place packed examples")
    ids, kinds, text = batch["input_ids"], batch[types], batch["position_ids"]
    spans = []
    for b, row in enumerate(rows):
        start = 0
        for n in row.lengths:
            spans.append((b, start, n))
            start += n
    longest = max(n for _, _, n in spans)
    alone = ids.new_zeros(len(spans), longest)
    alone_kinds, mask = torch.zeros_like(alone), torch.zeros_like(alone)
    for i, (b, start, n) in enumerate(spans):
        alone[i, :n], alone_kinds[i, :n], mask[i, :n] = ids[b, start : start + n], kinds[b, start : start + n], 1
    grids = {k: batch[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in batch}
    three, _ = rope(alone, mm_token_type_ids=alone_kinds, attention_mask=mask, **grids)
    positions = text[None].expand(4, -1, -1).clone()
    for i, (b, start, n) in enumerate(spans):
        positions[1:, b, start : start + n] = three[:, i, :n]
    return positions
