"""The MLX half of the objectives (the shared half is :mod:`hwft.objective`), and the one for
sft and cpt.

An objective's ``loss(model, micro) -> Loss`` has one shape on every engine
(:class:`hwft.contract.EngineObjective`); on MLX it is the function ``nn.value_and_grad``
differentiates, its statistics arrays the engine evaluates with the gradient and then records.
:class:`MlxObjective` builds it from two halves: ``forward(model, micro) -> (value, statistic
arrays)``, the traced computation, and ``counts(micro) -> Loss``, the host-side token counts.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from hwft.data.batching import Row, pad, segment_ids
from hwft.data.chat import IGNORE_INDEX
from hwft.data.pipeline import Batches
from hwft.distributed import ALONE, Collective
from hwft.objective import Loss, Objective, sequence_pairs, step_label_count
from hwft_mlx.arrays import number
from hwft_mlx.forward import hidden_states, output_logits, packs
from hwft_mlx.loading import router_balance_of
from hwft_mlx.losses import cross_entropy_sum, load_balancing_loss
from hwft_mlx.media import is_vision
from hwft_mlx.router import recorded_gates
from hwft_mlx.vision import logits as vision_logits


class MlxObjective(Objective):
    def loss(self, model: nn.Module, micro) -> Loss:
        """The micro-batch's loss, counts and statistics: ``forward``'s value and arrays with
        ``counts``' numbers."""
        value, stats = self.forward(model, micro)
        return replace(self.counts(micro), value=value, stats=stats)

    def forward(self, model: nn.Module, micro) -> tuple[mx.array, dict[str, mx.array]]:
        """The traced part: the loss and its statistics as arrays (one value, or one per item)."""
        raise NotImplementedError

    def counts(self, micro) -> Loss:
        """The tokens computed and trained (and attended), from the micro-batch's host data."""
        raise NotImplementedError


def packed_segments(rows: list[Row], width: int) -> np.ndarray | None:
    """None when no row packs several examples, else (batch, width): the example of each
    position (:func:`hwft.data.batching.segment_ids`), from which :mod:`hwft_mlx.packing`
    builds each layer's block-diagonal mask."""
    if all(len(r.lengths) == 1 for r in rows):
        return None
    return np.array(segment_ids(rows, width))


def picked_labels(sequences: list[list[int]]) -> list[list[tuple[int, int]]]:
    """Per sequence of labels (-100 where no loss is taken), the (position, next label) pairs:
    the positions whose next token is a label, the only ones the loss needs logits for."""
    return [
        [(t, labels[t + 1]) for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX] for labels in sequences
    ]


def label_positions(rows: list[Row], width: int) -> tuple[mx.array, mx.array]:
    """Flat indices (row * width + t) of the label-predicting positions of right-padded rows,
    and their labels."""
    flat = [(b * width + t, y) for b, picked in enumerate(picked_labels([r.labels for r in rows])) for t, y in picked]
    return mx.array([i for i, _ in flat], dtype=mx.int32), mx.array([y for _, y in flat], dtype=mx.int32)


def summed_cross_entropy(model: nn.Module, rows: list[Row], pad_id: int, fused: bool) -> mx.array:
    """Summed next-token cross-entropy over the rows' label tokens.

    ``fused``: the output layer runs on the label positions' hidden states only (no logits for
    prompts or padding); otherwise on every position, and the label positions are picked from
    the logits. The same number either way.
    """
    ids = mx.array(pad(rows, pad_id)["input_ids"])
    width = ids.shape[1]
    where, targets = label_positions(rows, width)
    if is_vision(model):  # mlx-vlm's forward, the rows' images in (hwft_mlx.vision)
        logits = vision_logits(model, ids, mx.array(pad(rows, pad_id)["attention_mask"]), rows)
        return cross_entropy_sum(logits.reshape(-1, logits.shape[-1])[where], targets)
    if packs(model):
        hidden = hidden_states(model, ids, packed_segments(rows, width))
        flat = hidden.reshape(-1, hidden.shape[-1])
        logits = output_logits(model, flat[where]) if fused else output_logits(model, flat)[where]
    else:  # mlx-lm's own call: causal over the row (selection has ensured no packed rows)
        logits = model(ids)
        logits = logits.reshape(-1, logits.shape[-1])[where]
    return cross_entropy_sum(logits, targets)


def scored_positions(sequences: list[list[int]], width: int) -> tuple[mx.array, mx.array, mx.array]:
    """For right-padded rows of ``width``, given their labels: (n, C) flat indices of the
    label-predicting positions, those labels (0 past the end), and a mask (1 for real entries).
    C is the most labels in a row."""
    picked = picked_labels(sequences)
    longest = max(1, max(len(p) for p in picked))
    where = np.zeros((len(picked), longest), dtype=np.int32)
    targets = np.zeros((len(picked), longest), dtype=np.int32)
    mask = np.zeros((len(picked), longest), dtype=np.float32)
    for i, p in enumerate(picked):
        if p:
            where[i, : len(p)] = [i * width + t for t, _ in p]
            targets[i, : len(p)] = [y for _, y in p]
            mask[i, : len(p)] = 1
    return mx.array(where), mx.array(targets), mx.array(mask)


def position_logits(model: nn.Module, ids: mx.array, where: mx.array, rows: list[Row] | None = None) -> mx.array:
    """Logits of right-padded causal rows at the flat positions ``where`` (any shape): the
    output layer runs on those positions only. ``rows``: the rows ``ids`` pads, whose images a
    vision-language model sees (hwft_mlx.vision)."""
    if is_vision(model):  # mlx-vlm's forward, the rows' images in
        mask = mx.array(pad(rows, 0)["attention_mask"]) if rows else mx.ones_like(ids)
        logits = vision_logits(model, ids, mask, rows)
        return logits.reshape(-1, logits.shape[-1])[where]
    if not packs(model):
        logits = model(ids)
        return logits.reshape(-1, logits.shape[-1])[where]
    hidden = hidden_states(model, ids)
    return output_logits(model, hidden.reshape(-1, hidden.shape[-1])[where])


class LanguageModelling(MlxObjective):
    """sft and cpt: next-token cross-entropy on the label tokens of (packed) rows, normalised by
    the step's label tokens (``hwft_torch.losses.causal_lm_loss``)."""

    def __init__(self, batches: Batches, accumulation: int, pad_id: int, fused: bool, collective: Collective = ALONE):
        super().__init__(batches, collective)
        self.accumulation, self.pad_id, self.fused = accumulation, pad_id, fused

    def step(self, model, step: int) -> list[tuple[list[Row], int]]:
        return self.step_shares(self.accumulation, step_label_count)

    def forward(self, model, micro: tuple[list[Row], int]):
        rows, num_items = micro
        with recorded_gates() as gates:  # an MoE model's router logits (hwft_mlx.router); else none
            value = summed_cross_entropy(model, rows, self.pad_id, self.fused) / num_items
        term = router_term(self, model, gates, mx.array(pad(rows, self.pad_id)["attention_mask"]))
        return (value, {}) if term is None else (value + term[0], {"aux_loss": term[1]})

    def counts(self, micro: tuple[list[Row], int]) -> Loss:
        rows, _ = micro
        return Loss(
            None,
            sum(len(r.input_ids) for r in rows),
            sum(r.num_labels for r in rows),
            sequence_pairs(rows),
            tuple(i for r in rows for i in r.ids),
        )


def log_router(setup) -> None:
    """Say so where the objective adds an MoE router's load-balancing term (hwft.router_balance)."""
    balance = router_balance_of(setup.model)
    if balance is not None:
        setup.job.log(
            f"moe: router load-balancing loss in the {setup.job.recipe.method.objective} loss, coefficient "
            f"{balance.coefficient:g} ({balance.experts} experts, top {balance.top_k}; from the gates' "
            "logits); logged as aux_loss"
        )


def router_term(objective, model, gates: list[mx.array], mask: mx.array) -> tuple[mx.array, mx.array] | None:
    """(coefficient * L_aux / the step's micro-batches, L_aux) of an MoE model that balances its
    router (hwft.router_balance), from the gate logits its policy forward recorded; else None."""
    balance = router_balance_of(model)
    if balance is None or not gates:
        return None
    aux = load_balancing_loss(gates, balance.experts, balance.top_k, mask)
    return balance.coefficient * aux / objective.step_micro_batches, aux


def held_out_loss(model: nn.Module, rows: list[Row], pad_id: int, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy per label token over ``rows`` (``data.eval``), dropout off."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ordered = sorted(rows, key=lambda r: len(r.input_ids))
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        total += number(summed_cross_entropy(model, batch, pad_id, fused=True))
        count += sum(r.num_labels for r in batch)
    model.train(was_training)
    return total / max(count, 1)


class LabelPositionsCrossEntropy:
    """Kernel ``hwft_mlx_label_cross_entropy`` (slot cross_entropy, hwft.kernels): the output
    layer runs on the label positions' hidden states only (:func:`summed_cross_entropy` with
    ``fused``), where the model packs through hwft's own forward."""

    def __init__(self, job):
        self.job = job

    def check(self, model) -> str | None:
        return None if packs(model) else "mlx-lm's own forward computes every position's logits"

    def apply(self, model) -> str:
        return ""


def build(setup) -> LanguageModelling:
    """sft and cpt on MLX (hwft_mlx.methods.Setup -> the objective): the output layer on the
    label positions only where the cross_entropy kernel applied."""
    recipe = setup.job.recipe
    fused = setup.kernels is not None and setup.kernels.get("cross_entropy") is not None
    log_router(setup)
    return LanguageModelling(
        setup.batches, recipe.train.gradient_accumulation_steps, setup.tokenizer.pad_token_id, fused, setup.collective
    )
