"""KTO: single answers marked desirable or undesirable, against a frozen reference policy
(:func:`hwft_torch.losses.kto_loss`).

A micro-batch's answers run through the policy with gradients; their mismatched pairs (each
prompt with another row's answer, fixed when the data was prepared) run through it without,
since the KL baseline is detached. The reference scores both: the base with the adapter
disabled (lora, qlora), a frozen copy (full), or log-probabilities computed once before training
(``reference: precomputed``; then no reference model is held).
"""

from __future__ import annotations

import torch

from hwft.data.batching import Row, pad
from hwft.data.chat import Tokenized
from hwft.data.kinds.feedback import FeedbackItem
from hwft.data.pipeline import Batches
from hwft.distributed import ALONE, Collective
from hwft.methods.kto import KtoSpec, balance_note
from hwft.objective import FeedbackSteps, Loss, Objective, precompute_reference
from hwft_torch.losses import kto_loss, token_logps
from hwft_torch.modeling import Reference, with_reference
from hwft_torch.objective import RouterBalanced, balance_router


def sequence_tensors(sequences: list[Tokenized], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels of the sequences, right-padded."""
    batch = pad([Row(t.input_ids, t.labels, [len(t.input_ids)]) for t in sequences], pad_id)
    return {k: torch.tensor(batch[k], device=device) for k in ("input_ids", "attention_mask", "labels")}


def summed_logps(model, batch: dict[str, torch.Tensor], router: list | None = None) -> torch.Tensor:
    """Each row's summed log-probability of its label tokens; with ``router`` a list, the
    forward's router logits are appended to it (an MoE policy)."""
    routed = {"output_router_logits": True} if router is not None else {}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **routed)
    if router is not None:
        router.append(out.router_logits)
    return token_logps(out.logits, batch["labels"]).sum(-1)


class Feedback(FeedbackSteps, RouterBalanced, Objective):
    def __init__(
        self,
        batches: Batches,
        spec: KtoSpec,
        accumulation: int,
        pad_id: int,
        device: torch.device,
        reference: Reference | None,
        collective: Collective = ALONE,
    ):
        super().__init__(batches, collective)
        self.spec, self.accumulation, self.pad_id, self.device = spec, accumulation, pad_id, device
        self.reference = reference  #: None: every item carries precomputed reference log-probs

    def tensors(self, sequences: list[Tokenized]) -> dict[str, torch.Tensor]:
        return sequence_tensors(sequences, self.pad_id, self.device)

    @torch.no_grad()
    def precompute(self, model, batch_size: int) -> None:
        """Reference log-probabilities of every answer and mismatched pair under ``model`` as it
        is now (before the first update the policy is the reference), stored on the items."""

        def logps_of(model, chunk):
            both = summed_logps(model, self.tensors([i.sequence for i in chunk] + [i.mismatched for i in chunk]))
            return torch.stack(both.chunk(2), dim=1).tolist()

        precompute_reference(model, self.batches, batch_size, logps_of)

    def loss(self, model, micro: tuple[list[FeedbackItem], int]) -> Loss:
        items, step_items = micro
        own = self.tensors([i.sequence for i in items])
        other = self.tensors([i.mismatched for i in items])
        router = [] if self.balance is not None else None
        logps = summed_logps(model, own, router)  # the router term is of the answers' forward, as TRL's
        with torch.no_grad():
            mismatched = summed_logps(model, other)
        if self.reference is None:
            ref = torch.tensor([i.reference_logps for i in items], device=self.device)
            ref_logps, ref_mismatched = ref[:, 0], ref[:, 1]
        else:
            with self.reference.active() as reference_model:
                ref_logps, ref_mismatched = summed_logps(reference_model, own), summed_logps(reference_model, other)
        desirable = torch.tensor([i.desirable for i in items], device=self.device)
        s = self.spec
        out = kto_loss(
            logps, ref_logps, mismatched, ref_mismatched, desirable, s.beta, s.desirable_weight, s.undesirable_weight
        )
        for item, reward in zip(items, out["rewards"].tolist(), strict=True):
            self.note(**{"rewards/chosen" if item.desirable else "rewards/rejected": reward})
        self.note(kl=out["kl"].item())
        tokens = int(own["attention_mask"].sum() + other["attention_mask"].sum())
        value = out["losses"].sum() / step_items
        if router:  # hwft.router_balance
            value = value + self.router_term(router[0], own["attention_mask"])
        return Loss(value, tokens, sum(i.sequence.num_labels for i in items))


def build(setup) -> Feedback:
    """kto on the torch engine (hwft_torch.methods.Setup -> the objective). A continued adapter
    is its own reference: the starting policy, precomputed."""
    job, recipe = setup.job, setup.job.recipe
    spec = recipe.method.kto
    items = setup.batches.rows
    note = balance_note(sum(i.desirable for i in items), sum(not i.desirable for i in items), spec)
    if note:
        job.log(note)
    objective = with_reference(
        setup,
        spec,
        lambda reference: Feedback(
            setup.batches,
            spec,
            recipe.train.gradient_accumulation_steps,
            setup.tokenizer.pad_token_id,
            setup.device,
            reference,
            setup.collective,
        ),
        f"kto: reference log-probabilities of {len(items)} answers and their mismatched pairs",
    )
    balance_router(objective, setup.model, job)
    return objective
