"""KTO on MLX: single answers marked desirable or undesirable (``hwft_torch.losses.kto_loss``).

A micro-batch's answers and their mismatched pairs (each prompt with another row's answer, fixed
when the data was prepared) run through the policy in one forward; the mismatched half's
log-probabilities are cut from the gradient, since the KL baseline is detached. The reference
log-probabilities of both are computed once, before the first update, from the model as it
starts, as dpo's on MLX (:mod:`hwft_mlx.preference`): no second model is held.
"""

from __future__ import annotations

import mlx.core as mx

from hwft.data.batching import Row, pad
from hwft.data.chat import Tokenized
from hwft.data.kinds.feedback import FeedbackItem
from hwft.data.pipeline import Batches
from hwft.distributed import ALONE, Collective
from hwft.methods.kto import KtoSpec, balance_note
from hwft.objective import FeedbackSteps, Loss, feedback_counts, precompute_reference
from hwft_mlx.losses import kto_loss
from hwft_mlx.objective import MlxObjective, log_router, router_term, scored_positions
from hwft_mlx.preference import sequence_logps
from hwft_mlx.router import recorded_gates


def sequence_arrays(sequences: list[Tokenized], pad_id: int) -> tuple[mx.array, tuple[mx.array, mx.array, mx.array]]:
    """Right-padded token rows of the sequences, and their scored positions."""
    ids = pad([Row(t.input_ids, t.labels, [len(t.input_ids)]) for t in sequences], pad_id)["input_ids"]
    return mx.array(ids), scored_positions([t.labels for t in sequences], len(ids[0]))


def both_logps(model, items: list[FeedbackItem], pad_id: int) -> tuple[mx.array, mx.array]:
    """Summed answer log-probabilities of the items' own answers and of their mismatched pairs."""
    ids, scored = sequence_arrays([i.sequence for i in items] + [i.mismatched for i in items], pad_id)
    own, mismatched = mx.split(sequence_logps(model, ids, *scored), 2)
    return own, mismatched


class Feedback(FeedbackSteps, MlxObjective):
    def __init__(self, batches: Batches, spec: KtoSpec, accumulation: int, pad_id: int, collective: Collective = ALONE):
        super().__init__(batches, collective)
        self.spec, self.accumulation, self.pad_id = spec, accumulation, pad_id

    def precompute(self, model, batch_size: int) -> None:
        """Reference log-probabilities of every answer and mismatched pair under ``model`` as it is now."""
        precompute_reference(
            model,
            self.batches,
            batch_size,
            lambda m, chunk: mx.stack(list(both_logps(m, chunk, self.pad_id)), axis=1).tolist(),
        )

    def forward(self, model, micro: tuple[list[FeedbackItem], int]):
        items, step_items = micro
        with recorded_gates() as gates:  # an MoE policy's router logits (hwft.router_balance)
            own, mismatched = both_logps(model, items, self.pad_id)
        ref = mx.array([i.reference_logps for i in items])
        desirable = mx.array([i.desirable for i in items])
        s = self.spec
        out = kto_loss(
            own,
            ref[:, 0],
            mx.stop_gradient(mismatched),
            ref[:, 1],
            desirable,
            s.beta,
            s.desirable_weight,
            s.undesirable_weight,
        )
        stats = {"kl": out["kl"]}
        for key, want in (("rewards/chosen", True), ("rewards/rejected", False)):
            index = [n for n, i in enumerate(items) if i.desirable == want]
            if index:
                stats[key] = mx.take(out["rewards"], mx.array(index))
        # the router term of the answers' rows only (the mismatched ones weigh 0), as torch's and TRL's
        sequences = [i.sequence for i in items] + [i.mismatched for i in items]
        width = max(len(t.input_ids) for t in sequences)
        lengths = mx.array([len(t.input_ids) if n < len(items) else 0 for n, t in enumerate(sequences)])
        term = router_term(self, model, gates, (mx.arange(width)[None] < lengths[:, None]).astype(mx.float32))
        value = out["losses"].sum() / step_items
        return (value, stats) if term is None else (value + term[0], {**stats, "aux_loss": term[1]})

    def counts(self, micro: tuple[list[FeedbackItem], int]) -> Loss:
        return feedback_counts(micro)


def build(setup) -> Feedback:
    """kto on MLX (hwft_mlx.methods.Setup -> the objective): the reference log-probabilities are
    precomputed from the starting model, so no second model is held."""
    job, recipe = setup.job, setup.job.recipe
    spec = recipe.method.kto
    items = setup.batches.rows
    note = balance_note(sum(i.desirable for i in items), sum(not i.desirable for i in items), spec)
    if note:
        job.log(note)
    objective = Feedback(
        setup.batches, spec, recipe.train.gradient_accumulation_steps, setup.tokenizer.pad_token_id, setup.collective
    )
    objective.precompute(setup.model, recipe.train.micro_batch_size)
    job.log(
        f"kto: reference log-probabilities of {len(items)} answers and their mismatched pairs precomputed "
        "from the starting model"
    )
    log_router(setup)
    return objective
