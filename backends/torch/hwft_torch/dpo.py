"""DPO: preference pairs against a frozen reference policy (:func:`hwft_torch.losses.dpo_loss`).

One forward computes a micro-batch's chosen and rejected sequences together (rows ``[chosen...,
rejected...]``, right-padded); the answers' summed token log-probabilities under the policy and
the reference give the loss. The reference is the base with the adapter disabled (lora, qlora),
a frozen copy (full), or log-probabilities computed once before training (``reference:
precomputed``; then no reference model is held at all).
"""

from __future__ import annotations

import torch

from hwft.data.batching import Row, pad
from hwft.data.kinds.preference import PreferencePair
from hwft.data.pipeline import Batches
from hwft.distributed import ALONE, Collective
from hwft.methods.dpo import DpoSpec
from hwft.objective import Loss, Objective, PairSteps, precompute_reference
from hwft_torch.losses import dpo_loss, token_logps
from hwft_torch.modeling import Reference, with_reference
from hwft_torch.objective import RouterBalanced, balance_router, media_tensors


def pair_tensors(pairs: list[PreferencePair], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels of ``[chosen..., rejected...]``, right-padded; with
    image prompts (hwft.vision) their pixels too, each sequence's in the same order."""
    rows = [
        Row(t.input_ids, t.labels, [len(t.input_ids)], inputs=t.inputs, token_inputs=t.token_inputs)
        for t in [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ]
    batch = {k: torch.tensor(v) for k, v in pad(rows, pad_id).items() if k in ("input_ids", "attention_mask", "labels")}
    batch.update(media_tensors(rows, batch["input_ids"].shape[1]))
    return {k: v.to(device) for k, v in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What of a pair batch the forward takes: all but the labels."""
    return {k: v for k, v in batch.items() if k != "labels"}


def answer_logps(
    model, batch: dict[str, torch.Tensor], router: list | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each row's label tokens, split into (chosen, rejected);
    with ``router`` a list, the forward's router logits are appended to it (an MoE policy)."""
    routed = {"output_router_logits": True} if router is not None else {}
    out = model(**model_inputs(batch), use_cache=False, **routed)
    if router is not None:
        router.append(out.router_logits)
    chosen, rejected = token_logps(out.logits, batch["labels"]).sum(-1).chunk(2)
    return chosen, rejected


class Preference(PairSteps, RouterBalanced, Objective):
    def __init__(
        self,
        batches: Batches,
        spec: DpoSpec,
        accumulation: int,
        pad_id: int,
        device: torch.device,
        reference: Reference | None,
        collective: Collective = ALONE,
    ):
        super().__init__(batches, collective)
        self.spec, self.accumulation, self.pad_id, self.device = spec, accumulation, pad_id, device
        self.reference = reference  #: None: every pair carries precomputed reference log-probs

    @torch.no_grad()
    def precompute(self, model, batch_size: int) -> None:
        """Reference log-probabilities of every pair under ``model`` as it is now (before the
        first update the policy is the reference), stored on the pairs."""

        def logps_of(model, chunk):
            return torch.stack(answer_logps(model, pair_tensors(chunk, self.pad_id, self.device)), dim=1).tolist()

        precompute_reference(model, self.batches, batch_size, logps_of)

    def loss(self, model, micro: tuple[list[PreferencePair], int]) -> Loss:
        pairs, step_pairs = micro
        batch = pair_tensors(pairs, self.pad_id, self.device)
        router = [] if self.balance is not None else None
        chosen, rejected = answer_logps(model, batch, router)
        if self.reference is None:
            ref = torch.tensor([p.reference_logps for p in pairs], device=self.device)
            ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
        else:
            with self.reference.active() as reference_model:
                ref_chosen, ref_rejected = answer_logps(reference_model, batch)
        counts = (batch["labels"][:, 1:] != -100).sum(-1).float().chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            self.spec.beta,
            self.spec.loss,
            self.spec.label_smoothing,
            *counts,
        )
        margins = chosen_rewards - rejected_rewards
        for c, r, m in zip(chosen_rewards.tolist(), rejected_rewards.tolist(), margins.tolist(), strict=True):
            self.note(
                **{"rewards/chosen": c, "rewards/rejected": r, "rewards/margins": m, "rewards/accuracy": float(m > 0)}
            )
        value = losses.sum() / step_pairs
        if router:  # hwft.router_balance, of the policy's forward
            value = value + self.router_term(router[0], batch["attention_mask"])
        return Loss(value, int(batch["attention_mask"].sum()), int((counts[0] + counts[1]).sum()))


def build(setup) -> Preference:
    """dpo on the torch engine (hwft_torch.methods.Setup -> the objective). A continued adapter
    is its own reference: the starting policy, precomputed."""
    recipe = setup.job.recipe
    spec = recipe.method.dpo
    objective = with_reference(
        setup,
        spec,
        lambda reference: Preference(
            setup.batches,
            spec,
            recipe.train.gradient_accumulation_steps,
            setup.tokenizer.pad_token_id,
            setup.device,
            reference,
            setup.collective,
        ),
        f"dpo: reference log-probabilities of {len(setup.batches.rows)} pairs",
    )
    balance_router(objective, setup.model, setup.job)
    return objective
