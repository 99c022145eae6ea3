"""DPO on MLX: preference pairs against the starting policy (``hwft_torch.losses.dpo_loss``).

One forward computes a micro-batch's chosen and rejected sequences together (rows ``[chosen...,
rejected...]``, right-padded). The reference log-probabilities are always computed once, before
the first update, from the model as it starts (the base for a new adapter, the continued
adapter, or the full model): the same numbers torch's reference model gives, with no second
model held.
"""

from __future__ import annotations

import mlx.core as mx

from hwft.data.batching import Row, pad
from hwft.data.kinds.preference import PreferencePair
from hwft.data.pipeline import Batches
from hwft.distributed import ALONE, Collective
from hwft.methods.dpo import DpoSpec
from hwft.objective import Loss, PairSteps, pair_counts, precompute_reference
from hwft_mlx.losses import dpo_loss, target_logps
from hwft_mlx.objective import MlxObjective, log_router, position_logits, router_term, scored_positions
from hwft_mlx.router import recorded_gates


def sequence_logps(
    model, ids: mx.array, where: mx.array, targets: mx.array, mask: mx.array, rows: list[Row] | None = None
) -> mx.array:
    """Summed log-probabilities of each row's label tokens (``token_logps(...).sum(-1)``), with
    logits computed at the label positions only (``rows``: their images, for a vision-language
    model)."""
    return (target_logps(position_logits(model, ids, where, rows), targets) * mask).sum(-1)


def pair_rows(pairs: list[PreferencePair]) -> list[Row]:
    """The ``[chosen..., rejected...]`` sequences as rows, each with the prompt's images."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return [Row(t.input_ids, t.labels, [len(t.input_ids)], inputs=t.inputs, token_inputs=t.token_inputs) for t in seqs]


def pair_arrays(pairs: list[PreferencePair], pad_id: int) -> tuple[mx.array, tuple[mx.array, mx.array, mx.array]]:
    """Right-padded ``[chosen..., rejected...]`` token rows, and their scored positions."""
    rows = pair_rows(pairs)
    ids = pad(rows, pad_id)["input_ids"]
    return mx.array(ids), scored_positions([r.labels for r in rows], len(ids[0]))


def real_tokens(pairs: list[PreferencePair], width: int) -> mx.array:
    """(2 * pairs, width): 1 on the real tokens of the ``[chosen..., rejected...]`` rows."""
    lengths = mx.array([len(t.input_ids) for t in [p.chosen for p in pairs] + [p.rejected for p in pairs]])
    return (mx.arange(width)[None] < lengths[:, None]).astype(mx.float32)


def with_router_term(objective, model, gates, pairs, value, stats):
    """The loss and statistics with an MoE policy's router term added (hwft_mlx.objective.router_term)."""
    width = max(max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs)
    term = router_term(objective, model, gates, real_tokens(pairs, width))
    return (value, stats) if term is None else (value + term[0], {**stats, "aux_loss": term[1]})


class Preference(PairSteps, MlxObjective):
    def __init__(self, batches: Batches, spec: DpoSpec, accumulation: int, pad_id: int, collective: Collective = ALONE):
        super().__init__(batches, collective)
        self.spec, self.accumulation, self.pad_id = spec, accumulation, pad_id

    def precompute(self, model, batch_size: int) -> None:
        """Reference log-probabilities of every pair under ``model`` as it is now."""

        def logps_of(model, chunk):
            ids, scored = pair_arrays(chunk, self.pad_id)
            logps = sequence_logps(model, ids, *scored, rows=pair_rows(chunk))
            return mx.stack(list(mx.split(logps, 2)), axis=1).tolist()

        precompute_reference(model, self.batches, batch_size, logps_of)

    def forward(self, model, micro: tuple[list[PreferencePair], int]):
        pairs, step_pairs = micro
        ids, scored = pair_arrays(pairs, self.pad_id)
        with recorded_gates() as gates:  # an MoE policy's router logits (hwft.router_balance)
            chosen, rejected = mx.split(sequence_logps(model, ids, *scored, rows=pair_rows(pairs)), 2)
        ref = mx.array([p.reference_logps for p in pairs])
        chosen_tokens, rejected_tokens = mx.split(scored[2].sum(-1), 2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen,
            rejected,
            ref[:, 0],
            ref[:, 1],
            self.spec.beta,
            self.spec.loss,
            self.spec.label_smoothing,
            chosen_tokens,
            rejected_tokens,
        )
        margins = chosen_rewards - rejected_rewards
        stats = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": margins,
            "rewards/accuracy": (margins > 0).astype(mx.float32),
        }
        return with_router_term(self, model, gates, pairs, losses.sum() / step_pairs, stats)

    def counts(self, micro: tuple[list[PreferencePair], int]) -> Loss:
        return pair_counts(micro)


def build(setup) -> Preference:
    """dpo on MLX (hwft_mlx.methods.Setup -> the objective): the reference log-probabilities are
    precomputed from the starting model, so no second model is held."""
    job, recipe = setup.job, setup.job.recipe
    objective = Preference(
        setup.batches,
        recipe.method.dpo,
        recipe.train.gradient_accumulation_steps,
        setup.tokenizer.pad_token_id,
        setup.collective,
    )
    objective.precompute(setup.model, recipe.train.micro_batch_size)
    log_router(setup)
    job.log(f"dpo: reference log-probabilities of {len(setup.batches.rows)} pairs precomputed from the starting model")
    return objective
