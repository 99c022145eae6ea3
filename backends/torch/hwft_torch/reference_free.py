"""The reference-free preference objectives (orpo, simpo) on the torch engine: one forward of a
micro-batch's chosen and rejected sequences together (as dpo's, :func:`hwft_torch.dpo.pair_tensors`),
each answer's *mean* token log-probability under the policy, and a loss of those alone. No
reference model is held or run. Each method's module (:mod:`hwft_torch.orpo`,
:mod:`hwft_torch.simpo`) names its loss."""

from __future__ import annotations

import torch

from hwft.data.kinds.preference import PreferencePair
from hwft.data.pipeline import Batches
from hwft.distributed import ALONE, Collective
from hwft.objective import Loss, Objective, PairSteps
from hwft_torch.dpo import answer_logps, pair_tensors
from hwft_torch.objective import RouterBalanced, balance_router


class ReferenceFree(PairSteps, RouterBalanced, Objective):
    """A pair loss of the policy's mean answer log-probabilities (``pair_loss``), averaged over
    the optimizer step's pairs."""

    #: the statistics of ``pair_loss``'s result logged besides the rewards (orpo: nll, log_odds)
    extra: tuple[str, ...] = ()

    def __init__(
        self,
        batches: Batches,
        spec,
        accumulation: int,
        pad_id: int,
        device: torch.device,
        collective: Collective = ALONE,
    ):
        super().__init__(batches, collective)
        self.spec, self.accumulation, self.pad_id, self.device = spec, accumulation, pad_id, device

    def pair_loss(self, chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"losses", "chosen_rewards", "rejected_rewards", *extra}: per pair."""
        raise NotImplementedError

    def loss(self, model, micro: tuple[list[PreferencePair], int]) -> Loss:
        pairs, step_pairs = micro
        batch = pair_tensors(pairs, self.pad_id, self.device)
        router = [] if self.balance is not None else None
        chosen, rejected = answer_logps(model, batch, router)
        chosen_tokens, rejected_tokens = (batch["labels"][:, 1:] != -100).sum(-1).float().chunk(2)
        out = self.pair_loss(chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1))
        margins = out["chosen_rewards"] - out["rejected_rewards"]
        columns = {
            "rewards/chosen": out["chosen_rewards"].tolist(),
            "rewards/rejected": out["rejected_rewards"].tolist(),
            "rewards/margins": margins.tolist(),
            "rewards/accuracy": (margins > 0).float().tolist(),
            **{k: out[k].tolist() for k in self.extra},
        }
        for i in range(len(pairs)):
            self.note(**{k: v[i] for k, v in columns.items()})
        value = out["losses"].sum() / step_pairs
        if router:  # hwft.router_balance
            value = value + self.router_term(router[0], batch["attention_mask"])
        return Loss(value, int(batch["attention_mask"].sum()), int((chosen_tokens + rejected_tokens).sum()))


def build_with(objective: type[ReferenceFree], section: str):
    """A builder (hwft_torch.methods.Setup -> the objective) of a reference-free method whose
    settings are the recipe's method.<section>."""

    def build(setup) -> ReferenceFree:
        recipe = setup.job.recipe
        made = objective(
            setup.batches,
            getattr(recipe.method, section),
            recipe.train.gradient_accumulation_steps,
            setup.tokenizer.pad_token_id,
            setup.device,
            setup.collective,
        )
        balance_router(made, setup.model, setup.job)
        return made

    return build
