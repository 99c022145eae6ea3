r"""The FLOP model behind ``hwft bench``'s MFU: useful work only, the same for every arm.

Per optimizer step, from the step's counts (``tokens``: non-padding tokens; ``trained``: tokens
a loss is taken on; ``attended``: causal attention pairs, :math:`\sum L(L+1)/2` over the step's
sequences) and the model's dimensions (:func:`hwft_torch.bench.model_dims`: ``linear`` weights
of the body, ``adapter`` weights, ``head`` = vocabulary x width, ``attention`` = heads x head
dim x layers), with 2 FLOPs per multiply-add:

.. math::
    F_{body} = 2\,N_{linear}\,T,\quad F_{attn} = 4\,W_{attn}\,P,\quad
    F_{head} = 2\,N_{head}\,T_{trained},\quad F_{adapter} = 2\,N_{adapter}\,T

- full tuning: :math:`3\,(F_{body} + F_{attn} + F_{head})` (forward; backward = input and weight
  gradients, twice the forward);
- lora, qlora: :math:`2\,(F_{body} + F_{head}) + 3\,(F_{attn} + F_{adapter})`: a frozen weight
  needs only its input gradient, so no frozen-weight gradient GEMM is counted;
- dpo with a live reference, grpo with beta > 0: plus one forward
  :math:`F_{body} + F_{attn} + F_{head}`.

Padding, logits of prompt tokens and recomputation (activation checkpointing) are work an
implementation may do but are not counted: MFU credits the useful work only, so a trainer that
wastes less scores higher. GRPO's generation is not counted (its rollouts are sampling, not
training); dpo and grpo steps report no ``attended`` pairs, so their attention is not counted.
MFU = counted FLOPs per second / the device's peak FLOP/s in the compute dtype.
"""

from __future__ import annotations


def step_flops(step: dict, dims: dict, tuning: str, reference_forward: bool = False) -> float:
    tokens, trained, attended = step["tokens"], step["trained"], step.get("attended", 0)
    body = 2 * dims["linear"] * tokens
    attention = 4 * dims["attention"] * attended
    head = 2 * dims["head"] * trained
    adapter = 2 * dims.get("adapter", 0) * tokens
    if tuning in ("full", "freeze"):  # freeze: the backward still runs through the layers above
        total = 3 * (body + attention + head)
    else:
        total = 2 * (body + head) + 3 * (attention + adapter)
    if reference_forward:
        total += body + attention + head
    return float(total)
