"""The MLX engine's methods: what its loop hands a method's builder, and which methods it
implements, one module each (registered through ``hwft_register_method_implementations``).

=======  =============================================  ==============================
method   module                                         objective
=======  =============================================  ==============================
sft      :mod:`hwft_mlx.objective`                      ``LanguageModelling``
cpt      :mod:`hwft_mlx.objective`                      ``LanguageModelling``
dpo      :mod:`hwft_mlx.preference`                     ``Preference``
orpo     :mod:`hwft_mlx.orpo`                           ``OddsRatio``
simpo    :mod:`hwft_mlx.simpo`                          ``SimpleMargin``
kto      :mod:`hwft_mlx.kto`                            ``Feedback``
rm       :mod:`hwft_mlx.rm`                             ``RewardModel``
grpo     :mod:`hwft_mlx.group_relative`                 ``GroupRelative``
ppo      :mod:`hwft_mlx.ppo`                            ``Proximal``
=======  =============================================  ==============================

A plugin's method on MLX registers ``Implementation(name, "mlx", build)``; ``build(setup:
Setup)`` returns an objective (:class:`hwft.contract.EngineObjective`, most simply a
:class:`hwft_mlx.objective.MlxObjective`), whose ``loss(model, micro) -> Loss`` the loop
differentiates with ``nn.value_and_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hwft.distributed import ALONE, Collective
from hwft.methods import Implementation

if TYPE_CHECKING:  # for the annotations: registering the implementations imports none of it
    from hwft.data.pipeline import Batches
    from hwft.job import Job
    from hwft.kernels import Applied

ENGINE = "mlx"


@dataclass
class Setup:
    """What the MLX loop has built when it asks for the method's objective: a
    :class:`hwft.contract.Setup` with MLX's own fields."""

    job: Job  #: the recipe (job.recipe), the run folder, the log (job.log)
    batches: Batches  #: the micro-batches of the method's kind
    model: Any  #: the mlx-lm model with its tuning (LoRA layers, a quantised base) applied
    tokenizer: Any
    stop: list[int]  #: the token ids that end a generation
    collective: Collective = ALONE  #: sums over ranks
    kernels: Applied | None = None  #: the kernels applied, by slot


IMPLEMENTATIONS = (
    Implementation("sft", ENGINE, "hwft_mlx.objective:build"),
    Implementation("cpt", ENGINE, "hwft_mlx.objective:build"),
    Implementation("dpo", ENGINE, "hwft_mlx.preference:build"),
    Implementation("orpo", ENGINE, "hwft_mlx.orpo:build"),
    Implementation("simpo", ENGINE, "hwft_mlx.simpo:build"),
    Implementation("kto", ENGINE, "hwft_mlx.kto:build"),
    Implementation("rm", ENGINE, "hwft_mlx.rm:build"),
    Implementation("grpo", ENGINE, "hwft_mlx.group_relative:build"),
    Implementation("ppo", ENGINE, "hwft_mlx.ppo:build"),
)
