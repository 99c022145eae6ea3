r"""orpo: odds-ratio preference optimisation on (prompt, chosen, rejected) pairs, with no
reference model.

With :math:`\bar\ell_c` and :math:`\bar\ell_r` the chosen and rejected answers' mean token
log-probabilities under the policy, the odds of an answer are :math:`p/(1-p)` with
:math:`p = e^{\bar\ell}`, so the log odds ratio is

.. math:: \log\frac{\mathrm{odds}_c}{\mathrm{odds}_r} = (\bar\ell_c - \bar\ell_r)
          - \left(\log(1 - e^{\bar\ell_c}) - \log(1 - e^{\bar\ell_r})\right)

and a pair's loss is the chosen answer's negative log-likelihood plus :math:`\lambda` times
the odds-ratio term:

.. math:: L = -\bar\ell_c - \lambda \log\sigma\!\left(\log\frac{\mathrm{odds}_c}{\mathrm{odds}_r}\right)

averaged over the optimizer step's pairs. The NLL covers the answer tokens only, as
LLaMA-Factory's does (TRL's covers the prompt too). :math:`\lambda` is ``beta``, as TRL and
LLaMA-Factory (``pref_beta``) name it. The logged rewards are :math:`\lambda\bar\ell` (TRL's).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from hwft.methods.dpo import PAIRS
from hwft.methods.record import Cell, FromLlamaFactory, Method
from hwft.section import Section


class OrpoSpec(Section):
    beta: float = Field(
        default=0.1,
        gt=0,
        description="lambda: the weight of the odds-ratio term beside the chosen "
        "answer's NLL (TRL's beta, LLaMA-Factory's pref_beta).",
    )


def invariants(run: list[dict], out: Path) -> None:
    """The chosen answers' likelihood rises and the odds ratio moves their way."""
    assert run[-1]["nll"] < run[0]["nll"], [m["nll"] for m in run]
    assert run[-1]["log_odds"] > run[0]["log_odds"], [m["log_odds"] for m in run]


METHOD = Method(
    name="orpo",
    description="odds-ratio preference optimisation: NLL plus an odds-ratio term, no reference model",
    kind="preference",
    media=True,
    section=OrpoSpec,
    metrics=("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "log_odds", "nll"),
    headline=(("rewards/margins", "margin"), ("log_odds", "log-odds")),
    sequences=lambda recipe: 2,  # chosen and rejected
    llamafactory=FromLlamaFactory(
        "dpo", ("orpo",), ("pref_beta",), section=lambda file, _: {"beta": float(file.get("pref_beta", 0.1))}
    ),
    cell=Cell(PAIRS, {"beta": 0.5}, invariants),
)
