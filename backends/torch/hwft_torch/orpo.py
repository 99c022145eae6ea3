"""ORPO on the torch engine: the chosen answer's NLL plus the odds-ratio term
(:func:`hwft_torch.losses.orpo_loss`, the maths in :mod:`hwft.methods.orpo`)."""

from __future__ import annotations

from hwft_torch.losses import orpo_loss
from hwft_torch.reference_free import ReferenceFree, build_with


class OddsRatio(ReferenceFree):
    extra = ("nll", "log_odds")

    def pair_loss(self, chosen, rejected):
        return orpo_loss(chosen, rejected, self.spec.beta)


build = build_with(OddsRatio, "orpo")
