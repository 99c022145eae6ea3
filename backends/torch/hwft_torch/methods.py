"""The torch engine's methods: what its loop hands a method's builder, and which methods it
implements, one module each (registered through ``hwft_register_method_implementations``).

=======  =============================================  ==============================
method   module                                         objective
=======  =============================================  ==============================
sft      :mod:`hwft_torch.language_modelling`           ``LanguageModelling``
cpt      :mod:`hwft_torch.language_modelling`           ``LanguageModelling``
dpo      :mod:`hwft_torch.dpo`                          ``Preference``
orpo     :mod:`hwft_torch.orpo`                         ``OddsRatio``
simpo    :mod:`hwft_torch.simpo`                        ``SimpleMargin``
kto      :mod:`hwft_torch.kto`                          ``Feedback``
rm       :mod:`hwft_torch.rm`                           ``RewardModel``
grpo     :mod:`hwft_torch.grpo`                         ``GroupRelative``
ppo      :mod:`hwft_torch.ppo`                          ``Proximal``
=======  =============================================  ==============================

A plugin's method on the torch engine registers an ``Implementation(name, "torch", build)``
whose ``build(setup: Setup)`` returns an objective (:class:`hwft.contract.EngineObjective`,
most simply an :class:`hwft.objective.Objective`): the loop calls its ``step(model, n)`` for a
step's micro-batches and ``loss(model, micro) -> Loss`` for each, under autocast, and
backpropagates ``Loss.value``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hwft.distributed import ALONE, Collective
from hwft.methods import Implementation

if TYPE_CHECKING:  # for the annotations: registering the implementations imports none of it
    import torch

    from hwft.data.pipeline import Batches
    from hwft.job import Job
    from hwft.kernels import Applied
    from hwft_torch.runtime import DeviceRuntime

ENGINE = "torch"


@dataclass
class Setup:
    """What the torch loop has built when it asks for the method's objective: a
    :class:`hwft.contract.Setup` with the torch engine's own fields."""

    job: Job  #: the recipe (job.recipe), the run folder, the log (job.log)
    batches: Batches  #: the micro-batches of the method's kind
    model: Any  #: the torch module, with its tuning (peft adapter, quantised base) applied
    tokenizer: Any
    device: torch.device
    autocast: Callable[[], AbstractContextManager]  #: a context manager factory: the run's compute dtype
    collective: Collective = ALONE  #: sums over ranks
    runtime: DeviceRuntime | None = None  #: the device's own settings
    kernels: Applied | None = None  #: the kernels applied, by slot (``kernels.get("cross_entropy")``)


IMPLEMENTATIONS = (
    Implementation("sft", ENGINE, "hwft_torch.language_modelling:build"),
    Implementation("cpt", ENGINE, "hwft_torch.language_modelling:build"),
    Implementation("dpo", ENGINE, "hwft_torch.dpo:build"),
    Implementation("orpo", ENGINE, "hwft_torch.orpo:build"),
    Implementation("simpo", ENGINE, "hwft_torch.simpo:build"),
    Implementation("kto", ENGINE, "hwft_torch.kto:build"),
    Implementation("rm", ENGINE, "hwft_torch.rm:build"),
    Implementation("grpo", ENGINE, "hwft_torch.grpo:build"),
    Implementation("ppo", ENGINE, "hwft_torch.ppo:build"),
)
