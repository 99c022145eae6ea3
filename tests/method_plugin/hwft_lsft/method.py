r"""lsft: supervised fine-tuning with label smoothing (Szegedy et al., 2016).

Each label token's target is the smoothed distribution :math:`q = (1-\varepsilon)\,
\mathrm{onehot}(y) + \varepsilon / V` over the V-token vocabulary, so its loss is

.. math::
    \ell_t = -\sum_v q_v \log p_v = (1-\varepsilon)\,(-\log p_y) + \varepsilon\,u_t,\qquad
    u_t = -\frac{1}{V}\sum_v \log p_v

summed over the label tokens and divided by the optimizer step's label tokens N, as sft's is.
The objective logs ``nll`` (the mean of :math:`-\log p_y`) and ``smoothing`` (the mean of
:math:`u_t`), so that ``loss = (1-ε)·nll + ε·smoothing`` can be checked from the metrics alone.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from hwft.methods import Cell, Method
from hwft.section import Section


class LsftSpec(Section):
    epsilon: float = Field(
        default=0.1, ge=0, lt=1, description="Label smoothing: the target's mass spread evenly over the vocabulary."
    )


ROWS = (
    {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am hwft-bot."}]},
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there, friend!"}]},
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
    {
        "messages": [
            {"role": "user", "content": "Count to three."},
            {"role": "assistant", "content": "One, two, three."},
        ]
    },
)
EPSILON = 0.1


def invariants(run: list[dict], out: Path) -> None:
    """The loss is the smoothed mixture of the logged terms at every step (one micro-batch a
    step, so the step's means are the micro-batch's; fp32 sums over about 40 tokens: 1e-5 of
    the loss), and the plain NLL falls with it."""
    for m in run:
        mixture = (1 - EPSILON) * m["nll"] + EPSILON * m["smoothing"]
        assert abs(m["loss"] - mixture) <= 1e-5 * abs(m["loss"]), (m["loss"], mixture)
    assert run[-1]["nll"] < run[0]["nll"], [m["nll"] for m in run]


METHOD = Method(
    name="lsft",
    description="supervised fine-tuning with label smoothing (hwft-lsft)",
    kind="chat",
    section=LsftSpec,
    packs=True,
    metrics=("nll", "smoothing"),
    headline=(("nll", "nll"),),
    cell=Cell(ROWS, {"epsilon": EPSILON}, invariants),
)
