r"""rm: a Bradley-Terry reward model, trained on (prompt, chosen, rejected) pairs.

A linear head on the model's last hidden state gives each sequence one scalar reward
:math:`r(x, y)`, read at its last token (the rightmost token that is not padding, the token
transformers' ``AutoModelForSequenceClassification`` reads). A pair's loss is

.. math:: L = -\log\sigma(r(x, y_c) - r(x, y_r) - m) + c\,\left(r(x, y_c) + r(x, y_r)\right)^2

with :math:`m` the ``margin`` (0: the plain Bradley-Terry loss) and :math:`c` the
``center_rewards_coefficient`` (0: off; TRL's, which keeps the rewards near 0), averaged over
the optimizer step's pairs. The head is a new ``score`` layer (no bias, initialised as
transformers initialises it); with LoRA it trains in full beside the adapter and is saved with
it, as PEFT's ``modules_to_save`` does. ``hwft eval`` reports the pairwise accuracy on held-out
pairs, and a trained reward model rewards GRPO's rollouts (``rewards: [{name: reward_model,
args: {path: runs/rm/adapter}}]``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from hwft.errors import RecipeError
from hwft.methods.dpo import PAIRS
from hwft.methods.record import Cell, FromLlamaFactory, Method
from hwft.section import Section


class RmSpec(Section):
    margin: float = Field(
        default=0.0,
        description="m: how far the chosen reward must lead the rejected one before a "
        "pair stops counting (0: the plain Bradley-Terry loss).",
    )
    center_rewards_coefficient: float = Field(
        default=0.0,
        ge=0,
        description="c: the weight of the squared sum of a pair's rewards, which keeps them centred "
        "on 0 (TRL's center_rewards_coefficient; 0: off).",
    )


def check(recipe, host) -> None:
    """A reward model scores sequences; it does not answer prompts."""
    if recipe.eval.prompts:
        raise RecipeError(
            "eval.prompts: a reward model (objective rm) scores answers and does not write them; "
            "remove eval.prompts (hwft eval reports its pairwise accuracy on held-out pairs)"
        )


def invariants(run: list[dict], out: Path) -> None:
    """The chosen answers' rewards pull ahead of the rejected ones'."""
    assert run[-1]["rewards/margins"] > run[0]["rewards/margins"], [m["rewards/margins"] for m in run]
    assert run[-1]["rewards/accuracy"] >= run[0]["rewards/accuracy"], [m["rewards/accuracy"] for m in run]


METHOD = Method(
    name="rm",
    description="a Bradley-Terry reward model on chosen / rejected pairs: a scalar head, one reward per answer",
    kind="preference",
    head="score",
    section=RmSpec,
    metrics=("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"),
    headline=(("rewards/margins", "margin"), ("rewards/accuracy", "acc")),
    check=check,
    sequences=lambda recipe: 2,  # chosen and rejected
    llamafactory=FromLlamaFactory("rm"),
    cell=Cell(PAIRS, {}, invariants),
)
