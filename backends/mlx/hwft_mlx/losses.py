"""The MLX engine's losses. Each implements the reference definition whose maths is stated once,
in :mod:`hwft_torch.losses`; ``tests/test_mlx.py`` holds each to it on the same numbers."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def cross_entropy_sum(logits: mx.array, targets: mx.array) -> mx.array:
    r"""Summed :math:`\log\sum_v e^{z_v} - z_y` over rows of ``logits`` (N, V) and ``targets``
    (N,), in fp32: the numerator of ``causal_lm_loss`` / ``linear_cross_entropy``."""
    z = logits.astype(mx.float32)
    picked = mx.take_along_axis(z, targets[:, None], axis=-1).squeeze(-1)
    return (mx.logsumexp(z, axis=-1) - picked).sum()


def target_logps(logits: mx.array, targets: mx.array, temperature: float = 1.0) -> mx.array:
    r""":math:`\log\mathrm{softmax}(z / T)_y` per position, fp32 (``hwft_torch.losses.target_logps``)."""
    z = logits.astype(mx.float32)
    if temperature != 1.0:
        z = z / temperature
    picked = mx.take_along_axis(z, targets[..., None], axis=-1).squeeze(-1)
    return picked - mx.logsumexp(z, axis=-1)


def dpo_loss(
    chosen: mx.array,
    rejected: mx.array,
    ref_chosen: mx.array,
    ref_rejected: mx.array,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: mx.array | None = None,
    rejected_tokens: mx.array | None = None,
):
    """Per-pair DPO losses and the implicit rewards (``hwft_torch.losses.dpo_loss``: sigmoid,
    robust, hinge, ipo)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * nn.log_sigmoid(beta * delta) - eps * nn.log_sigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - eps) * nn.log_sigmoid(beta * delta) + eps * nn.log_sigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = mx.maximum(1 - beta * delta, 0.0)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the answers' token counts")
        per_token = chosen_ratio / mx.maximum(chosen_tokens, 1) - rejected_ratio / mx.maximum(rejected_tokens, 1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss '{loss_type}' (sigmoid, robust, hinge, ipo)")
    return losses, mx.stop_gradient(beta * chosen_ratio), mx.stop_gradient(beta * rejected_ratio)


def log1mexp(x: mx.array) -> mx.array:
    """log(1 - e^x) for x < 0 (``hwft_torch.losses.log1mexp``)."""
    return mx.where(x < -0.6931471805599453, mx.log1p(-mx.exp(x)), mx.log(-mx.expm1(x)))


def orpo_loss(chosen: mx.array, rejected: mx.array, beta: float) -> dict[str, mx.array]:
    """Per-pair ORPO losses from mean answer log-probabilities (``hwft_torch.losses.orpo_loss``)."""
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    nll = -chosen
    return {
        "losses": nll - beta * nn.log_sigmoid(log_odds),
        "nll": mx.stop_gradient(nll),
        "log_odds": mx.stop_gradient(log_odds),
        "chosen_rewards": mx.stop_gradient(beta * chosen),
        "rejected_rewards": mx.stop_gradient(beta * rejected),
    }


def simpo_loss(
    chosen: mx.array, rejected: mx.array, beta: float, gamma: float, label_smoothing: float = 0.0
) -> dict[str, mx.array]:
    """Per-pair SimPO losses from mean answer log-probabilities (``hwft_torch.losses.simpo_loss``)."""
    z = beta * (chosen - rejected) - gamma
    eps = label_smoothing
    return {
        "losses": -(1 - eps) * nn.log_sigmoid(z) - eps * nn.log_sigmoid(-z),
        "chosen_rewards": mx.stop_gradient(beta * chosen),
        "rejected_rewards": mx.stop_gradient(beta * rejected),
    }


def kto_loss(
    logps: mx.array,
    ref_logps: mx.array,
    mismatched: mx.array,
    ref_mismatched: mx.array,
    desirable: mx.array,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> dict[str, mx.array]:
    """Per-answer KTO losses, rewards and the detached KL baseline (``hwft_torch.losses.kto_loss``)."""
    kl = mx.maximum(mx.stop_gradient((mismatched - ref_mismatched).mean()), 0.0)
    ratio = logps - ref_logps
    losses = mx.where(
        desirable,
        desirable_weight * (1 - mx.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - mx.sigmoid(beta * (kl - ratio))),
    )
    return {"losses": losses, "rewards": mx.stop_gradient(beta * ratio), "kl": kl}


def reward_model_loss(
    chosen: mx.array, rejected: mx.array, margin: float = 0.0, center_coefficient: float = 0.0
) -> mx.array:
    """Per-pair Bradley-Terry losses of a reward model (``hwft_torch.losses.reward_model_loss``)."""
    losses = -nn.log_sigmoid(chosen - rejected - margin)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses


def grpo_loss(
    logps: mx.array,
    old_logps: mx.array,
    ref_logps: mx.array | None,
    advantages: mx.array,
    mask: mx.array,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    per_completion: bool,
    normaliser: float,
    kl_correction: bool = True,
) -> tuple[mx.array, dict[str, mx.array]]:
    """The GRPO policy loss of one micro-batch and its statistics (``hwft_torch.losses.grpo_loss``:
    clipped ratio, k3 KL optionally ratio-corrected, per token or per completion aggregation)."""
    mask = mask.astype(logps.dtype)
    ratio = mx.exp(logps - old_logps)
    clipped = mx.clip(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages[:, None]
    per_token = -mx.minimum(ratio * adv, clipped * adv)
    stats = {}
    if beta != 0.0:
        assert ref_logps is not None, "beta > 0 takes the reference's log-probabilities"
        diff = ref_logps - logps
        kl = mx.exp(diff) - diff - 1
        per_token = per_token + beta * (kl * ratio if kl_correction else kl)
        stats["kl"] = mx.stop_gradient((kl * mask).sum())
    if per_completion:
        loss = ((per_token * mask).sum(-1) / mx.maximum(mask.sum(-1), 1)).sum() / normaliser
    else:
        loss = (per_token * mask).sum() / normaliser
    region = ((ratio < 1 - epsilon_low) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
    stats["clipped"] = mx.stop_gradient((region * mask).sum())
    stats["tokens"] = mask.sum()
    return loss, stats


def ppo_loss(
    logps: mx.array,
    old_logps: mx.array,
    values: mx.array,
    old_values: mx.array,
    returns: mx.array,
    advantages: mx.array,
    mask: mx.array,
    cliprange: float,
    cliprange_value: float,
    vf_coef: float,
    normaliser: float,
) -> tuple[mx.array, dict[str, mx.array]]:
    """The PPO loss of one micro-batch and its statistics (``hwft_torch.losses.ppo_loss``)."""
    ratio = mx.exp(logps - old_logps)
    policy = mx.maximum(-advantages * ratio, -advantages * mx.clip(ratio, 1 - cliprange, 1 + cliprange))
    clipped_values = old_values + mx.clip(values - old_values, -cliprange_value, cliprange_value)
    value = 0.5 * mx.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)
    loss = ((policy + vf_coef * value) * mask).sum() / normaliser
    region = ((ratio < 1 - cliprange) & (advantages < 0)) | ((ratio > 1 + cliprange) & (advantages > 0))
    return loss, {
        "policy": mx.stop_gradient((policy * mask).sum()),
        "value": mx.stop_gradient((value * mask).sum()),
        "clipped": mx.stop_gradient((region * mask).sum()),
        "tokens": mask.sum(),
    }


def load_balancing_loss(gate_logits: list[mx.array], experts: int, top_k: int, mask: mx.array | None) -> mx.array:
    r"""Switch Transformer's load-balancing loss over every MoE layer's router logits
    (:mod:`hwft.router_balance`): :math:`E \sum_e f_e P_e`, with :math:`f_e` the share of top-k
    assignments to expert e (no gradient) and :math:`P_e` its mean routing probability, over
    the real tokens (``mask`` (batch, L): 1 real, 0 padding; None: all). The same number as
    transformers' ``load_balancing_loss_func`` (tests/test_families.py)."""
    if not gate_logits:
        return mx.array(0.0)
    counts = mx.zeros((experts,), dtype=mx.float32)
    probs = mx.zeros((experts,), dtype=mx.float32)
    rows = mx.array(0.0)
    for logits in gate_logits:
        z = logits.reshape(-1, experts).astype(mx.float32)
        weight = mx.ones((z.shape[0],)) if mask is None else mask.reshape(-1).astype(mx.float32)
        p = mx.softmax(z, axis=-1)
        top = mx.stop_gradient(mx.argpartition(-p, top_k - 1, axis=-1)[:, :top_k])
        chosen = (top[:, :, None] == mx.arange(experts)[None, None, :]).astype(mx.float32).sum(axis=1)
        counts = counts + (chosen * weight[:, None]).sum(axis=0)
        probs = probs + (p * weight[:, None]).sum(axis=0)
        rows = rows + weight.sum()
    return (counts / rows * (probs / rows)).sum() * experts
