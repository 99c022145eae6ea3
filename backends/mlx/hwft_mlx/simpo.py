"""SimPO on MLX: the length-normalised reward margin against a target gamma
(:func:`hwft_mlx.losses.simpo_loss`, the maths in :mod:`hwft.methods.simpo`)."""

from __future__ import annotations

from hwft_mlx.losses import simpo_loss
from hwft_mlx.reference_free import ReferenceFree, build_with


class SimpleMargin(ReferenceFree):
    def pair_loss(self, chosen, rejected):
        return simpo_loss(chosen, rejected, self.spec.beta, self.spec.gamma, self.spec.label_smoothing)


build = build_with(SimpleMargin, "simpo")
