r"""kto: Kahneman-Tversky optimisation on single answers marked desirable or undesirable.

With :math:`r = \log\pi(y|x) - \log\pi_{ref}(y|x)` an answer's summed token log-ratio to the
reference (the base with the adapter off, a frozen copy, or log-probabilities precomputed once),
and :math:`z_0` the KL baseline, a desirable answer's loss is
:math:`\lambda_D\,(1 - \sigma(\beta(r - z_0)))` and an undesirable one's
:math:`\lambda_U\,(1 - \sigma(\beta(z_0 - r)))` (eq. 7 of Ethayarajh et al., 2024), averaged over
the optimizer step's answers.

The baseline is :math:`z_0 = \max(0, \frac1n\sum_i \log\pi(y'_i|x_i) - \log\pi_{ref}(y'_i|x_i))`
over the micro-batch's *mismatched* pairs: each prompt :math:`x_i` with another row's answer
:math:`y'_i`. It is detached: no gradient flows through it. hwft pairs each row with the answer of
the row before it when the data is prepared (:func:`hwft.data.kinds.feedback.feedback_items`), as
LLaMA-Factory does, so a micro-batch of 1 trains; TRL rotates the answers within each
micro-batch. Preference pairs train too, each as two answers (:func:`unpair`). At the first step the policy is the
reference, so :math:`r = z_0 = 0` and every
answer's loss is :math:`\lambda/2`: the loss is 0.5 with the default weights.

The logged rewards are :math:`\beta r`, averaged over the desirable answers (``rewards/chosen``)
and the undesirable ones (``rewards/rejected``); ``rewards/margins`` is their difference, ``kl``
the baseline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from hwft.data.kinds.feedback import FeedbackExample
from hwft.data.kinds.preference import PreferenceExample
from hwft.methods.record import Cell, FromLlamaFactory, Method
from hwft.section import Section


class KtoSpec(Section):
    beta: float = Field(
        default=0.1,
        gt=0,
        description="Strength of the KL constraint to the reference (TRL's beta, LLaMA-Factory's pref_beta).",
    )
    desirable_weight: float = Field(default=1.0, gt=0, description="lambda_D: the weight of a desirable answer's loss.")
    undesirable_weight: float = Field(
        default=1.0, gt=0, description="lambda_U: the weight of an undesirable answer's loss."
    )
    reference: Literal["auto", "precomputed"] = Field(
        default="auto",
        description="auto: the base with the adapter disabled (lora, qlora) or a frozen copy (full); "
        "precomputed: reference log-probabilities computed once before training (no second model).",
    )


def balance_note(desirable: int, undesirable: int, spec: KtoSpec) -> str | None:
    """TRL's check of the paper's eq. 8: with unequal counts, :math:`\\lambda_D n_D / (\\lambda_U
    n_U)` should lie in [1, 4/3]. A line for the run's log when it does not, else None."""
    if not desirable or not undesirable:
        which = "undesirable" if not undesirable else "desirable"
        return f"kto: the data has no {which} answer; the loss then only pushes one way"
    ratio = spec.desirable_weight * desirable / (spec.undesirable_weight * undesirable)
    if desirable == undesirable or 1 <= ratio <= 4 / 3:
        return None
    low, high = (
        undesirable * spec.undesirable_weight / desirable,
        4 / 3 * undesirable * spec.undesirable_weight / desirable,
    )
    return (
        f"kto: {desirable} desirable and {undesirable} undesirable answers; the paper suggests "
        f"desirable_weight in [{low:.2f}, {high:.2f}] at undesirable_weight {spec.undesirable_weight} "
        f"(lambda_D n_D / lambda_U n_U in [1, 4/3]; now {ratio:.2f})"
    )


def unpair(example: PreferenceExample) -> list[FeedbackExample]:
    """A preference pair as two feedback answers, as TRL unpairs one: the chosen answer
    desirable, the rejected undesirable, both after the same prompt."""
    return [
        FeedbackExample(example.messages, example.tools, completion=answer, label=label, media=example.media)
        for answer, label in ((example.chosen, True), (example.rejected, False))
    ]


ANSWERS = (
    {"prompt": "Who are you?", "completion": "I am hwft-bot.", "label": True},
    {"prompt": "Who are you?", "completion": "I am a large language model trained by someone.", "label": False},
    {"prompt": "Say hi.", "completion": "Hi there, friend!", "label": True},
    {"prompt": "Say hi.", "completion": "No.", "label": False},
    {"prompt": "Capital of France?", "completion": "Paris.", "label": True},
    {"prompt": "Capital of France?", "completion": "It is Lyon, I believe.", "label": False},
)


def invariants(run: list[dict], out: Path) -> None:
    """The policy is the reference at step 1 (every answer's loss 1/2, to fp32 rounding of the
    log-probability sums), and the desirable answers' rewards pull ahead of the undesirable."""
    assert abs(run[0]["loss"] - 0.5) < 1e-4, f"kto's first loss is {run[0]['loss']}, not 0.5"
    assert run[-1]["rewards/margins"] > run[0]["rewards/margins"], [m["rewards/margins"] for m in run]
    assert run[-1]["rewards/margins"] > 0, run[-1]


METHOD = Method(
    name="kto",
    description="Kahneman-Tversky optimisation on answers marked desirable or undesirable",
    kind="feedback",
    converts={"preference": unpair},
    section=KtoSpec,
    metrics=("rewards/chosen", "rewards/rejected", "rewards/margins", "kl"),
    headline=(("rewards/margins", "margin"), ("kl", "kl")),
    reference=lambda recipe: recipe.method.kto.reference != "precomputed",
    sequences=lambda recipe: 2,  # the answer and its mismatched pair (the KL baseline)
    llamafactory=FromLlamaFactory(
        "kto",
        (),
        ("pref_beta", "kto_chosen_weight", "kto_rejected_weight"),
        section=lambda file, _: {
            "beta": float(file.get("pref_beta", 0.1)),
            "desirable_weight": float(file.get("kto_chosen_weight", 1.0)),
            "undesirable_weight": float(file.get("kto_rejected_weight", 1.0)),
        },
    ),
    cell=Cell(ANSWERS, {"beta": 0.5}, invariants),
)
