"""rm: a Bradley-Terry reward model on preference pairs (:func:`hwft_torch.losses.reward_model_loss`).

The model is transformers' ``AutoModelForSequenceClassification`` with one label (loaded so by
the method's ``score`` head, :data:`hwft_torch.modeling.HEADS`): its forward reads the ``score``
layer at each row's last non-padding token. One forward scores a micro-batch's chosen and
rejected sequences together (rows ``[chosen..., rejected...]``, right-padded, as dpo's).
"""

from __future__ import annotations

import torch

from hwft.data.kinds.preference import PreferencePair
from hwft.data.pipeline import Batches
from hwft.distributed import ALONE, Collective
from hwft.methods.rm import RmSpec
from hwft.objective import Loss, Objective, PairSteps
from hwft_torch.dpo import model_inputs, pair_tensors
from hwft_torch.losses import reward_model_loss


def sequence_rewards(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One scalar reward per row."""
    out = model(**model_inputs(batch), use_cache=False)
    return out.logits.squeeze(-1).float()


class RewardModel(PairSteps, Objective):
    def __init__(
        self,
        batches: Batches,
        spec: RmSpec,
        accumulation: int,
        pad_id: int,
        device: torch.device,
        collective: Collective = ALONE,
    ):
        super().__init__(batches, collective)
        self.spec, self.accumulation, self.pad_id, self.device = spec, accumulation, pad_id, device

    def loss(self, model, micro: tuple[list[PreferencePair], int]) -> Loss:
        pairs, step_pairs = micro
        batch = pair_tensors(pairs, self.pad_id, self.device)
        chosen, rejected = sequence_rewards(model, batch).chunk(2)
        losses = reward_model_loss(chosen, rejected, self.spec.margin, self.spec.center_rewards_coefficient)
        margins = (chosen - rejected).detach()
        for c, r, m in zip(chosen.tolist(), rejected.tolist(), margins.tolist(), strict=True):
            self.note(
                **{"rewards/chosen": c, "rewards/rejected": r, "rewards/margins": m, "rewards/accuracy": float(m > 0)}
            )
        tokens = int(batch["attention_mask"].sum())
        return Loss(losses.sum() / step_pairs, tokens, len(pairs) * 2)


def build(setup) -> RewardModel:
    """rm on the torch engine (hwft_torch.methods.Setup -> the objective). The score head reads
    each row at its last token that is not the tokenizer's padding token."""
    recipe = setup.job.recipe
    setup.model.config.pad_token_id = setup.tokenizer.pad_token_id
    return RewardModel(
        setup.batches,
        recipe.method.rm,
        recipe.train.gradient_accumulation_steps,
        setup.tokenizer.pad_token_id,
        setup.device,
        setup.collective,
    )
