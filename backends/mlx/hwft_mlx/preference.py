"""DPO on MLX: preference pairs against the starting policy (``hwft_torch.losses.dpo_loss``).

One forward computes a micro-batch's chosen and rejected sequences together (rows ``[chosen...,
rejected...]``, right-padded). The reference log-probabilities are always computed once, before
the first update, from the model as it starts (the base for a new adapter, the continued
adapter, or the full model): the same numbers torch's reference model gives, with no second
model held.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from hwft.data.batching import Row, pad
from hwft.data.chat import IGNORE_INDEX, PreferencePair
from hwft.data.pipeline import Batches
from hwft.objective import Loss
from hwft.recipe import DpoSpec
from hwft_mlx.losses import dpo_loss, target_logps
from hwft_mlx.modeling import hidden_states, output_logits, packs
from hwft_mlx.objective import MlxObjective


def logits_of(model, ids: mx.array) -> mx.array:
    """Causal logits of right-padded rows (padding comes after every real token, so it changes
    nothing before it)."""
    return output_logits(model, hidden_states(model, ids, "causal")) if packs(model) else model(ids)


def sequence_logps(model, ids: mx.array, labels: mx.array) -> mx.array:
    """Summed log-probabilities of each row's label tokens (``token_logps(...).sum(-1)``)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logps = target_logps(logits_of(model, ids)[:, :-1], mx.where(keep, targets, 0))
    return (logps * keep).sum(-1)


def pair_arrays(pairs: list[PreferencePair], pad_id: int) -> tuple[mx.array, mx.array, np.ndarray]:
    rows = [Row(t.input_ids, t.labels, [len(t.input_ids)]) for t in
            [p.chosen for p in pairs] + [p.rejected for p in pairs]]
    batch = pad(rows, pad_id)
    labels = np.array(batch["labels"])
    return mx.array(batch["input_ids"]), mx.array(labels), labels


class Preference(MlxObjective):
    def __init__(self, batches: Batches, spec: DpoSpec, accumulation: int, pad_id: int):
        super().__init__(batches)
        self.spec, self.accumulation, self.pad_id = spec, accumulation, pad_id

    def precompute(self, model, batch_size: int) -> None:
        """Reference log-probabilities of every pair under ``model`` as it is now."""
        was_training = model.training
        model.eval()
        pairs = self.batches.rows
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            ids, labels, _ = pair_arrays(chunk, self.pad_id)
            chosen, rejected = mx.split(sequence_logps(model, ids, labels), 2)
            for pair, c, r in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True):
                pair.reference_logps = (c, r)
        model.train(was_training)

    def step(self, model, step: int) -> list[tuple[list[PreferencePair], int]]:
        micro = self.draw(self.accumulation)
        pairs = sum(len(batch) for batch in micro)
        return [(batch, pairs) for batch in micro]

    def loss(self, model, micro: tuple[list[PreferencePair], int]):
        pairs, step_pairs = micro
        ids, labels, host = pair_arrays(pairs, self.pad_id)
        chosen, rejected = mx.split(sequence_logps(model, ids, labels), 2)
        ref = mx.array([p.reference_logps for p in pairs])
        counts = (host[:, 1:] != IGNORE_INDEX).sum(-1).astype(np.float32)
        chosen_tokens, rejected_tokens = (mx.array(c) for c in np.split(counts, 2))
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref[:, 0], ref[:, 1], self.spec.beta, self.spec.loss,
            self.spec.label_smoothing, chosen_tokens, rejected_tokens,
        )
        margins = chosen_rewards - rejected_rewards
        stats = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                 "rewards/margins": margins, "rewards/accuracy": (margins > 0).astype(mx.float32)}
        return losses.sum() / step_pairs, stats

    def counts(self, micro: tuple[list[PreferencePair], int]) -> Loss:
        pairs, _ = micro
        seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        return Loss(None, sum(len(t.input_ids) for t in seqs), sum(t.num_labels for t in seqs))
