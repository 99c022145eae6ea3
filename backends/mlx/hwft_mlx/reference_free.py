"""The reference-free preference objectives (orpo, simpo) on MLX: one forward of a
micro-batch's chosen and rejected sequences together (as dpo's, :func:`hwft_mlx.preference.pair_arrays`),
each answer's *mean* token log-probability under the policy, and a loss of those alone (as
``hwft_torch.reference_free``). Each method's module (:mod:`hwft_mlx.orpo`,
:mod:`hwft_mlx.simpo`) names its loss."""

from __future__ import annotations

import mlx.core as mx

from hwft.data.kinds.preference import PreferencePair
from hwft.data.pipeline import Batches
from hwft.distributed import ALONE, Collective
from hwft.objective import Loss, PairSteps, pair_counts
from hwft_mlx.objective import MlxObjective, log_router
from hwft_mlx.preference import pair_arrays, pair_rows, sequence_logps, with_router_term
from hwft_mlx.router import recorded_gates


class ReferenceFree(PairSteps, MlxObjective):
    #: the statistics of ``pair_loss``'s result logged besides the rewards (orpo: nll, log_odds)
    extra: tuple[str, ...] = ()

    def __init__(self, batches: Batches, spec, accumulation: int, pad_id: int, collective: Collective = ALONE):
        super().__init__(batches, collective)
        self.spec, self.accumulation, self.pad_id = spec, accumulation, pad_id

    def pair_loss(self, chosen: mx.array, rejected: mx.array) -> dict[str, mx.array]:
        raise NotImplementedError

    def forward(self, model, micro: tuple[list[PreferencePair], int]):
        pairs, step_pairs = micro
        ids, scored = pair_arrays(pairs, self.pad_id)
        with recorded_gates() as gates:  # an MoE policy's router logits (hwft.router_balance)
            chosen, rejected = mx.split(sequence_logps(model, ids, *scored, rows=pair_rows(pairs)), 2)
        chosen_tokens, rejected_tokens = mx.split(scored[2].sum(-1), 2)
        out = self.pair_loss(chosen / mx.maximum(chosen_tokens, 1), rejected / mx.maximum(rejected_tokens, 1))
        margins = out["chosen_rewards"] - out["rejected_rewards"]
        stats = {
            "rewards/chosen": out["chosen_rewards"],
            "rewards/rejected": out["rejected_rewards"],
            "rewards/margins": margins,
            "rewards/accuracy": (margins > 0).astype(mx.float32),
            **{k: out[k] for k in self.extra},
        }
        return with_router_term(self, model, gates, pairs, out["losses"].sum() / step_pairs, stats)

    def counts(self, micro: tuple[list[PreferencePair], int]) -> Loss:
        return pair_counts(micro)


def build_with(objective: type[ReferenceFree], section: str):
    """A builder (hwft_mlx.methods.Setup -> the objective) of a reference-free method whose
    settings are the recipe's method.<section>."""

    def build(setup) -> ReferenceFree:
        recipe = setup.job.recipe
        log_router(setup)
        return objective(
            setup.batches,
            getattr(recipe.method, section),
            recipe.train.gradient_accumulation_steps,
            setup.tokenizer.pad_token_id,
            setup.collective,
        )

    return build
