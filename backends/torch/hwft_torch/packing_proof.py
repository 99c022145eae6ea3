"""The load-time proof that a family outside the torch table keeps packed examples apart.

A packed row goes into the model with its position ids and no mask (hwft_torch.objective), and
transformers builds each attention layer's block-diagonal mask from where the positions restart.
A family whose layers carry state along the row instead (a state-space or linear-attention layer,
a convolution over the sequence) or that ignores the position ids lets one example see the one
before it, and nothing would say so. The families in hwft_torch.families are held to their
rows' own forwards by the tests; any other family is checked here, once, when the model loads:
two rows of two packed examples each must give every example the logits it has alone. Where
they do not, packing is refused in one line (``data.packing: false`` trains the family).

Two rows, split at different places, so that a mask broadcast against the wrong axis shows.
Eval mode, no gradients: dropout off, and nothing of the run changes.

Rows with images or videos of a family that packs them (hwft.vision, hwft_torch.media_packing)
have their own proof, on two of the run's own examples (:func:`media_packing_problem`).
"""

from __future__ import annotations

import torch

#: max |packed - alone| / max |alone| allowed, by the dtype the model computes in: fp32 rounding
#: of attention over a few tokens is ~1e-7 of the largest logit.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def packing_problem(model, vocabulary: int) -> str | None:
    """None where ``model`` gives each packed example its own logits; else why not, in a few words."""
    generator = torch.Generator().manual_seed(0)
    splits = ((5, 7), (8, 4))
    device = next(model.parameters()).device
    examples = [[torch.randint(3, vocabulary, (n,), generator=generator) for n in split] for split in splits]
    rows = torch.stack([torch.cat(pair) for pair in examples]).to(device)
    positions = torch.tensor([[*range(a), *range(b)] for a, b in splits], device=device)
    from hwft_torch.media_packing import rope_index

    if rope_index(model) is not None:  # a Qwen VL model: the text positions, then its 3-D ones (to_tensors)
        positions = positions[None].expand(4, -1, -1)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # Each example alone first: a forward that fails here fails on any row (its own
            # error, not packing's).
            alone = torch.stack(
                [
                    torch.cat([model(input_ids=ids[None].to(device), use_cache=False).logits[0] for ids in pair])
                    for pair in examples
                ]
            ).float()
            try:
                packed = model(input_ids=rows, position_ids=positions, use_cache=False).logits.float()
            except Exception as exc:  # noqa: BLE001 - a forward that cannot take packed rows: say so
                return f"its forward does not take packed rows ({type(exc).__name__}: {str(exc)[:200]})"
    finally:
        model.train(was_training)
    scale = alone.abs().max().item() or 1.0
    difference = (packed - alone).abs().max().item() / scale
    allowed = TOLERANCE.get(next(model.parameters()).dtype, 5e-2)
    if not difference <= allowed:
        return (
            f"a packed example's logits differ from its own by {difference:.1e} of the largest (allowed {allowed:.0e})"
        )
    return None


def media_packing_problem(
    model, tokenized: list, pad_id: int, attention: str, device, dtype: torch.dtype
) -> str | None:
    """None where two examples with images or videos (``tokenized``: hwft.data.chat.Tokenized),
    packed into one row, each get the logits they have alone, within the tolerance of the dtype
    the run computes in (``dtype``, under its autocast); else why not, in a few words."""
    from hwft.data.batching import make_rows
    from hwft_torch.objective import to_tensors

    (packed,) = make_rows(tokenized, sum(len(t.input_ids) for t in tokenized), packing=True)
    order = [tokenized[i] for i in packed.ids]
    singles = make_rows(order, max(len(t.input_ids) for t in order), packing=False)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = torch.cat(
                [
                    model(**drop_labels(to_tensors([r], pad_id, attention, device)), use_cache=False).logits[0]
                    for r in singles
                ]
            ).float()
            try:
                together = model(**drop_labels(to_tensors([packed], pad_id, attention, device, model)), use_cache=False)
            except Exception as exc:  # noqa: BLE001 - a forward that cannot take packed rows: say so
                return f"its forward does not take packed rows ({type(exc).__name__}: {str(exc)[:200]})"
    finally:
        model.train(was_training)
    difference = (together.logits[0].float() - alone).abs().max().item() / (alone.abs().max().item() or 1.0)
    allowed = TOLERANCE.get(dtype, 5e-2)
    if not difference <= allowed:
        return (
            f"a packed example's logits differ from its own by {difference:.1e} of the largest (allowed {allowed:.0e})"
        )
    return None


def drop_labels(tensors: dict) -> dict:
    tensors.pop("labels", None)
    return tensors
