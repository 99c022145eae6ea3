"""Losses of the torch engine, each with its maths."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hwft.data.chat import IGNORE_INDEX


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: int | torch.Tensor) -> torch.Tensor:
    r"""Next-token cross-entropy summed over label tokens, divided by ``num_items``.

    .. math::
        L = \frac{1}{N} \sum_{b,t:\ y_{b,t+1} \ne -100} -\log \mathrm{softmax}(z_{b,t})_{y_{b,t+1}}

    where :math:`z_{b,t}` are the logits at position t of row b and :math:`y` the labels, shifted
    by one so position t predicts token t+1. With :math:`N` the number of label tokens in the
    whole optimizer step (every micro-batch of the gradient accumulation), the micro-batch losses
    add up to the mean over the step's tokens, however the tokens fall into micro-batches; with
    one micro-batch it equals transformers' own ``labels=`` loss. Computed in fp32.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total / num_items
