# mlx's nn.Module.__getattr__ has no return annotation, so pyright reads each child module
# (``model.args``, ``glu.gate_proj``) as possibly None:
# pyright: reportOptionalMemberAccess=false, reportOptionalCall=false
"""rm on MLX: a Bradley-Terry reward model (``hwft_torch.losses.reward_model_loss``).

The model is mlx-lm's with a ``score`` head added (:func:`hwft_mlx.heads.add_score_head`);
a sequence's reward is the head applied to the decoder's last hidden state at its last
non-padding token (:func:`hwft_mlx.heads.last_tokens`, where transformers reads it). One
forward scores a micro-batch's chosen and rejected sequences together, as dpo's.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from hwft.data.batching import Row, pad
from hwft.data.kinds.preference import PreferencePair
from hwft.data.pipeline import Batches
from hwft.distributed import ALONE, Collective
from hwft.methods.rm import RmSpec
from hwft.objective import Loss, PairSteps, pair_counts
from hwft_mlx.forward import hidden_states
from hwft_mlx.heads import last_tokens
from hwft_mlx.losses import reward_model_loss
from hwft_mlx.objective import MlxObjective


def sequence_rewards(model: nn.Module, ids: list[list[int]], pad_id: int) -> mx.array:
    """One scalar reward per right-padded row of ``ids``."""
    hidden = hidden_states(model, mx.array(ids))
    width = hidden.shape[1]
    where = mx.array([b * width + t for b, t in enumerate(last_tokens(ids, pad_id))])
    return model.score(hidden.reshape(-1, hidden.shape[-1])[where]).squeeze(-1).astype(mx.float32)


class RewardModel(PairSteps, MlxObjective):
    def __init__(self, batches: Batches, spec: RmSpec, accumulation: int, pad_id: int, collective: Collective = ALONE):
        super().__init__(batches, collective)
        self.spec, self.accumulation, self.pad_id = spec, accumulation, pad_id

    def forward(self, model, micro: tuple[list[PreferencePair], int]):
        pairs, step_pairs = micro
        seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        ids = pad([Row(t.input_ids, t.labels, [len(t.input_ids)]) for t in seqs], self.pad_id)["input_ids"]
        chosen, rejected = mx.split(sequence_rewards(model, ids, self.pad_id), 2)
        losses = reward_model_loss(chosen, rejected, self.spec.margin, self.spec.center_rewards_coefficient)
        margins = mx.stop_gradient(chosen - rejected)
        stats = {
            "rewards/chosen": mx.stop_gradient(chosen),
            "rewards/rejected": mx.stop_gradient(rejected),
            "rewards/margins": margins,
            "rewards/accuracy": (margins > 0).astype(mx.float32),
        }
        return losses.sum() / step_pairs, stats

    def counts(self, micro: tuple[list[PreferencePair], int]) -> Loss:
        pairs, _ = micro
        counted = pair_counts(micro)
        return Loss(None, counted.tokens, 2 * len(pairs))


def build(setup) -> RewardModel:
    """rm on MLX (hwft_mlx.methods.Setup -> the objective)."""
    recipe = setup.job.recipe
    return RewardModel(
        setup.batches,
        recipe.method.rm,
        recipe.train.gradient_accumulation_steps,
        setup.tokenizer.pad_token_id,
        setup.collective,
    )
