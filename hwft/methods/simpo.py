r"""simpo: simple preference optimisation on (prompt, chosen, rejected) pairs, with no
reference model.

With :math:`\bar\ell_c` and :math:`\bar\ell_r` the chosen and rejected answers' mean token
log-probabilities under the policy (length-normalised, so a long answer is not favoured for
its length), a pair's loss is

.. math:: L = -\log\sigma\!\left(\beta(\bar\ell_c - \bar\ell_r) - \gamma\right)

averaged over the optimizer step's pairs: the chosen answer's reward :math:`\beta\bar\ell_c`
must beat the rejected one's by the target margin :math:`\gamma`. This is TRL's CPO loss with
``loss_type="simpo"`` and ``cpo_alpha=0`` (no NLL term), and LLaMA-Factory's ``pref_loss:
simpo``, which write :math:`\beta(\Delta - \gamma/\beta)`. Rewards are :math:`\beta\bar\ell`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from hwft.methods.dpo import PAIRS
from hwft.methods.record import Cell, FromLlamaFactory, Method
from hwft.section import Section


class SimpoSpec(Section):
    beta: float = Field(
        default=2.0,
        gt=0,
        description="Scale of the length-normalised reward (the SimPO paper uses "
        "2-10; TRL's and LLaMA-Factory's default, 0.1, is DPO's).",
    )
    gamma: float = Field(
        default=0.5,
        ge=0,
        description="The target reward margin gamma between chosen and rejected "
        "(TRL's simpo_gamma, LLaMA-Factory's simpo_gamma).",
    )
    label_smoothing: float = Field(
        default=0.0,
        ge=0,
        lt=0.5,
        description="Probability that a pair's labels are flipped (the conservative loss, as TRL's).",
    )


def invariants(run: list[dict], out: Path) -> None:
    """The reward margin grows."""
    assert run[-1]["rewards/margins"] > run[0]["rewards/margins"], [m["rewards/margins"] for m in run]


METHOD = Method(
    name="simpo",
    description="simple preference optimisation: a length-normalised margin, no reference model",
    kind="preference",
    media=True,
    section=SimpoSpec,
    metrics=("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"),
    headline=(("rewards/margins", "margin"), ("rewards/accuracy", "acc")),
    sequences=lambda recipe: 2,  # chosen and rejected
    llamafactory=FromLlamaFactory(
        "dpo",
        ("simpo",),
        ("pref_beta", "simpo_gamma"),
        section=lambda file, _: {
            "beta": float(file.get("pref_beta", 0.1)),
            "gamma": float(file.get("simpo_gamma", 0.5)),
        },
    ),
    cell=Cell(PAIRS, {"beta": 2.0, "gamma": 0.5}, invariants),
)
