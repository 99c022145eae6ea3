r"""grpo: group-relative policy optimisation from reward functions.

Each prompt gets ``num_generations`` sampled completions; each completion's reward R_i (the
weighted sum of ``rewards``) becomes the advantage :math:`A_i = (R_i - \mathrm{mean}_{group}) /
(\mathrm{std}_{group} + 10^{-4})`, and each token's loss is the clipped surrogate
:math:`-\min(\rho A, \mathrm{clip}(\rho, 1-\epsilon, 1+\epsilon_{high}) A) + \beta\,\mathrm{KL}` with
:math:`\rho` the ratio to the sampling policy and KL the k3 estimator to the reference; the
aggregations (dapo, grpo, dr_grpo) are written out in ``hwft_torch.losses.grpo_loss``.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from hwft.distributed import ALONE, Collective
from hwft.methods.record import Cell, Method
from hwft.rewards import Reward, Sample, ScoredRollouts, score
from hwft.section import Section


class RewardSpec(Section):
    name: str = Field(description="A registered reward function (`hwft plugins` lists them).")
    weight: float = Field(default=1.0, description="Weight in the summed reward.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the function.")


class GrpoSpec(Section):
    num_generations: int = Field(default=4, ge=2, description="Completions sampled per prompt (one group).")
    max_new_tokens: int = Field(default=128, gt=0, description="Length limit of each completion.")
    temperature: float = Field(
        default=1.0, gt=0, description="Sampling temperature of rollouts (log-probs use it too)."
    )
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling of rollouts.")
    beta: float = Field(default=0.04, ge=0, description="Weight of the KL penalty to the reference policy (0: none).")
    kl_correction: bool = Field(
        default=True,
        description="Weight the KL term by the policy ratio (unbiased reverse-KL gradient, TRL's default).",
    )
    epsilon: float = Field(default=0.2, gt=0, description="Lower clipping range of the policy ratio.")
    epsilon_high: float | None = Field(default=None, gt=0, description="Upper clipping range (default: epsilon).")
    num_iterations: int = Field(
        default=1,
        ge=1,
        description="Optimizer steps taken on each batch of rollouts (ratio clipping acts from the 2nd).",
    )
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = Field(
        default="dapo", description="How per-token losses are averaged (see hwft_torch.losses.grpo_loss)."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        default="group", description="Divide advantages by the reward std of the group, of the batch, or not at all."
    )
    rewards: list[RewardSpec] = Field(default_factory=list, description="Reward functions, summed with their weights.")

    _reward_shorthand = field_validator("rewards", mode="before")(lambda value: reward_shorthand(value))

    @property
    def per_completion(self) -> bool:
        """Whether the loss averages each completion's tokens first (loss type grpo), rather than
        every token of the step alike (dapo, dr_grpo)."""
        return self.loss_type == "grpo"


def reward_shorthand(value: Any) -> Any:
    """``rewards: [exact_match, format]`` is a shorthand for ``[{name: exact_match}, ...]``."""
    if isinstance(value, list):
        return [{"name": v} if isinstance(v, str) else v for v in value]
    return value


def check(recipe, host) -> None:
    """Every reward the recipe names is registered, with arguments its function accepts."""
    from hwft.rewards import check_rewards

    check_rewards(recipe.method.grpo.rewards, host.rewards(), "grpo")


# --------------------------------------------------------------------------------------------
# A rollout batch scored, engine-neutral (each engine's objective samples and trains)


def advantages(rewards: list[float], group: int, scale: str) -> list[float]:
    """Group-relative advantages: (R - mean of the group) / (std + 1e-4), the std (with Bessel's
    correction, as torch.std) of the group, of the whole batch, or none (``scale_rewards``)."""
    out = []
    batch_std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    for start in range(0, len(rewards), group):
        values = rewards[start : start + group]
        mean = statistics.fmean(values)
        std = {"group": statistics.stdev(values) if len(values) > 1 else 0.0, "batch": batch_std}.get(scale)
        out += [(v - mean) if std is None else (v - mean) / (std + 1e-4) for v in values]
    return out


def score_rollouts(samples: list[Sample], spec, registered: dict[str, Reward]) -> ScoredRollouts:
    """Rewards, advantages and logged statistics of a rollout batch (``samples`` in groups of
    ``spec.num_generations`` consecutive completions of one prompt)."""
    group = spec.num_generations
    totals, per_function = score(samples, spec.rewards, registered)
    stds = [statistics.stdev(totals[s : s + group]) if group > 1 else 0.0 for s in range(0, len(totals), group)]
    metrics = {
        "reward": statistics.fmean(totals),
        "reward_std": statistics.fmean(stds),
        "frac_reward_zero_std": sum(s < 1e-6 for s in stds) / len(stds),
        "completion_length": statistics.fmean(s.completion_tokens for s in samples),
        "truncated": sum(s.truncated for s in samples) / len(samples),
    }
    for name, values in per_function.items():
        metrics[f"rewards/{name}/mean"] = statistics.fmean(values)
        metrics[f"rewards/{name}/std"] = statistics.pstdev(values)
    return ScoredRollouts(samples, totals, advantages(totals, group, spec.scale_rewards), metrics)


@dataclass
class StepRollouts:
    """A rollout batch scored over all ranks, and what this rank trains with."""

    scored: ScoredRollouts  #: every rank's samples, rewards and advantages, in rank order
    advantages: list[float]  #: this rank's samples' advantages
    normaliser: float  #: the grpo_loss denominator over the whole step (all ranks)


def score_step(
    samples: list[Sample], spec, registered: dict[str, Reward], collective: Collective = ALONE
) -> StepRollouts:
    """Score one optimizer step's rollouts as a single process would: every rank's samples are
    gathered (rank order), rewarded and normalised together (group or batch scale), and the
    loss normaliser counts the whole step: completion tokens (dapo), completions (grpo), or
    completions x max_new_tokens (dr_grpo)."""
    gathered = collective.gather([asdict(s) for s in samples])
    everyone = [Sample(**d) for part in gathered for d in part]
    scored = score_rollouts(everyone, spec, registered)
    start = sum(len(part) for part in gathered[: collective.world.rank])
    completions = len(everyone)
    tokens = sum(s.completion_tokens for s in everyone)
    normaliser = {"dapo": tokens, "grpo": completions, "dr_grpo": completions * spec.max_new_tokens}[spec.loss_type]
    return StepRollouts(scored, scored.advantages[start : start + len(samples)], max(float(normaliser), 1.0))


PROMPTS = tuple({"prompt": f"What is {i} + {i}?", "reference": str(2 * i)} for i in range(1, 5))


def invariants(run: list[dict], out: Path) -> None:
    """Rewards are logged per function; one rollout batch trained 4 steps: clipping acts from
    the second and the policy moves away from the reference; every rollout is written."""
    assert {"reward", "reward_std", "completion_length", "rewards/testing_vowels/mean"} <= set(run[0]), run[0]
    assert run[0]["clip_ratio"] == 0 and run[-1]["clip_ratio"] > 0 and run[-1]["kl"] > 0, run
    assert len((out / "rollouts.jsonl").read_text().splitlines()) == len(PROMPTS) * 4


METHOD = Method(
    name="grpo",
    description="group-relative policy optimisation: sampled completions scored by reward functions",
    kind="prompt",
    media=True,
    section=GrpoSpec,
    metrics=("reward", "reward_std", "completion_length", "clip_ratio", "kl"),
    headline=(("reward", "reward"),),
    reference=lambda recipe: recipe.method.grpo.beta > 0,
    check=check,
    generates=True,
    sequences=lambda recipe: recipe.method.grpo.num_generations,
    # one rollout batch trained 4 steps: the surrogate loss on it must fall, clipping act;
    # testing_vowels (hwft.testing.rewards) is continuous, so a random tiny model's group of
    # completions has a spread to learn from
    cell=Cell(
        PROMPTS,
        {"num_generations": 4, "max_new_tokens": 6, "beta": 0.04, "num_iterations": 4, "rewards": ["testing_vowels"]},
        invariants,
    ),
)
