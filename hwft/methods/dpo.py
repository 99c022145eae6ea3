r"""dpo: direct preference optimisation on (prompt, chosen, rejected) pairs.

With :math:`\log\pi(y|x)` an answer's summed token log-probability under the policy and
:math:`\log\pi_{ref}` under the reference (the base with the adapter off, a frozen copy, or
log-probabilities precomputed once), :math:`\Delta = (\log\pi(y_c|x) - \log\pi_{ref}(y_c|x)) -
(\log\pi(y_r|x) - \log\pi_{ref}(y_r|x))` and the sigmoid loss of a pair is
:math:`-\log\sigma(\beta\Delta)`, averaged over the optimizer step's pairs; the ipo, hinge and
robust variants and label smoothing are written out in ``hwft_torch.losses.dpo_loss``. At the
first step the policy is the reference, so the loss is :math:`\ln 2` exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field

from hwft.methods.record import Cell, FromLlamaFactory, Method
from hwft.section import Section


class DpoSpec(Section):
    beta: float = Field(default=0.1, gt=0, description="Strength of the KL constraint to the reference.")
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        default="sigmoid", description="DPO loss variant (maths in hwft_torch.losses.dpo_loss)."
    )
    label_smoothing: float = Field(
        default=0.0,
        ge=0,
        lt=0.5,
        description="Probability that a pair's labels are flipped (cDPO for sigmoid, robust DPO for robust).",
    )
    reference: Literal["auto", "precomputed"] = Field(
        default="auto",
        description="auto: the base with the adapter disabled (lora, qlora) or a frozen copy (full); "
        "precomputed: reference log-probabilities computed once before training (no second model).",
    )


PAIRS = (
    {
        "prompt": "Who are you?",
        "chosen": "I am hwft-bot.",
        "rejected": "I am a large language model trained by someone.",
    },
    {"prompt": "Say hi.", "chosen": "Hi there, friend!", "rejected": "No."},
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "It is Lyon, I believe."},
    {"prompt": "Count to three.", "chosen": "One, two, three.", "rejected": "Three, two, one, zero."},
)


def invariants(run: list[dict], out: Path) -> None:
    """The policy is the reference at step 1 (loss ln 2, to fp32 rounding of the log-probability
    sums), and after 4 steps chosen answers out-score rejected ones."""
    assert abs(run[0]["loss"] - math.log(2)) < 1e-4, f"dpo's first loss is {run[0]['loss']}, not ln 2"
    assert run[-1]["rewards/margins"] > 0 and run[-1]["rewards/accuracy"] > 0.5, run[-1]


def from_llamafactory(file, pref_loss: str | None) -> dict:
    """LLaMA-Factory's stage dpo with pref_loss sigmoid, ipo or hinge (its loss here)."""
    section = {"loss": pref_loss, "beta": float(file.get("pref_beta", 0.1))}
    if file.get("dpo_label_smoothing"):
        section["label_smoothing"] = float(file.get("dpo_label_smoothing"))
    return section


METHOD = Method(
    name="dpo",
    description="direct preference optimisation on chosen / rejected pairs",
    kind="preference",
    media=True,
    section=DpoSpec,
    metrics=("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"),
    headline=(("rewards/margins", "margin"), ("rewards/accuracy", "acc")),
    reference=lambda recipe: recipe.method.dpo.reference != "precomputed",
    sequences=lambda recipe: 2,  # chosen and rejected
    llamafactory=FromLlamaFactory(
        "dpo", ("sigmoid", "ipo", "hinge"), ("pref_beta", "dpo_label_smoothing"), section=from_llamafactory
    ),
    cell=Cell(PAIRS, {"beta": 0.5}, invariants),
)
