r"""grpo: group-relative policy optimisation from reward functions.

Each prompt gets ``num_generations`` sampled completions; each completion's reward R_i (the
weighted sum of ``rewards``) becomes the advantage :math:`A_i = (R_i - \mathrm{mean}_{group}) /
(\mathrm{std}_{group} + 10^{-4})`, and each token's loss is the clipped surrogate
:math:`-\min(\rho A, \mathrm{clip}(\rho, 1-\epsilon, 1+\epsilon_{high}) A) + \beta\,\mathrm{KL}` with
:math:`\rho` the ratio to the sampling policy and KL the k3 estimator to the reference; the
aggregations (dapo, grpo, dr_grpo) are written out in ``hwft_torch.losses.grpo_loss``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from hwft.methods.record import Cell, Method
from hwft.section import Section


class RewardSpec(Section):
    name: str = Field(description="A registered reward function (`hwft plugins` lists them).")
    weight: float = Field(1.0, description="Weight in the summed reward.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the function.")


class GrpoSpec(Section):
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (one group).")
    max_new_tokens: int = Field(128, gt=0, description="Length limit of each completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts (log-probs use it too).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of rollouts.")
    beta: float = Field(0.04, ge=0, description="Weight of the KL penalty to the reference policy (0: none).")
    kl_correction: bool = Field(
        True, description="Weight the KL term by the policy ratio (unbiased reverse-KL gradient, TRL's default)."
    )
    epsilon: float = Field(0.2, gt=0, description="Lower clipping range of the policy ratio.")
    epsilon_high: float | None = Field(None, gt=0, description="Upper clipping range (default: epsilon).")
    num_iterations: int = Field(
        1, ge=1, description="Optimizer steps taken on each batch of rollouts (ratio clipping acts from the 2nd)."
    )
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = Field(
        "dapo", description="How per-token losses are averaged (see hwft_torch.losses.grpo_loss)."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the reward std of the group, of the batch, or not at all."
    )
    rewards: list[RewardSpec] = Field(
        default_factory=list, description="Reward functions, summed with their weights."
    )

    _reward_shorthand = field_validator("rewards", mode="before")(lambda value: reward_shorthand(value))


def reward_shorthand(value: Any) -> Any:
    """``rewards: [exact_match, format]`` is a shorthand for ``[{name: exact_match}, ...]``."""
    if isinstance(value, list):
        return [{"name": v} if isinstance(v, str) else v for v in value]
    return value


def check(recipe, host) -> None:
    """Every reward the recipe names is registered, with arguments its function accepts."""
    from hwft.rewards import check_rewards

    check_rewards(recipe.method.grpo.rewards, host.rewards())


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
    batches="hwft.data.pipeline:prompt_batches",
    section=GrpoSpec,
    metrics=("reward", "reward_std", "completion_length", "clip_ratio", "kl"),
    headline=(("reward", "reward"),),
    reference=lambda recipe: recipe.method.grpo.beta > 0,
    check=check,
    # one rollout batch trained 4 steps: the surrogate loss on it must fall, clipping act;
    # testing_vowels (hwft.testing.rewards) is continuous, so a random tiny model's group of
    # completions has a spread to learn from
    cell=Cell(PROMPTS, {"num_generations": 4, "max_new_tokens": 6, "beta": 0.04, "num_iterations": 4,
                        "rewards": ["testing_vowels"]}, invariants),
)
