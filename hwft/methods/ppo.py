r"""ppo: PPO-clip with a value head, rewarded by reward functions or a trained reward model.

Each optimizer step's prompts get one sampled completion each, a rollout batch that trains
``num_iterations`` steps (PPO's epochs). For completion token :math:`t = 0..T-1` (:math:`T` its
length, the end-of-sequence token included), under the policy that sampled it:

- the per-token reward is the KL penalty to the reference, plus the sequence's score :math:`R`
  (the weighted sum of ``rewards``) on its last token:
  :math:`r_t = -c_{KL}(\log\pi_{old}(y_t) - \log\pi_{ref}(y_t)) + [t = T-1]\,R`;
- :math:`V_t` is the value head's estimate at the position that predicts :math:`y_t`;
- GAE: :math:`\delta_t = r_t + \gamma V_{t+1} - V_t` (:math:`V_T = 0`),
  :math:`A_t = \delta_t + \gamma\lambda A_{t+1}`, returns :math:`G_t = A_t + V_t`;
- the advantages are whitened over the rollout batch's completion tokens:
  :math:`(A - \bar A) / \sqrt{\mathrm{Var}(A) + 10^{-8}}`, the variance with Bessel's correction.

The loss of a token, with :math:`\rho = \pi_\theta(y_t) / \pi_{old}(y_t)` and the new value
:math:`V'_t`, is the clipped surrogate plus the clipped value loss:

.. math:: \max(-A_t\rho,\ -A_t\,\mathrm{clip}(\rho, 1-\epsilon, 1+\epsilon))
          + c_V\,\tfrac12\max\left((V'_t - G_t)^2,\
          (\mathrm{clip}(V'_t, V_t - \epsilon_V, V_t + \epsilon_V) - G_t)^2\right)

averaged over the step's completion tokens (TRL's PPO, before TRL 1.x dropped it). The reference
is the base with the adapter off (lora, qlora) or a frozen copy (full). The value head is a
linear layer (hidden -> 1) on the policy's last hidden state, trained beside it and saved as
``value_head.safetensors`` next to the result. The numbers that need no gradient (rewards, GAE,
whitening) are computed here, once for every engine; each engine's loss is its own module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field, field_validator

from hwft.distributed import ALONE, Collective
from hwft.extras import Extra
from hwft.methods.grpo import RewardSpec, reward_shorthand
from hwft.methods.record import Cell, FromLlamaFactory, Method
from hwft.section import Section

#: The value head each engine's ppo objective trains beside the model (its module filled in):
#: ``model.v_head``, saved as ``value_head.safetensors`` with TRL's and LLaMA-Factory's names.
VALUE_HEAD = Extra("v_head", None, "value_head.safetensors", "v_head.summary.")


class PpoSpec(Section):
    max_new_tokens: int = Field(default=128, gt=0, description="Length limit of each completion.")
    temperature: float = Field(
        default=1.0, gt=0, description="Sampling temperature of rollouts (log-probs use it too)."
    )
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling of rollouts.")
    kl_coef: float = Field(default=0.05, ge=0, description="c_KL: weight of the per-token KL penalty to the reference.")
    gamma: float = Field(default=1.0, gt=0, le=1, description="Discount of GAE.")
    lam: float = Field(default=0.95, ge=0, le=1, description="lambda of GAE.")
    cliprange: float = Field(default=0.2, gt=0, description="epsilon: clipping range of the policy ratio.")
    cliprange_value: float = Field(
        default=0.2,
        gt=0,
        description="epsilon_V: how far a value may move from the sampling one before its loss is clipped.",
    )
    vf_coef: float = Field(default=0.1, ge=0, description="c_V: weight of the value loss.")
    num_iterations: int = Field(
        default=4, ge=1, description="PPO epochs: optimizer steps on each rollout batch (TRL's num_ppo_epochs)."
    )
    rewards: list[RewardSpec] = Field(
        default_factory=list,
        description="Reward functions (reward_model: a trained "
        "reward model), summed with their weights into each completion's score.",
    )

    _reward_shorthand = field_validator("rewards", mode="before")(lambda value: reward_shorthand(value))

    @property
    def num_generations(self) -> int:
        """One completion per prompt (a rollout batch is a step's prompts, each sampled once)."""
        return 1


# --------------------------------------------------------------------------------------------
# The numbers of a rollout batch, engine-neutral (numpy, no gradient)


def token_rewards(
    scores: np.ndarray, logps: np.ndarray, ref_logps: np.ndarray, mask: np.ndarray, kl_coef: float
) -> np.ndarray:
    """(n, T) per-token rewards: -kl_coef x (log pi_old - log pi_ref) on real tokens, plus each
    sequence's score on its last real token."""
    rewards = -kl_coef * (logps - ref_logps) * mask
    last = mask.sum(-1).astype(int) - 1
    rows = np.arange(len(scores))[last >= 0]
    rewards[rows, last[last >= 0]] += scores[last >= 0]
    return rewards


def gae(
    rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """(advantages, returns) by generalised advantage estimation, right to left; values and
    rewards past a sequence's end count as 0."""
    values = values * mask
    rewards = rewards * mask
    advantages = np.zeros_like(rewards)
    running = np.zeros(len(rewards), dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        following = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def whiten(xs: list[np.ndarray], masks: list[np.ndarray], collective: Collective = ALONE) -> list[np.ndarray]:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries of all of ``xs`` together (the
    micro-batches of a rollout batch, on every rank), the variance with Bessel's correction; 0
    where masked."""
    values = np.concatenate([x[m > 0] for x, m in zip(xs, masks, strict=True)])
    total, count = collective.sum([float(values.sum()), float(len(values))])
    mean = total / max(count, 1.0)
    (squares,) = collective.sum([float(((values - mean) ** 2).sum())])
    var = squares / max(count - 1, 1.0)
    return [(x - mean) / np.sqrt(var + 1e-8) * m for x, m in zip(xs, masks, strict=True)]


def rollout_targets(
    batch: list[dict], spec: PpoSpec, collective: Collective = ALONE
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(whitened advantages, returns) of each micro-batch of a rollout batch, from its
    ``scores`` (n,) and the sampling policy's ``logps``, the reference's ``ref_logps``, the
    ``values`` and the ``mask``, each (n, T); whitened over every rank's tokens."""
    gaes = [
        gae(
            token_rewards(b["scores"], b["logps"], b["ref_logps"], b["mask"], spec.kl_coef),
            b["values"],
            b["mask"],
            spec.gamma,
            spec.lam,
        )
        for b in batch
    ]
    whitened = whiten([a for a, _ in gaes], [b["mask"] for b in batch], collective)
    return [(a, r) for a, (_, r) in zip(whitened, gaes, strict=True)]


def score_samples(
    samples: list, spec: PpoSpec, registered: dict, collective: Collective = ALONE
) -> tuple[list[float], dict[str, float], list, list[float]]:
    """This rank's completions' scores (the weighted rewards), the rollout batch's logged
    statistics, and every rank's completions with their scores (gathered in rank order and
    scored together, as one process would)."""
    import statistics
    from dataclasses import asdict

    from hwft.rewards import Sample, score

    gathered = collective.gather([asdict(s) for s in samples])
    everyone = [Sample(**d) for part in gathered for d in part]
    start = sum(len(part) for part in gathered[: collective.world.rank])
    totals, per_function = score(everyone, spec.rewards, registered)
    mine = totals[start : start + len(samples)]
    samples, totals, per_function = everyone, totals, per_function
    metrics = {
        "reward": statistics.fmean(totals),
        "reward_std": statistics.pstdev(totals),
        "completion_length": statistics.fmean(s.completion_tokens for s in samples),
        "truncated": sum(s.truncated for s in samples) / len(samples),
    }
    for name, values in per_function.items():
        metrics[f"rewards/{name}/mean"] = statistics.fmean(values)
    return mine, metrics, everyone, totals


def check(recipe, host) -> None:
    """Rewards are registered and take their args."""
    from hwft.rewards import check_rewards

    check_rewards(recipe.method.ppo.rewards, host.rewards(), "ppo")


#: LLaMA-Factory's keys that only its stage ppo reads.
LLAMAFACTORY_KEYS = (
    "reward_model",
    "reward_model_type",
    "ppo_epochs",
    "max_new_tokens",
    "top_p",
    "top_k",
    "temperature",
    "do_sample",
)


def from_llamafactory(file, pref_loss: str | None) -> dict:
    """LLaMA-Factory's stage ppo: its reward model becomes the reward_model reward; sampling as
    its generating arguments say."""
    from pathlib import Path

    if not file.get("reward_model"):
        raise file.error("stage ppo needs reward_model (the folder of a reward model trained with stage rm)")
    if file.get("reward_model_type", "lora") not in ("lora", "full"):
        raise file.refuse("reward_model_type", "- hwft scores with a local reward model (lora or full), not an API")
    if file.get("top_k", 0):
        raise file.refuse("top_k", "- hwft samples rollouts with top_p (top_k 0: off)")
    if file.get("do_sample", True) is not True:
        raise file.refuse("do_sample", "- PPO samples its rollouts")
    file.note("stage ppo: cutoff_len bounds the prompt, so max_length is cutoff_len + max_new_tokens.")
    return {
        "max_new_tokens": int(file.get("max_new_tokens", 512)),
        "top_p": float(file.get("top_p", 1.0)),
        "temperature": float(file.get("temperature", 1.0)),
        "num_iterations": int(file.get("ppo_epochs", 4)),
        "rewards": [
            {"name": "reward_model", "args": {"path": str(Path(str(file.get("reward_model"))).expanduser().resolve())}}
        ],
    }


def longer_rows(train: dict, section: dict) -> None:
    """LLaMA-Factory's cutoff_len bounds a ppo prompt; hwft's max_length holds the completion too."""
    train["max_length"] += section["max_new_tokens"]


PROMPTS = tuple({"prompt": f"What is {i} + {i}?", "reference": str(2 * i)} for i in range(1, 5))


def invariants(run: list[dict], out: Path) -> None:
    """One rollout batch trained 4 steps: clipping acts from the second, the value loss falls,
    and the value head is saved beside the result."""
    assert {"reward", "value_loss", "policy_loss", "clip_ratio", "kl"} <= set(run[0]), run[0]
    assert run[0]["clip_ratio"] == 0 and run[-1]["clip_ratio"] > 0, [m["clip_ratio"] for m in run]
    assert run[-1]["value_loss"] < run[0]["value_loss"], [m["value_loss"] for m in run]
    assert len(list(out.glob("*/value_head.safetensors"))) == 1, list(out.iterdir())


METHOD = Method(
    name="ppo",
    description="PPO-clip with a value head: sampled completions scored by reward functions or a reward model",
    kind="prompt",
    section=PpoSpec,
    metrics=("reward", "policy_loss", "value_loss", "clip_ratio", "kl", "completion_length"),
    headline=(("reward", "reward"), ("value_loss", "vf")),
    reference=lambda recipe: True,
    check=check,
    generates=True,
    llamafactory=FromLlamaFactory("ppo", (), LLAMAFACTORY_KEYS, LLAMAFACTORY_KEYS, from_llamafactory, longer_rows),
    cell=Cell(PROMPTS, {"max_new_tokens": 6, "num_iterations": 4, "rewards": ["testing_vowels"]}, invariants),
)
