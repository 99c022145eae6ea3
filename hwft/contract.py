"""The engine contract, typed: what an engine's loop hands a method's builder
(:class:`Setup`), and what the objective it gets back does (:class:`EngineObjective`), one shape
on every engine. The torch engine's ``hwft_torch.methods.Setup`` and MLX's
``hwft_mlx.methods.Setup`` are Setups with their engine's own fields besides; the core's
:class:`hwft.objective.Objective` implements what an objective shares. The loop written once in
the core (:func:`hwft.loop.run_steps`) takes what the engine's set-up made as an
:class:`hwft.loop.EngineRun`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from hwft.data.pipeline import Batches
from hwft.distributed import Collective
from hwft.extras import Extra
from hwft.job import Job
from hwft.objective import Loss


class Setup(Protocol):
    """What an engine's loop has built when it asks for a method's objective
    (``Implementation.build(setup)``)."""

    job: Job  #: the recipe (job.recipe), the run folder, the log (job.log)
    batches: Batches  #: the micro-batches of the method's kind
    model: Any  #: the engine's model, with its tuning (adapters, a quantised base) applied
    tokenizer: Any
    collective: Collective  #: sums and gathers over ranks
    kernels: Any  #: hwft.kernels.Applied: the kernels applied, by slot (``kernels.get("cross_entropy")``)


class EngineObjective(Protocol):
    """What a method's objective does for an engine's loop, on every engine."""

    extras: tuple[Extra, ...]  #: modules it trains beside the model (hwft.extras)
    whole_model: Callable[[], AbstractContextManager]  #: the context it generates in (set by the engine)
    span: int  #: optimizer steps one draw of data serves (a rollout batch's num_iterations)
    collective: Collective  #: the ranks its statistics are summed over

    def step(self, model: Any, step: int) -> Sequence[Any]:
        """This rank's micro-batches of optimizer step ``step`` (sampling rollouts first, where
        the method generates)."""
        ...

    def loss(self, model: Any, micro: Any) -> Loss:
        """One micro-batch's share of the step's loss, its counts and statistics (``Loss``): on
        MLX, the function ``nn.value_and_grad`` differentiates."""
        ...

    def record(self, stats: dict[str, Any]) -> None:
        """Note a computed micro-batch's statistics."""
        ...

    def log_metrics(self) -> dict[str, float]:
        """The means of what was noted since the last call, over all ranks."""
        ...

    def position(self) -> dict:
        """The data position a checkpoint records."""
        ...

    def skip(self, micro_batches: int) -> None:
        """Resuming: advance the data past what the checkpointed run drew."""
        ...

    def resumable(self, step: int) -> bool:
        """Whether a checkpoint after ``step`` holds all the next step needs."""
        ...

    def epoch(self) -> float:
        """Passes over the data so far."""
        ...


#: An engine's implementation of a method: ``build(setup) -> objective``.
Build = Callable[[Setup], EngineObjective]
