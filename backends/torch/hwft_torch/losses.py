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


#: Upper bound on the logits one chunk of :func:`linear_cross_entropy` holds (elements, in the
#: compute dtype): 2**25 is 128 MiB in fp32, about 680 positions of a 49k vocabulary.
CHUNK_ELEMENTS = 2**25
#: fp32 elements of the rows whose softmax is computed at once within a chunk: 2**20 is 4 MiB,
#: about 21 positions of a 49k vocabulary.
SOFTMAX_ELEMENTS = 2**20


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, chunk by chunk.

    The gradients are computed in the forward pass, one chunk of positions at a time, so the
    (positions x vocabulary) logits exist for one chunk only and are never stored for backward
    (the approach of Liger's fused linear cross-entropy, in plain torch so it runs on any
    device). Backward scales the stored gradients by the incoming one.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, chunk):
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # On the CPU the softmax goes a few rows at a time (SOFTMAX_ELEMENTS); an accelerator
        # takes the whole chunk in one launch per operation.
        rows_at_once = max(1, SOFTMAX_ELEMENTS // weight.shape[0]) if hidden.device.type == "cpu" else chunk
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(dtype)
            y = targets[start : start + chunk]
            z = h @ w.T  # (chunk, vocab) logits in the compute dtype
            picked = z[torch.arange(z.shape[0], device=z.device), y].float()
            sums = torch.empty(z.shape[0], 1, dtype=torch.float32, device=z.device)
            losses = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
            # The softmax in fp32, written back over z in its own dtype. On the CPU a whole chunk's
            # fp32 copy (128 MiB) would be allocated, faulted in and streamed through memory in
            # every pass, where a few rows' stays in cache.
            for first in range(0, z.shape[0], rows_at_once):
                part = slice(first, first + rows_at_once)
                block = z[part].float()  # z itself where z is fp32
                # logsumexp as m + log(sum(exp(z - m))), with exp(z - m) written over the block in
                # place: torch.logsumexp would allocate and fill a second block for z - m.
                top = block.amax(dim=-1, keepdim=True)
                sums[part] = block.sub_(top).exp_().sum(dim=-1, keepdim=True)
                losses[part] = top.squeeze(-1) + sums[part].log().squeeze(-1) - picked[part]
                if grad_weight is not None:
                    # d(sum of losses)/dz = softmax(z) - onehot(y) = exp(z - m) / s - onehot(y)
                    block.div_(sums[part])
                    block[torch.arange(block.shape[0], device=z.device), y[part]] -= 1.0
                if block.dtype != z.dtype:
                    z[part] = block
            total += losses.sum()
            if grad_weight is None:
                # A frozen output layer needs only dL/dh = (exp(z - m) @ W) / s - W[y]: the
                # division and the one-hot move onto the (chunk, hidden) product, and no pass
                # over the (chunk, vocab) block is left.
                grad = (z @ w).float().div_(sums).sub_(w[y].float())
                grad_hidden[start : start + chunk] = grad.to(hidden.dtype)
                continue
            grad_hidden[start : start + chunk] = (z @ w).to(hidden.dtype)
            grad_weight += (z.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.weight_grad = grad_weight is not None
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.weight_grad else None
        return grad_hidden * grad_output.to(grad_hidden.dtype), gw, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    num_items: int | torch.Tensor,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""Cross-entropy of the output layer applied to hidden states, without full logits.

    .. math::
        L = \frac{1}{N} \sum_{i} \left( \log \sum_v e^{z_{i,v}} - z_{i,y_i} \right),
        \qquad z_i = W h_i

    over the positions i that carry a label (``hidden`` holds only those, already shifted:
    ``hidden[i]`` predicts ``targets[i]``), with :math:`N` = ``num_items`` as in
    :func:`causal_lm_loss`, which this equals. The matmuls run in ``dtype`` (the autocast dtype,
    default the hidden states' own), the softmax in fp32, in chunks of at most
    :data:`CHUNK_ELEMENTS` logits: memory is O(chunk x vocabulary) rather than O(tokens x
    vocabulary), and positions without a label (prompts, padding) cost nothing.
    """
    dtype = dtype or hidden.dtype
    chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, chunk) / num_items


@torch.no_grad()
def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of :func:`linear_cross_entropy`, for evaluation: no gradients,
    one chunk of logits at a time."""
    chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        z = (hidden[start : start + chunk] @ weight.to(hidden.dtype).T).float()
        y = targets[start : start + chunk]
        total += (torch.logsumexp(z, dim=-1) - z.gather(-1, y.unsqueeze(-1)).squeeze(-1)).sum()
    return total


def token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    r"""Per-token log-probabilities of the labels, shifted: entry (b, t) is
    :math:`\log \mathrm{softmax}(z_{b,t} / T)_{y_{b,t+1}}` where :math:`y_{b,t+1} \ne -100`,
    and 0 elsewhere. Shape (batch, length - 1), fp32."""
    target = labels[:, 1:].to(logits.device)
    mask = target != IGNORE_INDEX
    return target_logps(logits[:, :-1, :], target.clamp(min=0), temperature) * mask


def target_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    r""":math:`\log \mathrm{softmax}(z / T)_y` for each position's logits z and target y, in fp32
    (no shift: ``logits[b, t]`` scores ``targets[b, t]``)."""
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    picked = scores.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scores, dim=-1)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Per-pair DPO losses and the implicit rewards of the chosen and rejected answers.

    With :math:`\log\pi(y|x)` the summed log-probability of an answer's tokens under the policy
    and :math:`\log\pi_{ref}` under the reference, the log-ratios are
    :math:`r_c = \log\pi(y_c|x) - \log\pi_{ref}(y_c|x)` and :math:`r_r` likewise, and
    :math:`\Delta = r_c - r_r`. With :math:`\varepsilon` = ``label_smoothing``:

    - ``sigmoid`` (DPO; cDPO when :math:`\varepsilon > 0`):
      :math:`-(1-\varepsilon)\log\sigma(\beta\Delta) - \varepsilon\log\sigma(-\beta\Delta)`
    - ``robust`` (rDPO, unbiased under flipped labels):
      :math:`\frac{-(1-\varepsilon)\log\sigma(\beta\Delta) + \varepsilon\log\sigma(-\beta\Delta)}{1-2\varepsilon}`
    - ``hinge`` (SLiC): :math:`\max(0, 1 - \beta\Delta)`
    - ``ipo``: :math:`\left(\frac{r_c}{|y_c|} - \frac{r_r}{|y_r|} - \frac{1}{2\beta}\right)^2`, the
      log-ratios averaged per answer token (``chosen_tokens``, ``rejected_tokens``), as TRL
      computes IPO (the paper's :math:`\tau` is ``beta``).

    The rewards are :math:`\beta r_c` and :math:`\beta r_r` (detached). The training loss is the
    mean over the pairs of an optimizer step.
    """
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the answers' token counts")
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss '{loss_type}' (sigmoid, robust, hinge, ipo)")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mismatched_logps: torch.Tensor,
    ref_mismatched_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    r"""Per-answer KTO losses (:mod:`hwft.methods.kto`). With :math:`r` the answers' summed
    log-ratios to the reference and :math:`z_0 = \max(0, \mathrm{mean}(\log\pi(y'|x) -
    \log\pi_{ref}(y'|x)))` over the mismatched pairs (detached), a desirable answer's loss is
    :math:`\lambda_D(1 - \sigma(eta(r - z_0)))`, an undesirable one's
    :math:`\lambda_U(1 - \sigma(eta(z_0 - r)))`. Returns the losses, the rewards :math:`eta r`
    (detached) and :math:`z_0` (``kl``)."""
    kl = (mismatched_logps - ref_mismatched_logps).mean().detach().clamp(min=0)
    ratio = logps - ref_logps
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    return {"losses": losses, "rewards": beta * ratio.detach(), "kl": kl}


def reward_model_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0, center_coefficient: float = 0.0
) -> torch.Tensor:
    r"""Per-pair Bradley-Terry losses of a reward model's scalar rewards (:mod:`hwft.methods.rm`):
    :math:`-\log\sigma(r_c - r_r - m) + c\,(r_c + r_r)^2`."""
    chosen, rejected = chosen.float(), rejected.float()
    losses = -F.logsigmoid(chosen - rejected - margin)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, without cancellation: log(-expm1(x)) near 0, log1p(-e^x) below -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    r"""Per-pair ORPO losses from the answers' *mean* token log-probabilities :math:`\bar\ell_c,
    \bar\ell_r` (:mod:`hwft.methods.orpo`): :math:`-\bar\ell_c - \beta\log\sigma(\log
    \mathrm{OR})` with :math:`\log\mathrm{OR} = (\bar\ell_c - \bar\ell_r) - (\log(1-e^{\bar\ell_c})
    - \log(1-e^{\bar\ell_r}))`. Returns the losses, the NLL, the log odds ratio and the rewards
    :math:`\beta\bar\ell` (detached), each per pair."""
    chosen, rejected = chosen.float(), rejected.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    nll = -chosen
    return {
        "losses": nll - beta * F.logsigmoid(log_odds),
        "nll": nll.detach(),
        "log_odds": log_odds.detach(),
        "chosen_rewards": beta * chosen.detach(),
        "rejected_rewards": beta * rejected.detach(),
    }


def simpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, beta: float, gamma: float, label_smoothing: float = 0.0
) -> dict[str, torch.Tensor]:
    r"""Per-pair SimPO losses from the answers' *mean* token log-probabilities
    (:mod:`hwft.methods.simpo`): with :math:`z = \beta(\bar\ell_c - \bar\ell_r) - \gamma`,
    :math:`-(1-\varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)`. Returns the losses and
    the rewards :math:`\beta\bar\ell` (detached)."""
    z = beta * (chosen - rejected) - gamma
    eps = label_smoothing
    return {
        "losses": -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z),
        "chosen_rewards": beta * chosen.detach(),
        "rejected_rewards": beta * rejected.detach(),
    }


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    per_completion: bool,
    normaliser: float,
    kl_correction: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""The GRPO policy loss of one micro-batch of completions, and its statistics.

    For completion i of a group and its token t, with :math:`\rho_{i,t} = \exp(\log\pi_\theta -
    \log\pi_{old})` the ratio to the policy that sampled the rollouts and :math:`A_i` the
    group-normalised advantage :math:`(R_i - \mathrm{mean}(R_{group})) / (\mathrm{std}(R_{group}) + 10^{-4})`:

    .. math::
        \ell_{i,t} = -\min\left(\rho_{i,t} A_i,\
                     \mathrm{clip}(\rho_{i,t}, 1-\epsilon_{low}, 1+\epsilon_{high}) A_i\right)
                     + \beta\, \mathrm{KL}_{i,t},\qquad
        \mathrm{KL}_{i,t} = e^{\log\pi_{ref} - \log\pi_\theta} - (\log\pi_{ref} - \log\pi_\theta) - 1

    (the k3 estimator, always >= 0), multiplied by :math:`\rho_{i,t}` when ``kl_correction`` (the
    unbiased reverse-KL gradient of DeepSeek-V3.2, TRL's default; it changes the gradient even
    where :math:`\rho = 1`). Log-probabilities use the sampling temperature. Aggregation
    over the step's completions (``normaliser`` is computed over the whole optimizer step, so the
    micro-batch losses add up to the step's loss however they are split; the loss types of
    :class:`hwft.methods.grpo.GrpoSpec` choose them):

    - ``per_completion`` False: :math:`\sum_{i,t} \ell_{i,t} / N`, every token equal (loss type
      ``dapo``, TRL's default: :math:`N = N_{tokens}`; ``dr_grpo``: :math:`N = N_{completions}
      \cdot L_{max}`, no length bias);
    - ``per_completion`` True: :math:`\sum_i \frac{1}{|o_i|}\sum_t \ell_{i,t} / N_{completions}`,
      every completion equal (loss type ``grpo``).

    With one optimizer step per rollout batch, :math:`\rho = 1` and clipping never acts; it acts
    from the second pass (``num_iterations`` > 1).
    """
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    stats = {}
    if beta != 0.0:
        assert ref_logps is not None, "beta > 0 takes the reference's log-probabilities"
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + beta * (kl * ratio if kl_correction else kl)
        stats["kl"] = (kl * mask).sum().detach()
    if per_completion:
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / normaliser
    else:
        loss = (per_token * mask).sum() / normaliser
    region = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    stats["clipped"] = (region * mask).sum().detach()
    stats["tokens"] = mask.sum().detach()
    return loss, stats


def ppo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    cliprange_value: float,
    vf_coef: float,
    normaliser: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""The PPO loss of one micro-batch of completion tokens (:mod:`hwft.methods.ppo`): per token
    :math:`\max(-A\rho, -A\,\mathrm{clip}(\rho, 1-\epsilon, 1+\epsilon)) + c_V\frac12\max((V'-G)^2,
    (\mathrm{clip}(V', V-\epsilon_V, V+\epsilon_V) - G)^2)`, summed over the real tokens and divided
    by ``normaliser`` (the optimizer step's completion tokens). Statistics: the summed policy and
    value terms, the clipped tokens (ratio outside the range, on the side the advantage pushes)
    and the token count."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    policy = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange))
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    value = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
    loss = ((policy + vf_coef * value) * mask).sum() / normaliser
    region = ((ratio < 1 - cliprange) & (advantages < 0)) | ((ratio > 1 + cliprange) & (advantages > 0))
    return loss, {
        "policy": (policy * mask).sum().detach(),
        "value": (value * mask).sum().detach(),
        "clipped": (region * mask).sum().detach(),
        "tokens": mask.sum().detach(),
    }
